"""Writing a checkpoint's expert pieces into the host store in its packed format.

A float piece (one expert of an ``[E, ...]`` stack, or one expert's part of a merged stack) is
read into a temporary of the compute dtype, oriented ``[out, in]`` and packed with the codec
(quantized while streaming: never the whole float experts on the host). A shipped packed piece
(fp8 codes or scales, GPT-OSS's ``*_blocks`` / ``*_scales``) is read straight into its place.
Row-splittable codecs pack a part's rows on their own into rows of the packed tensors; fp8
packs each source part as its own row chunk (:class:`ExpertPacking`'s ``chunks``).
"""

from __future__ import annotations

import torch

from expertflow.formats.mxfp4 import E8M0_NAN
from expertflow.runtime.checkpoint import SAFETENSORS_DTYPES, Shard
from expertflow.runtime.checkpoint_plan import Entry

__all__ = ["check_complete", "check_expert_entries", "expected_tracks", "write_expert_piece"]


def _packed(packing, entry: Entry) -> bool:
    """Whether the entry's stack is packed by a codec (a weight with a quantized format)."""
    return packing.codec is not None and entry.stack.is_weight


def _split(packing, entry: Entry) -> tuple[int, int, bool]:
    """(part, parts, chunked): which source part the piece is, and whether parts are packed
    as chunks of their own (else as row ranges of the packed tensors)."""
    part, parts = (0, 1) if entry.piece is None else entry.piece[1:]
    chunked = parts > 1 and len(packing.chunk_ranges(entry.stack.index)) == parts
    return part, parts, chunked


def _position(packing, entry: Entry) -> int:
    """The packed tensor a codes/scales/float-as-is piece is read into."""
    index = entry.stack.index
    which = 1 if entry.role == "scales" else 0
    if not _packed(packing, entry):
        return packing.part_ranges()[index].start
    part, _, chunked = _split(packing, entry)
    return packing.chunk_ranges(index)[part if chunked else 0][which]


def _expected(packing, module, layout, entry: Entry) -> tuple[list[int], torch.dtype | None]:
    """One expert's shape of the piece, and its required dtype (None: any, converted)."""
    _, parts, chunked = _split(packing, entry)
    if entry.role == "expert" and _packed(packing, entry):  # a float part: module rows
        shape = list(getattr(module, packing.names[entry.stack.index]).shape[1:])
        shape[0] //= parts
        return shape, None
    t = layout[_position(packing, entry)]
    shape, dtype = list(t.shape), (t.dtype if entry.role != "expert" else None)
    if parts > 1 and not chunked:  # a part's rows of the packed (or float) tensor
        shape[0] //= parts
    return shape, dtype


def check_expert_entries(entries, found, packings, headers) -> None:
    """Checks every expert piece's shape and dtype from the headers against the store's
    layout, before anything is read."""
    layouts = [p.layout(m) for (_, m), p in zip(found, packings, strict=True)]
    for entry in entries:
        if entry.stack is None or entry.role not in ("expert", "codes", "scales"):
            continue
        layer = entry.stack.layer
        packing, module = packings[layer], found[layer][1]
        info = headers[entry.file][entry.key]
        where = f"from_pretrained: {entry.file}: tensor {entry.key}"
        if entry.role != "expert" and not _packed(packing, entry):
            raise ValueError(
                f"{where} is packed ({entry.role}), but {entry.stack.name} is kept as floats"
            )
        parts = 1 if entry.piece is None else entry.piece[2]
        if parts > 1 and packing.transposed and _packed(packing, entry):
            raise ValueError(
                f"{where} is a part of {entry.stack.name} along its input columns, which "
                f"the {packing.codec.name} format cannot pack apart"
            )
        shape, dtype = _expected(packing, module, layouts[layer], entry)
        got = info["shape"] if entry.piece is not None else info["shape"][1:]
        if list(got) != shape:
            whole = "" if entry.piece is not None else " per expert"
            raise ValueError(
                f"{where} has shape {list(got)}{whole}, expected {shape} for "
                f"{entry.stack.name} ({entry.role}, {packing.format_name})"
            )
        if entry.role == "expert" and not SAFETENSORS_DTYPES[info["dtype"]].is_floating_point:
            raise ValueError(
                f"{where} has dtype {info['dtype']}, expected a float dtype for "
                f"{entry.stack.name} (or a packed format's codes with their scales)"
            )
        if dtype is not None and SAFETENSORS_DTYPES[info["dtype"]] != dtype:
            raise ValueError(
                f"{where} has dtype {info['dtype']}, expected {dtype} for {entry.stack.name} "
                f"({entry.role}, {packing.format_name})"
            )


