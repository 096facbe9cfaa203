"""``python -m lsa train``: train a :class:`LightningIndexer` from dump shards only.

The backbone is never loaded: everything comes from ``lsa dump``'s shards (hidden states at the
target layers, pooled chunk-key statistics, lookahead targets). ``--key-group g`` trains the
fine-grained key tower (one index key per ``g`` tokens) from the token keys of a dump made with
``--token-keys``; the group features are computed once, before the first epoch.

Losses (per target layer, averaged over layers; ``--loss``):

- ``kl``: listwise, ``KL(y_t || softmax(logits over the selectable chunks))`` against the graded
  lookahead target, as DeepSeek's sparse-attention indexer is trained against dense attention.
- ``focal``: the original's focal BCE on logits (γ = 2): positives are the oracle's free picks at
  ``--label-budget`` (the top-k of ``y_t``), negatives the other selectable chunks. Only chunks
  that exist at ``t`` are ever negatives (the original also sampled chunks from the future).
- ``both``: their sum.

AdamW, cosine decay (with a short linear warm-up), gradient clipping; validation metrics
(:mod:`lsa.indexer.metrics`) every epoch; the best epoch by validation coverage (mean of the
budgets) is saved with ``save_pretrained``; the test split is reported against Recency, Random
and SnapKV-style at the end (all positions, answer positions, and per document length when the
corpus recorded a ``bucket``), and everything is written to ``<out>/metrics.json``. Runs on
cuda when available (``--device``); batches are then built on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lsa.cli_errors import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    SECONDS,
    Number,
    UsageError,
    check_output_dir,
    device_option,
)
from lsa.indexer.data import Batch, EmptySplit, ShardData
from lsa.indexer.labels import oracle_positives
from lsa.indexer.metrics import BUDGETS, baseline_scores, evaluate, format_table
from lsa.reference.select import budget_count
from lsa.scorers.lightning import KEY_STATS, IndexerConfig, LightningIndexer

#: ranges of the float options
POSITIVE = Number(float, 0, low_open=True)
NON_NEGATIVE_FLOAT = Number(float, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="directory written by `lsa dump`")
    parser.add_argument("--out", required=True, help="where the best indexer is saved")
    parser.add_argument(
        "--layers",
        type=NON_NEGATIVE,
        nargs="*",
        default=None,
        help="subset of the dumped target layers",
    )
    parser.add_argument("--loss", choices=("kl", "focal", "both"), default="kl")
    parser.add_argument("--label-budget", type=FRACTION, default=0.1, help="focal positives: top-k")
    parser.add_argument("--gamma", type=NON_NEGATIVE_FLOAT, default=2.0, help="focal loss γ")
    parser.add_argument("--n-heads", type=COUNT, default=8)
    parser.add_argument("--index-dim", type=COUNT, default=128, help="a power of two >= 2")
    parser.add_argument("--q-rank", type=COUNT, default=128)
    parser.add_argument("--rope-dim", type=NON_NEGATIVE, default=64, help="even, <= --index-dim")
    parser.add_argument("--rope-theta", type=POSITIVE, default=10000.0)
    parser.add_argument("--ensemble", choices=("max", "mean"), default="mean")
    parser.add_argument("--key-fp8", action="store_true")
    parser.add_argument(
        "--key-stats",
        nargs="+",
        choices=KEY_STATS,
        default=list(KEY_STATS),
        help="pooled statistics of the chunk's keys the key tower reads (ablation)",
    )
    parser.add_argument(
        "--prev-chunk", action="store_true", help="heads also score a chunk by its predecessor"
    )
    parser.add_argument(
        "--key-group",
        type=COUNT,
        default=None,
        help="fine-grained keys: one index key per this many tokens (a divisor of the chunk size "
        "below it, e.g. 1, 4, 16; needs a dump made with --token-keys); default: the pooled "
        "tower, one key per chunk",
    )
    parser.add_argument(
        "--key-pool",
        choices=("max", "logsumexp"),
        default="max",
        help="with --key-group: a chunk's logit is the max or the log-sum-exp of its keys' logits",
    )
    parser.add_argument(
        "--answer-repeat",
        type=COUNT,
        default=1,
        help="each answer position (the last prompt token, where the cache selects after the "
        "prefill) appears this many times per epoch; they are ~1%% of the dumped positions",
    )
    parser.add_argument("--epochs", type=COUNT, default=20)
    parser.add_argument("--batch-size", type=COUNT, default=64)
    parser.add_argument("--lr", type=POSITIVE, default=2e-3)
    parser.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.01)
    parser.add_argument("--clip", type=POSITIVE, default=1.0, help="gradient norm clip")
    parser.add_argument(
        "--warmup", type=Number(float, 0, 1), default=0.05, help="fraction of steps"
    )
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0)
    parser.add_argument("--threads", type=COUNT, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--device", type=device_option, default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--max-seconds",
        type=SECONDS,
        default=None,
        help="stop after the epoch that passes this much training time (best epoch kept)",
    )


def build_indexer(data: ShardData, args) -> LightningIndexer:
    s = data.settings
    config = IndexerConfig(
        hidden_size=int(s["hidden_size"]),
        kv_heads=int(s["kv_heads"]),
        kv_head_dim=int(s["kv_head_dim"]),
        target_layers=tuple(data.layers),
        chunk_size=data.chunk_size,
        n_heads=args.n_heads,
        index_dim=args.index_dim,
        q_rank=args.q_rank,
        rope_dim=args.rope_dim,
        rope_theta=args.rope_theta,
        ensemble=args.ensemble,
        key_fp8=args.key_fp8,
        prev_chunk=args.prev_chunk,
        key_stats=tuple(args.key_stats),
        key_group=args.key_group,
        key_pool=args.key_pool,
        derotate_keys=True,
        backbone_rope_scaling=float(s["backbone_rope_scaling"]),
        backbone=str(s["model"]),
    )
    if data.feature_dim != config.feature_dim:
        raise ValueError(
            f"shards hold {data.feature_dim}-dim chunk features, the config needs "
            f"{config.feature_dim}"
        )
    return LightningIndexer(config, torch.tensor(s["backbone_inv_freq"]))


@torch.no_grad()
def fine_features(
    model: LightningIndexer, data: ShardData, block: int = 512
) -> dict[int, torch.Tensor]:
    """Per target layer, the fine-grained key tower's input of every chunk, [C, m, F], computed
    with ``model.features`` from the dump's token keys, on the model's device (``block`` chunks
    at a time, so the fp32 keys of a whole dump are never materialised at once)."""
    cfg, dev = model.config, _device(model)
    out = {}
    for layer in data.layers:
        tokens = data.tokens[layer]  # [C, cs, H_kv*D] float16
        parts = []
        for a in range(0, tokens.shape[0], block):
            t = tokens[a : a + block].to(dev).float()
            keys = t.view(t.shape[0], cfg.chunk_size, cfg.kv_heads, cfg.kv_head_dim)
            start = data.chunk_position[a : a + block, None].to(dev)
            parts.append(model.features(keys.permute(0, 2, 1, 3), start)[:, 0])
        out[layer] = torch.cat(parts)
    return out


def epoch_order(is_answer: torch.Tensor, repeat: int, gen: torch.Generator) -> torch.Tensor:
    """The positions of one epoch, shuffled: every position once, answer positions ``repeat``
    times (``repeat = 1`` gives exactly ``torch.randperm``, so earlier runs reproduce)."""
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"--answer-repeat must be an int >= 1, got {repeat!r}")
    extra = is_answer.nonzero().flatten().repeat(repeat - 1)
    order = torch.cat([torch.arange(len(is_answer)), extra])
    return order[torch.randperm(len(order), generator=gen)]


def batch_logits(model: LightningIndexer, batch: Batch) -> dict[int, torch.Tensor]:
    """Per-layer logits [B, n] for a batch (chunk keys computed from the shard features)."""
    out = {}
    for layer in model.target_layers:
        if model.config.key_group is None:
            keys = model.encode_features(layer, batch.features[layer], batch.chunk_start)
        else:
            keys = distinct_chunk_keys(model, layer, batch)
        out[layer] = model.layer_logits(layer, batch.hidden[layer], batch.position, keys)
    return out


def distinct_chunk_keys(model: LightningIndexer, layer: int, batch: Batch) -> torch.Tensor:
    """Chunk keys [B, n, m * d] from a grouped batch (``batch.features[layer]`` is the data's
    table [C, m, F], ``batch.chunk_row`` the rows), the key tower run once per distinct chunk.

    The positions of a batch share their documents' chunks (a chunk's keys do not depend on
    the query), and a fine-grained tower costs ``m`` times the pooled one per chunk: this keeps
    it to the distinct chunks. Absent slots (row -1) get zero keys; their logits are masked."""
    rows = batch.chunk_row.flatten()
    present = (rows >= 0).nonzero().flatten()  # slot indices of existing chunks
    distinct, inverse = torch.unique(rows[present], return_inverse=True)
    first = torch.full_like(distinct, rows.numel()).scatter_reduce(0, inverse, present, "amin")
    start = batch.chunk_start.flatten()[first]  # a row's start is the same in every slot
    feats = batch.features[layer][distinct]  # [U, m, F]
    encoded = model.encode_features(layer, feats[None], start[None])[0]  # [U, m * d]
    keys = encoded.new_zeros(rows.numel(), encoded.shape[-1])
    keys = keys.index_copy(0, present, encoded[inverse])
    return keys.view(*batch.chunk_row.shape, -1)


def kl_loss(logits: torch.Tensor, target: torch.Tensor, selectable: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || softmax(logits)) over the selectable chunks."""
    rows = selectable.any(-1) & (target.sum(-1) > 0)
    logp = torch.log_softmax(logits.masked_fill(~selectable, float("-inf")), dim=-1)
    t = target.clamp_min(0)
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-12)) - logp), torch.zeros_like(t))
    return kl.sum(-1)[rows].mean() if rows.any() else logits.sum() * 0


