"""Reading a local transformers checkpoint: its safetensors shards, one tensor at a time, and the
translation of its key names to the model's (transformers' own conversion mapping)."""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["SAFETENSORS_DTYPES", "KeyTranslator", "Shard", "checkpoint_files"]


def checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise ValueError(f"from_pretrained: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"from_pretrained: {path} has no config.json (not a checkpoint folder)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / n for n in _indexed_shards(index)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(
                f"from_pretrained: shards named in {index.name} are missing: {missing}"
            )
        return files
    files = sorted(f for f in path.glob("*.safetensors") if f.is_file())
    if not files:
        raise ValueError(
            f"from_pretrained: {path} has no *.safetensors weights (only safetensors checkpoints "
            "are read: they can be streamed one tensor at a time)"
        )
    return files


def _indexed_shards(index: Path) -> list[str]:
    """The shard file names an index's ``weight_map`` names: plain names in its folder (a name
    with a folder in it would read a file from elsewhere)."""
    expected = 'expected {"weight_map": {tensor name: shard file name}}'
    try:
        content = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"from_pretrained: {index} is not JSON ({exc}); {expected}") from exc
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"from_pretrained: {index} has no weight_map object; {expected}")
    names = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name == "..":
            raise ValueError(
                f"from_pretrained: {index} maps {key} to {name!r}; expected the file name of a "
                "shard in the checkpoint folder"
            )
        names.add(name)
    return sorted(names)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Newer torch builds also have these (MXFP4 scales are E8M0).
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_DTYPES = _SAFETENSORS_DTYPES  # header dtype name -> torch dtype

