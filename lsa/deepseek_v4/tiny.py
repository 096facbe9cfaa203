"""Small random DeepSeek-V4 configurations: every layer kind, tiny dims, seconds on a CPU."""

from __future__ import annotations

import torch


def tiny_config(
    layer_types=(
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    ),
    *,
    index_topk: int = 4,
    sliding_window: int = 8,
    vocab_size: int = 64,
):
    """A DeepseekV4Config with hidden 32, 2 heads of 16 dims (8 with RoPE), indexer 2 x 16,
    CSA rate 4, HCA rate 8, two experts: small enough for thousands of CPU decode steps."""
    from transformers import DeepseekV4Config

    n = len(layer_types)
    return DeepseekV4Config(
        vocab_size=vocab_size,
        hidden_size=32,
        moe_intermediate_size=16,
        intermediate_size=16,
        num_hidden_layers=n,
        num_attention_heads=2,
        head_dim=16,
        q_lora_rank=16,
        n_routed_experts=2,
        num_experts_per_tok=1,
        layer_types=list(layer_types),
        mlp_layer_types=["moe"] * n,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        sliding_window=sliding_window,
        o_groups=2,
        o_lora_rank=8,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=index_topk,
        partial_rotary_factor=0.5,
        hc_mult=2,
        hc_sinkhorn_iters=3,
        max_position_embeddings=1 << 16,
        eos_token_id=None,
        bos_token_id=None,
    )


def tiny_model(seed: int = 0, **kwargs):
    """A random ``DeepseekV4ForCausalLM`` on :func:`tiny_config` (eval mode, fp32).

    Random init zeroes the compressors' position bias and the attention sinks; they are drawn
    here too, so the tests exercise them."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "sinks")):
                p.normal_(0.0, 0.5)
    return model


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """Greedy decoding with a plain loop (what generate() does, without its per-step overhead):
    the prompt in one forward, then ``steps`` one-token forwards. Returns [B, S + steps]."""
    from lsa.cache.model import cache_kwarg

    kw = cache_kwarg(model)
    out = model(input_ids=input_ids, **{kw: cache})
    tokens = [input_ids, out.logits[:, -1:].argmax(-1)]
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1], **{kw: cache})
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, 1)
