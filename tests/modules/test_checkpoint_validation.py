"""from_pretrained() refuses damaged checkpoints with a ValueError naming the file and tensor:
safetensors headers that break the format (which would otherwise read the wrong bytes and give
wrong logits), unreadable configs and indexes, tensors the model does not have."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import expertflow
from tests.modules.test_offload import batch, build

pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-shard mixtral checkpoint and the logits of its model."""
    path = tmp_path_factory.mktemp("mixtral")
    model = build("mixtral")
    model.save_pretrained(path)
    ids, mask = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return path, logits


def load(path, **kwargs):
    return expertflow.from_pretrained(path, device="cpu", slots=8, **kwargs)


def copy_of(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def split(path):
    """(header, data) of model.safetensors."""
    raw = (path / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write(path, header, data):
    text = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)


def two_same_shape(header):
    """Two tensors of one shape and dtype (aliasing one onto the other gives valid sizes)."""
    seen = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        sig = (entry["dtype"], tuple(entry["shape"]))
        if sig in seen:
            return seen[sig], key
        seen[sig] = key
    raise AssertionError("no two tensors of one shape")


def first(header):
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def alias(h, d):
    a, b = two_same_shape(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def into_header(h, d):
    k = first(h)
    begin, end = h[k]["data_offsets"]
    h[k]["data_offsets"] = [begin - 16, end - 16]


def swap_offsets_order(h, d):
    k = first(h)
    h[k]["data_offsets"] = h[k]["data_offsets"][::-1]


def entry(field, value):
    def damage(h, d):
        k = first(h)
        if value is None:
            del h[k][field]
        else:
            h[k][field] = value

    return damage


def shape_times_two(h, d):
    k = first(h)
    h[k]["shape"] = [2 * h[k]["shape"][0], *h[k]["shape"][1:]]


# name -> (damage(header, data) -> None or (header, data), what the error says)
HEADERS = {
    "negative offsets into the header": (into_header, r"data_offsets \[-16, .*0 <= begin"),
    "offsets end before begin": (swap_offsets_order, r"data_offsets .*0 <= begin <= end"),
    "two tensors reading the same bytes": (alias, r"overlaps tensor"),
    "no dtype": (entry("dtype", None), r"lacks dtype"),
    "no data_offsets": (entry("data_offsets", None), r"lacks data_offsets"),
    "no shape": (entry("shape", None), r"lacks shape"),
    "unknown dtype": (entry("dtype", "F33"), r"has dtype 'F33', expected one of"),
    "shape not a list": (entry("shape", "ab"), r"has shape 'ab', expected a list"),
    "bool offsets": (entry("data_offsets", [False, True]), r"data_offsets \[False, True\]"),
    "size not shape x dtype": (shape_times_two, r"bytes\), but shape .* is \d+ bytes"),
    "entry not an object": (lambda h, d: h.update({first(h): 5}),
                            r"is 5 in the header, expected an object"),
    "list-shaped header": (lambda h, d: ([v for k, v in h.items() if k != "__metadata__"], d),
                           r"the header is a JSON list, expected an object"),
    "truncated data": (lambda h, d: (h, d[:-100]), r"is truncated: .* up to byte"),
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 8), r"has 8 bytes after its last tensor"),
    "a gap between tensors": (lambda h, d: (_shifted(h), b"\0" * 4 + d),
                              r"bytes \[0, 4\) of the data belong to no tensor"),
    "metadata not an object": (lambda h, d: h.update({"__metadata__": [1]}),
                               r"__metadata__ is \[1\], expected an object"),
}  # fmt: skip


def _shifted(h):
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [o + 4 for o in v["data_offsets"]]
    return h


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_damaged_safetensors_headers_are_refused_naming_file_and_tensor(case, saved, tmp_path):
    path = copy_of(saved, tmp_path)
    header, data = split(path)
    damage, message = HEADERS[case]
    changed = damage(header, data)
    write(path, *(changed if isinstance(changed, tuple) else (header, data)))
    with pytest.raises(ValueError, match=message) as err:
        load(path)
    assert str(path / "model.safetensors") in str(err.value)
    # The safetensors library (what transformers reads with) refuses the same file.
    with pytest.raises(Exception):  # noqa: B017, PT011 (SafetensorError, or json's)
        safetensors.safe_open(str(path / "model.safetensors"), "pt")