_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
_ENTRY = "{dtype, shape, data_offsets}"


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose names are unique: with a name given twice, json.loads would keep the
    last silently, and the other entry's bytes would be read as nothing."""
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = sorted(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"the header names {twice[:4]} more than once")
    return out


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _entry_span(path: Path, key: str, entry) -> tuple[int, int]:
    """``[begin, end)`` of one header entry in the data, after checking it as the format
    requires: a known dtype, a shape, and offsets spanning exactly shape x dtype size bytes."""
    where = f"from_pretrained: {path}: tensor {key}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {entry!r} in the header, expected an object {_ENTRY}")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} in the header ({_ENTRY} expected)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"{where} has dtype {dtype!r}, expected one of {list(_SAFETENSORS_DTYPES)}"
        )
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise ValueError(f"{where} has shape {shape!r}, expected a list of ints >= 0")
    if not (_is_int_list(offsets) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(
            f"{where} has data_offsets {offsets!r}, expected [begin, end] with "
            "0 <= begin <= end (bytes from the end of the header)"
        )
    nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(
            f"{where} has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes), but "
            f"shape {shape} of {dtype} is {nbytes} bytes"
        )
    return offsets[0], offsets[1]


def _check_layout(path: Path, header: dict, data_bytes: int) -> None:
    """The tensors tile the data exactly, as the format requires: in order, without overlap
    (two tensors reading the same bytes), gap or missing end (a truncated file)."""
    spans = sorted((*_entry_span(path, key, entry), key) for key, entry in header.items())
    end, previous = 0, None
    for begin, stop, key in spans:
        if begin < end:
            raise ValueError(
                f"from_pretrained: {path}: tensor {key} (bytes [{begin}, {stop})) overlaps "
                f"tensor {previous}, which ends at byte {end}"
            )
        if begin > end:
            raise ValueError(
                f"from_pretrained: {path}: bytes [{end}, {begin}) of the data belong to no "
                f"tensor (before {key}); the tensors must follow each other"
            )
        end, previous = stop, key
    if end > data_bytes:
        cut = [key for begin, stop, key in spans if stop > data_bytes]
        raise ValueError(
            f"from_pretrained: {path} is truncated: its header places tensors up to byte {end} "
            f"of the data, the file holds {data_bytes} (cut: {', '.join(cut[:4])})"
        )
    if end < data_bytes:
        raise ValueError(
            f"from_pretrained: {path} has {data_bytes - end} bytes after its last tensor "
            "(not a safetensors file, or a damaged one)"
        )


class Shard:
    """One safetensors file read with plain reads into the destination's memory: no mmap (its
    touched pages would count as resident until unmapped) and no temporary copy where the
    checkpoint's dtype is already the wanted one. The header is checked whole on opening, so
    that no offset can read another tensor's bytes, the header, or past the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        except OSError as exc:
            raise ValueError(f"from_pretrained: {path} cannot be read ({exc})") from exc
        try:
            self.entries, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict, int]:
        path, file_size = self.path, os.fstat(self._file.fileno()).st_size
        try:
            size = int.from_bytes(self._file.read(8), "little")
            if file_size < 8 or not 2 <= size <= min(_MAX_HEADER, file_size - 8):
                raise ValueError(f"header length {size} in a file of {file_size} bytes")
            header = json.loads(self._file.read(size), object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"from_pretrained: {path} is not a safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise ValueError(
                f"from_pretrained: {path}: the header is a JSON {type(header).__name__}, "
                f"expected an object of tensor name -> {_ENTRY}"
            )
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(
                f"from_pretrained: {path}: __metadata__ is {metadata!r}, expected an object"
            )
        _check_layout(path, header, file_size - 8 - size)
        return header, 8 + size

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def _dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self.entries[key]["dtype"]]  # known: checked on opening

    def read_into(self, key: str, dst: torch.Tensor, row: int | None = None) -> None:
        """Reads the tensor (or its ``row``-th slice along dim 0) into ``dst`` (CPU,
        contiguous), converting the dtype if needed."""
        dtype, shape = self._dtype(key), self.shape(key)
        begin, end = self.entries[key]["data_offsets"]
        if row is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end, shape = begin + row * row_bytes, begin + (row + 1) * row_bytes, shape[1:]
        if list(dst.shape) != shape:
            raise ValueError(
                f"from_pretrained: {key}{'' if row is None else f'[{row}]'} has shape {shape} "
                f"in {self.path}, the model expects {list(dst.shape)}"
            )
        target = dst if dst.dtype == dtype else torch.empty(shape, dtype=dtype)
        buffer = target.view(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - begin:
            raise ValueError(f"from_pretrained: {key} in {self.path} has a corrupt size")
        self._file.seek(self._data_start + begin)
        if self._file.readinto(buffer) != end - begin:
            raise ValueError(f"from_pretrained: {self.path} is truncated at {key}")
        if target is not dst:
            dst.copy_(target)

    def read(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self._dtype(key))
        self.read_into(key, out)
        return out


class KeyTranslator:
    """Checkpoint key -> model key, with transformers' conversion mapping for the family. For
    a key that a converter merges into an experts stack, also says which expert and which
    part of the stacked tensor it is."""

    _EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._rename = rename_source_key
        self._prefix = getattr(model, "base_model_prefix", None)
        self._model_keys = dict.fromkeys(name for name, _ in model.named_parameters())
        self._model_keys.update(dict.fromkeys(name for name, _ in model.named_buffers()))

    def __call__(self, key: str) -> tuple[str, tuple[int, int, int] | None]:
        """``(model_key, None)`` for a tensor loaded as is, or ``(model_key, (expert, part,
        parts))`` for one expert's piece of a stack concatenated from ``parts`` sources."""
        target, pattern = self._rename(
            key, self._renamings, self._converters, self._prefix, self._model_keys
        )
        if pattern is None:
            return target, None
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        ops = [type(op).__name__ for op in converter.operations]
        if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) or any(
            getattr(op, "dim", 0) != (0 if i == 0 else 1)
            for i, op in enumerate(converter.operations)
        ):
            raise ValueError(
                f"from_pretrained: checkpoint key {key} needs the conversion {ops}, which "
                "expertflow does not stream yet (supported: per-expert tensors stacked, "
                "optionally concatenated along the output rows)"
            )
        match = self._EXPERT_INDEX.search(key)
        if match is None:
            raise ValueError(f"from_pretrained: no expert index in checkpoint key {key}")
        part = converter.source_patterns.index(pattern)
        return target, (int(match.group(1)), part, len(converter.source_patterns))
