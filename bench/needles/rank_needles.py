"""Where do chunk-selection signals rank the asked needle's chunk on RULER NIAH prompts? (CPU)

Per sample: one teacher-forced pass over prompt + reference answer digits, recording (all layers)
the attention inputs, post-RoPE keys and the attention mass of the last 64 prompt queries and the
answer queries. Signals over the n = S // 64 completed prompt chunks (S = prompt length):

  indexer      the shipped Qwen LightningIndexer, fed exactly as the cache's refresh after prefill
  idx_L{6,12,18}  one target layer's indexer logits alone (the shipped ensemble is their mean)
  snapkv       attention mass of prompt rows S-64..S-1, all layers and heads
  last         attention mass of prompt row S-1, all layers and heads
  attn_L{l}    row S-1 attention mass of layer l alone (exact, from recorded keys + recomputed q)
  quest_L{l}   Quest page bound with the real layer-l query: max_h sum_d max(q*kmin, q*kmax)
  meank_L{l}   the real layer-l query against the chunk-mean key (MoBA landmark): max_h q.mean(k)
  answer       attention mass of the teacher-forced answer-digit queries (dense "oracle")

Needle = the chunks holding the answer digits (all must be kept); key = chunk holding "for <key>".
Rank 0 = best among selectable chunks 1..n-3 (stable sort, ties to earlier, as select_chunks).
Hit = every needle chunk is forced or within the free picks ceil(0.1 n) - 3.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from pathlib import Path

import torch

from lsa.indexer import load_indexer
from lsa.indexer.labels import LabelConfig, teacher_forced_pass
from lsa.models import load_model
from lsa.reference.select import budget_count

CS = 64
TARGETS = (6, 12, 18)


def char_to_token(tok, ids):
    """Decoded text of ids and, per character, the token index it came from."""
    pieces = [tok.decode([i]) for i in ids]
    owner = []
    for t, p in enumerate(pieces):
        owner += [t] * len(p)
    return "".join(pieces), owner


def locate(text, owner, key, answer):
    """Token spans of the asked needle's key words and of its answer digits."""
    pat = re.compile(r"for " + re.escape(key) + r" is:?\s*(" + re.escape(answer) + r")")
    m = pat.search(text)
    if m is None:
        raise ValueError(f"needle for key {key!r} with answer {answer!r} not found in the prompt")
    key_start = m.start() + 4
    key_tokens = sorted({owner[c] for c in range(key_start, key_start + len(key))})
    dig_tokens = sorted({owner[c] for c in range(m.start(1), m.end(1))})
    return key_tokens, dig_tokens


def ranks(score, n):
    """Rank of each chunk among selectable ones 1..n-3 (-1 for forced chunks)."""
    sel = torch.arange(1, n - 2)
    order = torch.sort(score[sel], descending=True, stable=True).indices
    r = torch.full((n,), -1, dtype=torch.long)
    r[sel[order]] = torch.arange(len(sel))
    return r


