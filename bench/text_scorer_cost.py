"""Cost of the text scorer (lsa.scorers.text) per chunk and per refresh, and its chunk-key bytes.

    python bench/text_scorer_cost.py --device cuda --model smollm2 --length 4096

Times (median of ``--repeats``, after a warm-up): embedding one completed chunk (what a decode
step that completes a chunk pays), one refresh (the query embedding and the scores), and all the
prompt's chunks at once (the prefill). The text is this repository's README tokenised by the
model's tokenizer. Compare the chunk cost with the decode time of the 64 steps that produce a
chunk (``decode_seconds`` / ``decode_steps`` in an ``lsa eval`` results.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from lsa.models import ALIASES, model_dir
    from lsa.scorers.contract import TokenIds
    from lsa.scorers.text import TextScorer, load_encoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2", help="whose tokenizer makes the text")
    ap.add_argument("--encoder", default=None, help="sentence-transformers folder (default MiniLM)")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(str(model_dir(ALIASES.get(args.model, args.model))))
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = tok(text * (1 + 4 * args.length // len(text)))["input_ids"][: args.length + 64]
    ids = torch.tensor(ids)
    scorer = TextScorer(
        lambda x: tok.decode(x, skip_special_tokens=True),
        encoder=load_encoder(args.encoder, device=device),
    )
    cs, n = scorer.chunk_size, args.length // scorer.chunk_size
    tokens = TokenIds((ids,), (args.length,))
    on = torch.zeros(1, device=device)

    def timed(fn, repeats: int) -> float:
        fn()
        out = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out) * 1e3

    with torch.inference_mode():
        last = torch.tensor([[args.length]])  # the chunk the 64 generated tokens complete
        chunk_ms = timed(lambda: scorer.encode_chunks(0, on, last, token_ids=tokens), args.repeats)
        starts = torch.arange(n)[None] * cs
        keys = scorer.encode_chunks(0, on, starts, token_ids=tokens)
        pos = torch.tensor([args.length + 63])
        refresh_ms = timed(lambda: scorer.score({}, pos, {0: keys}, token_ids=tokens), args.repeats)
        prompt_ms = timed(lambda: scorer.encode_chunks(0, on, starts, token_ids=tokens), 2)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model_tokenizer": args.model,
        "encoder": args.encoder or "all-MiniLM-L6-v2",
        "prompt_tokens": args.length,
        "chunk_embedding_ms": round(chunk_ms, 2),
        "refresh_ms": round(refresh_ms, 2),
        "prompt_chunks": n,
        "prompt_chunks_ms": round(prompt_ms, 1),
        "chunk_key_bytes_per_chunk": scorer.key_dim * 4,
        "chunk_key_bytes_prompt": keys.numel() * keys.element_size(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
