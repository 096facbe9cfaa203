"""One dense prefill per batch, shared by every method of the evaluation.

Every method prefills densely (LSACache's prefill is exact dense SDPA with the model's mask), so
the prompt's K/V, the first answer token and the hidden states the scorers read are the same for
all of them. :func:`prefill_batch` runs that prefill once, through ``generate()`` with one new
token so that positions, masks and the greedy pick are exactly those of a normal request; each
method then continues from it (:func:`lsa.eval.runner.run_method`): ``dense`` on a copy of the
``DynamicCache``, the cache methods through :meth:`lsa.LSACache.load_prefill`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lsa.cache.model import attention_modules, cache_kwarg, text_config


@dataclass
class Prefill:
    """One batch after its prefill."""

    ids: torch.Tensor  # [B, P] left-padded prompts
    mask: torch.Tensor  # [B, P]
    cache: object  # the DynamicCache holding the prompt's K/V
    first: torch.Tensor  # [B] the greedy first answer token (from the prefill's logits)
    hidden: dict[int, torch.Tensor]  # layer -> attention input of the last prompt token [B, hidden]

    def keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prompt's K and V [B, H_kv, P, D]."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def dense_cache(self):
        """A copy the dense method may extend (generation appends to it)."""
        return copy.deepcopy(self.cache)

    def continued_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` that continue the request after the first token."""
        ids = torch.cat([self.ids, self.first[:, None]], 1)
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        return ids, mask


def prefill_batch(model, ids: torch.Tensor, mask: torch.Tensor, *, pad_id: int) -> Prefill:
    """The dense prefill of ``ids`` [B, P] (left-padded, ``mask`` [B, P]) and its first token."""
    from transformers import DynamicCache

    n_layers = text_config(model).num_hidden_layers
    hidden: dict[int, torch.Tensor] = {}

    def capture(idx: int):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            hidden[idx] = x[:, -1].detach().clone()

        return hook

    handles = [
        module.register_forward_pre_hook(capture(i), with_kwargs=True)
        for i, module in attention_modules(model, n_layers).items()
    ]
    cache = DynamicCache(config=model.config)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
        out = model.generate(
            ids,
            attention_mask=mask,
            **{cache_kwarg(model): cache},
            max_new_tokens=1,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
        )
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
    if cache.get_seq_length() != ids.shape[1]:
        raise RuntimeError(
            f"the shared prefill cached {cache.get_seq_length()} tokens, expected {ids.shape[1]}"
        )
    return Prefill(ids, mask, cache, out[:, -1], hidden)


__all__ = ["Prefill", "prefill_batch"]
