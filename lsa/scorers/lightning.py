"""The lightning-form memory indexer: a dual encoder over the decoder's own states.

Per target layer ``L`` (one independent pair of towers each)::

    query tower (hidden x of the current token, [B, hidden]; the attention input of layer L):
        ql = RMSNorm(wq_a(x))                            # low-rank, [B, q_rank]
        q  = wq_b(ql).view(B, H, d)                      # per-head
        q  = hadamard(rope_last(q, position))            # RoPE on the last rope_dim dims
        w  = weights_proj(x) * d**-0.5 * H**-0.5         # per-head weights, [B, H]
    key tower (the layer's cached keys of one chunk, [cs, H_kv, D], post-RoPE):
        f  = [mean, min, max] over the chunk's tokens of the keys with the backbone's RoPE undone
        k  = hadamard(rope_last(RMSNorm(w_k(f)), chunk_start))      # [d], one key per chunk
    logit_j = sum_h w_h * relu(q_h . k_j) + bias ;  sigmoid(logit) = keep probability
    (with ``prev_chunk``: relu(q_h . k_j) + gamma_h * relu(q_h . k_{j-1}) inside the sum)

and the target layers' logits are ensembled with ``max`` (or ``mean``).

Fine-grained index keys (``key_group = g``, a divisor of the chunk size below it): the key
tower runs on every group of ``g`` consecutive tokens instead of the whole chunk (the pooled
statistics of the group; for ``g = 1`` the de-rotated token key itself) with its RoPE at the
group's first position, so a chunk has ``m = chunk_size / g`` index keys, returned flattened as
one ``[m · index_dim]`` chunk key (the cache stores it like any other). A chunk's logit pools
its keys' logits, by their max or (``key_pool="logsumexp"``) their log-sum-exp::

    logit_j = max_i sum_h w_h * relu(q_h . k_{j,i}) + bias

(log-sum-exp: under the listwise softmax a chunk then weighs as the sum of its groups, as its
lookahead target is the sum of its tokens' attention mass).

Why: a pooled chunk key blurs look-alike facts (near-identical needles) into the same
statistics; one key per few tokens keeps the fact that matches the query apart, as the
original's index keys (one per 4 tokens) and DeepSeek's sparse attention (one per token) do.
With ``key_fp8``, :meth:`LightningIndexer.encode_chunks` returns the keys packed by the fp8
codec (uint8, ``index_dim + 4`` bytes per key), which is what the cache then holds.

Why this key tower: the cache holds the post-RoPE keys of every token, so a chunk key must be a
function of them. Undoing the backbone's rotation gives position-free content; the per-channel
mean (MoBA's and ShadowKV's chunk landmark) and min/max (Quest's page bounds) summarise what
queries of that layer can find in the chunk, and cost nothing to keep. A learned projection of
these statistics then feeds the same RoPE-at-chunk-start + Hadamard path as the original's
compressed index keys, so ``q . k`` sees the distance between the query and the chunk.

The module implements :class:`lsa.scorers.ChunkScorer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import torch
from torch import nn

from lsa._validation import check_bool, check_int
from lsa.indexer.codec import decode_fp8, encode_fp8, fake_quantize_fp8

CONFIG_NAME = "indexer_config.json"
WEIGHTS_NAME = "indexer.safetensors"
#: 2: ``indexer_config.json`` carries ``tensors_sha256`` (:func:`tensors_sha256`), checked on
#: load; 1 (no checksum) still loads, with a warning. 3: as 2, and the config may hold
#: ``key_group`` and ``key_pool`` (fine-grained keys); pooled indexers are still saved as format
#: 2, unchanged.
FORMAT_VERSION = 3
POOLED_FORMAT_VERSION = 2
#: the pooled statistics of a chunk's keys, in the order :func:`chunk_features` concatenates them
KEY_STATS = ("mean", "min", "max")


@dataclass(frozen=True)
class IndexerConfig:
    """Shapes and choices of a :class:`LightningIndexer` (saved as JSON beside the weights).

    Attributes:
        hidden_size: the backbone's hidden size (query tower input).
        kv_heads, kv_head_dim: the backbone's KV heads and head dim (key tower input).
        target_layers: decoder layers whose hidden state and keys are read.
        chunk_size: tokens per chunk.
        n_heads, index_dim, q_rank: indexer heads, their dim (a power of two, for the Hadamard
            rotation) and the query tower's low rank.
        rope_dim, rope_theta: the indexer's own RoPE, on the last ``rope_dim`` dims.
        ensemble: ``"max"`` or ``"mean"`` of the per-layer logits.
        key_fp8: chunk keys pass through the fp8 codec (132 bytes per 128-dim key).
        derotate_keys: undo the backbone's RoPE before pooling (needs ``backbone_inv_freq``).
        backbone_rope_scaling: the backbone's cos/sin scaling (``attention_scaling``).
        backbone: free-form name of the backbone, for checks and reports.
        prev_chunk: each head also scores a chunk by its predecessor's match, with a learned
            per-head weight (``gamma``, starts at 0): a fact cut by a chunk border continues in
            a chunk whose own tokens say nothing about the question.
        key_stats: which pooled statistics of the chunk's keys the key tower reads (a subset of
            ``KEY_STATS``, kept in that order; an ablation knob, all three by default).
        key_group: ``None`` (the pooled tower: one index key per chunk) or ``g``, a divisor of
            ``chunk_size`` below it: one index key per ``g`` tokens (fine-grained; ``g = 1``
            reads each token's key, so ``key_stats`` must stay all three, they coincide).
        key_pool: how a chunk's logit pools its index keys' logits: ``"max"`` or
            ``"logsumexp"`` (fine-grained keys only).
    """

    hidden_size: int
    kv_heads: int
    kv_head_dim: int
    target_layers: tuple[int, ...]
    chunk_size: int = 64
    n_heads: int = 8
    index_dim: int = 128
    q_rank: int = 128
    rope_dim: int = 64
    rope_theta: float = 10000.0
    ensemble: str = "max"
    key_fp8: bool = False
    derotate_keys: bool = True
    backbone_rope_scaling: float = 1.0
    backbone: str = ""
    prev_chunk: bool = False
    key_stats: tuple[str, ...] = KEY_STATS
    key_group: int | None = None
    key_pool: str = "max"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # Configs come from JSON files too: every field is checked for its kind (TypeError) and
        # its value (ValueError), so "key_fp8": "no" or "rope_theta": "abc" never slip through.
        # Values are stored as the checks return them (plain int / float / tuple), so that a
        # numpy int or a list from JSON compares and saves like the Python value.
        for name in ("hidden_size", "kv_heads", "kv_head_dim", "chunk_size", "n_heads", "q_rank"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        d = check_int("index_dim", self.index_dim, minimum=2)
        if d & (d - 1):
            raise ValueError(f"index_dim must be a power of two >= 2, got {d}")
        rope_dim = check_int("rope_dim", self.rope_dim, minimum=0)
        object.__setattr__(self, "index_dim", d)
        object.__setattr__(self, "rope_dim", rope_dim)
        if rope_dim % 2 or rope_dim > d:
            raise ValueError(f"rope_dim must be even and in [0, index_dim={d}], got {rope_dim}")
        if self.kv_head_dim % 2:
            raise ValueError(f"kv_head_dim must be even, got {self.kv_head_dim}")
        layers = _check_sequence("target_layers", self.target_layers, "ints (decoder layers)")
        layers = tuple(check_int(f"target_layers[{i}]", x, minimum=0) for i, x in enumerate(layers))
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"target_layers must be non-empty and distinct, got {list(layers)}")
        object.__setattr__(self, "target_layers", layers)
        for name in ("rope_theta", "backbone_rope_scaling"):
            object.__setattr__(self, name, _check_positive_float(name, getattr(self, name)))
        for name in ("key_fp8", "derotate_keys", "prev_chunk"):
            check_bool(name, getattr(self, name))
        for name in ("ensemble", "backbone"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
        if self.ensemble not in ("max", "mean"):
            raise ValueError(f"ensemble must be 'max' or 'mean', got {self.ensemble!r}")
        stats = _check_sequence("key_stats", self.key_stats, f"names from {KEY_STATS}")
        for i, x in enumerate(stats):
            if not isinstance(x, str):
                raise TypeError(f"key_stats[{i}] must be a str, got {type(x).__name__} {x!r}")
        if not stats or len(set(stats)) != len(stats) or not set(stats) <= set(KEY_STATS):
            raise ValueError(
                f"key_stats must be distinct names from {KEY_STATS}, got {list(stats)}"
            )
        object.__setattr__(self, "key_stats", tuple(x for x in KEY_STATS if x in stats))
        if not isinstance(self.key_pool, str):
            raise TypeError(f"key_pool must be a str, got {type(self.key_pool).__name__}")
        if self.key_pool not in ("max", "logsumexp"):
            raise ValueError(f"key_pool must be 'max' or 'logsumexp', got {self.key_pool!r}")
        if self.key_group is None and self.key_pool != "max":
            raise ValueError("key_pool applies to fine-grained keys only; set key_group too")
        if self.key_group is not None:
            g = check_int("key_group", self.key_group, minimum=1)
            object.__setattr__(self, "key_group", g)
            if g >= self.chunk_size or self.chunk_size % g:
                raise ValueError(
                    f"key_group must be None (one pooled key per chunk) or a divisor of "
                    f"chunk_size={self.chunk_size} below it (e.g. 1, 4, 16), got {g}"
                )
            if self.prev_chunk:
                raise ValueError("prev_chunk needs the pooled tower (key_group=None)")
            if g == 1 and self.key_stats != KEY_STATS:
                raise ValueError(
                    f"key_stats does not apply to key_group=1 (a single token's key is its own "
                    f"mean, min and max); leave it at {list(KEY_STATS)}, got {list(self.key_stats)}"
                )
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__} {self.extra!r}")
        try:  # saved as JSON: what does not come back equal would change on a save/load
            same = json.loads(json.dumps(self.extra, allow_nan=False)) == self.extra
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"extra must hold only JSON values under str keys (it is saved as JSON), "
                f"got {self.extra!r}"
            )

    @property
    def feature_dim(self) -> int:
        """Size of the pooled chunk statistics (:func:`chunk_features`, also what a dump
        stores): ``len(KEY_STATS) · kv_heads · kv_head_dim``."""
        return len(KEY_STATS) * self.kv_heads * self.kv_head_dim

    @property
    def keys_per_chunk(self) -> int:
        """Index keys per chunk: 1 for the pooled tower, ``chunk_size / key_group`` else."""
        return 1 if self.key_group is None else self.chunk_size // self.key_group

    @property
    def key_input_dim(self) -> int:
        """What the key tower's projection reads per index key: the chosen statistics of its
        tokens' keys, or (``key_group = 1``) the token's key."""
        block = self.kv_heads * self.kv_head_dim
        return block if self.key_group == 1 else len(self.key_stats) * block

    def key_bytes_per_token(self, fp8: bool | None = None) -> float:
        """Device bytes of index keys per history token, all target layers: stored by the fp8
        codec (``index_dim + 4`` bytes a key; default: when ``key_fp8``) or as float32."""
        fp8 = self.key_fp8 if fp8 is None else fp8
        per_key = self.index_dim + 4 if fp8 else 4 * self.index_dim
        return len(self.target_layers) * self.keys_per_chunk * per_key / self.chunk_size

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["target_layers"] = list(self.target_layers)
        out["key_stats"] = list(self.key_stats)
        if self.key_group is None:  # pooled configs stay byte-identical to format 2
            del out["key_group"], out["key_pool"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> IndexerConfig:
        if not isinstance(data, dict):
            raise TypeError(f"indexer config must be a dict, got {type(data).__name__} {data!r}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"indexer config has unknown fields {unknown}; known: {sorted(names)}")
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"indexer config lacks the required fields {missing}")
        return cls(**data)


def _check_sequence(name: str, value: object, of: str) -> tuple:
    """A list or tuple (a bare int or str is a mistake, not a one-element sequence)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of {of}, got {type(value).__name__} {value!r}")
    return tuple(value)


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a number (float or int), got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The checksum ``save_pretrained`` writes and ``from_pretrained`` checks: SHA-256 over the
    tensors in sorted name order, each as a JSON line ``[name, dtype, shape]`` then its raw bytes
    (C order, the machine's byte order). The line fixes the byte count, so the stream has one
    reading; hashing the tensors rather than the file leaves the header's layout free."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        line = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        h.update(line.encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±inf, sorted."""
    return sorted(
        name
        for name, t in tensors.items()
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all())
    )


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def hadamard_matrix(d: int) -> torch.Tensor:
    """Normalised Walsh–Hadamard matrix ``[d, d]`` (orthogonal, symmetric), d a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def rope_last(x: torch.Tensor, position: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """Rotate the last ``rope_dim`` dims of ``x`` [..., d] (half-split) by ``position`` [...]."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = position.to(torch.float32)[..., None] * inv  # [..., half]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    while cos.dim() < x.dim():  # broadcast over head dims between position's dims and d
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    keep, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    a, b = rot[..., :half], rot[..., half:]
    return torch.cat([keep, a * cos - b * sin, a * sin + b * cos], dim=-1)


def chunk_features(
    keys: torch.Tensor,
    chunk_start: torch.Tensor,
    chunk_size: int,
    inv_freq: torch.Tensor | None,
    rope_scaling: float = 1.0,
) -> torch.Tensor:
    """Pooled statistics of each chunk's keys: ``[B, n, 3 * H_kv * D]`` (mean, min, max).

    Args:
        keys: [B, H_kv, n * chunk_size, D] post-RoPE keys of whole chunks.
        chunk_start: int [B, n], the position of each chunk's first token.
        inv_freq: the backbone's RoPE inverse frequencies [D/2] (rotate-half convention, as in
            Llama and Qwen2); ``None`` pools the keys as given.
    """
    k = derotated_keys(keys, chunk_start, chunk_size, inv_freq, rope_scaling)
    return torch.cat([k.mean(2), k.amin(2), k.amax(2)], dim=-1)


def group_features(
    keys: torch.Tensor,
    chunk_start: torch.Tensor,
    chunk_size: int,
    group: int,
    inv_freq: torch.Tensor | None,
    rope_scaling: float = 1.0,
) -> torch.Tensor:
    """Key-tower input of fine-grained keys: ``[B, n, chunk_size / group, F]``, per group of
    ``group`` tokens the mean, min and max of their (de-rotated) keys (``F = 3 · H_kv · D``), or
    for ``group = 1`` the token's key itself (``F = H_kv · D``). Arguments as
    :func:`chunk_features`."""
    if chunk_size % group:
        raise ValueError(f"group must divide chunk_size={chunk_size}, got {group}")
    k = derotated_keys(keys, chunk_start, chunk_size, inv_freq, rope_scaling)
    b, n, _, f = k.shape
    if group == 1:
        return k
    k = k.view(b, n, chunk_size // group, group, f)
    return torch.cat([k.mean(3), k.amin(3), k.amax(3)], dim=-1)


def derotated_keys(
    keys: torch.Tensor,
    chunk_start: torch.Tensor,
    chunk_size: int,
    inv_freq: torch.Tensor | None,
    rope_scaling: float = 1.0,
) -> torch.Tensor:
    """Post-RoPE keys [B, H_kv, n * cs, D] -> fp32 keys with the backbone's RoPE undone (as
    given when ``inv_freq`` is ``None``), heads side by side: [B, n, cs, H_kv * D]."""
    b, h_kv, s, d = keys.shape
    n = chunk_start.shape[-1]
    if s != n * chunk_size:
        raise ValueError(
            f"keys must hold n * chunk_size = {n} * {chunk_size} tokens, got {s} ([B, H_kv, S, D] "
            f"= {tuple(keys.shape)})"
        )
    k = keys.float().view(b, h_kv, n, chunk_size, d)  # [B, H_kv, n, cs, D]
    if inv_freq is not None:
        pos = chunk_start.to(torch.float32)[:, :, None] + torch.arange(
            chunk_size, device=keys.device, dtype=torch.float32
        )  # [B, n, cs]
        ang = pos[..., None] * inv_freq.to(keys.device, torch.float32)  # [B, n, cs, D/2]
        ang = torch.cat([ang, ang], dim=-1)[:, None]  # [B, 1, n, cs, D]
        cos, sin = ang.cos() * rope_scaling, ang.sin() * rope_scaling
        rot_half = torch.cat([-k[..., d // 2 :], k[..., : d // 2]], dim=-1)
        # k = x cos + rot_half(x) sin  =>  x = (k cos - rot_half(k) sin) / scaling^2
        k = (k * cos - rot_half * sin) / (rope_scaling * rope_scaling)
    return k.permute(0, 2, 3, 1, 4).reshape(b, n, chunk_size, h_kv * d)


class _LayerIndexer(nn.Module):
    """Query and key towers for one target layer."""

    def __init__(self, cfg: IndexerConfig):
        super().__init__()
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_rank, bias=False)
        self.q_norm = nn.RMSNorm(cfg.q_rank, eps=1e-6)
        self.wq_b = nn.Linear(cfg.q_rank, cfg.n_heads * cfg.index_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.n_heads, bias=False)
        self.wk = nn.Linear(cfg.key_input_dim, cfg.index_dim, bias=False)
        self.k_norm = nn.RMSNorm(cfg.index_dim, eps=1e-6)
        self.bias = nn.Parameter(torch.zeros(()))
        if cfg.prev_chunk:
            self.gamma = nn.Parameter(torch.zeros(cfg.n_heads))


class LightningIndexer(nn.Module):
    """Lightning-form memory indexer (see the module docstring); a :class:`ChunkScorer`."""

    def __init__(self, config: IndexerConfig, backbone_inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.chunk_size = config.chunk_size
        self.target_layers = config.target_layers
        self.layers = nn.ModuleDict(
            {str(layer): _LayerIndexer(config) for layer in config.target_layers}
        )
        self.register_buffer("hadamard", hadamard_matrix(config.index_dim), persistent=False)
        if config.key_stats != KEY_STATS:  # the columns of the pooled statistics the tower reads
            block = config.kv_heads * config.kv_head_dim
            cols = [KEY_STATS.index(x) * block + i for x in config.key_stats for i in range(block)]
            self.register_buffer("stat_columns", torch.tensor(cols), persistent=False)
        else:
            self.stat_columns = None
        if config.derotate_keys:
            if backbone_inv_freq is None:
                backbone_inv_freq = torch.zeros(config.kv_head_dim // 2)  # set by from_pretrained
            if tuple(backbone_inv_freq.shape) != (config.kv_head_dim // 2,):
                raise ValueError(
                    f"backbone_inv_freq must be [kv_head_dim/2] = [{config.kv_head_dim // 2}], "
                    f"got {tuple(backbone_inv_freq.shape)}"
                )
            self.register_buffer("backbone_inv_freq", backbone_inv_freq.float().clone())
        else:
            self.backbone_inv_freq = None

    # -- towers -----------------------------------------------------------------------------

    def _layer(self, layer: int) -> _LayerIndexer:
        if layer not in self.target_layers:
            raise ValueError(
                f"layer must be one of target_layers {self.target_layers}, got {layer}"
            )
        return self.layers[str(layer)]

    def features(self, keys: torch.Tensor, chunk_start: torch.Tensor) -> torch.Tensor:
        """Key-tower input for whole chunks: [B, H_kv, n*cs, D] keys -> [B, n, feature_dim]
        (pooled), or [B, n, keys_per_chunk, F] (:func:`group_features`, with ``key_group``)."""
        cfg = self.config
        if keys.dim() != 4 or keys.shape[1] != cfg.kv_heads or keys.shape[3] != cfg.kv_head_dim:
            raise ValueError(
                f"keys must be [B, H_kv={cfg.kv_heads}, n*chunk_size, D={cfg.kv_head_dim}], "
                f"got {tuple(keys.shape)}"
            )
        if chunk_start.dim() != 2 or chunk_start.shape[0] != keys.shape[0]:
            raise ValueError(
                f"chunk_start must be int [B={keys.shape[0]}, n], got {tuple(chunk_start.shape)}"
            )
        if cfg.key_group is not None:
            return group_features(
                keys,
                chunk_start,
                cfg.chunk_size,
                cfg.key_group,
                self.backbone_inv_freq,
                cfg.backbone_rope_scaling,
            )
        return chunk_features(
            keys, chunk_start, cfg.chunk_size, self.backbone_inv_freq, cfg.backbone_rope_scaling
        )

    def encode_features(
        self, layer: int, features: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        """Key tower from :meth:`features`: pooled [B, n, feature_dim] or grouped
        [B, n, m, F] -> chunk keys [B, n, m * index_dim] (``m = keys_per_chunk``, 1 if pooled),
        float (fp8 values with ``key_fp8``)."""
        cfg = self.config
        mod = self._layer(layer)
        m = cfg.keys_per_chunk
        if cfg.key_group is None:
            features = features[:, :, None]  # [B, n, 1, F]
        if features.dim() != 4 or features.shape[2] != m:
            raise ValueError(
                f"features must be [B, n, {m}, F] (key_group={cfg.key_group}), got "
                f"{tuple(features.shape)}"
            )
        if self.stat_columns is not None:
            features = features.index_select(-1, self.stat_columns)
        b, n = features.shape[:2]
        k = mod.k_norm(mod.wk(features.to(mod.wk.weight.dtype)))  # [B, n, m, d]
        # Each index key's RoPE sits at its group's first token (the chunk start if pooled).
        offset = torch.arange(m, device=chunk_start.device) * (cfg.chunk_size // m)
        k = rope_last(k, chunk_start[..., None] + offset, cfg.rope_dim, cfg.rope_theta)
        k = k @ self.hadamard
        if cfg.key_fp8:  # straight-through: the forward sees fp8 keys, gradients pass unchanged
            k = k + (fake_quantize_fp8(k) - k).detach()
        return k.reshape(b, n, m * cfg.index_dim)

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        """ChunkScorer: post-RoPE cached keys [B, H_kv, n*cs, D] -> chunk keys
        [B, n, m * index_dim] float, or with ``key_fp8`` packed by the fp8 codec: uint8
        [B, n, m * (index_dim + 4)] (what the cache then stores; :meth:`score` unpacks it)."""
        k = self.encode_features(layer, self.features(keys, chunk_start), chunk_start)
        if not self.config.key_fp8:
            return k
        b, n = k.shape[:2]
        return encode_fp8(k.view(b, n, -1, self.config.index_dim)).view(b, n, -1)

    def unpack_keys(self, chunk_keys: torch.Tensor) -> torch.Tensor:
        """Chunk keys as :meth:`encode_chunks` returns them -> float [B, n, m, index_dim]."""
        cfg = self.config
        m, d = cfg.keys_per_chunk, cfg.index_dim
        packed = chunk_keys.dtype == torch.uint8
        width = m * (d + 4) if packed else m * d
        if chunk_keys.dim() != 3 or chunk_keys.shape[2] != width:
            kind = f"uint8 fp8-packed [B, n, {m}*({d}+4)]" if packed else f"float [B, n, {m}*{d}]"
            raise ValueError(f"chunk_keys must be {kind}, got {tuple(chunk_keys.shape)}")
        b, n = chunk_keys.shape[:2]
        if packed:
            return decode_fp8(chunk_keys.reshape(b, n, m, d + 4))
        return chunk_keys.reshape(b, n, m, d)

    def layer_logits(
        self, layer: int, hidden: torch.Tensor, position: torch.Tensor, chunk_keys: torch.Tensor
    ) -> torch.Tensor:
        """One layer's logits [B, n] for hidden [B, hidden], position [B] and chunk keys
        [B, n, m * d] (float or fp8-packed, as :meth:`encode_chunks` returns them): per chunk
        the max over its ``m`` index keys (``m = 1`` for the pooled tower)."""
        cfg = self.config
        mod = self._layer(layer)
        x = hidden.to(mod.wq_a.weight.dtype)
        b = x.shape[0]
        q = mod.wq_b(mod.q_norm(mod.wq_a(x))).view(b, cfg.n_heads, cfg.index_dim)  # [B, H, d]
        q = rope_last(q, position, cfg.rope_dim, cfg.rope_theta) @ self.hadamard
        w = mod.weights_proj(x) * (cfg.index_dim**-0.5 * cfg.n_heads**-0.5)  # [B, H]
        keys = self.unpack_keys(chunk_keys).to(q.dtype)  # [B, n, m, d]
        if cfg.key_group is None:
            s = torch.relu(torch.einsum("bhd,bnd->bnh", q, keys[:, :, 0]))  # [B, n, H]
            if cfg.prev_chunk:  # chunk j also scores by chunk j-1's match (chunk 0 has none)
                s = s + mod.gamma * torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1]
            return (s * w[:, None, :]).sum(-1) + mod.bias
        # All index keys of the history in one product: [B, n*m, d] x [B, d, H].
        b, n, m, d = keys.shape
        s = torch.relu(torch.bmm(keys.reshape(b, n * m, d), q.transpose(1, 2)))  # [B, n*m, H]
        per_key = torch.bmm(s, w[:, :, None]).view(b, n, m)
        pooled = per_key.amax(-1) if cfg.key_pool == "max" else per_key.logsumexp(-1)
        return pooled + mod.bias

    def ensemble(self, logits: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(logits, 0)
        return stacked.amax(0) if self.config.ensemble == "max" else stacked.mean(0)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """ChunkScorer: logits [B, n] from every target layer's hidden [B, hidden] and keys."""
        missing = [
            layer for layer in self.target_layers if layer not in hidden or layer not in chunk_keys
        ]
        if missing:
            raise ValueError(f"hidden and chunk_keys need every target layer; missing {missing}")
        return self.ensemble(
            [
                self.layer_logits(layer, hidden[layer], position, chunk_keys[layer])
                for layer in self.target_layers
            ]
        )

    # -- persistence ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``indexer.safetensors`` and ``indexer_config.json`` (with the tensors' checksum,
        :func:`tensors_sha256`) into ``directory``.

        Raises:
            ValueError: a weight holds NaN or ±inf (``from_pretrained`` would refuse the file).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        bad = _non_finite(tensors)
        if bad:
            raise ValueError(f"cannot save an indexer with non-finite (NaN/inf) weights: {bad}")
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "lsa-indexer"})
        meta = {
            "format_version": (
                POOLED_FORMAT_VERSION if self.config.key_group is None else FORMAT_VERSION
            ),
            "tensors_sha256": tensors_sha256(tensors),
            "config": self.config.to_dict(),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **expect) -> LightningIndexer:
        """Load an indexer saved by :meth:`save_pretrained`.

        Format 2 files must carry ``tensors_sha256``; format 1 files (no checksum) load with a
        warning. Non-finite weights are refused in both.

        Args:
            expect: config fields the caller requires (e.g. ``hidden_size=576``,
                ``target_layers=(10, 20)``); any difference raises.

        Raises:
            ValueError: missing files, an unknown format, an invalid config or one that does not
                match ``expect``, weights whose names or shapes do not match the config, whose
                checksum does not match the config's, or that hold NaN or ±inf.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise ValueError(f"{directory} must hold {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{cfg_path} must hold a JSON object, got {type(meta).__name__}")
        version = meta.get("format_version")
        if type(version) is not int or version not in (1, 2, FORMAT_VERSION):  # true == 1
            raise ValueError(
                f"{cfg_path}: expected format_version 1, 2 or {FORMAT_VERSION}, got {version!r}"
            )
        known = {"format_version", "config", "tensors_sha256"}
        unknown = sorted(set(meta) - known)
        if unknown or "config" not in meta:
            raise ValueError(
                f"{cfg_path} must hold the keys {sorted(known)} (tensors_sha256 from format 2 on), "
                f"got {sorted(meta)}"
            )
        checksum = meta.get("tensors_sha256")
        if checksum is None and version >= 2:
            raise ValueError(f"{cfg_path}: format_version {version} needs tensors_sha256, absent")
        if checksum is not None and (
            not isinstance(checksum, str)
            or len(checksum) != 64
            or any(c not in "0123456789abcdef" for c in checksum)
        ):
            raise ValueError(
                f"{cfg_path}: tensors_sha256 must be 64 lowercase hex digits, got {checksum!r}"
            )
        try:
            config = IndexerConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: invalid indexer config: {e}") from e
        for key, want in expect.items():
            got = getattr(config, key, None)
            want = tuple(want) if key == "target_layers" else want
            if got != want:
                raise ValueError(f"indexer in {directory} has {key}={got!r}, expected {want!r}")
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{w_path} is not a readable safetensors file: {e}") from e
        if checksum is None:
            warnings.warn(
                f"{cfg_path} is format_version 1 and carries no checksum of {w_path.name}: "
                "corrupted weights are caught only if they turn non-finite; re-save it with "
                "save_pretrained to add one",
                stacklevel=2,
            )
        elif tensors_sha256(tensors) != checksum:
            raise ValueError(
                f"{w_path}: the weights do not match their config's checksum (tensors_sha256 in "
                f"{cfg_path.name}): the file is corrupted or was changed after saving"
            )
        model = cls(config)
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{w_path} does not match its config: missing {missing}, unexpected {unexpected}"
            )
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{w_path}: tensor {name!r} has shape {tuple(value.shape)}, the config needs "
                    f"{tuple(own[name].shape)}"
                )
        bad = _non_finite(tensors)
        if bad:
            raise ValueError(f"{w_path}: non-finite (NaN/inf) values in the tensors {bad}")
        model.load_state_dict(tensors)
        return model
