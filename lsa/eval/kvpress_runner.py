"""kvpress peers on the prompts ``python -m lsa eval`` wrote, in kvpress's own environment.

``kvpress`` 0.5.5 pins ``transformers<5.3`` and breaks on newer ones, so it cannot share lsa's
environment. This module imports nothing from lsa (run it as a file or as
``python -m lsa.eval.kvpress_runner`` with lsa on ``PYTHONPATH``)::

    /tmp/kvpress/bin/python lsa/eval/kvpress_runner.py --prompts OUT/prompts.jsonl \\
        --model ~/.cache/lsa/smollm2-135m-instruct --budget 0.1 --out OUT/kvpress.json

Per prompt and press (batch 1, so no padding reaches a press): the whole prompt is prefilled with
the press active (the press compresses every layer's KV to ``budget`` of the prompt tokens right
after that layer's prefill attention, so the first answer token comes from the dense prefill, as
in LSACache), then greedy decoding continues on the compressed ``DynamicCache`` with explicit
position ids (the cache is shorter than the positions), stopping at EOS or the task's
``max_new_tokens``. Bytes are the DynamicCache's real storage at the end of the request, against a
dense cache of the same tokens. ``lsa eval --kvpress-results`` merges the output and applies
RULER's metric.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

#: our method name -> kvpress class name
PRESSES = {
    "snapkv": "SnapKVPress",
    "streamingllm": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
}
DTYPES = ("float32", "bfloat16", "float16")


def prompt_digest(ids) -> str:
    """A short hash of a prompt's token ids (the same as ``lsa.eval.cli.prompt_digest``)."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def read_prompts(path: Path) -> list[dict]:
    """The rows of a prompts.jsonl (or .jsonl.gz) that ``lsa eval`` wrote, digests checked."""
    import gzip

    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for r in rows:
        if r["digest"] != prompt_digest(r["input_ids"]):
            raise ValueError(f"{path}: row {r['task']}#{r['sample']} does not match its digest")
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def make_press(method: str, budget: float):
    """The kvpress press for ``method`` keeping ``budget`` of the prompt's KV."""
    import kvpress

    if method not in PRESSES:
        raise ValueError(f"method must be one of {sorted(PRESSES)}, got {method!r}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return getattr(kvpress, PRESSES[method])(compression_ratio=1.0 - budget)


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.untyped_storage().nbytes()
    return total


def generate_pressed(model, press, ids, *, max_new_tokens: int, eos: set[int]):
    """Greedy answer under ``press``: (new ids, decode steps, decode seconds, device KV bytes)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    p = ids.shape[1]
    with torch.inference_mode():
        with press(model):
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        new = [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        steps = 0
        while len(new) < max_new_tokens and new[-1] not in eos:
            out = model(
                input_ids=torch.tensor([[new[-1]]], device=ids.device),
                past_key_values=cache,
                position_ids=torch.tensor([[p + len(new) - 1]], device=ids.device),
            )
            new.append(int(out.logits[0, -1].argmax()))
            steps += 1
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds = time.perf_counter() - t0
    return new, steps, seconds, cache_bytes(cache), cache.get_seq_length()


def run(args: argparse.Namespace) -> int:
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_prompts(Path(args.prompts))
    if args.limit:
        rows = rows[: args.limit]
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype).to(args.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    eos = model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * heads * head_dim * dtype.itemsize
    records = []
    total = len(rows) * len(args.presses) * len(args.budget)
    done = 0
    start = time.perf_counter()

    def write(*, complete: bool) -> None:
        # after every press and budget too, so a run stopped by a time limit keeps its records
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "versions": {
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "kvpress": getattr(kvpress, "__version__", "0.5.5"),
                    },
                    "model": str(args.model),
                    "complete": complete,
                    "wall_s": time.perf_counter() - start,
                    "records": records,
                },
                indent=1,
            )
        )

    for method in args.presses:
        for budget in args.budget:
            press = make_press(method, budget)
            for r in rows:
                ids = torch.tensor([r["input_ids"]], device=args.device)
                new, steps, seconds, nbytes, kept = generate_pressed(
                    model, press, ids, max_new_tokens=r["max_new_tokens"], eos=eos
                )
                tokens = len(r["input_ids"]) + len(new) - 1  # the last answer token is not cached
                records.append(
                    {
                        "task": r["task"],
                        "sample": r["sample"],
                        "method": method,
                        "budget": budget,
                        "digest": prompt_digest(r["input_ids"]),
                        "prediction": tokenizer.decode(new, skip_special_tokens=True),
                        "new_ids": new,
                        "prompt_tokens": len(r["input_ids"]),
                        "dense_kv_bytes": per_token * (len(r["input_ids"]) + len(new)),
                        "kv": {
                            "device_bytes": nbytes,
                            "host_bytes": 0,
                            "dense_bytes": per_token * tokens,
                            "cached_tokens": kept,
                            "batch_rows": 1,
                            "device_fraction": nbytes / (per_token * tokens),
                        },
                        "decode_steps": steps,
                        "decode_tokens": steps,
                        "decode_seconds": seconds,
                    }
                )
                done += 1
                print(
                    f"[{done}/{total}] {method}@{budget:g} {r['task']}#{r['sample']}: "
                    f"{records[-1]['prediction'][:60]!r}",
                    file=sys.stderr,
                )
            write(complete=False)
    write(complete=True)
    print(f"{len(records)} records -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kvpress_runner", description="kvpress presses on lsa eval's prompts.jsonl"
    )
    p.add_argument("--prompts", type=Path, required=True, help="prompts.jsonl[.gz] of lsa eval")
    p.add_argument("--model", type=Path, required=True, help="transformers model directory")
    p.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    p.add_argument("--budget", type=float, nargs="+", default=[0.1], help="fractions of KV kept")
    p.add_argument("--out", type=Path, required=True, help="predictions JSON for lsa eval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
    args = p.parse_args(argv)
    for b in args.budget:
        if not 0 < b <= 1:
            p.error(f"--budget must be fractions in (0, 1], got {b}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
