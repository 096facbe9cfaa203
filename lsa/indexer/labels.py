"""Lookahead targets from the model's real attention, for every position, in one forward pass.

Definition (for a document of ``S`` tokens, chunks of ``cs`` tokens, lookahead ``τ``):

- ``A[u, j]``: the attention probability that query ``u`` puts on the keys of chunk ``j``,
  averaged over the label layers and all their query heads (so ``Σ_j A[u, j] = 1``), or, with
  ``head_reduce="max"``, the largest such probability of any one (label layer, head): a few
  retrieval heads that copy from one chunk then decide, instead of being averaged away. It
  comes from the model's own post-RoPE queries and keys in one teacher-forced pass, in blocks of
  queries so memory stays ``O(block · S)`` per layer; the full ``[S, S]`` is never stored.
- At position ``t`` the chunks that exist are those that end at or before ``t``:
  ``n_t = (t + 1) // cs``. Of these, the first ``sink_chunks`` and the last ``recent_chunks`` are
  forced (kept anyway); the rest, ``j ∈ [sink, n_t − recent)``, are *selectable*.
- **Target** ``y_t[j] = Σ_{u=t}^{min(t+τ, S)−1} A[u, j]`` for selectable ``j``, normalised to sum 1
  over the selectable chunks. Chunks formed after ``t`` never appear, neither as positives nor as
  negatives (the original's causality leak is not copied).
- **Reactive** (SnapKV-style baseline, what a selector without lookahead sees):
  ``r_t[j] = Σ_{u=t−w+1}^{t} A[u, j]`` over the same chunks, normalised the same way.
- Binary views derive from ``y_t``: the oracle's top-k free picks at a budget
  (:func:`oracle_positives`). Top-p sets are not used: at 4K they mark nearly every chunk.

Rows are stored in CSR form (``ptr``, ``index``, values) because ``n_t`` grows with ``t``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS

_IMPL = "lsa_label_capture"


@dataclass(frozen=True)
class LabelConfig:
    """How lookahead targets are built (stored in the dump manifest)."""

    chunk_size: int = 64
    lookahead: int = 64
    sink_chunks: int = SINK_CHUNKS
    recent_chunks: int = RECENT_CHUNKS
    #: decoder layers whose attention is aggregated; ``None`` = all layers.
    label_layers: tuple[int, ...] | None = None
    #: SnapKV-style window: the last ``reactive_window`` queries up to ``t``.
    reactive_window: int = 64
    #: queries per block when computing attention mass.
    query_block: int = 256
    #: queries before it get no mass (zero rows): the oracle needs only the answer's queries.
    query_start: int = 0
    #: how the (label layer, head) attention distributions combine: "mean" or "max".
    head_reduce: str = "mean"

    def __post_init__(self):
        for name in ("chunk_size", "lookahead", "reactive_window", "query_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("sink_chunks", "recent_chunks", "query_start"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.label_layers is not None:
            object.__setattr__(self, "label_layers", tuple(int(x) for x in self.label_layers))
        if self.head_reduce not in ("mean", "max"):
            raise ValueError(f"head_reduce must be 'mean' or 'max', got {self.head_reduce!r}")

    def selectable(self, t: int) -> range:
        """Selectable chunk indices at position ``t``: existing, not sink, not recent."""
        n_t = (t + 1) // self.chunk_size
        return range(self.sink_chunks, max(self.sink_chunks, n_t - self.recent_chunks))


def chunk_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    chunk_size: int,
    query_block: int = 256,
    query_start: int = 0,
    reduce: str = "sum",
) -> torch.Tensor:
    """Causal attention mass per query and chunk, summed (or, ``reduce="max"``, maxed) over
    query heads.

    Args:
        query: [H_q, S, D] post-RoPE queries of one sequence; key: [H_kv, S, D], H_q % H_kv == 0.
        scaling: the logit scale the layer uses.
        query_start: rows of the queries before it stay zero (not computed).

    Returns:
        float32 [S, ceil(S / chunk_size)]: ``Σ_h Σ_{s ∈ chunk j, s ≤ u} softmax_s(q_u·k_s)``
        (``max_h`` in place of ``Σ_h`` with ``reduce="max"``).
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    h_q, s, d = query.shape
    h_kv = key.shape[0]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key heads ({h_kv})")
    g = h_q // h_kv
    n_chunks = -(-s // chunk_size)
    out = torch.zeros(s, n_chunks, dtype=torch.float32, device=query.device)
    q = query.float().view(h_kv, g, s, d)  # [H_kv, g, S, D]
    k = key.float()
    for start in range(min(query_start, s), s, query_block):
        stop = min(s, start + query_block)
        kv_len = stop  # causal: this block sees keys [0, stop)
        logits = torch.einsum("hgbd,hsd->hgbs", q[:, :, start:stop], k[:, :kv_len]) * scaling
        u = torch.arange(start, stop, device=query.device)[:, None]
        logits.masked_fill_(torch.arange(kv_len, device=query.device)[None, :] > u, float("-inf"))
        p = torch.softmax(logits, dim=-1)  # [H_kv, g, b, kv_len]
        pad = (-kv_len) % chunk_size
        p = torch.nn.functional.pad(p, (0, pad)).view(h_kv, g, stop - start, -1, chunk_size)
        p = p.sum(-1)  # [H_kv, g, b, chunks]: each head's mass per chunk, then across heads
        p = p.sum((0, 1)) if reduce == "sum" else p.amax((0, 1))
        out[start:stop, : p.shape[1]] += p
    return out


class AttentionRecorder:
    """Collects, during one forward pass of a Hugging Face decoder (batch 1):

    - ``mass``: [S, n_chunks] attention mass summed over the label layers and their heads,
    - ``n_terms``: how many (layer, head) distributions were summed (rows of ``mass`` sum to it;
      1 with ``head_reduce="max"``, whose rows are not normalised),
    - ``hidden[layer]``: [S, hidden] attention inputs of the target layers,
    - ``keys[layer]``: [H_kv, S, D] post-RoPE keys of the target layers.

    Use as a context manager around the forward call (see :func:`teacher_forced_pass`). It routes
    attention through a registered function that records and then calls SDPA, and restores the
    model's attention implementation on exit.
    """

    def __init__(self, model, target_layers, config: LabelConfig):
        self.model = model
        self.target_layers = tuple(target_layers)
        self.config = config
        self.layers = _decoder_layers(model)
        n = len(self.layers)
        bad = [x for x in self.target_layers if not 0 <= x < n]
        if bad:
            raise ValueError(f"target_layers must be in [0, {n}), got {bad}")
        label_layers = config.label_layers if config.label_layers is not None else range(n)
        self.label_layers = set(label_layers)
        if not self.label_layers or not all(0 <= x < n for x in self.label_layers):
            raise ValueError(f"label_layers must be non-empty and in [0, {n}), got {label_layers}")
        self.mass: torch.Tensor | None = None
        self.n_terms = 0
        self.hidden: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self._handles = []
        self._previous_impl = None

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if query.shape[0] != 1:
            raise ValueError(f"the recorder handles batch 1, got batch {query.shape[0]}")
        if layer in self.target_layers:
            self.keys[layer] = key[0].detach().float().clone()
        if layer in self.label_layers:
            cfg = self.config
            top = cfg.head_reduce == "max"  # the strongest head of any label layer; rows unscaled
            m = chunk_attention_mass(
                query[0], key[0], scaling, cfg.chunk_size, cfg.query_block, cfg.query_start,
                reduce="max" if top else "sum",
            )  # fmt: skip
            if self.mass is None:
                self.mass = m
            else:
                self.mass = torch.maximum(self.mass, m) if top else self.mass + m
            self.n_terms = 1 if top else self.n_terms + query.shape[1]

    def __enter__(self) -> AttentionRecorder:
        _register_capture()
        self._previous_impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(_IMPL)
        for idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            attn._lsa_recorder = self
            if idx in self.target_layers:
                self._handles.append(
                    attn.register_forward_pre_hook(self._hidden_hook(idx), with_kwargs=True)
                )
        return self

    def _hidden_hook(self, idx: int):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.hidden[idx] = x[0].detach().float().clone()

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for layer in self.layers:
            with contextlib.suppress(AttributeError):
                del layer.self_attn._lsa_recorder
        self.model.set_attn_implementation(self._previous_impl)


def _decoder_layers(model):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"cannot find decoder layers on {type(model).__name__} (model.model.layers)"
        )
    return layers


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = getattr(module, "_lsa_recorder", None)
    if recorder is not None:
        recorder.observe(module.layer_idx, query, key, kwargs.get("scaling") or module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_IMPL, _capture_attention)
    AttentionMaskInterface.register(_IMPL, sdpa_mask)


