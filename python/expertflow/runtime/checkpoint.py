"""Reading a local transformers checkpoint: its safetensors shards, one tensor at a time, and the
translation of its key names to the model's (transformers' own conversion mapping)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["KeyTranslator", "Shard", "checkpoint_files"]


def checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise ValueError(f"from_pretrained: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"from_pretrained: {path} has no config.json (not a checkpoint folder)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(
                f"from_pretrained: shards named in {index.name} are missing: {missing}"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"from_pretrained: {path} has no *.safetensors weights (only safetensors checkpoints "
            "are read: they can be streamed one tensor at a time)"
        )
    return files


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


class Shard:
    """One safetensors file read with plain reads into the destination's memory: no mmap (its
    touched pages would count as resident until unmapped) and no temporary copy where the
    checkpoint's dtype is already the wanted one."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        try:
            size = int.from_bytes(self._file.read(8), "little")
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"header length {size}")
            header = json.loads(self._file.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            self._file.close()
            raise ValueError(f"from_pretrained: {path} is not a safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self._data_start = 8 + size
        self.entries = header

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def _dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"from_pretrained: {key} in {self.path} has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]

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
                f"in the checkpoint, the model expects {list(dst.shape)}"
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
