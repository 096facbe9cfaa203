"""Reading dump shards back (no backbone, no transformers): positions, features, labels."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from lsa.indexer.dump import MANIFEST

#: tensors every shard holds (besides ``hidden.{L}`` and ``features.{L}`` per target layer)
SHARD_TENSORS = (
    "position", "n_chunks", "is_answer", "selectable_mass", "sample_doc", "doc_chunk_ptr",
    "label_ptr", "label_index", "label_target", "label_reactive",
)  # fmt: skip


class EmptySplit(ValueError):
    """The dump holds no position of the split asked for (a small corpus may have no test)."""


#: what a manifest's settings hold for training (besides much else), and its label settings
MANIFEST_SETTINGS = (
    "model", "hidden_size", "kv_heads", "kv_head_dim", "target_layers", "labels",
    "backbone_inv_freq", "backbone_rope_scaling",
)  # fmt: skip
LABEL_SETTINGS = ("chunk_size", "sink_chunks", "recent_chunks")


def _lacks(obj, keys) -> list[str] | str:
    """The ``keys`` a JSON object lacks (all of them, as "everything", if it is no object)."""
    return [k for k in keys if k not in obj] if isinstance(obj, dict) else "everything"


def read_manifest(directory: Path) -> dict:
    """A dump's manifest, its structure checked; ``ValueError`` says what is wrong with it."""
    dump = "expected a folder written by `python -m lsa dump`"
    if not directory.is_dir():
        state = "is a file" if directory.exists() else "does not exist"
        raise ValueError(f"{directory} {state}; {dump}")
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory} holds no {MANIFEST}; {dump}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file ({err}); {dump}") from None
    lacks = _lacks(manifest, ("settings", "shards"))
    if not lacks:
        lacks = [f"settings.{k}" for k in _lacks(manifest["settings"], MANIFEST_SETTINGS)]
    if not lacks:
        lacks = [
            f"settings.labels.{k}" for k in _lacks(manifest["settings"]["labels"], LABEL_SETTINGS)
        ]
    if not lacks and not isinstance(manifest["shards"], list):
        lacks = ["shards (a list)"]
    if not lacks:
        for i, shard in enumerate(manifest["shards"]):
            lacks = [f"shards[{i}].{k}" for k in _lacks(shard, ("file", "docs"))]
            if not lacks and not isinstance(shard["docs"], list):
                lacks = [f"shards[{i}].docs (a list)"]
            for j, doc in enumerate([] if lacks else shard["docs"]):
                lacks = [f"shards[{i}].docs[{j}].{k}" for k in _lacks(doc, ("id", "split"))]
                if lacks:
                    break
            if lacks:
                break
    if lacks:
        raise ValueError(f"{path} is not a dump manifest: it lacks {lacks}; {dump}")
    layers = manifest["settings"]["target_layers"]
    if not (isinstance(layers, list) and layers and all(isinstance(x, int) for x in layers)):
        raise ValueError(f"{path}: settings.target_layers must be a list of ints, got {layers!r}")
    if not manifest["shards"]:
        raise ValueError(f"{path} lists no shards (no document was dumped: all too short?)")
    return manifest


def read_shard(
    directory: Path, shard: dict, layers: list[int], token_keys: bool = False
) -> dict[str, torch.Tensor]:
    """One shard's tensors, checked against the manifest's entry; ``ValueError`` if not.
    ``token_keys``: the shard must also hold ``tokens.{L}`` (``lsa dump --token-keys``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / shard["file"]
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors shard: {err}") from None
    needed = [*SHARD_TENSORS, *(f"{kind}.{la}" for la in layers for kind in ("hidden", "features"))]
    if token_keys:
        needed += [f"tokens.{la}" for la in layers]
    missing = [k for k in needed if k not in t]
    if missing:
        hint = " (fine-grained keys need a dump made with --token-keys)" if token_keys else ""
        raise ValueError(f"{path} lacks tensors {missing}{hint}")
    n, docs = t["position"].numel(), len(shard["docs"])
    if t["label_ptr"].numel() != n + 1 or t["doc_chunk_ptr"].numel() != docs + 1:
        raise ValueError(
            f"{path} does not match its manifest entry: {n} positions, {docs} documents, "
            f"label_ptr {t['label_ptr'].numel()} and doc_chunk_ptr {t['doc_chunk_ptr'].numel()}"
        )
    return t


@dataclass
class Batch:
    """Padded batch of positions. ``n`` = the longest ``n_t`` in the batch."""

    hidden: dict[int, torch.Tensor]  # [B, hidden] per target layer
    #: [B, n, F] per target layer (zeros past each n_t); once the data holds fine-grained group
    #: features (:meth:`ShardData.set_features`), the whole table [C, m, F], read through
    #: ``chunk_row`` (a copy per slot would be ``m`` times the pooled batch, for repeated chunks)
    features: dict[int, torch.Tensor]
    chunk_start: torch.Tensor  # int64 [B, n]
    chunk_row: torch.Tensor  # int64 [B, n]: the chunk's row in the data's features; -1 if absent
    position: torch.Tensor  # int64 [B]
    exists: torch.Tensor  # bool [B, n]: chunk exists at t
    selectable: torch.Tensor  # bool [B, n]: exists, not sink, not recent
    target: torch.Tensor  # float [B, n]: graded lookahead target (zeros off selectable)
    reactive: torch.Tensor  # float [B, n]: SnapKV-style scores (zeros off selectable)
    n_chunks: torch.Tensor  # int64 [B]

    def to(self, device) -> Batch:
        """The same batch with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = (
                {k: t.to(device) for k, t in v.items()} if isinstance(v, dict) else v.to(device)
            )
        return Batch(**moved)