@torch.no_grad()
def teacher_forced_pass(
    model, input_ids: torch.Tensor, target_layers, config: LabelConfig
) -> AttentionRecorder:
    """Run the decoder body once over ``input_ids`` [1, S] and return the filled recorder."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, S], got {tuple(input_ids.shape)}")
    body = getattr(model, "model", model)  # skip the LM head: its logits are not needed
    with AttentionRecorder(model, target_layers, config) as rec:
        body(input_ids=input_ids, use_cache=False)
    if rec.mass is None:
        raise RuntimeError("no attention was recorded: the model did not call its attention")
    return rec


@dataclass
class Targets:
    """CSR lookahead targets for sampled positions of one document.

    ``index[ptr[i]:ptr[i+1]]`` are the selectable chunks at ``position[i]``; ``target`` and
    ``reactive`` hold their normalised lookahead / SnapKV-style mass; ``n_chunks[i]`` is
    ``n_t``; ``selectable_mass[i]`` is the share of the window's attention on selectable chunks.
    """

    position: torch.Tensor  # int64 [T]
    n_chunks: torch.Tensor  # int64 [T]
    ptr: torch.Tensor  # int64 [T + 1]
    index: torch.Tensor  # int32 [nnz]
    target: torch.Tensor  # float32 [nnz]
    reactive: torch.Tensor  # float32 [nnz]
    selectable_mass: torch.Tensor  # float32 [T]


def lookahead_targets(mass: torch.Tensor, n_terms: int, positions, config: LabelConfig) -> Targets:
    """Targets at ``positions`` from ``mass`` [S, n_chunks] (see the module docstring)."""
    s = mass.shape[0]
    a = mass.float() / n_terms  # rows sum to 1 (head_reduce="mean")
    cum = torch.cat([torch.zeros(1, a.shape[1]), a.cumsum(0)], 0)  # cum[u] = Σ_{<u}
    rows_i, rows_t, rows_r, ptr, n_list, sel_mass, pos_list = [], [], [], [0], [], [], []
    for t in positions:
        t = int(t)
        if not 0 <= t < s:
            raise ValueError(f"positions must be in [0, {s}), got {t}")
        sel = torch.tensor(list(config.selectable(t)), dtype=torch.long)
        window = cum[min(t + config.lookahead, s)] - cum[t]
        past = cum[t + 1] - cum[max(0, t + 1 - config.reactive_window)]
        y, r = window[sel], past[sel]
        total = float(window.sum())
        sel_mass.append(float(y.sum()) / total if total > 0 else 0.0)
        y = y / y.sum() if y.sum() > 0 else y
        r = r / r.sum() if r.sum() > 0 else r
        rows_i.append(sel.to(torch.int32))
        rows_t.append(y)
        rows_r.append(r)
        ptr.append(ptr[-1] + len(sel))
        n_list.append((t + 1) // config.chunk_size)
        pos_list.append(t)
    cat = lambda xs, dt: torch.cat(xs).to(dt) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
    return Targets(
        position=torch.tensor(pos_list, dtype=torch.int64),
        n_chunks=torch.tensor(n_list, dtype=torch.int64),
        ptr=torch.tensor(ptr, dtype=torch.int64),
        index=cat(rows_i, torch.int32),
        target=cat(rows_t, torch.float32),
        reactive=cat(rows_r, torch.float32),
        selectable_mass=torch.tensor(sel_mass, dtype=torch.float32),
    )


def dense_row(index: torch.Tensor, values: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """One CSR row as a dense float [n_chunks] (zeros on forced chunks)."""
    out = torch.zeros(n_chunks, dtype=torch.float32)
    out[index.long()] = values.float()
    return out


def oracle_positives(target: torch.Tensor, selectable: torch.Tensor, k: int) -> torch.Tensor:
    """Binary view: bool [..., n], the ``k`` selectable chunks with the most target mass.

    Ties go to the earlier chunk (stable sort), as in :func:`lsa.select_chunks`.
    """
    masked = target.masked_fill(~selectable, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return (ranks < k) & selectable
