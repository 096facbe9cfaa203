"""vLLM dense throughput at long contexts: the baseline the LSA plugin is measured against.

    python -m lsa.vllm.dense_baseline --model qwen2.5-coder-0.5b --context 16384 32768 \\
        --batch 1 8 32 --max-new-tokens 128 --out out/vllm_dense.json

Prompts are random token ids (seeded), decoding ignores EOS so every request yields exactly
``--max-new-tokens`` tokens. For each (context, batch) the requests are submitted at once to
``vllm.LLM.generate``; requests/s and output tokens/s are wall-clock over that call (after one
warm-up request). Needs vLLM (the ``vllm`` extra, in its own environment: it pins torch 2.11) and
a GPU; the JSON records the hardware, versions and date.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import lsa


def _vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "lsa.vllm.dense_baseline needs vLLM: pip install 'lsa[vllm]' (vllm==0.26.0) in its "
            "own environment (it pins torch 2.11)"
        ) from err
    return vllm


def _model_path(name: str) -> str:
    if Path(name).is_dir():
        return name
    from lsa.models import model_dir

    return str(model_dir(name))  # a known name: converted once from its PyPI package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lsa.vllm.dense_baseline", description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="known name or model folder")
    p.add_argument("--context", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    for name in ("context", "batch"):
        bad = [x for x in getattr(args, name) if x < 1]
        if bad:
            p.error(f"--{name} values must be >= 1, got {bad}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vllm = _vllm()
    from vllm.inputs import TokensPrompt

    path = _model_path(args.model)
    max_len = max(args.context) + args.max_new_tokens
    llm = vllm.LLM(
        model=path,
        dtype=args.dtype,
        max_model_len=max_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,  # random prompts share nothing; keep runs independent
        seed=args.seed,
    )
    vocab = llm.get_tokenizer().vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    params = vllm.SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)

    def prompts(n: int, length: int) -> list:
        ids = torch.randint(0, vocab, (n, length), generator=gen).tolist()
        return [TokensPrompt(prompt_token_ids=row) for row in ids]

    llm.generate(prompts(1, 256), params, use_tqdm=False)  # warm-up: compile, graphs
    rows = []
    for context in args.context:
        for batch in args.batch:
            batch_prompts = prompts(batch, context)
            start = time.perf_counter()
            outs = llm.generate(batch_prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "seconds": seconds,
                    "requests_per_s": batch / seconds,
                    "output_tokens_per_s": tokens / seconds,
                    "output_tokens": tokens,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "what": "vLLM dense throughput (lsa.vllm.dense_baseline)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.node(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "lsa": lsa.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_path": path,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
