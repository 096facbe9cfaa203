"""Bad input raises ValueError / TypeError naming the argument, what was expected and what came.

Each case starts from a valid call (checked by ``test_valid_baseline``) and changes one thing.
"""

from __future__ import annotations

import math

import pytest
import torch

import lsa

B, HQ, HKV, SQ, SKV, D, CHUNK = 1, 4, 2, 3, 10, 8, 4
N_CHUNKS = 3  # ceil(10 / 4)


def t(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def sparse_args(**change) -> tuple[tuple, dict]:
    """A valid sparse_attention call, with ``change`` applied (q/k/v by name)."""
    tensors = {"q": t(B, HQ, SQ, D), "k": t(B, HKV, SKV, D), "v": t(B, HKV, SKV, D)}
    kwargs = {
        "keep": torch.ones(B, 1, N_CHUNKS, dtype=torch.bool),
        "chunk_size": CHUNK,
        "enable_gqa": True,
    }
    for name, value in change.items():
        if name in tensors:
            tensors[name] = value
        elif value is _DROP:
            kwargs.pop(name, None)
        else:
            kwargs[name] = value
    return (tensors["q"], tensors["k"], tensors["v"]), kwargs


_DROP = object()


def with_scores(**change) -> dict:
    """Change a sparse call from keep to scores + budget."""
    return {"keep": _DROP, "scores": torch.zeros(B, HKV, N_CHUNKS), "budget": 2, **change}


def test_valid_baseline() -> None:
    args, kwargs = sparse_args()
    assert lsa.sparse_attention(*args, **kwargs).shape == (B, HQ, SQ, D)
    args, kwargs = sparse_args(**with_scores())
    assert lsa.sparse_attention(*args, **kwargs).shape == (B, HQ, SQ, D)
    args, kwargs = sparse_args(**with_scores(budget=_DROP, threshold=0.0))
    assert lsa.sparse_attention(*args, **kwargs).shape == (B, HQ, SQ, D)
    assert lsa.dense_attention(*args, enable_gqa=True).shape == (B, HQ, SQ, D)


QKV_CASES = [
    # (change, exception, pattern the message must match)
    ({"q": t(HQ, SQ, D)}, ValueError, r"q must be 4-D \[B, H, S, D\], got 3-D"),
    ({"k": t(1, B, HKV, SKV, D)}, ValueError, r"k must be 4-D .* got 5-D"),
    ({"v": t(HKV, SKV, D)}, ValueError, r"v must be 4-D .* got 3-D"),
    ({"q": [[1.0]]}, TypeError, r"q must be a torch.Tensor, got list"),
    ({"k": t(B, HKV, SKV, D, dtype=torch.int64)}, TypeError, r"k must be a floating-point"),
    ({"k": t(2, HKV, SKV, D)}, ValueError, r"k batch size .* q's \(1\), got 2"),
    ({"v": t(2, HKV, SKV, D)}, ValueError, r"v batch size .* q's \(1\), got 2"),
    ({"k": t(B, HKV, SKV, D + 1)}, ValueError, r"k head dim .* q's \(8\), got 9"),
    ({"v": t(B, HKV, SKV, D + 1)}, ValueError, r"v head dim .* q's \(8\), got 9"),
    ({"v": t(B, HKV, SKV + 1, D)}, ValueError, r"v must have k's heads and length"),
    (
        {"k": t(B, HKV, SKV, D, dtype=torch.float64)},
        TypeError,
        r"k\.dtype must equal q\.dtype \(torch.float32\), got torch.float64",
    ),
    ({"v": t(B, HKV, SKV, D, dtype=torch.bfloat16)}, TypeError, r"v\.dtype must equal q\.dtype"),
    ({"k": t(B, HKV, SKV, D, device="meta")}, ValueError, r"k\.device must equal q\.device"),
    ({"v": t(B, HKV, SKV, D, device="meta")}, ValueError, r"v\.device must equal q\.device"),
    ({"q": t(B, 3, SQ, D)}, ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    ({"enable_gqa": False}, ValueError, r"q has 4 heads and k/v have 2: pass enable_gqa=True"),
    ({"enable_gqa": 1}, TypeError, r"enable_gqa must be a bool"),
    ({"q": t(B, HQ, SKV + 1, D)}, ValueError, r"causal .* q length 11 > k length 10"),
    ({"causal": "yes"}, TypeError, r"causal must be a bool"),
    ({"scale": -1.0}, ValueError, r"scale must be a finite number > 0"),
    ({"scale": math.nan}, ValueError, r"scale must be a finite number > 0"),
    ({"scale": "1"}, TypeError, r"scale must be a float or None"),
]

SPARSE_CASES = [
    ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1, got 0"),
    ({"chunk_size": -4}, ValueError, r"chunk_size must be >= 1, got -4"),
    ({"chunk_size": 4.0}, TypeError, r"chunk_size must be an int"),
    ({"keep": _DROP}, ValueError, r"exactly one of keep or scores, got neither"),
    ({"scores": torch.zeros(B, 1, N_CHUNKS), "budget": 1}, ValueError, r"keep or scores, got both"),
    ({"keep": torch.ones(B, 1, N_CHUNKS)}, TypeError, r"keep must be a bool tensor, got dtype"),
    ({"keep": torch.ones(B, 1, 2, dtype=torch.bool)}, ValueError, r"keep chunks \(dim 2\) .*= 3"),
    ({"keep": torch.ones(B, 1, 10, dtype=torch.bool)}, ValueError, r"keep chunks \(dim 2\)"),
    ({"keep": torch.ones(B, 3, N_CHUNKS, dtype=torch.bool)}, ValueError, r"keep heads \(dim 1\)"),
    ({"keep": torch.ones(B, HQ, N_CHUNKS, dtype=torch.bool)}, ValueError, r"keep heads"),
    ({"keep": torch.ones(2, 1, N_CHUNKS, dtype=torch.bool)}, ValueError, r"keep batch \(dim 0\)"),
    ({"keep": torch.ones(B, N_CHUNKS, dtype=torch.bool)}, ValueError, r"keep must be 3-D"),
    ({"keep": [[[True] * N_CHUNKS]]}, TypeError, r"keep must be a torch.Tensor"),
    ({"budget": 2}, ValueError, r"budget and threshold .* keep given"),
    ({"threshold": 0.0}, ValueError, r"budget and threshold .* keep given"),
    ({"sink_chunks": -1}, ValueError, r"sink_chunks must be >= 0, got -1"),
    ({"recent_chunks": -2}, ValueError, r"recent_chunks must be >= 0, got -2"),
    ({"backend": "fastest"}, ValueError, r"backend must be one of .* got 'fastest'"),
    ({"backend": None}, TypeError, r"backend must be a str"),
    ({"return_lse": "yes"}, TypeError, r"return_lse must be a bool"),
]

_NAN = torch.tensor([[[0.0, math.nan, 0.0]]])
_INF = torch.tensor([[[0.0, math.inf, 0.0]]])
_NEG_INF = torch.tensor([[[-math.inf, 0.0, 0.0]]])

SCORES_CASES = [
    ({"scores": _NAN}, ValueError, r"scores must be finite, got 1 NaN and 0 ±inf"),
    ({"scores": _INF}, ValueError, r"scores must be finite, got 0 NaN and 1 ±inf"),
    ({"scores": _NEG_INF}, ValueError, r"scores must be finite, got 0 NaN and 1 ±inf"),
    (
        {"scores": torch.zeros(B, 1, N_CHUNKS, dtype=torch.int64)},
        TypeError,
        r"scores must be a floating-point tensor",
    ),
    ({"scores": torch.zeros(B, 1, 4)}, ValueError, r"scores chunks \(dim 2\)"),
    ({"scores": torch.zeros(B, 3, N_CHUNKS)}, ValueError, r"scores heads \(dim 1\)"),
    ({"budget": 0.0}, ValueError, r"budget as a float fraction must be in \(0, 1\], got 0.0"),
    ({"budget": 1.5}, ValueError, r"budget as a float fraction must be in \(0, 1\], got 1.5"),
    ({"budget": -0.5}, ValueError, r"budget as a float fraction must be in \(0, 1\]"),
    ({"budget": math.nan}, ValueError, r"budget as a float fraction must be in \(0, 1\]"),
    ({"budget": 0}, ValueError, r"budget as an int count must be >= 1, got 0"),
    ({"budget": -3}, ValueError, r"budget as an int count must be >= 1, got -3"),
    ({"budget": "half"}, TypeError, r"budget must be an int count or a float fraction"),
    ({"budget": True}, TypeError, r"budget must be an int count or a float fraction"),
    ({"budget": _DROP}, ValueError, r"budget .* or threshold, got neither"),
    ({"budget": _DROP, "threshold": math.nan}, ValueError, r"threshold must not be NaN"),
    ({"budget": _DROP, "threshold": "high"}, TypeError, r"threshold must be a float"),
]


def _ids(cases) -> list[str]:
    return [
        pattern.split(" ")[0].replace("\\", "") + f"-{i}" for i, (_, _, pattern) in enumerate(cases)
    ]


@pytest.mark.parametrize(("change", "exc", "pattern"), QKV_CASES, ids=_ids(QKV_CASES))
def test_qkv_errors_sparse(change, exc, pattern) -> None:
    args, kwargs = sparse_args(**change)
    with pytest.raises(exc, match=pattern):
        lsa.sparse_attention(*args, **kwargs)


@pytest.mark.parametrize(("change", "exc", "pattern"), QKV_CASES, ids=_ids(QKV_CASES))
def test_qkv_errors_dense(change, exc, pattern) -> None:
    args, kwargs = sparse_args(**change)
    kwargs = {key: kwargs[key] for key in ("enable_gqa", "causal", "scale") if key in kwargs}
    with pytest.raises(exc, match=pattern):
        lsa.dense_attention(*args, **kwargs)


@pytest.mark.parametrize(("change", "exc", "pattern"), SPARSE_CASES, ids=_ids(SPARSE_CASES))
def test_sparse_errors(change, exc, pattern) -> None:
    args, kwargs = sparse_args(**change)
    with pytest.raises(exc, match=pattern):
        lsa.sparse_attention(*args, **kwargs)


@pytest.mark.parametrize(("change", "exc", "pattern"), SCORES_CASES, ids=_ids(SCORES_CASES))
def test_scores_errors(change, exc, pattern) -> None:
    args, kwargs = sparse_args(**with_scores(**change))
    with pytest.raises(exc, match=pattern):
        lsa.sparse_attention(*args, **kwargs)


SELECT_CASES = [
    ({"scores": [0.0, 1.0]}, TypeError, r"scores must be a torch.Tensor, got list"),
    ({"scores": torch.tensor(1.0)}, ValueError, r"scores must have a chunk dimension"),
    ({"scores": torch.tensor([0.0, math.nan])}, ValueError, r"scores must be finite"),
    ({"scores": torch.tensor([0.0, -math.inf])}, ValueError, r"scores must be finite"),
    ({"scores": torch.tensor([0, 1])}, TypeError, r"scores must be a floating-point"),
    ({"budget": None}, ValueError, r"budget .* or threshold, got neither"),
    ({"budget": 2.0}, ValueError, r"budget as a float fraction must be in \(0, 1\], got 2.0"),
    ({"budget": 0}, ValueError, r"budget as an int count must be >= 1"),
    ({"sink_chunks": -1}, ValueError, r"sink_chunks must be >= 0, got -1"),
    ({"recent_chunks": -1}, ValueError, r"recent_chunks must be >= 0, got -1"),
    ({"sink_chunks": 1.0}, TypeError, r"sink_chunks must be an int"),
]


@pytest.mark.parametrize(("change", "exc", "pattern"), SELECT_CASES, ids=_ids(SELECT_CASES))
def test_select_errors(change, exc, pattern) -> None:
    kwargs = {"scores": torch.zeros(2, 5), "budget": 2, **change}
    assert lsa.select_chunks(torch.zeros(2, 5), budget=2).shape == (2, 5)
    with pytest.raises(exc, match=pattern):
        lsa.select_chunks(**kwargs)


def reserve_args(**change):
    kwargs = {
        "q": t(B, HQ, SQ, D),
        "k_reserve": t(B, HKV, 2 * CHUNK, D),
        "v_reserve": t(B, HKV, 2 * CHUNK, D),
        "block_table": torch.tensor([[[0, -1]]]),
        "kv_len": torch.tensor([SKV]),
        "chunk_size": CHUNK,
        "enable_gqa": True,
    }
    kwargs.update(change)
    return kwargs


RESERVE_CASES = [
    ({"block_table": [[[0, 1]]]}, TypeError, r"block_table must be a torch.Tensor"),
    ({"block_table": torch.tensor([[[0.0, 1.0]]])}, TypeError, r"block_table must be an integer"),
    ({"block_table": torch.tensor([[0, 1]])}, ValueError, r"block_table must be \[B=1"),
    ({"block_table": torch.tensor([[[0, 1]]] * 2)}, ValueError, r"block_table must be \[B=1"),
    ({"block_table": torch.zeros(1, 3, 2, dtype=torch.long)}, ValueError, r"block_table heads"),
    (
        {"block_table": torch.tensor([[[0, 1, 2]]])},
        ValueError,
        r"reserve length \(k_reserve dim 2\)",
    ),
    ({"kv_len": SKV}, TypeError, r"kv_len must be a torch.Tensor"),
    ({"kv_len": torch.tensor([10.0])}, TypeError, r"kv_len must be an integer tensor"),
    ({"kv_len": torch.tensor([10, 10])}, ValueError, r"kv_len must be an integer tensor of shape"),
    ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1"),
    ({"causal": None}, TypeError, r"causal must be a bool"),
    # a chunk in two slots would count its tokens twice; a negative length hides every key
    ({"block_table": torch.tensor([[[0, 0]]])}, ValueError, r"repeats chunks \[0\]"),
    ({"block_table": torch.tensor([[[1, -2]]])}, ValueError, r"entries must be chunk ids"),
    ({"kv_len": torch.tensor([-1])}, ValueError, r"kv_len must be >= 0 in every row"),
]


@pytest.mark.parametrize(("change", "exc", "pattern"), RESERVE_CASES, ids=_ids(RESERVE_CASES))
def test_reserve_errors(change, exc, pattern) -> None:
    assert lsa.reserve_attention(**reserve_args()).shape == (B, HQ, SQ, D)
    with pytest.raises(exc, match=pattern):
        lsa.reserve_attention(**reserve_args(**change))


def test_reserve_error_names_k_reserve() -> None:
    with pytest.raises(ValueError, match=r"k_reserve must be 4-D"):
        lsa.reserve_attention(**reserve_args(k_reserve=t(B, HKV, 2 * CHUNK)))


def test_zero_head_dim_is_refused() -> None:
    args, kwargs = sparse_args(q=t(B, HQ, SQ, 0), k=t(B, HKV, SKV, 0), v=t(B, HKV, SKV, 0))
    with pytest.raises(ValueError, match=r"head dim \(dim 3\) must be >= 1"):
        lsa.sparse_attention(*args, **kwargs)
    with pytest.raises(ValueError, match=r"head dim \(dim 3\) must be >= 1"):
        lsa.dense_attention(*args, enable_gqa=True)


def test_backends_without_backward_refuse_inputs_that_need_grad() -> None:
    """flex has no backward on the CPU: refused by name, not an opaque Dynamo error; under
    no_grad (or with "reference") the same call runs."""
    args, kwargs = sparse_args(q=t(B, HQ, SQ, D).requires_grad_())
    kwargs["chunk_size"] = 16
    kwargs["keep"] = torch.ones(B, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"backend='flex' cannot serve this call: it has no back"):
        lsa.sparse_attention(*args, **kwargs, backend="flex")
    out = lsa.sparse_attention(*args, **kwargs, backend="reference")
    out.sum().backward()
    assert args[0].grad is not None
    with torch.no_grad():
        assert lsa.sparse_attention(*args, **kwargs, backend="flex").shape == (B, HQ, SQ, D)
