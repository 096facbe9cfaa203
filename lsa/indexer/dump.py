"""``python -m lsa dump``: one backbone pass per document -> indexer training shards.

For every document of a JSONL corpus, one teacher-forced forward pass (batch 1) records what the
indexer needs at sampled positions ``t`` — and nothing else, so training never needs the model:

- ``hidden.{L}`` [N, hidden]: the attention input of target layer ``L`` at ``t`` (query tower);
- ``features.{L}`` [C, 3·H_kv·D]: pooled statistics of each whole chunk's keys of layer ``L``
  (key tower input, :func:`lsa.scorers.lightning.chunk_features`), ``doc_chunk_ptr`` [docs+1];
- with ``--token-keys``, ``tokens.{L}`` [C, chunk_size, H_kv·D] float16: every token's post-RoPE
  key of layer ``L`` (as the cache holds it), the input of a fine-grained key tower
  (``IndexerConfig.key_group`` < chunk_size); rows are chunks, as in ``features.{L}``;
- ``position``, ``sample_doc``, ``is_answer``, ``n_chunks`` [N];
- lookahead labels in CSR form: ``label_ptr`` [N+1], ``label_index``, ``label_target`` (graded,
  normalised), ``label_reactive`` (SnapKV-style), ``selectable_mass`` [N]
  (:mod:`lsa.indexer.labels`).

Shards are ``shard_00000.safetensors`` …; ``manifest.json`` holds the model, layers, τ, chunk
size, label parameters, the backbone's RoPE frequencies and, per shard, its documents with their
split (train / val / test, by document). The manifest is rewritten after each shard, so an
interrupted dump resumes where it stopped (same settings required). Test and validation
documents are dumped first, so ``--max-seconds`` (a clean stop after a shard) keeps them all.
On cuda the backbone runs in bf16 by default; the recorded tensors are fp32 either way.

Corpus lines (JSONL): ``{"id", "text"}``, or RULER's ``{"id"?, "input", "outputs"}`` (the prompt
then the first reference answer, teacher-forced; the last prompt token is always sampled and
marked ``is_answer``), or ``{"id", "input_ids": [...]}``. An optional ``"split"`` overrides the
hash split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lsa.cli_errors import (
    COUNT,
    NON_NEGATIVE,
    SECONDS,
    Number,
    UsageError,
    check_input_file,
    check_output_dir,
    device_option,
)
from lsa.indexer.labels import LabelConfig, lookahead_targets, teacher_forced_pass
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS
from lsa.scorers.lightning import chunk_features

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
#: --val-frac / --test-frac: shares of the documents, in [0, 1)
SHARE = Number(float, 0, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'smollm2', 'qwen2.5-coder-0.5b' or a dir")
    parser.add_argument("--corpus", required=True, nargs="+", help="JSONL file(s)")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest)")
    parser.add_argument("--target-layers", type=NON_NEGATIVE, nargs="+", required=True)
    parser.add_argument(
        "--label-layers", type=NON_NEGATIVE, nargs="*", default=None, help="default: all layers"
    )
    parser.add_argument("--chunk-size", type=COUNT, default=64)
    parser.add_argument("--lookahead", type=COUNT, default=64, help="τ, decode steps per refresh")
    parser.add_argument("--sink-chunks", type=NON_NEGATIVE, default=SINK_CHUNKS)
    parser.add_argument("--recent-chunks", type=NON_NEGATIVE, default=RECENT_CHUNKS)
    parser.add_argument("--stride", type=COUNT, default=64, help="sample every stride-th position")
    parser.add_argument(
        "--min-position", type=NON_NEGATIVE, default=1024, help="first sampled position"
    )
    parser.add_argument(
        "--max-length",
        type=COUNT,
        default=8192,
        help="truncate documents (shorter than 2 chunks + 1 token, they are skipped)",
    )
    parser.add_argument("--docs-per-shard", type=COUNT, default=4)
    parser.add_argument("--max-docs", type=COUNT, default=None)
    parser.add_argument("--val-frac", type=SHARE, default=0.15, help="share of validation docs")
    parser.add_argument("--test-frac", type=SHARE, default=0.25, help="share of test docs")
    parser.add_argument("--query-block", type=COUNT, default=256)
    parser.add_argument(
        "--label-reduce",
        choices=("mean", "max"),
        default="mean",
        help="combine the label layers' heads by their mean or by the strongest head",
    )
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts as chat turns")
    parser.add_argument(
        "--token-keys",
        action="store_true",
        help="also store every token's post-RoPE key of the target layers (float16), for "
        "fine-grained key towers (train --key-group); ~2·H_kv·D bytes per token and layer",
    )
    parser.add_argument("--threads", type=COUNT, default=None, help="torch threads")
    parser.add_argument(
        "--device", type=device_option, default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="backbone weights (default: bfloat16 on cuda, float32 on cpu); attention mass "
        "for the labels, hidden states and keys are always recorded in float32",
    )
    parser.add_argument(
        "--max-seconds",
        type=SECONDS,
        default=None,
        help="stop cleanly (after a shard) once this much time has passed; resume later",
    )


def split_of(doc_id: str, val_frac: float, test_frac: float) -> str:
    """Deterministic split by document id (sha256), so documents never straddle splits."""
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def _corpus_doc(line: str, where: str) -> dict:
    """One corpus line, checked (``where`` names the file and line)."""
    expected = 'expected one JSON object per line with "text", "input" (+ "outputs") or "input_ids"'
    try:
        d = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where} is not JSON ({err}); {expected}") from None
    if not isinstance(d, dict) or not {"text", "input", "input_ids"} & set(d):
        raise UsageError(f"{where} holds no document; {expected}")
    ids = d.get("input_ids")
    if ids is not None and not (
        isinstance(ids, list) and all(isinstance(x, int) and x >= 0 for x in ids)
    ):
        raise UsageError(f"{where}: input_ids must be a list of token ids (ints >= 0)")
    if d.get("split") and d["split"] not in SPLITS:  # no split (or "") means by hash
        raise UsageError(f"{where}: split must be one of {SPLITS}, got {d['split']!r}")
    return d


def read_corpus(paths) -> list[dict]:
    """The documents of the JSONL files ``paths`` (see the module docstring); a file that is not
    such a corpus raises :class:`UsageError` naming ``--corpus``."""
    docs = []
    for path in map(Path, paths):
        try:
            lines = check_input_file("--corpus", path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--corpus: {path} cannot be read as text: {err}") from None
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            d = _corpus_doc(line, f"--corpus: {path} line {i + 1}")
            d.setdefault("id", f"{path.stem}:{d.get('index', i)}")
            d["id"] = str(d["id"])
            docs.append(d)
    if not docs:
        raise UsageError(f"--corpus: {', '.join(map(str, paths))} holds no documents")
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise UsageError(f"--corpus: document ids must be unique, got {repeated[:5]} repeated")
    return docs


def check_args(args: argparse.Namespace):
    """Everything about ``args`` that can be checked before the backbone loads; returns the
    backbone's :class:`lsa.models.ModelDims` (read from its config, no weights)."""
    from lsa.models import model_dims

    try:
        dims = model_dims(args.model)
    except ValueError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    for option, layers in (
        ("--target-layers", args.target_layers),
        ("--label-layers", args.label_layers),
    ):
        if not layers:
            continue
        if len(set(layers)) != len(layers):
            raise UsageError(f"{option} must be distinct, got {layers}")
        beyond = [layer for layer in layers if layer >= dims.num_layers]
        if beyond:
            raise UsageError(
                f"{option}: --model {args.model} has {dims.num_layers} layers "
                f"(0-{dims.num_layers - 1}), got {beyond}"
            )
    if args.max_length < 2 * args.chunk_size + 1:
        raise UsageError(
            f"--max-length must be >= 2 * --chunk-size + 1 = {2 * args.chunk_size + 1} (shorter "
            f"documents are skipped), got {args.max_length}"
        )
    if args.val_frac + args.test_frac >= 1:
        raise UsageError(
            f"--val-frac + --test-frac must be < 1 (the rest trains), got {args.val_frac} + "
            f"{args.test_frac}"
        )
    check_output_dir("--out", Path(args.out))
    return dims