def test_duplicate_names_in_a_header_and_across_shards_are_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    header, data = split(path)
    k = first(header)
    text = json.dumps(header)
    twice = text[:-1] + f', "{k}": ' + json.dumps(header[k]) + "}"
    (path / "model.safetensors").write_bytes(
        len(twice.encode()).to_bytes(8, "little") + twice.encode() + data
    )
    with pytest.raises(ValueError, match=rf"names \['{k}'\] more than once"):
        load(path)
    write(path, header, data)
    shutil.copy(path / "model.safetensors", path / "model-copy.safetensors")
    with pytest.raises(ValueError, match=rf"tensor {k} is in both .*model-copy.safetensors"):
        load(path)


def test_an_intact_copy_still_loads_with_the_same_logits(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    header, data = split(path)
    write(path, header, data)  # rewritten header (other spacing): same tensors
    ids, mask = batch()
    with torch.no_grad():
        got = load(path)(input_ids=ids, attention_mask=mask).logits
    assert (got - saved[1])[mask.bool()].abs().max().item() <= 1e-5


def test_tensors_the_model_does_not_have_are_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    header, data = split(path)
    k = first(header)
    header["bogus.weight"] = header.pop(k)
    write(path, header, data)
    with pytest.raises(ValueError, match=r"model.safetensors has tensor bogus.weight, which the"):
        load(path)
    header, data = split(copy_of(saved, tmp_path))
    expert = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    header[expert.replace(".3.", ".9.")] = header.pop(expert)
    write(path, header, data)
    with pytest.raises(ValueError, match=r"experts.9.w1.weight is of expert 9, the model's layer"):
        load(path)


def test_keys_transformers_ignores_for_the_model_are_skipped(saved, tmp_path, monkeypatch):
    # DeepSeek-V3 checkpoints carry a multi-token-prediction layer 61 that transformers skips
    # (_keys_to_ignore_on_load_unexpected); a key of the model itself is never skipped.
    from transformers import MixtralForCausalLM

    path = copy_of(saved, tmp_path)
    header, data = split(path)
    k = first(header)
    header["model.layers.61.extra.weight"] = header.pop(k)
    write(path, header, data)
    monkeypatch.setattr(
        MixtralForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.61.*", k]
    )
    with pytest.raises(ValueError, match=rf"lacks weights for \['{k}'\]"):
        load(path)  # the extra key skipped, the pattern naming k did not hide its absence


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"index.json is not JSON"),
        ("[]", r"index.json has no weight_map object"),
        ('{"weight_map": [1]}', r"index.json has no weight_map object"),
        ('{"weight_map": {"a": 3}}', r"index.json maps a to 3; expected the file name"),
        ('{"weight_map": {"a": "../x/model.safetensors"}}', r"maps a to '../x/model.safetensors'"),
        ('{"weight_map": {"a": "gone.safetensors"}}', r"shards named in .* are missing"),
    ],
)
def test_bad_index_files_are_refused(text, message, saved, tmp_path):
    path = copy_of(saved, tmp_path)
    (path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: "{not json", r"config.json is not a usable transformers config \(OSError"),
        (lambda c: json.dumps({**c, "dtype": "float33"}), r"config.json is not a usable"),
        (lambda c: json.dumps({**c, "dtype": "int8"}), r"the dtype in .*config.json must be a"),
        (lambda c: json.dumps({**c, "num_local_experts": "x"}), r"config.json is not a usable"),
    ],
)
def test_bad_configs_are_refused(change, message, saved, tmp_path):
    path = copy_of(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(change(config))
    with pytest.raises(ValueError, match=message):
        load(path)


def test_dtype_argument(saved, tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype .* 'float33'"):
        load(saved[0], dtype="float33")
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype .* torch.int8"):
        load(saved[0], dtype=torch.int8)
    model = load(saved[0], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_config_far_larger_than_its_shards_is_refused_before_allocating(saved, tmp_path):
    # num_local_experts: 1000000 took 86 s, then failed to allocate a 37 GB host store.
    path = copy_of(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_local_experts": 100_000}))
    with pytest.raises(ValueError, match=r"config.json describes a model of \d+ weights, far more"):
        load(path)


def test_a_folder_named_like_a_shard_and_a_path_of_a_wrong_type(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    (path / "extra.safetensors").mkdir()  # was opened as a file: IsADirectoryError
    ids, mask = batch()
    with torch.no_grad():
        got = load(path)(input_ids=ids, attention_mask=mask).logits
    assert (got - saved[1])[mask.bool()].abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"from_pretrained: path must be a str or path, got int"):
        load(42)
