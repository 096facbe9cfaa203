"""Lookahead targets for the DeepSeek-V4 memory indexer, from the native attention over
compressed entries (the same graded, causal definition as :mod:`lsa.indexer.labels`).

One teacher-forced forward of the stock model without a cache records, for every query ``u``
and every CSA label layer and head, the attention probability on each compressed entry (the
native attention: sliding window, the entries its own top-k picked, and the per-head sink share
one softmax). Pages of ``page_size`` entries are the unit of selection, so:

- ``A[u, p]``: that probability summed over the entries of page ``p``, averaged over the label
  layers and their heads;
- page ``p`` exists at ``t`` once all its entries do: entry ``e`` is written by token
  ``4e + 3`` (rate ``m``), so ``n_t = (t + 1) // (page_size * m)``, which is
  ``lookahead_targets``' chunk rule with ``chunk_size = page_size * m`` tokens;
- target ``y_t[p] = Σ_{u=t}^{t+τ-1} A[u, p]`` over the selectable pages at ``t``, normalised.

Pages formed after ``t`` are neither positives nor negatives (the seed's labels leaked them,
``seed_spec.md`` §8.2). The same pass records the target layers' attention inputs and their
index-K over the whole sequence, so generated entries are never missing from the keys (§8.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsa.deepseek_v4.memory_indexer import CSA
from lsa.indexer.labels import LabelConfig, Targets, lookahead_targets


@dataclass
class Recording:
    """What one teacher-forced pass over a document [1, S] yields."""

    #: float32 [S, T]: attention probability on each compressed entry, mean over label heads
    entry_mass: torch.Tensor
    #: per target layer, float32 [S, hidden]: the attention input of every position
    hidden: dict[int, torch.Tensor]
    #: per target layer, float32 [T, index_head_dim]: the native index-K of every entry
    index_k: dict[int, torch.Tensor]
    #: tokens per compressed entry (the CSA rate)
    compress_rate: int


def csa_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.layer_types) if t == CSA]


@torch.no_grad()
def record_document(model, input_ids: torch.Tensor, target_layers, label_layers=None) -> Recording:
    """Run the stock model once over ``input_ids`` [1, S] (no cache) and record a
    :class:`Recording`. ``label_layers``: CSA layers whose attention makes the labels (all CSA
    layers by default)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"input_ids must be a [1, S] tensor, got {getattr(input_ids, 'shape', input_ids)}"
        )
    csa = csa_layers(model)
    label_layers = tuple(csa if label_layers is None else label_layers)
    targets = tuple(target_layers)
    bad = [x for x in (*label_layers, *targets) if x not in csa]
    if bad:
        raise ValueError(f"label_layers and target_layers must be CSA layers {csa}, got {bad}")
    if getattr(model.config, "_attn_implementation", "eager") not in (None, "eager"):
        raise ValueError("record_document needs eager attention (its probabilities are read)")
    body = getattr(model, "model", model)
    s = input_ids.shape[1]
    mass: list[torch.Tensor] = []
    hidden: dict[int, torch.Tensor] = {}
    index_k: dict[int, torch.Tensor] = {}
    handles = []

    def on_attention(module, args, out):
        probs = out[1]  # [1, H, S, S + T]: window keys first, then the compressed entries
        mass.append(probs[0, :, :, s:].float().mean(0))

    def on_input(layer):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden[layer] = x[0].detach().float().clone()

        return hook

    def on_scorer(layer):
        def hook(module, args, out):
            index_k[layer] = args[1][0].detach().float().clone()  # [T, d]

        return hook

    try:
        for x in label_layers:
            handles.append(body.layers[x].self_attn.register_forward_hook(on_attention))
        for x in targets:
            attn = body.layers[x].self_attn
            handles.append(attn.register_forward_pre_hook(on_input(x), with_kwargs=True))
            handles.append(attn.compressor.indexer.scorer.register_forward_hook(on_scorer(x)))
        body(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(mass) != len(label_layers) or any(m.shape[0] != s for m in mass):
        raise RuntimeError("the label layers' attention probabilities were not all recorded")
    rate = model.config.compress_rates[CSA]
    return Recording(torch.stack(mass).mean(0), hidden, index_k, rate)


def page_mass(entry_mass: torch.Tensor, page_size: int) -> torch.Tensor:
    """[S, T] entry mass -> [S, ceil(T / page_size)] page mass (sum over a page's entries)."""
    s, t = entry_mass.shape
    pad = (-t) % page_size
    return torch.nn.functional.pad(entry_mass, (0, pad)).view(s, -1, page_size).sum(-1)


def page_label_config(
    page_size: int, compress_rate: int, lookahead: int, sink_pages: int, recent_pages: int
) -> LabelConfig:
    """The :class:`LabelConfig` whose token chunks are the pages (``page_size`` entries)."""
    return LabelConfig(
        chunk_size=page_size * compress_rate,
        lookahead=lookahead,
        sink_chunks=sink_pages,
        recent_chunks=recent_pages,
    )


def page_targets(recording: Recording, positions, config: LabelConfig) -> Targets:
    """CSR lookahead targets over pages at ``positions`` (see the module docstring)."""
    page_size = config.chunk_size // recording.compress_rate
    mass = page_mass(recording.entry_mass, page_size)
    return lookahead_targets(mass, 1, positions, config)