def focal_loss(
    logits: torch.Tensor, positive: torch.Tensor, selectable: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Focal BCE on logits over selectable chunks (negatives only among chunks that exist)."""
    y = positive.float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * y + (1 - p) * (1 - y)
    loss = bce * (1 - p_t).pow(gamma)
    return loss[selectable].mean() if selectable.any() else logits.sum() * 0


def positives(batch: Batch, budget: float, sink: int, recent: int) -> torch.Tensor:
    """Oracle free picks at ``budget`` per row (the focal loss's binary view of the target)."""
    pos = torch.zeros_like(batch.selectable)
    for r, n in enumerate(batch.n_chunks.tolist()):
        k = max(1, budget_count(budget, n) - min(n, sink + recent))
        pos[r] = oracle_positives(batch.target[r], batch.selectable[r], k)
    return pos


def _device(model: LightningIndexer) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_split(model: LightningIndexer, data: ShardData, batch_size: int = 256):
    """Ensemble scores, targets and selectable masks per position (lists of [n_t], on CPU)."""
    model.eval()
    scores, targets, selectable, reactive, n_list = [], [], [], [], []
    for start in range(0, len(data), batch_size):
        on = data.batch(torch.arange(start, min(len(data), start + batch_size)))
        on = on.to(_device(model))
        logits = model.ensemble(list(batch_logits(model, on).values())).float().cpu()
        batch = on.to("cpu")  # the metrics loop over positions: on the CPU
        for r, n in enumerate(batch.n_chunks.tolist()):
            scores.append(logits[r, :n])
            targets.append(batch.target[r, :n])
            selectable.append(batch.selectable[r, :n])
            reactive.append(batch.reactive[r, :n])
            n_list.append(n)
    return scores, targets, selectable, reactive, n_list


def label_stats(data: ShardData) -> dict[str, float]:
    """Sparsity of the targets: selectable chunks, and how many hold 50% / 80% of the mass."""
    sel, c50, c80 = [], [], []
    for i in range(len(data)):
        a, z = int(data.label_ptr[i]), int(data.label_ptr[i + 1])
        y = torch.sort(data.label_target[a:z], descending=True).values
        if y.numel() == 0 or float(y.sum()) <= 0:
            continue
        cum = y.cumsum(0)
        sel.append(y.numel())
        c50.append(int((cum < 0.5).sum()) + 1)
        c80.append(int((cum < 0.8).sum()) + 1)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "positions": len(data),
        "selectable_chunks": mean(sel),
        "chunks_for_50pct_mass": mean(c50),
        "chunks_for_80pct_mass": mean(c80),
        "selectable_share_of_lookahead_mass": float(data.selectable_mass.mean()),
    }


def evaluate_model(model, data: ShardData, with_baselines: bool, seed: int = 0):
    scores, targets, selectable, reactive, n_list = score_split(model, data)
    methods = {"indexer": scores}
    if with_baselines:
        methods.update(baseline_scores(n_list, reactive, seed=seed))
    return evaluate(
        methods,
        targets,
        selectable,
        budgets=BUDGETS,
        sink_chunks=data.sink_chunks,
        recent_chunks=data.recent_chunks,
    )


def check_args(args: argparse.Namespace) -> None:
    """The options argparse cannot check one by one (before any shard is read)."""
    d = args.index_dim
    if d < 2 or d & (d - 1):
        raise UsageError(f"--index-dim must be a power of two >= 2, got {d}")
    if args.rope_dim % 2 or args.rope_dim > d:
        raise UsageError(f"--rope-dim must be even and <= --index-dim {d}, got {args.rope_dim}")
    for option, values in (("--layers", args.layers), ("--key-stats", args.key_stats)):
        if values and len(set(values)) != len(values):
            raise UsageError(f"{option} must be distinct, got {values}")
    if args.key_pool != "max" and args.key_group is None:
        raise UsageError(f"--key-pool {args.key_pool} pools fine-grained keys: give --key-group")
    check_output_dir("--out", Path(args.out))


def load_split(data: str, split: str, token_keys: bool = False) -> ShardData:
    """``split`` of the dump ``data``; a missing, empty or corrupt dump raises
    :class:`UsageError` naming ``--data`` (:class:`EmptySplit` passes: test may be absent)."""
    try:
        return ShardData(data, split, token_keys=token_keys)
    except EmptySplit as err:
        if split == "test":
            raise
        raise UsageError(f"--data: {err}; training needs train and val documents") from None
    except ValueError as err:
        raise UsageError(f"--data: {err}") from None


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = (lambda *a: None) if args.quiet else print
    fine = args.key_group is not None
    train_data = load_split(args.data, "train", fine)
    val_data = load_split(args.data, "val", fine)
    try:
        test_data = load_split(args.data, "test", fine)
    except EmptySplit:
        test_data = None
    if args.layers:
        unknown = sorted(set(args.layers) - set(train_data.layers))
        if unknown:
            raise UsageError(f"--layers {unknown} were not dumped; dumped: {train_data.layers}")
        for d in (train_data, val_data, test_data):
            if d is not None:
                d.layers = sorted(args.layers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats = {"train": label_stats(train_data), "val": label_stats(val_data)}
    if test_data is not None:
        stats["test"] = label_stats(test_data)
    # Batches are built where the model trains (gathers of [B, n, F] features are the cost).
    for d in (train_data, val_data, test_data):
        if d is not None:
            d.to(device)
    try:
        model = build_indexer(train_data, args).to(device)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--data {args.data}: its settings build no indexer: {err}") from None
    if fine:  # token keys -> group features, once (the tower's input does not change)
        for d in (train_data, val_data, test_data):
            if d is not None:
                d.set_features(fine_features(model, d))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_answer = int(train_data.is_answer.sum())
    steps_per_epoch = math.ceil(
        (len(train_data) + n_answer * (args.answer_repeat - 1)) / args.batch_size
    )
    total = max(1, steps_per_epoch * args.epochs)
    warm = max(1, int(args.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        ),
    )
    sink, recent = train_data.sink_chunks, train_data.recent_chunks
    out = Path(args.out)
    history, best, best_epoch = [], -math.inf, -1
    gen = torch.Generator().manual_seed(args.seed)
    log(f"train {len(train_data)} positions, val {len(val_data)}, test {len(test_data or [])}")
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = epoch_order(train_data.is_answer, args.answer_repeat, gen)
        losses = []
        for start in range(0, len(perm), args.batch_size):
            batch = train_data.batch(perm[start : start + args.batch_size])
            pos = positives(batch, args.label_budget, sink, recent) if args.loss != "kl" else None
            batch = batch.to(device)
            pos = pos.to(device) if pos is not None else None
            per_layer = batch_logits(model, batch)
            terms = []
            for logits in per_layer.values():
                term = 0.0
                if args.loss in ("kl", "both"):
                    term = term + kl_loss(logits, batch.target, batch.selectable)
                if args.loss in ("focal", "both"):
                    term = term + focal_loss(logits, pos, batch.selectable, args.gamma)
                terms.append(term)
            loss = torch.stack(terms).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        val = evaluate_model(model, val_data, with_baselines=False)["indexer"]
        covs = [val[f"{b:g}"]["coverage"] for b in BUDGETS]
        covs = [c for c in covs if not math.isnan(c)]
        # Best by validation coverage; with no free pick at any budget (tiny data), by loss.
        key = sum(covs) / len(covs) if covs else -sum(losses) / len(losses)
        history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "val": val})
        mark = ""
        if key > best:
            best, best_epoch, mark = key, epoch, " *"
            model.save_pretrained(out)
        log(
            f"epoch {epoch:3d} loss {history[-1]['loss']:.4f} val cov@0.1 "
            f"{val['0.1']['coverage']:.3f} ovl@0.1 {val['0.1']['overlap']:.3f} cov@0.2 "
            f"{val['0.2']['coverage']:.3f}{mark}  ({time.time() - t0:.0f}s)"
        )
        if args.max_seconds is not None and time.time() - t0 > args.max_seconds:
            log(f"stopping after epoch {epoch}: --max-seconds {args.max_seconds:g} reached")
            break
    best_model = LightningIndexer.from_pretrained(out).to(device)
    report = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "data": str(args.data),
        "dump_settings": {k: v for k, v in train_data.settings.items() if k != "backbone_inv_freq"},
        "label_stats": stats,
        "best_epoch": best_epoch,
        "epochs_run": len(history),  # fewer than --epochs when --max-seconds stopped it
        "history": history,
        "val": evaluate_model(best_model, val_data, with_baselines=True),
        "hardware": {
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.time() - t0, 1),
    }
    log(f"\nvalidation (best epoch {best_epoch}):\n" + format_table(report["val"]))
    if test_data is not None:
        report["test"] = evaluate_model(best_model, test_data, with_baselines=True)
        log("\ntest:\n" + format_table(report["test"]))
        scored = score_split(best_model, test_data)
        answer = test_data.is_answer.nonzero().flatten()
        if len(answer):
            report["test_answer_positions"] = _subset_eval(scored, test_data, answer)
            log("\ntest, answer positions only:\n" + format_table(report["test_answer_positions"]))
        report["test_by_length"] = by_length = {}
        for bucket, idx in _positions_by_bucket(test_data).items():
            by_length[bucket] = {"all": _subset_eval(scored, test_data, idx)}
            log(
                f"\ntest, {bucket}-token documents, all positions:\n"
                + format_table(by_length[bucket]["all"])
            )
            ans = idx[test_data.is_answer[idx]]
            if len(ans):
                by_length[bucket]["answer"] = _subset_eval(scored, test_data, ans)
                log(
                    f"\ntest, {bucket}-token documents, answer positions:\n"
                    + format_table(by_length[bucket]["answer"])
                )
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _positions_by_bucket(data: ShardData) -> dict[int, torch.Tensor]:
    """Position indices grouped by their document's ``bucket`` (nominal length), if recorded."""
    buckets = torch.tensor([int(m.get("bucket", -1)) for m in data.doc_meta], dtype=torch.int64)
    per_position = buckets[data.doc.cpu()]
    return {
        int(b): (per_position == b).nonzero().flatten()
        for b in sorted(set(buckets.tolist()) - {-1})
    }


def _subset_eval(scored, data: ShardData, idx: torch.Tensor):
    scores, targets, selectable, reactive, n_list = scored
    pick = lambda xs: [xs[i] for i in idx.tolist()]  # noqa: E731
    methods = {"indexer": pick(scores)}
    methods.update(baseline_scores(pick(n_list), pick(reactive)))
    return evaluate(
        methods,
        pick(targets),
        pick(selectable),
        sink_chunks=data.sink_chunks,
        recent_chunks=data.recent_chunks,
    )