def tokenize(doc: dict, tokenizer, chat_template: bool) -> tuple[list[int], int | None]:
    """Token ids and the index of the last prompt token (``None`` for plain text)."""
    if "input_ids" in doc:
        return [int(x) for x in doc["input_ids"]], doc.get("answer_position")
    if tokenizer is None:
        raise ValueError(f"document {doc['id']!r} has text but the model has no tokenizer")
    if "input" in doc:
        answer = doc.get("outputs") or [""]
        if chat_template and tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": doc["input"]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(doc["input"])["input_ids"]
        answer_ids = tokenizer(" " + str(answer[0]), add_special_tokens=False)["input_ids"]
        return prompt_ids + answer_ids, len(prompt_ids) - 1
    return tokenizer(doc["text"])["input_ids"], None


def sample_positions(length: int, stride: int, min_position: int, answer: int | None) -> list[int]:
    pos = list(range(min(min_position, length - 1), length, stride))
    if answer is not None and 0 <= answer < length and answer not in pos:
        pos.append(answer)
    return sorted(pos)


def backbone_rope(model) -> tuple[list[float], float]:
    """The backbone's RoPE inverse frequencies and cos/sin scaling (rotate-half convention)."""
    body = getattr(model, "model", model)
    rotary = getattr(body, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb.inv_freq")
    return rotary.inv_freq.float().tolist(), float(getattr(rotary, "attention_scaling", 1.0))


def dump_document(model, ids: list[int], answer, args, label_cfg, inv_freq, scaling) -> dict:
    """Tensors of one document (see the module docstring), before concatenation into a shard.

    The forward pass runs on the model's device; everything kept is moved to the CPU.
    """
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    rec = teacher_forced_pass(model, x, args.target_layers, label_cfg)
    rec.hidden = {k: v.cpu() for k, v in rec.hidden.items()}
    rec.keys = {k: v.cpu() for k, v in rec.keys.items()}
    positions = sample_positions(len(ids), args.stride, args.min_position, answer)
    targets = lookahead_targets(rec.mass.cpu(), rec.n_terms, positions, label_cfg)
    cs = args.chunk_size
    n_doc = len(ids) // cs
    starts = (torch.arange(n_doc) * cs)[None]
    inv = torch.tensor(inv_freq)
    out = {
        "position": targets.position,
        "n_chunks": targets.n_chunks,
        "is_answer": torch.tensor([int(p == answer) for p in positions], dtype=torch.int64),
        "label_ptr": targets.ptr,
        "label_index": targets.index,
        "label_target": targets.target,
        "label_reactive": targets.reactive,
        "selectable_mass": targets.selectable_mass,
    }
    for layer in args.target_layers:
        out[f"hidden.{layer}"] = rec.hidden[layer][targets.position]
        keys = rec.keys[layer][None, :, : n_doc * cs]
        out[f"features.{layer}"] = chunk_features(keys, starts, cs, inv, scaling)[0]
        if args.token_keys:  # [H_kv, n*cs, D] -> [n, cs, H_kv*D], one row per chunk
            h_kv, _, d = keys.shape[1:]
            tok = keys[0].permute(1, 0, 2).reshape(n_doc, cs, h_kv * d)
            out[f"tokens.{layer}"] = tok.to(torch.float16).contiguous()
    return out


def concat_docs(docs: list[dict], target_layers) -> dict[str, torch.Tensor]:
    out: dict[str, list] = {}
    sample_doc, chunk_ptr, label_ptr = [], [0], [torch.zeros(1, dtype=torch.int64)]
    for i, d in enumerate(docs):
        n = len(d["position"])
        sample_doc.append(torch.full((n,), i, dtype=torch.int64))
        chunk_ptr.append(chunk_ptr[-1] + d[f"features.{target_layers[0]}"].shape[0])
        label_ptr.append(d["label_ptr"][1:] + label_ptr[-1][-1])
        for k, v in d.items():
            if k != "label_ptr":
                out.setdefault(k, []).append(v)
    tensors = {k: torch.cat(v).contiguous() for k, v in out.items()}
    tensors["sample_doc"] = torch.cat(sample_doc)
    tensors["doc_chunk_ptr"] = torch.tensor(chunk_ptr, dtype=torch.int64)
    tensors["label_ptr"] = torch.cat(label_ptr)
    return tensors


def _settings(args, label_cfg, inv_freq, scaling, model) -> dict:
    from lsa.models import config_dims

    dims = config_dims(model.config)
    return {
        "model": args.model,
        "backbone_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "hidden_size": dims.hidden_size,
        "num_layers": dims.num_layers,
        "kv_heads": dims.kv_heads,
        "kv_head_dim": dims.kv_head_dim,
        "target_layers": list(args.target_layers),
        "labels": {**asdict(label_cfg), "label_layers": label_cfg.label_layers},
        "stride": args.stride,
        "min_position": args.min_position,
        "max_length": args.max_length,
        "chat_template": bool(args.chat_template),
        "token_keys": bool(args.token_keys),
        "backbone_inv_freq": inv_freq,
        "backbone_rope_scaling": scaling,
    }


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from lsa.models import load_model

    check_args(args)
    docs = read_corpus(args.corpus)
    if args.max_docs is not None:
        docs = docs[: args.max_docs]
    for doc in docs:
        doc["split"] = doc.get("split") or split_of(doc["id"], args.val_frac, args.test_frac)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype_name))
    model.to(device)
    label_cfg = LabelConfig(
        chunk_size=args.chunk_size,
        lookahead=args.lookahead,
        sink_chunks=args.sink_chunks,
        recent_chunks=args.recent_chunks,
        label_layers=tuple(args.label_layers) if args.label_layers else None,
        query_block=args.query_block,
        head_reduce=args.label_reduce,
    )
    inv_freq, scaling = backbone_rope(model)
    settings = _settings(args, label_cfg, inv_freq, scaling, model)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        old = {k: v for k, v in manifest["settings"].items()}
        old["labels"].setdefault("head_reduce", "mean")  # dumps written before the option
        old.setdefault("token_keys", False)  # likewise
        if json.loads(json.dumps(settings)) != old:
            raise ValueError(
                f"{manifest_path} was written with other settings; use a new --out or the same "
                "arguments to resume"
            )
    else:
        manifest = {"format_version": 1, "settings": settings, "shards": []}
    done = {d["id"] for s in manifest["shards"] for d in s["docs"]}
    # Test and validation documents first, so a dump stopped by --max-seconds has them all.
    todo = sorted(
        (d for d in docs if d["id"] not in done), key=lambda d: SPLITS[::-1].index(d["split"])
    )
    pending: list[tuple[dict, dict]] = []

    def flush() -> None:
        if not pending:
            return
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        tensors = concat_docs([t for _, t in pending], args.target_layers)
        save_file(tensors, str(out / name))
        manifest["shards"].append(
            {
                "file": name,
                "samples": int(tensors["position"].numel()),
                "docs": [m for m, _ in pending],
            }
        )
        _write_json(manifest_path, manifest)
        pending.clear()

    t0 = time.monotonic()
    for doc in tqdm(todo, desc="dump", unit="doc", initial=len(done), total=len(docs)):
        ids, answer = tokenize(doc, tokenizer, args.chat_template)
        ids = ids[: args.max_length]
        if len(ids) < 2 * args.chunk_size + 1:
            continue
        tensors = dump_document(model, ids, answer, args, label_cfg, inv_freq, scaling)
        meta = {
            "id": doc["id"],
            "split": doc["split"],
            "length": len(ids),
            "task": doc.get("task", ""),
        }
        if "bucket" in doc:
            meta["bucket"] = int(doc["bucket"])
        pending.append((meta, tensors))
        if len(pending) >= args.docs_per_shard:
            flush()
            if args.max_seconds is not None and time.monotonic() - t0 > args.max_seconds:
                print(f"stopping after --max-seconds {args.max_seconds:g}; run again to resume")
                break
    flush()
    n = sum(s["samples"] for s in manifest["shards"])
    print(f"{len(manifest['shards'])} shards, {n} positions -> {out}")
    return 0
