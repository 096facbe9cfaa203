"""Long prompts whose answers are long: a document plus an instruction to list, trace or
summarise across all of it (the prompts of :mod:`lsa.eval.long`).

A document is an essay excerpt of ``length`` tokens from RULER's Paul Graham haystack
(:func:`lsa.eval.ruler.essay_documents`, which cuts the essays into disjoint train / val / test
regions). Into it go ``n_facts`` generated lines at evenly spaced sentence boundaries, so that a
faithful answer has to visit the whole document in order and the resident set must follow it
from one refresh to the next:

- ``records``: numbered shipping records ("Record 3 of 24: ..."); the instruction asks for all
  of them in order, copied in full;
- ``trace``: a chain of variable assignments (``VAR ABCDE = VAR FGHIJ``, the first one a
  number), shuffled over the document; the instruction asks for every assignment in document
  order and then the value of each variable;
- ``summary``: nothing inserted; the instruction asks for a summary part by part, in order.

Splits follow the essay regions: ``tune`` prompts come from the validation region and ``test``
prompts (the held-out split: no setting is chosen on it) from the test region; neither shares
text with the essays the shipped indexers were trained on.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

#: instruction kinds, in the order prompts are built
KINDS = ("records", "trace", "summary")
#: prompt split -> the essay region its documents come from (lsa.eval.ruler.ESSAY_SPLITS)
SPLITS = {"tune": "val", "test": "test"}

_NAMES = (
    "Amara Osei", "Bruno Keller", "Chiara Rossi", "Dmitri Volkov", "Elena Duarte", "Farid Haddad",
    "Greta Lind", "Hiro Tanaka", "Ines Moreau", "Jonas Berg", "Kavya Rao", "Liam Byrne",
    "Mei Chen", "Nadia Petrova", "Omar Farouk", "Priya Nair", "Quentin Blanc", "Rosa Vidal",
)  # fmt: skip
_GOODS = (
    "copper wire", "olive oil", "cotton bales", "glass jars", "coffee beans", "steel bolts",
    "wool blankets", "paper rolls", "tea chests", "rice sacks", "salt blocks", "cedar planks",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Osaka", "Nairobi", "Oslo", "Lima", "Hanoi", "Tunis", "Quebec", "Perth", "Riga",
    "Dakar", "Porto", "Busan", "Cusco", "Split", "Bergen",
)  # fmt: skip

_INSTRUCTIONS = {
    "records": (
        "The document above contains {n} numbered records hidden between its paragraphs. List "
        "all {n} records in the order they appear, one per line, copying each record in full."
    ),
    "trace": (
        "The document above contains {n} lines of the form 'VAR X = ...' hidden between its "
        "paragraphs. First write every such line in the order it appears in the document, one "
        "per line. Then, for each variable, write its numeric value, following the assignments."
    ),
    "summary": (
        "Summarise the document above part by part, in order, from its first paragraph to its "
        "last: for each part, write two or three sentences on what it says. Do not skip parts."
    ),
}


@dataclass(frozen=True)
class LongPrompt:
    """One prompt: the user message (document + instruction) and what was inserted."""

    id: str
    split: str  # "tune" or "test"
    kind: str  # one of KINDS
    text: str
    facts: tuple[str, ...]  # the inserted lines in document order (empty for "summary")


def _records(rng: random.Random, n: int) -> list[str]:
    return [
        f"Record {i + 1} of {n}: {rng.choice(_NAMES)} shipped {rng.randint(10, 999)} crates "
        f"of {rng.choice(_GOODS)} from {rng.choice(_CITIES)} to {rng.choice(_CITIES)}."
        for i in range(n)
    ]


def _trace(rng: random.Random, n: int) -> list[str]:
    """A chain of ``n`` assignments, the first a number, shuffled (document order != chain)."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    lines = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    lines += [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, n)]
    rng.shuffle(lines)
    return lines