def _check_scales(packing, key: str, scales: torch.Tensor) -> None:
    if packing.codec.name == "fp8" and not bool(torch.isfinite(scales).all()):
        raise ValueError(f"from_pretrained: fp8 scale tensor {key} has NaN or inf scales")
    if packing.codec.name == "mxfp4" and bool((scales == E8M0_NAN).any()):
        raise ValueError(f"from_pretrained: mxfp4 scale tensor {key} has NaN scales (0xFF)")


def _pack_piece(packing, entry: Entry, w: torch.Tensor) -> list[torch.Tensor]:
    """A float piece (module orientation) packed: all chunks of a whole weight, or one part's."""
    w = packing.oriented(w)
    n = 1 if entry.piece is not None else len(packing.chunk_ranges(entry.stack.index))
    out = []
    for chunk in w.split(w.shape[0] // n):
        out += packing.codec.pack(chunk)
    return out


def _write_float(shard, packing, entry, store, row, shape) -> None:
    """Reads one expert's float piece, packs it and writes it into its packed tensors."""
    index = entry.stack.index
    part, parts, chunked = _split(packing, entry)
    w = torch.empty(shape, dtype=packing.dtype)
    shard.read_into(entry.key, w, row=row)
    packed = _pack_piece(packing, entry, w)
    if entry.piece is None or chunked:
        positions = packing.chunk_ranges(index)[part] if chunked else packing.part_ranges()[index]
        for pos, src in zip(positions, packed, strict=True):
            store[pos].copy_(src)
        return
    for pos, src in zip(packing.part_ranges()[index], packed, strict=True):
        rows = store[pos].shape[0] // parts
        store[pos][part * rows : (part + 1) * rows].copy_(src)


def write_expert_piece(cache, shard: Shard, entry: Entry, packing, module, filled: dict) -> None:
    """Writes one checkpoint tensor (an ``[E, ...]`` stack one expert at a time, or one
    expert's piece) into the host store, recording what it filled in ``filled``."""
    layer, index = entry.stack.layer, entry.stack.index
    part, parts, chunked = _split(packing, entry)
    experts = range(shard.shape(entry.key)[0]) if entry.piece is None else [entry.piece[0]]
    quantize = entry.role == "expert" and _packed(packing, entry)
    tracks = (
        ["weight", "scales"] if quantize else ["scales" if entry.role == "scales" else "weight"]
    )
    for e in experts:
        row = e if entry.piece is None else None
        store = cache.host_expert(layer, e)
        if quantize:
            shape = list(getattr(module, packing.names[index]).shape[1:])
            shape[0] //= parts
            _write_float(shard, packing, entry, store, row, shape)
        else:
            dst = store[_position(packing, entry)]
            if parts > 1 and not chunked:
                rows = dst.shape[0] // parts
                dst = dst[part * rows : (part + 1) * rows]
            shard.read_into(entry.key, dst, row=row)
            if entry.role == "scales":
                _check_scales(packing, entry.key, dst)
        for track in tracks:
            filled.setdefault((layer, index, track), set()).add((e, part, parts))


def expected_tracks(packings) -> dict:
    """Every (layer, index, track) the checkpoint must fill: each logical tensor's values,
    and a quantized weight's scales."""
    tracks = {}
    for layer, packing in enumerate(packings):
        for index, name in enumerate(packing.names):
            tracks[(layer, index, "weight")] = set()
            if packing.codec is not None and not name.endswith("_bias"):
                tracks[(layer, index, "scales")] = set()
    return tracks


def check_complete(model, found, packings, filled, path) -> None:
    """Every piece of every expert (its values and, packed, its scales), and every other
    parameter, came from the checkpoint."""
    for (layer, index, track), pieces in filled.items():
        module = found[layer][1]
        parts = max((p for _, _, p in pieces), default=1)
        wanted = {(e, i, parts) for e in range(module.num_experts) for i in range(parts)}
        name = f"{found[layer][0]}.{packings[layer].names[index]}"
        if track == "scales":
            name += " (its scales)"
        if pieces - wanted:  # some experts both whole and in parts
            twice = sorted({e for e, _, _ in pieces - wanted})
            raise ValueError(
                f"from_pretrained: {path} gives experts {twice[:8]} of {name} "
                "in two layouts (whole and in parts)"
            )
        if pieces != wanted:
            missing = sorted({e for e, _, _ in wanted - pieces})
            raise ValueError(f"from_pretrained: {path} lacks experts {missing[:8]} of {name}")
    expert_params = {id(p) for _, m in found for p in m.parameters(recurse=False)}
    missing = [
        name for name, p in model.named_parameters() if p.is_meta and id(p) not in expert_params
    ]
    if missing:
        raise ValueError(f"from_pretrained: {path} lacks weights for {missing[:8]}")
