"""``expertflow.from_pretrained()``: load a local checkpoint straight into an offloaded model.

The full model is never materialised on the host. The model is built with its parameters on the
meta device, the host store is allocated from the experts' shapes alone, and the checkpoint is
streamed one safetensors shard at a time: each expert tensor is written into its place in the
store (converted from the checkpoint's per-expert layout where needed, e.g. Mixtral's
``experts.N.w1/w2/w3``), every other tensor goes to the device. Peak host memory is the store
plus one open shard. Checkpoint key names are translated with transformers' own conversion
mapping, so every family transformers can load is read the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from expertflow._offload import (
    PrefetchSettings,
    _build_cache,
    _expert_tensors,
    _install,
    _offloadable_modules,
    expert_param_names,
)

__all__ = ["from_pretrained"]


@contextlib.contextmanager
def _parameters_on_meta():
    """Module construction with every parameter on the meta device (no memory, no init) while
    buffers (rotary tables and the like, computed at construction) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _checkpoint_files(path: Path) -> list[Path]:
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


class _Shard:
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


class _KeyTranslator:
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


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        old = module._parameters[name]
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(
                f"from_pretrained: {key} has shape {list(value.shape)} in the checkpoint, the "
                f"model expects {list(old.shape)}"
            )
        module._parameters[name] = type(old)(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise ValueError(f"from_pretrained: the model has no tensor {key}")


def from_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cuda",
    slots: int | None = None,
    gpu_memory: int | str | None = None,
    dtype: torch.dtype | None = None,
    policy: str = "expertflow",
    budget: str = "per_layer",
    predictor=None,
    lookahead: bool = False,
    background: bool = False,
    prefetch_threshold: float = 0.0,
) -> nn.Module:
    """Loads a local transformers checkpoint (``config.json`` + safetensors, sharded or not)
    as an offloaded model: like ``offload(AutoModelForCausalLM.from_pretrained(path))`` but
    without ever holding the whole model on the host. No network access is attempted.

    Args:
        path: the checkpoint folder (as written by ``save_pretrained``).
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
            prefetch_threshold: as for :func:`expertflow.offload`.
        dtype: the weights' dtype on the device and in the host store (default: the
            checkpoint's ``dtype`` in its config, else float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    prefetch = PrefetchSettings(predictor, lookahead, background, prefetch_threshold)
    path = Path(path)
    files = _checkpoint_files(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    found = _offloadable_modules(model)
    layouts = [[_expert_tensors(m, e) for e in range(m.num_experts)] for _, m in found]
    cache = _build_cache(model, found, layouts, device, slots, gpu_memory, budget, policy)
    del layouts
    # model key of an experts stack -> (layer, part in the store's expert tensors)
    stacks = {
        f"{name}.{param}": (layer, i)
        for layer, (name, module) in enumerate(found)
        for i, param in enumerate(expert_param_names(module))
    }
    filled: dict[tuple[int, int], set] = {key: set() for key in stacks.values()}
    translate = _KeyTranslator(model)
    with torch.no_grad():
        for file in files:
            shard = _Shard(file)
            try:
                for key in shard.keys():
                    target, piece = translate(key)
                    if target in stacks:
                        layer, part = stacks[target]
                        _fill_expert_piece(cache, shard, key, layer, part, piece, filled)
                    elif piece is None:
                        _set_tensor(model, target, shard.read(key).to(device, dtype))
                    else:
                        raise ValueError(
                            f"from_pretrained: {key} -> {target} is not an experts stack"
                        )
            finally:
                shard.close()
    model.tie_weights()
    _check_complete(model, found, filled, path)
    return _install(model, found, cache, budget, prefetch)


def _fill_expert_piece(cache, shard: _Shard, key, layer, part, piece, filled) -> None:
    """Writes one checkpoint tensor into the host store: a whole ``[E, ...]`` stack one expert
    at a time, or one expert's (part of a) tensor."""
    if piece is None:
        for e in range(shard.shape(key)[0]):
            shard.read_into(key, cache.host_expert(layer, e)[part], row=e)
            filled[(layer, part)].add((e, 0, 1))
        return
    expert, index, parts = piece
    dst = cache.host_expert(layer, expert)[part]
    rows = dst.shape[0] // parts
    shard.read_into(key, dst[index * rows : (index + 1) * rows])
    filled[(layer, part)].add((expert, index, parts))


def _check_complete(model, found, filled, path) -> None:
    """Every piece of every expert, and every other parameter, came from the checkpoint."""
    for (layer, part), pieces in filled.items():
        module = found[layer][1]
        parts = max((p for _, _, p in pieces), default=1)
        wanted = {(e, i, parts) for e in range(module.num_experts) for i in range(parts)}
        if pieces != wanted:
            missing = sorted({e for e, _, _ in wanted - pieces})
            name = expert_param_names(module)[part]
            raise ValueError(
                f"from_pretrained: {path} lacks experts {missing[:8]} of {found[layer][0]}.{name}"
            )
    expert_params = {id(p) for _, m in found for p in m.parameters(recurse=False)}
    missing = [
        name for name, p in model.named_parameters() if p.is_meta and id(p) not in expert_params
    ]
    if missing:
        raise ValueError(f"from_pretrained: {path} lacks weights for {missing[:8]}")
