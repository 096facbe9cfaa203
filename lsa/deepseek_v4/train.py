"""Backbone-free training of the DeepSeek-V4 memory indexer from a dump (:mod:`.dump`).

Per sample (document, position ``t``) the indexer scores the entries of the complete pages that
exist at ``t`` (never later ones: the causal rule of the labels), a page takes its best entry's
logit (as :meth:`DeepseekV4LSACache.refresh` does), and the loss is the KL divergence of the
softmax over the selectable pages from the graded lookahead target.
AdamW with gradient clipping; a loss computed in fp32 from logits (the seed's BCE on bf16
probabilities, ``seed_spec.md`` §8.7, is not copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import trange

from lsa._validation import check_int
from lsa.deepseek_v4.dump import read_manifest
from lsa.deepseek_v4.memory_indexer import MemoryIndexer


@dataclass
class Sample:
    hidden: dict[int, torch.Tensor]  # per layer [hidden]
    position: int
    keys: dict[int, torch.Tensor]  # per layer: stored keys of the entries existing at t
    selectable: torch.Tensor  # int64 [n_sel] page ids
    target: torch.Tensor  # float32 [n_sel], sums to 1 (or 0 when no mass fell on them)
    n_pages: int  # complete pages at t


def load_samples(directory: str | Path) -> tuple[dict, list[Sample]]:
    """Every sample of a dump, with the keys cut to what exists at each sample's position."""
    manifest = read_manifest(directory)
    page = manifest["config"]["page_size"]
    layers = manifest["config"]["target_layers"]
    samples = []
    for doc in manifest["documents"]:
        rec = torch.load(Path(directory) / doc["file"], weights_only=True)
        t = rec["targets"]
        for i, pos in enumerate(rec["positions"].tolist()):
            a, b = int(t["ptr"][i]), int(t["ptr"][i + 1])
            n_pages = int(t["n_chunks"][i])
            samples.append(
                Sample(
                    hidden={x: rec["hidden"][x][i] for x in layers},
                    position=pos,
                    keys={x: rec["keys"][x][: n_pages * page] for x in layers},
                    selectable=t["index"][a:b].long(),
                    target=t["target"][a:b],
                    n_pages=n_pages,
                )
            )
    return manifest, samples


def sample_loss(indexer: MemoryIndexer, sample: Sample, page_size: int) -> torch.Tensor:
    """KL divergence of one sample's page distribution from its target (module docstring)."""
    dev = indexer.inv_freq.device
    hidden = {x: h[None].to(dev) for x, h in sample.hidden.items()}
    keys = {x: indexer.decode_keys(k.to(dev))[None] for x, k in sample.keys.items()}
    position = torch.tensor([sample.position], device=dev)
    logits = indexer.score(hidden, position, keys)[0]  # [n_pages * page_size]
    pages = logits.view(sample.n_pages, page_size).amax(-1)
    log_p = torch.log_softmax(pages[sample.selectable.to(dev)], -1)
    y = sample.target.to(dev)
    return (torch.xlogy(y, y) - y * log_p).sum()  # KL(y || p): 0 when the indexer matches


def train_memory_indexer(
    indexer: MemoryIndexer,
    directory: str | Path,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> list[float]:
    """Train ``indexer`` in place on a dump; returns the mean loss of each epoch."""
    if not isinstance(indexer, MemoryIndexer):
        raise TypeError(f"indexer must be a MemoryIndexer, got {type(indexer).__name__}")
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    manifest, samples = load_samples(directory)
    layers = tuple(manifest["config"]["target_layers"])
    if set(layers) != set(indexer.target_layers):
        raise ValueError(
            f"indexer.target_layers {indexer.target_layers} must match the dump's {layers}"
        )
    samples = [s for s in samples if float(s.target.sum()) > 0]
    if not samples:
        raise ValueError(f"the dump in {str(directory)!r} has no sample with lookahead mass")
    page = manifest["config"]["page_size"]
    opt = torch.optim.AdamW(indexer.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    indexer.train()
    for _ in trange(epochs, desc="train", unit="epoch"):
        order = torch.randperm(len(samples), generator=gen).tolist()
        total = 0.0
        for a in range(0, len(order), batch_size):
            batch = [samples[i] for i in order[a : a + batch_size]]
            loss = torch.stack([sample_loss(indexer, s, page) for s in batch]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(indexer.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(batch)
        history.append(total / len(samples))
    indexer.eval()
    return history


@torch.no_grad()
def captured_mass(indexer: MemoryIndexer, directory: str | Path, budget_pages: int) -> dict:
    """Mean share of the lookahead target that the indexer's top ``budget_pages`` selectable
    pages hold, against the most recent ``budget_pages`` selectable pages (recency)."""
    manifest, samples = load_samples(directory)
    page = manifest["config"]["page_size"]
    dev = indexer.inv_freq.device
    ours, recency = [], []
    for s in samples:
        if float(s.target.sum()) <= 0:
            continue
        hidden = {x: h[None].to(dev) for x, h in s.hidden.items()}
        keys = {x: indexer.decode_keys(k.to(dev))[None] for x, k in s.keys.items()}
        logits = indexer.score(hidden, torch.tensor([s.position], device=dev), keys)[0]
        pages = logits.view(s.n_pages, page).amax(-1)[s.selectable.to(dev)].cpu()
        k = min(budget_pages, len(s.selectable))
        ours.append(float(s.target[pages.topk(k).indices].sum()))
        recency.append(float(s.target[-k:].sum()))
    return {
        "indexer": sum(ours) / len(ours),
        "recency": sum(recency) / len(recency),
        "samples": len(ours),
    }
