"""Indexer files: every config field is type- and range-checked, the weights carry a checksum in
the config (format 2), non-finite weights are refused, format 1 files still load with a warning."""

import json
import math
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lsa.scorers import IndexerConfig, LightningIndexer
from lsa.scorers.lightning import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, tensors_sha256

BASE = dict(
    hidden_size=48,
    kv_heads=2,
    kv_head_dim=16,
    target_layers=(1, 3),
    chunk_size=8,
    n_heads=4,
    index_dim=32,
    q_rank=24,
    rope_dim=16,
)
INT_FIELDS = ("hidden_size", "kv_heads", "kv_head_dim", "chunk_size", "n_heads", "index_dim")
INT_FIELDS += ("q_rank", "rope_dim")
BOOL_FIELDS = ("key_fp8", "derotate_keys", "prev_chunk")
FLOAT_FIELDS = ("rope_theta", "backbone_rope_scaling")


def _config(**kw):
    return IndexerConfig(**{**BASE, **kw})


def _saved(tmp_path, seed=0):
    """An indexer with random weights saved in ``tmp_path``; returns it."""
    torch.manual_seed(seed)
    idx = LightningIndexer(_config(), torch.rand(8))
    for p in idx.parameters():
        torch.nn.init.normal_(p, std=0.3)
    idx.save_pretrained(tmp_path)
    return idx


def _meta(tmp_path):
    return json.loads((tmp_path / CONFIG_NAME).read_text())


def _write_meta(tmp_path, meta):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the config: every field ------------------------------------------------------------------


def test_a_bare_int_for_target_layers_is_a_clear_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"target_layers must be a list of ints.*got int 7"):
        _config(target_layers=7)
    _saved(tmp_path)
    meta = _meta(tmp_path)
    meta["config"]["target_layers"] = 7
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*target_layers must be a list of ints"):
        LightningIndexer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ("13", TypeError, r"target_layers must be a list of ints.*got str '13'"),
        ([1, "3"], TypeError, r"target_layers\[1\] must be an int, got str '3'"),
        ([1, True], TypeError, r"target_layers\[1\] must be an int, got bool True"),
        ([1, 3.0], TypeError, r"target_layers\[1\] must be an int, got float 3.0"),
        ([1, -2], ValueError, r"target_layers\[1\] must be >= 0, got -2"),
        ([1, 1], ValueError, r"target_layers must be non-empty and distinct, got \[1, 1\]"),
        ([], ValueError, r"target_layers must be non-empty and distinct, got \[\]"),
    ],
)
def test_target_layers_must_be_distinct_ints_from_zero(value, error, message):
    with pytest.raises(error, match=message):
        _config(target_layers=value)


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["no", "false", 1, 0, None])
def test_bool_fields_must_be_real_bools(name, value):
    # "no" is truthy: accepted, it would turn the option on
    with pytest.raises(TypeError, match=rf"{name} must be a bool, got {type(value).__name__}"):
        _config(**{name: value})


