"""The ``"lsa"`` attention implementation for transformers decoders (registered on import).

A standard decoder layer calls ``cache.update(k, v, layer_idx)`` and then the registered attention
function with what ``update`` returned. :class:`~lsa.cache.LSACache` hands the layer over through
a thread-local slot (checked by tensor identity), so no model code is patched:

- prefill (the cache is empty): plain SDPA over the prompt with the model's mask (dense, exact),
  then the prompt's K/V go to the mirror;
- decode: :func:`lsa.reserve_attention` over the reserve (resident chunks + tail) with the
  cache's block table and per-row logical lengths.

Without an LSACache the function is exact dense SDPA when no past K/V is given (e.g. a plain
forward), and raises when another cache supplies past K/V.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from lsa.cache.layer import LSALayer

ATTN_IMPLEMENTATION = "lsa"


@dataclass
class Handoff:
    """What ``LSACache.update`` returned for one layer, for the attention call that follows."""

    layer: LSALayer
    key: torch.Tensor
    mode: str  # "prefill" or "decode"


_slot = threading.local()


def hand_over(layer: LSALayer, key: torch.Tensor, mode: str) -> None:
    _slot.handoff = Handoff(layer, key, mode)


def _take(module: torch.nn.Module, key: torch.Tensor) -> Handoff | None:
    handoff = getattr(_slot, "handoff", None)
    if handoff is None or handoff.key is not key:
        return None
    _slot.handoff = None
    if getattr(module, "layer_idx", handoff.layer.layer_idx) != handoff.layer.layer_idx:
        raise RuntimeError(
            f"LSACache handed layer {handoff.layer.layer_idx}'s K/V to the attention of layer "
            f"{module.layer_idx}"
        )
    return handoff


def lsa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``"lsa"``: query [B, H_q, S_q, D] -> [B, S_q, H_q, D]."""
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"attn_implementation='lsa' supports full attention only; layer "
            f"{getattr(module, 'layer_idx', '?')} uses sliding_window={kwargs['sliding_window']}"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='lsa' does not support attention logit softcapping")
    handoff = _take(module, key)
    if handoff is None:
        if key.shape[2] != query.shape[2]:
            raise TypeError(
                "attn_implementation='lsa' decodes only with an lsa.LSACache: this call got "
                f"{key.shape[2] - query.shape[2]} past tokens from another cache (e.g. a "
                "DynamicCache); pass cache=LSACache(model, scorer, ...) to generate()"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cache = handoff.layer.cache
    if handoff.mode == "prefill":
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        cache.ingest_prefill(handoff.layer, key, value, attention_mask)
        return out, None
    return cache.decode_attention(handoff.layer, query, key, value, scaling), None


def register_lsa_attention() -> str:
    """Register ``"lsa"`` with transformers' AttentionInterface (and SDPA's mask function for it).

    Idempotent. Call it before ``from_pretrained(..., attn_implementation="lsa")``;
    :class:`~lsa.cache.LSACache` calls it itself. Returns the implementation name.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, lsa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


# Registering a new name changes no existing behaviour, and it must happen before
# `model.set_attn_implementation("lsa")` or `from_pretrained(..., attn_implementation="lsa")`,
# which validate the name: so importing lsa.cache registers it.
register_lsa_attention()