def insert_lines(text: str, lines: list[str]) -> str:
    """``text`` with ``lines`` placed, in order, at evenly spaced sentence boundaries (each on
    its own line); the first goes after the first sentence, the last before the end."""
    if not lines:
        return text
    cuts = [m.end() for m in re.finditer(r"[.!?]\s+", text)]
    if len(cuts) < len(lines):
        raise ValueError(
            f"the document has {len(cuts)} sentence boundaries, fewer than the {len(lines)} "
            "lines to insert: use a longer length or fewer facts"
        )
    step = len(cuts) / len(lines)
    at = [cuts[int(k * step)] for k in range(len(lines))]
    out, prev = [], 0
    for pos, line in zip(at, lines, strict=True):
        out += [text[prev:pos], f"\n{line}\n"]
        prev = pos
    out.append(text[prev:])
    return "".join(out)


def build_prompts(
    tokenizer,
    *,
    length: int,
    per_split: dict[str, int],
    kinds: tuple[str, ...] = KINDS,
    n_facts: int = 24,
    seed: int = 0,
) -> list[LongPrompt]:
    """``per_split[split]`` documents of ``length`` tokens per split, times every kind.

    Args:
        tokenizer: the model's tokenizer (documents are cut to ``length`` of its tokens; the
            inserted lines and the instruction come on top).
        per_split: documents per split, e.g. ``{"tune": 1, "test": 2}``; splits from
            :data:`SPLITS`.
        kinds: instruction kinds from :data:`KINDS`.
        n_facts: lines inserted for ``records`` and ``trace``.
    """
    from lsa.eval.ruler import essay_documents

    bad = [s for s in per_split if s not in SPLITS]
    if bad:
        raise ValueError(f"per_split keys must be among {tuple(SPLITS)}, got {bad}")
    wrong = [k for k in kinds if k not in KINDS]
    if wrong or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    if not isinstance(n_facts, int) or n_facts < 1:
        raise ValueError(f"n_facts must be an int >= 1, got {n_facts!r}")
    regions = {SPLITS[s]: n for s, n in per_split.items() if n > 0}
    docs = essay_documents(tokenizer, (length,), regions, seed=seed)
    split_of = {region: split for split, region in SPLITS.items()}
    prompts = []
    for d, doc in enumerate(docs):
        split = split_of[doc["split"]]
        for kind in kinds:
            rng = random.Random(f"{seed}:{doc['id']}:{kind}")
            facts = {"records": _records, "trace": _trace}.get(kind)
            lines = facts(rng, n_facts) if facts is not None else []
            body = insert_lines(doc["text"], lines)
            instruction = _INSTRUCTIONS[kind].format(n=n_facts)
            prompts.append(
                LongPrompt(
                    id=f"{split}:{d}:{kind}",
                    split=split,
                    kind=kind,
                    text=f"{body}\n\n{instruction}",
                    facts=tuple(lines),
                )
            )
    return prompts


def write_prompts(prompts: list[LongPrompt], path: Path) -> None:
    """One JSON object per line (the fields of :class:`LongPrompt`), for a machine without the
    essay package."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(p)) + "\n" for p in prompts))


def read_prompts(path: Path) -> list[LongPrompt]:
    """The prompts :func:`write_prompts` wrote; ``ValueError`` naming the line if one is not."""
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = LongPrompt(**{**row, "facts": tuple(row["facts"])})
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise ValueError(
                f"{path} line {n} is not a long-generation prompt (expected JSON with "
                f"id, split, kind, text, facts): {err}"
            ) from None
        if prompt.kind not in KINDS or prompt.split not in SPLITS:
            raise ValueError(
                f"{path} line {n}: unknown kind or split ({prompt.kind}, {prompt.split})"
            )
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


__all__ = [
    "KINDS",
    "SPLITS",
    "LongPrompt",
    "build_prompts",
    "insert_lines",
    "read_prompts",
    "write_prompts",
]