class ShardData:
    """All shards of a dump in memory, one split at a time (``split`` in train/val/test/None).

    With ``token_keys``, ``tokens[L]`` holds every chunk's post-RoPE token keys
    [C, chunk_size, H_kv·D] (float16, from ``lsa dump --token-keys``) and ``chunk_position``
    [C] each chunk's first position, the input of fine-grained key towers.

    Raises:
        EmptySplit: no position of ``split``.
        ValueError: ``directory`` is no readable dump (the message says what is wrong).
    """

    def __init__(self, directory: str | Path, split: str | None = None, token_keys: bool = False):
        directory = Path(directory)
        manifest = read_manifest(directory)
        self.settings = manifest["settings"]
        self.layers = [int(x) for x in self.settings["target_layers"]]
        lab = self.settings["labels"]
        self.chunk_size = int(lab["chunk_size"])
        self.sink_chunks, self.recent_chunks = int(lab["sink_chunks"]), int(lab["recent_chunks"])
        parts: dict[str, list] = {}
        feats: dict[int, list] = {layer: [] for layer in self.layers}
        toks: dict[int, list] = {layer: [] for layer in self.layers}
        chunk_pos: list[torch.Tensor] = []
        doc_offset = chunk_offset = label_offset = 0
        self.doc_chunk_start: list[int] = []
        self.doc_ids: list[str] = []
        #: the manifest's entry of each kept document (id, split, length, task, bucket?).
        self.doc_meta: list[dict] = []
        for shard in manifest["shards"]:
            t = read_shard(directory, shard, self.layers, token_keys)
            keep_doc = [split is None or d["split"] == split for d in shard["docs"]]
            doc_keep = torch.tensor(keep_doc, dtype=torch.bool)
            sample_keep = doc_keep[t["sample_doc"]]
            # Re-index documents and chunk features for the kept documents only.
            cptr = t["doc_chunk_ptr"]
            new_doc = torch.full((len(keep_doc),), -1, dtype=torch.int64)
            for i, k in enumerate(keep_doc):
                if not k:
                    continue
                new_doc[i] = doc_offset
                self.doc_chunk_start.append(chunk_offset)
                self.doc_ids.append(shard["docs"][i]["id"])
                self.doc_meta.append(shard["docs"][i])
                for layer in self.layers:
                    feats[layer].append(t[f"features.{layer}"][cptr[i] : cptr[i + 1]])
                    if token_keys:
                        toks[layer].append(t[f"tokens.{layer}"][cptr[i] : cptr[i + 1]])
                chunk_pos.append(torch.arange(int(cptr[i + 1] - cptr[i])) * self.chunk_size)
                chunk_offset += int(cptr[i + 1] - cptr[i])
                doc_offset += 1
            idx = sample_keep.nonzero().flatten()
            ptr = t["label_ptr"]
            starts, stops = ptr[idx], ptr[idx + 1]
            sel = (
                torch.cat(
                    [
                        torch.arange(a, b)
                        for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
                    ]
                )
                if len(idx)
                else torch.zeros(0, dtype=torch.long)
            )
            lens = stops - starts
            parts.setdefault("label_len", []).append(lens)
            for key in ("label_index", "label_target", "label_reactive"):
                parts.setdefault(key, []).append(t[key][sel])
            for key in ("position", "n_chunks", "is_answer", "selectable_mass"):
                parts.setdefault(key, []).append(t[key][idx])
            parts.setdefault("doc", []).append(new_doc[t["sample_doc"][idx]])
            for layer in self.layers:
                parts.setdefault(f"hidden.{layer}", []).append(t[f"hidden.{layer}"][idx])
            label_offset += int(lens.sum())
        if not parts or sum(len(p) for p in parts["position"]) == 0:
            raise EmptySplit(f"{directory} has no positions in split {split!r}")
        cat = {k: torch.cat(v) for k, v in parts.items()}
        self.position, self.n_chunks = cat["position"], cat["n_chunks"]
        self.is_answer, self.selectable_mass = cat["is_answer"].bool(), cat["selectable_mass"]
        self.doc = cat["doc"]
        self.hidden = {layer: cat[f"hidden.{layer}"] for layer in self.layers}
        self.features = {layer: torch.cat(feats[layer]) for layer in self.layers}
        self.tokens = {layer: torch.cat(toks[layer]) for layer in self.layers} if token_keys else {}
        self.chunk_position = torch.cat(chunk_pos)
        self.label_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), cat["label_len"].cumsum(0)])
        self.label_index = cat["label_index"].long()
        self.label_target, self.label_reactive = cat["label_target"], cat["label_reactive"]
        self.doc_chunk_start_t = torch.tensor(self.doc_chunk_start, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.position.numel())

    @property
    def feature_dim(self) -> int:
        """Per-key feature size (the last dim of ``features``)."""
        return int(self.features[self.layers[0]].shape[-1])

    def set_features(self, features: dict[int, torch.Tensor]) -> None:
        """Replace the chunk features by others with one row per chunk (e.g. fine-grained
        group features [C, m, F] made from ``tokens``); the token keys are then dropped."""
        total = self.features[self.layers[0]].shape[0]
        for layer in self.layers:
            got = features.get(layer)
            if got is None or got.shape[0] != total:
                shape = None if got is None else tuple(got.shape)
                raise ValueError(f"features[{layer}] must have {total} rows (chunks), got {shape}")
        self.features = {layer: features[layer] for layer in self.layers}
        self.tokens = {}

    #: tensors :meth:`to` moves (``is_answer``, ``selectable_mass`` stay on the CPU for reports).
    _DEVICE_TENSORS = (
        "position", "n_chunks", "doc", "doc_chunk_start_t", "label_ptr", "label_index",
        "label_target", "label_reactive",
    )  # fmt: skip

    def to(self, device) -> ShardData:
        """Move what :meth:`batch` reads to ``device`` (in place), so batches are built there."""
        for name in self._DEVICE_TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        self.hidden = {k: v.to(device) for k, v in self.hidden.items()}
        self.features = {k: v.to(device) for k, v in self.features.items()}
        return self

    def batch(self, indices: torch.Tensor) -> Batch:
        """Positions ``indices`` as a padded :class:`Batch` on this data's device."""
        dev = self.position.device
        indices = indices.to(dev).long()
        b = len(indices)
        n_t = self.n_chunks[indices]
        n = max(1, int(n_t.max()))
        j = torch.arange(n, device=dev)
        exists = j[None] < n_t[:, None]
        selectable = (
            exists & (j[None] >= self.sink_chunks) & (j[None] < (n_t - self.recent_chunks)[:, None])
        )
        # Feature rows: the document's first chunk + j, clamped and zeroed where absent.
        first = self.doc_chunk_start_t[self.doc[indices]]  # [B]
        rows = first[:, None] + j[None]
        total = self.features[self.layers[0]].shape[0]
        rows = rows.clamp(max=total - 1)
        grouped = self.features[self.layers[0]].dim() == 3
        features = {
            layer: self.features[layer]
            if grouped
            else self.features[layer][rows] * exists[..., None]
            for layer in self.layers
        }
        # CSR rows -> dense [B, n], vectorised: entry e of row r sits at label_ptr[i_r] + e.
        starts = self.label_ptr[indices]
        lens = self.label_ptr[indices + 1] - starts
        row = torch.repeat_interleave(torch.arange(b, device=dev), lens)
        first_entry = torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        src = torch.repeat_interleave(starts, lens) + torch.arange(row.numel(), device=dev)
        src = src - first_entry
        cols = self.label_index[src]
        target = torch.zeros(b, n, device=dev)
        reactive = torch.zeros(b, n, device=dev)
        target[row, cols] = self.label_target[src].float()
        reactive[row, cols] = self.label_reactive[src].float()
        return Batch(
            hidden={layer: self.hidden[layer][indices] for layer in self.layers},
            features=features,
            chunk_start=(j[None] * self.chunk_size).expand(b, n).contiguous(),
            chunk_row=rows.masked_fill(~exists, -1),
            position=self.position[indices],
            exists=exists,
            selectable=selectable,
            target=target,
            reactive=reactive,
            n_chunks=n_t,
        )
