"""What LSACache needs to know about a transformers decoder, and what it refuses."""

from __future__ import annotations

import torch

_FULL = "full_attention"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``generate()`` takes a cache under: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before. Passing the wrong one is silent on 5.17, which forwards an unknown
    ``cache=`` to the layers and builds its own DynamicCache."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def attention_modules(model: torch.nn.Module, n_layers: int) -> dict[int, torch.nn.Module]:
    """layer_idx -> the attention module of that decoder layer (the module calling the cache)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if (
            isinstance(idx, int)
            and type(module).__name__.endswith("Attention")
            and hasattr(module, "q_proj")
        ):
            found.setdefault(idx, module)
    missing = [i for i in range(n_layers) if i not in found]
    if missing:
        raise ValueError(
            f"LSACache could not find the attention modules of decoder layers {missing} in "
            f"{type(model).__name__} (looked for *Attention modules with layer_idx and q_proj)"
        )
    return found


def check_layer_types(config) -> None:
    """Raise unless every decoder layer is plain full attention."""
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        bad = {i: t for i, t in enumerate(layer_types) if t != _FULL}
        if bad:
            shown = ", ".join(f"layer {i}: {t!r}" for i, t in list(bad.items())[:6])
            raise ValueError(
                f"LSACache supports full-attention layers only; {type(config).__name__} has "
                f"{len(bad)} of {n_layers} other layers ({shown})"
            )
    elif getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"LSACache supports full-attention layers only; {type(config).__name__} uses "
            f"sliding_window={config.sliding_window} attention"
        )
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(
            f"LSACache supports full-attention layers only; {type(config).__name__} uses "
            f"chunked attention (attention_chunk_size={config.attention_chunk_size})"
        )