def test_a_string_bool_in_a_file_is_refused_naming_the_file(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    meta["config"]["key_fp8"] = "no"
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*key_fp8 must be a bool, got str 'no'"):
        LightningIndexer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_float_fields_must_be_finite_positive_numbers(name):
    with pytest.raises(TypeError, match=rf"{name} must be a number.*got str 'abc'"):
        _config(**{name: "abc"})
    for bad in (True, None, [1.0]):
        with pytest.raises(TypeError, match=rf"{name} must be a number"):
            _config(**{name: bad})
    for bad in (math.nan, math.inf, -math.inf, 0, -1.5):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got"):
            _config(**{name: bad})
    value = getattr(_config(**{name: 3}), name)  # an int is a fine float, stored as one
    assert value == 3.0 and type(value) is float


def test_a_string_float_in_a_file_is_refused_naming_the_file(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    meta["config"]["rope_theta"] = "abc"
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*rope_theta must be a number"):
        LightningIndexer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", INT_FIELDS)
def test_int_fields_refuse_bools_floats_and_strings(name):
    good = _config().to_dict()[name]
    for bad in (True, float(good), str(good), None):
        with pytest.raises(TypeError, match=rf"{name} must be an int, got {type(bad).__name__}"):
            _config(**{name: bad})


def test_int_fields_ranges():
    for name in ("hidden_size", "kv_heads", "kv_head_dim", "chunk_size", "n_heads", "q_rank"):
        with pytest.raises(ValueError, match=rf"{name} must be >= 1, got 0"):
            _config(**{name: 0})
    with pytest.raises(ValueError, match="index_dim must be a power of two >= 2, got 48"):
        _config(index_dim=48)
    with pytest.raises(ValueError, match=r"rope_dim must be even and in \[0, index_dim=32\]"):
        _config(rope_dim=7)
    with pytest.raises(ValueError, match="rope_dim must be >= 0, got -2"):
        _config(rope_dim=-2)
    with pytest.raises(ValueError, match="kv_head_dim must be even, got 15"):
        _config(kv_head_dim=15)


def test_str_dict_and_key_stats_fields():
    with pytest.raises(TypeError, match="ensemble must be a str, got int 1"):
        _config(ensemble=1)
    with pytest.raises(TypeError, match="backbone must be a str, got NoneType None"):
        _config(backbone=None)
    with pytest.raises(TypeError, match=r"key_stats must be a list of names.*got str 'mean'"):
        _config(key_stats="mean")  # would be read as the names 'm', 'e', 'a', 'n'
    with pytest.raises(TypeError, match=r"key_stats\[0\] must be a str, got int 0"):
        _config(key_stats=[0])
    with pytest.raises(TypeError, match=r"extra must be a dict, got list \[\]"):
        _config(extra=[])
    with pytest.raises(ValueError, match="extra must hold only JSON values under str keys"):
        _config(extra={1: "a"})  # JSON would bring the key back as "1"
    with pytest.raises(ValueError, match="extra must hold only JSON values"):
        _config(extra={"a": math.nan})
    assert _config(extra={"note": [1, "x"]}).extra == {"note": [1, "x"]}


def test_config_from_a_file_lacking_required_fields_names_them(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    del meta["config"]["kv_heads"]
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match=r"lacks the required fields \['kv_heads'\]"):
        LightningIndexer.from_pretrained(tmp_path)
    meta["config"] = [1, 2]
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*config must be a dict, got list"):
        LightningIndexer.from_pretrained(tmp_path)


def test_format_version_must_be_a_known_int(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    for bad in (True, 2.0, "2", 4, None):  # True == 1 and 2.0 == 2 in Python
        _write_meta(tmp_path, dict(meta, format_version=bad))
        with pytest.raises(ValueError, match="expected format_version 1, 2 or 3, got"):
            LightningIndexer.from_pretrained(tmp_path)
    _write_meta(tmp_path, dict(meta, comment="hi"))
    with pytest.raises(ValueError, match=r"must hold the keys.*got \['comment'"):
        LightningIndexer.from_pretrained(tmp_path)


# --- the checksum -----------------------------------------------------------------------------


def test_round_trip_writes_a_checksum_that_verifies(tmp_path):
    idx = _saved(tmp_path)
    meta = _meta(tmp_path)
    # a pooled indexer is still written as format 2 (format 3 is for fine-grained keys)
    assert FORMAT_VERSION == 3 and meta["format_version"] == 2
    on_disk = load_file(str(tmp_path / WEIGHTS_NAME))
    assert meta["tensors_sha256"] == tensors_sha256(on_disk)
    assert len(meta["tensors_sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a format 2 file loads without the no-checksum warning
        back = LightningIndexer.from_pretrained(tmp_path)
    assert _same_weights(back, idx)
    back.save_pretrained(tmp_path / "again")  # the same weights give the same checksum
    assert _meta(tmp_path / "again")["tensors_sha256"] == meta["tensors_sha256"]


def test_checksum_covers_names_dtypes_shapes_and_bytes_in_name_order():
    a, b = torch.arange(6.0), torch.ones(2)
    ref = tensors_sha256({"a": a, "b": b})
    assert tensors_sha256({"b": b, "a": a}) == ref  # dict order does not matter
    assert tensors_sha256({"a": a.view(2, 3), "b": b}) != ref
    assert tensors_sha256({"a": a.double(), "b": b}) != ref
    assert tensors_sha256({"c": a, "b": b}) != ref
    assert tensors_sha256({"a": a, "b": b.clone().index_fill_(0, torch.tensor([1]), 2)}) != ref
    # the byte count is fixed by the shape: moving an element across tensors changes the sum
    assert tensors_sha256({"a": a[:5], "b": torch.cat([a[5:], b])}) != ref
    assert tensors_sha256({"a": a.t().contiguous()[None]}) != tensors_sha256({"a": a})


def test_bytes_corrupted_inside_the_tensor_data_fail_the_checksum(tmp_path):
    _saved(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = max(
        (k for k in header if k != "__metadata__"),
        key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0],
    )
    lo, hi = header[name]["data_offsets"]
    mid = 8 + n + (lo + hi) // 2 // 4 * 4
    raw[mid : mid + 16] = struct.pack("<4f", 0.5, -0.25, 1.0, 2.0)  # finite: only the sum sees it
    path.write_bytes(bytes(raw))
    corrupted = load_file(str(path))  # the file still parses, with finite values
    assert all(torch.isfinite(t).all() for t in corrupted.values())
    assert tensors_sha256(corrupted) != _meta(tmp_path)["tensors_sha256"]
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*do not match their config's checksum"):
        LightningIndexer.from_pretrained(tmp_path)


def test_a_format_2_file_needs_a_well_formed_checksum(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    del meta["tensors_sha256"]
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="format_version 2 needs tensors_sha256"):
        LightningIndexer.from_pretrained(tmp_path)
    for bad in ("abc", 123, "G" * 64):
        _write_meta(tmp_path, dict(meta, tensors_sha256=bad))
        with pytest.raises(ValueError, match="tensors_sha256 must be 64 lowercase hex digits"):
            LightningIndexer.from_pretrained(tmp_path)


def test_a_format_1_file_without_checksum_loads_with_a_warning(tmp_path):
    idx = _saved(tmp_path)
    meta = _meta(tmp_path)
    _write_meta(tmp_path, {"format_version": 1, "config": meta["config"]})
    with pytest.warns(UserWarning, match=r"format_version 1 and carries no checksum"):
        back = LightningIndexer.from_pretrained(tmp_path)
    assert _same_weights(back, idx)


# --- non-finite weights -----------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, version):
    _saved(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(path))
    tensors["layers.3.wk.weight"][0, 0] = math.nan
    tensors["layers.1.bias"].fill_(math.inf)
    save_file(tensors, str(path))
    meta = _meta(tmp_path)
    if version == 1:
        meta = {"format_version": 1, "config": meta["config"]}
    else:  # a checksum made over the bad weights: only the finite check can catch them
        meta["tensors_sha256"] = tensors_sha256(tensors)
    _write_meta(tmp_path, meta)
    want = rf"{WEIGHTS_NAME}: non-finite.*\['layers\.1\.bias', 'layers\.3\.wk\.weight'\]"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # format 1's no-checksum warning
        with pytest.raises(ValueError, match=want):
            LightningIndexer.from_pretrained(tmp_path)


def test_save_refuses_non_finite_weights(tmp_path):
    idx = LightningIndexer(_config(), torch.rand(8))
    with torch.no_grad():
        idx.layers["1"].wq_a.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"non-finite.*\['layers\.1\.wq_a\.weight'\]"):
        idx.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the shipped files ------------------------------------------------------------------------


def test_shipped_indexers_are_format_2_and_verify():
    from lsa.indexer import WEIGHTS_DIR, load_indexer, shipped_indexers

    names = shipped_indexers()
    if not names:
        pytest.skip("no indexer weights shipped in lsa/indexer/weights/")
    for name in names:
        meta = json.loads((WEIGHTS_DIR / name / CONFIG_NAME).read_text())
        assert meta["format_version"] == 2
        assert meta["tensors_sha256"] == tensors_sha256(
            load_file(WEIGHTS_DIR / name / WEIGHTS_NAME)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_indexer(name)
