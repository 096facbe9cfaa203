"""The memory indexer for DeepSeek-V4 in the seed's form (``seed_spec.md`` §2).

One independent retriever per target CSA layer ``L`` (a *decoder* layer index, not the seed's
count of c4 layers), reading that layer's own attention input and its own compressed index keys::

    ql    = RMSNorm(wq_a(x)) * q_norm_weight                  # x: layer L's attention input
    q     = hadamard(rope_last(wq_b(ql).view(H, d), pos))     # the model's "compress" RoPE
    w     = weights_proj(x) * d**-0.5 * H**-0.5
    k_j   = decode_fp8(index-K code of entry j)               # stored Hadamard-rotated, 132 B
    logit_j = sum_h w_h * relu(q_h . k_j)

and the layers' logits are ensembled with ``max`` (the seed's deployed ``or`` of sigmoids, since
sigmoid is monotone) or ``mean``. This is the native lightning indexer's formula: initialised
from the model (:meth:`MemoryIndexer.from_model`, the seed's ``load_pretrained``), it reproduces
the native logits up to the fp8 rounding of the keys. The Hadamard rotation is applied to both
sides (orthogonal, so ``q . k`` is unchanged); it only spreads outliers before fp8.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lsa._validation import check_int
from lsa.indexer.codec import decode_fp8, encode_fp8
from lsa.scorers.lightning import hadamard_matrix

CONFIG_NAME = "memory_indexer_config.json"
WEIGHTS_NAME = "memory_indexer.safetensors"
CSA = "compressed_sparse_attention"


@dataclass(frozen=True)
class MemoryIndexerConfig:
    """Shapes of a :class:`MemoryIndexer` (saved as JSON beside the weights).

    Attributes:
        hidden_size: the backbone's hidden size.
        target_layers: decoder layer indices of CSA layers whose hidden state and index-K are read.
        n_heads, head_dim, q_rank: retriever heads, their dim (the model's ``index_head_dim``,
            a power of two) and the query's low rank.
        rope_dim: trailing dims that get RoPE (the model's rope head dim).
        rms_norm_eps: eps of the query's RMSNorm.
        ensemble: ``"max"`` or ``"mean"`` over target layers.
        key_fp8: index keys pass through the fp8 codec (``head_dim + 4`` bytes per entry).
    """

    hidden_size: int
    target_layers: tuple[int, ...]
    n_heads: int
    head_dim: int
    q_rank: int
    rope_dim: int
    rms_norm_eps: float = 1e-6
    ensemble: str = "max"
    key_fp8: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "n_heads", "head_dim", "q_rank", "rope_dim"):
            check_int(name, getattr(self, name), minimum=1)
        if self.head_dim & (self.head_dim - 1):
            raise ValueError(f"head_dim must be a power of two (Hadamard), got {self.head_dim}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(
                f"rope_dim must be even and <= head_dim ({self.head_dim}), got {self.rope_dim}"
            )
        layers = tuple(self.target_layers)
        if not layers or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise ValueError(f"target_layers must be a non-empty tuple of ints >= 0, got {layers}")
        object.__setattr__(self, "target_layers", layers)
        if self.ensemble not in ("max", "mean"):
            raise ValueError(f"ensemble must be 'max' or 'mean', got {self.ensemble!r}")


def rope_interleaved_last(
    x: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> torch.Tensor:
    """DeepSeek-V4's RoPE: interleaved pairs (x[2i], x[2i+1]) on the last ``2 * len(inv_freq)``
    dims. ``x`` [B, ..., D] float, ``position`` int [B] (one position per row)."""
    rd = 2 * inv_freq.shape[0]
    freqs = position.float()[:, None] * inv_freq.float()[None]  # [B, rd/2]
    cos = (freqs.cos() * scaling).repeat_interleave(2, -1)
    sin = (freqs.sin() * scaling).repeat_interleave(2, -1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rd,)
    cos, sin = cos.view(shape), sin.view(shape)
    nope, rope = x[..., :-rd], x[..., -rd:]
    rotated = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, rope * cos + rotated * sin], dim=-1)


def encode_index_keys(
    index_k: torch.Tensor, fp8: bool = True, hadamard: torch.Tensor | None = None
) -> torch.Tensor:
    """Native index-K [..., d] -> the stored form: Hadamard-rotated, then fp8 codes uint8
    [..., d + 4] (the seed's 132-byte format at d = 128) or float32 when ``fp8`` is False.
    ``hadamard``: the [d, d] matrix on the keys' device, if the caller keeps one."""
    if hadamard is None:
        hadamard = hadamard_matrix(index_k.shape[-1]).to(index_k.device)
    rotated = index_k.float() @ hadamard
    return encode_fp8(rotated) if fp8 else rotated


class _Retriever(nn.Module):
    """One target layer's query tower (the seed's ``LightningIndexerTrainable``)."""

    def __init__(self, cfg: MemoryIndexerConfig):
        super().__init__()
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_rank, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(cfg.q_rank))
        self.wq_b = nn.Linear(cfg.q_rank, cfg.n_heads * cfg.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.n_heads, bias=False)


class MemoryIndexer(nn.Module):
    """Scores compressed entries of the CSA history for the current token (see module doc)."""

    def __init__(self, config: MemoryIndexerConfig, inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        if not isinstance(config, MemoryIndexerConfig):
            raise TypeError(f"config must be a MemoryIndexerConfig, got {type(config).__name__}")
        if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] != config.rope_dim:
            raise ValueError(
                f"inv_freq must be [rope_dim / 2] = [{config.rope_dim // 2}], "
                f"got {tuple(inv_freq.shape)}"
            )
        self.config = config
        self.rope_scaling = float(rope_scaling)
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=True)
        self.register_buffer("hadamard", hadamard_matrix(config.head_dim), persistent=False)
        self.retrievers = nn.ModuleDict({f"l{i}": _Retriever(config) for i in config.target_layers})

    @property
    def target_layers(self) -> tuple[int, ...]:
        return self.config.target_layers

    # keys -------------------------------------------------------------------------------------
    def encode_keys(self, index_k: torch.Tensor) -> torch.Tensor:
        """Native index-K [..., head_dim] -> what the indexer stores: the Hadamard-rotated key,
        as fp8 codes uint8 [..., head_dim + 4] (``key_fp8``) or float32."""
        return encode_index_keys(index_k, self.config.key_fp8, self.hadamard)

    def decode_keys(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored keys (from :meth:`encode_keys`) -> float32 [..., head_dim]."""
        return decode_fp8(stored) if stored.dtype == torch.uint8 else stored.float()

    # scoring ----------------------------------------------------------------------------------
    def layer_logits(
        self, layer: int, hidden: torch.Tensor, position: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, N] of one target layer.

        Args:
            hidden: [B, hidden_size] the layer's attention input for the current token.
            position: int [B] the current token's position.
            keys: [B, N, head_dim] float decoded keys (:meth:`decode_keys`).
        """
        cfg = self.config
        r = self.retrievers[f"l{layer}"]
        x = hidden.float()
        ql = r.wq_a(x)
        ql = ql * torch.rsqrt(ql.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        ql = ql * r.q_norm_weight
        q = r.wq_b(ql).view(x.shape[0], cfg.n_heads, cfg.head_dim)
        q = rope_interleaved_last(q, position, self.inv_freq, self.rope_scaling)
        q = q @ self.hadamard
        w = r.weights_proj(x) * (cfg.head_dim**-0.5 * cfg.n_heads**-0.5)  # [B, H]
        dots = torch.relu(torch.einsum("bhd,bnd->bnh", q, keys.float()))
        return (dots * w[:, None, :]).sum(-1)

    def score(
        self, hidden: dict[int, torch.Tensor], position: torch.Tensor, keys: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """Ensembled logits [B, N] over the target layers (same N entries in every layer)."""
        missing = [x for x in self.target_layers if x not in hidden or x not in keys]
        if missing:
            raise ValueError(f"score needs hidden and keys of target layers {missing}")
        per = [self.layer_logits(x, hidden[x], position, keys[x]) for x in self.target_layers]
        stacked = torch.stack(per)
        return stacked.amax(0) if self.config.ensemble == "max" else stacked.mean(0)

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        target_layers,
        *,
        n_heads: int | None = None,
        q_rank: int | None = None,
        ensemble: str = "max",
        key_fp8: bool = True,
    ) -> MemoryIndexer:
        """A memory indexer for a transformers DeepSeek-V4 model, initialised like the seed's
        ``load_pretrained``: each retriever copies its layer's ``q_a_proj``/``q_a_norm`` and native
        indexer ``q_b_proj``/``weights_proj``. With more heads or rank than the model, only the
        overlapping block is copied; the rest keeps the default init."""
        config = model.config
        layer_types = list(config.layer_types)
        targets = tuple(int(x) for x in target_layers)
        bad = [x for x in targets if not 0 <= x < len(layer_types) or layer_types[x] != CSA]
        if bad:
            csa = [i for i, t in enumerate(layer_types) if t == CSA]
            raise ValueError(f"target_layers must be CSA layers {csa}, got {bad}")
        body = getattr(model, "model", model)
        rotary = body.rotary_emb
        inv_freq = rotary.compress_inv_freq
        cfg = MemoryIndexerConfig(
            hidden_size=config.hidden_size,
            target_layers=targets,
            n_heads=n_heads or config.index_n_heads,
            head_dim=config.index_head_dim,
            q_rank=q_rank or config.q_lora_rank,
            rope_dim=2 * inv_freq.shape[0],
            rms_norm_eps=config.rms_norm_eps,
            ensemble=ensemble,
            key_fp8=key_fp8,
        )
        out = cls(cfg, inv_freq, rotary.compress_attention_scaling)
        with torch.no_grad():
            for x in targets:
                attn = body.layers[x].self_attn
                native = attn.compressor.indexer
                r = out.retrievers[f"l{x}"]
                rank = min(cfg.q_rank, config.q_lora_rank)
                rows = min(cfg.n_heads, config.index_n_heads) * cfg.head_dim
                heads = min(cfg.n_heads, config.index_n_heads)
                r.wq_a.weight[:rank].copy_(attn.q_a_proj.weight[:rank].float())
                r.q_norm_weight[:rank].copy_(attn.q_a_norm.weight[:rank].float())
                r.wq_b.weight[:rows, :rank].copy_(native.q_b_proj.weight[:rows, :rank].float())
                r.weights_proj.weight[:heads].copy_(
                    native.scorer.weights_proj.weight[:heads].float()
                )
        return out.to(next(model.parameters()).device)

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        data = asdict(self.config) | {"rope_scaling": self.rope_scaling}
        (path / CONFIG_NAME).write_text(json.dumps(data, indent=1) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MemoryIndexer:
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"directory must hold {CONFIG_NAME}, got {str(path)!r}")
        data = json.loads((path / CONFIG_NAME).read_text())
        scaling = data.pop("rope_scaling")
        data["target_layers"] = tuple(data["target_layers"])
        state = load_file(str(path / WEIGHTS_NAME))
        out = cls(MemoryIndexerConfig(**data), state["inv_freq"], scaling)
        out.load_state_dict(state)
        return out
