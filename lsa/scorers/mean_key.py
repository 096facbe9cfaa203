"""A stand-in :class:`~lsa.scorers.ChunkScorer` for tests: no training, never a default.

Chunk key = the mean of the chunk's cached (post-RoPE) keys, per KV head. Score = the largest,
over query heads, of the scaled dot product between the layer's *real* query for the captured
hidden state (the attention module's ``q_proj`` and RoPE at the token's position) and the chunk's
mean key; summed over target layers. It approximates "which chunk would this query attend to"
and is deterministic, which is all the cache tests need.
"""

from __future__ import annotations

import torch

from lsa.scorers.contract import check_scorer_settings


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MeanKeyScorer:
    """Mean-key scorer read from a transformers decoder (Llama/Qwen2-style attention)."""

    def __init__(
        self, model: torch.nn.Module, target_layers: tuple[int, ...] = (0,), chunk_size: int = 64
    ) -> None:
        config = model.config.get_text_config(decoder=True)
        self.chunk_size, self.target_layers = check_scorer_settings(chunk_size, target_layers)
        self.hidden_size = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.num_key_value_heads = config.num_key_value_heads
        self.num_heads = config.num_attention_heads
        self._attn = {
            m.layer_idx: m
            for m in model.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")
        }
        rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        if not rotary:
            raise ValueError(f"no rotary embedding module found in {type(model).__name__}")
        self._rotary = rotary[0]

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        b, h, t, d = keys.shape
        n = t // self.chunk_size
        mean = keys.float().view(b, h, n, self.chunk_size, d).mean(3)  # [B, H_kv, n, D]
        return mean.permute(0, 2, 1, 3).reshape(b, n, h * d)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        total = None
        for layer in self.target_layers:
            attn = self._attn[layer]
            h = hidden[layer]  # [B, hidden]
            b = h.shape[0]
            q = attn.q_proj(h).view(b, 1, self.num_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q = attn.q_norm(q)
            q = q.transpose(1, 2)  # [B, H_q, 1, D]
            cos, sin = self._rotary(q, position[:, None])  # [B, 1, D]
            q = (q * cos[:, None] + _rotate_half(q) * sin[:, None])[:, :, 0].float()
            keys = chunk_keys[layer]
            n = keys.shape[1]
            k = keys.view(b, n, self.num_key_value_heads, self.head_dim)
            group = self.num_heads // self.num_key_value_heads
            qg = q.view(b, self.num_key_value_heads, group, self.head_dim)
            logits = torch.einsum("bhgd,bnhd->bhgn", qg, k) * self.head_dim**-0.5
            logits = logits.amax(dim=(1, 2))  # [B, n]
            total = logits if total is None else total + logits
        return total
