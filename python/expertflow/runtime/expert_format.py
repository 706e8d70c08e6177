"""How each expert is packed in the host store, copied to a slot and expanded for compute.

An experts module's per-expert tensors (:func:`~expertflow.runtime.experts.expert_param_names`:
the up or gate-up weight, its bias, the down weight, its bias) are its *logical* tensors. A
format packs each weight into a few tensors (codes and scales, see :mod:`expertflow.formats`)
always in the formats' ``[out, in]`` orientation, whatever the module's ``is_transposed``;
biases stay in the compute dtype. The host store and the slots hold exactly these packed bytes,
so every copy moves the packed size; :meth:`ExpertPacking.unpack` expands a slot's tensors on
the slot's device back to the logical tensors the family's expert code multiplies with.

The float format packs nothing: an expert is its logical tensors, as before formats existed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from expertflow import formats, ops
from expertflow.runtime.experts import expert_param_names

__all__ = [
    "DEFAULT_INT4_GROUP",
    "EXPERT_FORMATS",
    "ExpertPacking",
    "WeightCodec",
    "codec_for",
]

EXPERT_FORMATS = ("auto", "int8", "int4", "fp8", "mxfp4")
QUANTIZED_FORMATS = EXPERT_FORMATS[1:]
# int4's group size when none is given: see README "Quantized experts" (bench_quantized.py).
DEFAULT_INT4_GROUP = 64
FP8_BLOCK = (128, 128)


class WeightCodec:
    """Packs one ``[out, in]`` float weight into a list of tensors and expands it back.

    Attributes:
        name: the format's name.
        row_splittable: whether packing rows ``[a, b)`` alone gives rows ``[a, b)`` of every
            packed tensor (true of per-row formats; a checkpoint's fused weights can then be
            packed one source at a time).
    """

    name = ""
    row_splittable = True

    def check(self, out: int, inp: int, where: str) -> None:
        """Refuses a weight shape the format cannot hold, naming ``where``."""

    def layout(self, out: int, inp: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def pack(self, w: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def unpack(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Int8Codec(WeightCodec):
    name = "int8"

    def layout(self, out, inp):
        return [((out, inp), torch.int8), ((out,), torch.float32)]

    def pack(self, w):
        return list(formats.quantize_int8(w))

    def unpack(self, parts, dtype):
        return ops.dequantize_int8(parts[0], parts[1], dtype)


class Int4Codec(WeightCodec):
    def __init__(self, group_size: int | None):
        self.group_size = group_size  # None: DEFAULT_INT4_GROUP or the largest that fits
        self.name = "int4" if group_size is None else f"int4 (group {group_size})"

    def group_for(self, inp: int) -> int:
        """The group for a weight with ``inp`` input columns: the one given, else the default
        or, where that does not divide ``inp``, their greatest common divisor."""
        return self.group_size or math.gcd(inp, DEFAULT_INT4_GROUP)

    def check(self, out, inp, where):
        if inp % 2:
            raise ValueError(f"expert_format='int4': {where} has an odd input size {inp}")
        if self.group_size is not None and inp % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the input size {inp} of {where}"
            )

    def layout(self, out, inp):
        g = self.group_for(inp)
        return [((out, inp // 2), torch.uint8), ((out, inp // g), torch.float32)]

    def pack(self, w):
        return list(formats.quantize_int4(w, self.group_for(w.shape[1])))

    def unpack(self, parts, dtype):
        g = self.group_for(parts[0].shape[1] * 2)
        return ops.dequantize_int4(parts[0], parts[1], g, dtype)


class Fp8Codec(WeightCodec):
    """e4m3 with one float32 scale per ``block`` tile. Rows split only at tile boundaries."""

    name = "fp8"
    row_splittable = False

    def __init__(self, block: tuple[int, int] = FP8_BLOCK):
        self.block = tuple(block)

    def layout(self, out, inp):
        tiles = (-(-out // self.block[0]), -(-inp // self.block[1]))
        return [((out, inp), torch.float8_e4m3fn), (tiles, torch.float32)]

    def pack(self, w):
        return list(formats.quantize_fp8_block(w, self.block))

    def unpack(self, parts, dtype):
        return ops.dequantize_fp8_block(parts[0], parts[1], self.block, dtype)


class Mxfp4Codec(WeightCodec):
    name = "mxfp4"

    def check(self, out, inp, where):
        if inp % formats.MXFP4_BLOCK:
            raise ValueError(
                f"expert_format='mxfp4': the input size {inp} of {where} is not a multiple of "
                f"{formats.MXFP4_BLOCK}"
            )

    def layout(self, out, inp):
        n = inp // formats.MXFP4_BLOCK
        return [((out, n, formats.MXFP4_BLOCK // 2), torch.uint8), ((out, n), torch.uint8)]

    def pack(self, w):
        return list(formats.quantize_mxfp4(w))

    def unpack(self, parts, dtype):
        return ops.dequantize_mxfp4(parts[0], parts[1], dtype)


def codec_for(expert_format: str, group_size: int | None = None) -> WeightCodec | None:
    """The codec of a quantized ``expert_format``; None for the float format."""
    if expert_format == "auto":
        return None
    if expert_format == "int4":
        return Int4Codec(group_size)
    return {"int8": Int8Codec, "fp8": Fp8Codec, "mxfp4": Mxfp4Codec}[expert_format]()


class ExpertPacking:
    """One experts module's packing: which tensors an expert has in the store, and how they
    become the module's logical tensors again.

    Args:
        name: the module's qualified name (for messages).
        module: a transformers experts module (its tensors may be on the meta device).
        codec: the weights' codec, or None to keep the logical tensors as they are.
        chunks: per logical tensor, how many row chunks (of the ``[out, in]`` weight) are
            packed each on its own, for a codec that cannot pack rows apart
            (``row_splittable`` false, such as fp8's tiles) and a checkpoint that gives a
            weight as several sources (gate and up); :meth:`unpack` concatenates the chunks
            along ``out``. Default: one chunk each, the whole weight.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        codec: WeightCodec | None,
        chunks: list[int] | None = None,
    ):
        self.codec = codec
        self.names = expert_param_names(module)
        self.transposed = bool(module.is_transposed)
        self.dtype = module.down_proj.dtype  # the compute dtype
        # per logical tensor: its [out, in] shape (None for a bias) and packed-tensor count
        self._shapes = []
        # per logical tensor: the row chunks its weight is packed as, each on its own (1: whole)
        self._chunks = list(chunks) if chunks is not None else [1] * len(self.names)
        for attr, n in zip(self.names, self._chunks, strict=True):
            shape = tuple(getattr(module, attr).shape[1:])
            if attr.endswith("_bias") or codec is None:
                self._shapes.append(None)
                continue
            out, inp = (shape[1], shape[0]) if self.transposed else shape
            codec.check(out, inp, f"{name}.{attr}")
            if n < 1 or out % n:
                raise ValueError(f"{name}.{attr}: {out} output rows do not split into {n} chunks")
            self._shapes.append((out, inp))
        self._ranges = self._part_ranges()

    @property
    def format_name(self) -> str:
        return "float" if self.codec is None else self.codec.name

    def part_ranges(self) -> list[range]:
        """For each logical tensor, the positions of its packed tensors in an expert's list."""
        return list(self._ranges)

    def _part_ranges(self) -> list[range]:
        ranges, start = [], 0
        for index, shape in enumerate(self._shapes):
            n = 1 if shape is None else len(self._chunk_layout(index)) * self._chunks[index]
            ranges.append(range(start, start + n))
            start += n
        return ranges

    def _chunk_layout(self, index: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The codec's layout of one row chunk of logical weight ``index``."""
        out, inp = self._shapes[index]
        return self.codec.layout(out // self._chunks[index], inp)

    def chunk_ranges(self, index: int) -> list[range]:
        """For logical tensor ``index``, the positions of each row chunk's packed tensors in an
        expert's list (one range, the whole tensor, unless it was packed in chunks)."""
        whole = self._ranges[index]
        if self._shapes[index] is None or self._chunks[index] == 1:
            return [whole]
        k = len(self._chunk_layout(index))
        return [
            range(whole.start + c * k, whole.start + (c + 1) * k)
            for c in range(self._chunks[index])
        ]

    def layout(self, module: nn.Module) -> list[torch.Tensor]:
        """One expert's packed tensors as meta tensors (shapes and dtypes only)."""
        out = []
        for index, (attr, shape) in enumerate(zip(self.names, self._shapes, strict=True)):
            if shape is None:
                t = getattr(module, attr)
                out.append(torch.empty(t.shape[1:], dtype=t.dtype, device="meta"))
            else:
                layout = self._chunk_layout(index) * self._chunks[index]
                out += [torch.empty(s, dtype=d, device="meta") for s, d in layout]
        return out

    def oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """A logical weight in the formats' ``[out, in]`` orientation."""
        return weight.t() if self.transposed else weight

    def pack(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """One expert's logical tensors (module orientation) to its packed tensors."""
        if self.codec is None:
            return list(tensors)
        out = []
        for t, shape, n in zip(tensors, self._shapes, self._chunks, strict=True):
            if shape is None:
                out.append(t)
                continue
            for chunk in self.oriented(t).split(shape[0] // n):
                out += self.codec.pack(chunk)
        return out

    def unpack(self, packed: list[torch.Tensor]) -> list[torch.Tensor]:
        """A slot's (or the store's) packed tensors to the logical tensors, module orientation,
        in the compute dtype, on the tensors' device."""
        if self.codec is None:
            return packed
        out = []
        for index, (r, shape) in enumerate(zip(self._ranges, self._shapes, strict=True)):
            if shape is None:
                out.append(packed[r.start])
                continue
            chunks = [
                self.codec.unpack([packed[i] for i in c], self.dtype)
                for c in self.chunk_ranges(index)
            ]
            w = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            out.append(w.t() if self.transposed else w)
        return out