def layer_query(model, layer, h_last, pos):
    """Post-RoPE query [H_q, D] of one layer at position pos from its attention input [hidden]."""
    attn = model.model.layers[layer].self_attn
    d = attn.head_dim
    q = attn.q_proj(h_last[None]).view(1, -1, d)  # [1, H, D]
    x = h_last[None, None]
    cos, sin = model.model.rotary_emb(x, torch.tensor([[pos]]))  # [1, 1, D]
    rot = torch.cat([-q[..., d // 2 :], q[..., : d // 2]], -1)
    return (q * cos + rot * sin)[0], attn.scaling


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", default="out/eval_qwen_8k/prompts.jsonl.gz")
    p.add_argument("--plan", default="niah_multikey_2:0-11,niah_single_1:0-5")
    p.add_argument("--out", default="out/needles/results.jsonl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tensors", default="out/needles/tensors")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    Path(a.tensors).mkdir(parents=True, exist_ok=True)

    want = {}
    for item in a.plan.split(","):
        task, rng = item.split(":")
        lo, hi = (int(x) for x in rng.split("-"))
        want.setdefault(task, set()).update(range(lo, hi + 1))
    rows = []
    with gzip.open(a.prompts, "rt") as f:
        for line in f:
            d = json.loads(line)
            if d["sample"] in want.get(d["task"], ()):
                rows.append(d)
    order = list(want)
    rows.sort(key=lambda d: (d["sample"], order.index(d["task"])))  # interleave tasks

    model, tok = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    indexer = load_indexer("qwen", hidden_size=model.config.hidden_size).eval()
    n_layers = model.config.num_hidden_layers
    done = set()
    try:
        with open(a.out) as f:
            done = {(r["task"], r["sample"]) for r in map(json.loads, f)}
    except FileNotFoundError:
        pass

    for d in rows:
        if (d["task"], d["sample"]) in done:
            continue
        t0 = time.time()
        ids = d["input_ids"]
        s = len(ids)
        n = s // CS
        answer = d["references"][0]
        text, owner = char_to_token(tok, ids)
        qm = re.search(r"special magic numbers? for (\S+?) mentioned", text)
        if qm is None:
            raise ValueError(f"{d['task']} {d['sample']}: no question key found")
        key = qm.group(1)
        key_tok, dig_tok = locate(text, owner, key, answer)
        ans_ids = tok(answer, add_special_tokens=False)["input_ids"]
        full = torch.tensor([ids + ans_ids])
        cfg = LabelConfig(chunk_size=CS, label_layers=None, query_block=512, query_start=s - CS)
        with torch.inference_mode():
            rec = teacher_forced_pass(model, full, tuple(range(n_layers)), cfg)
            mass = rec.mass[:, :n] / rec.n_terms  # [S_total, n]
            sig = {
                "snapkv": mass[s - CS : s].sum(0),
                "last": mass[s - 1],
                "answer": mass[s:].sum(0),
            }
            pos = torch.tensor([s - 1])
            start = torch.arange(n)[None] * CS
            hidden, ckeys = {}, {}
            for L in TARGETS:
                hidden[L] = rec.hidden[L][s - 1][None]
                ckeys[L] = indexer.encode_chunks(L, rec.keys[L][None, :, : n * CS], start)
                sig[f"idx_L{L}"] = indexer.layer_logits(L, hidden[L], pos, ckeys[L])[0]
            sig["indexer"] = indexer.score(hidden, pos, ckeys)[0]
            # how alike the chunk summaries are: pooled features (derotated mean/min/max, the
            # key tower's input) vs the key tower's output, mean pairwise cosine over chunks
            sim = {}
            for L in TARGETS:
                feats = indexer.features(rec.keys[L][None, :, : n * CS], start)[0]
                mean_part = feats[:, : feats.shape[1] // 3]
                for tag, x in (("feat", feats), ("featmean", mean_part), ("ikey", ckeys[L][0])):
                    x = x - x.mean(0)  # centred: the spread between chunks, not the common part
                    x = torch.nn.functional.normalize(x, dim=-1)
                    c = x @ x.T
                    sim[f"{tag}_L{L}"] = float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))
            check = torch.zeros(n)
            for L in range(n_layers):
                q, scale = layer_query(model, L, rec.hidden[L][s - 1], s - 1)  # [Hq, D]
                k = rec.keys[L][:, :s]  # [Hkv, S, D]
                g = q.shape[0] // k.shape[0]
                kq = k.repeat_interleave(g, 0)  # [Hq, S, D]
                prob = torch.softmax(torch.einsum("hd,hsd->hs", q, kq) * scale, -1)
                per_chunk = prob[:, : n * CS].reshape(q.shape[0], n, CS).sum(-1)  # [Hq, n]
                check += per_chunk.sum(0)
                if L in (*TARGETS, 15, 21):
                    sig[f"attn_L{L}"] = per_chunk.sum(0)
                    kc = kq[:, : n * CS].reshape(q.shape[0], n, CS, -1)
                    qb = q[:, None, :]
                    bound = torch.maximum(qb * kc.amin(2), qb * kc.amax(2)).sum(-1)  # [Hq, n]
                    sig[f"quest_L{L}"] = bound.amax(0)
                    sig[f"meank_L{L}"] = (qb * kc.mean(2)).sum(-1).amax(0)
            # tensors for offline swap tests (query of one sample against another's chunks)
            torch.save(
                {
                    "hidden_last": torch.stack([rec.hidden[L][s - 1] for L in range(n_layers)]),
                    "keys": {L: rec.keys[L][:, :s].clone() for L in (*TARGETS, 15, 21)},
                    "S": s,
                    "n": n,
                    "answer_mass": sig["answer"].clone(),
                },
                f"{a.tensors}/{d['task']}_{d['sample']}.pt",
            )
            # our recomputed last-row attention must reproduce the recorder's row S-1
            err = float((check / rec.n_terms - mass[s - 1]).abs().max())
            if err > 1e-4:
                raise RuntimeError(f"recomputed last-token attention differs by {err}")

        k_budget = budget_count(0.1, n)
        free = k_budget - 3
        needle = sorted({t // CS for t in dig_tok if t // CS < n})
        key_chunk = sorted({t // CS for t in key_tok if t // CS < n})
        out = {
            "task": d["task"],
            "sample": d["sample"],
            "S": s,
            "n": n,
            "k": k_budget,
            "free": free,
            "key": key,
            "answer": answer,
            "needle_chunks": needle,
            "key_chunks": key_chunk,
            "check_err": err,
            "centred_cos": sim,
            "signals": {},
        }
        for name, v in sig.items():
            v = v.float()
            r = ranks(v, n)
            nr = [int(r[c]) for c in needle]
            kr = [int(r[c]) for c in key_chunk]
            worst = max(nr) if nr else -1
            sv = v[1 : n - 2]
            z = [float((v[c] - sv.mean()) / sv.std()) for c in needle]
            idx = torch.arange(len(sv), dtype=torch.float32)
            rk = torch.argsort(torch.argsort(sv)).float()
            spearman = float(torch.corrcoef(torch.stack([rk, idx]))[0, 1])
            top = torch.sort(torch.where(r >= 0, -r, -(10**9)), descending=True).indices[:3]
            out["signals"][name] = {
                "needle_rank": worst,
                "key_rank": max(kr) if kr else -1,
                "hit": all(x < free for x in nr),
                "top3": [int(c) for c in top],
                "needle_z": min(z) if z else None,
                "spearman_pos": spearman,
            }
        # what the indexer ranks first instead: decoded text and the needle keys it holds
        tops = []
        for c in out["signals"]["indexer"]["top3"]:
            chunk_text = tok.decode(ids[c * CS : (c + 1) * CS])
            tops.append(
                {
                    "chunk": c,
                    "keys": re.findall(r"for (\S+) is", chunk_text),
                    "text": chunk_text[:80],
                    "answer_mass": float(sig["answer"][c]),
                }
            )
        out["indexer_top"] = tops
        out["answer_mass_needle"] = float(sum(sig["answer"][c] for c in needle))
        out["seconds"] = round(time.time() - t0, 1)
        with open(a.out, "a") as f:
            f.write(json.dumps(out) + "\n")
        sn = out["signals"]
        print(
            f"{d['task']} {d['sample']} S={s} n={n} free={free} needle={needle} "
            + " ".join(f"{k}={sn[k]['needle_rank']}" for k in ("indexer", "snapkv", "last"))
            + f" ({out['seconds']}s)",
            flush=True,
        )
        del rec
    return 0


if __name__ == "__main__":
    sys.exit(main())
