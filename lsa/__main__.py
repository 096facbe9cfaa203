"""Command line: ``python -m lsa {demo,dump,train,eval,longgen} ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``--help`` stays fast. A bad command line
(argparse's errors and every :class:`lsa.cli_errors.UsageError` a command raises, before it loads
a model) ends as one line ``python -m lsa <command>: <what is wrong>`` on stderr and status 2.
"""

from __future__ import annotations

import importlib
import sys

from lsa.cli_errors import Parser, run_command

COMMANDS = {
    "demo": ("lsa.demo", "SmolLM2 on RULER: dense vs lsa vs recency vs random (the main job)"),
    "dump": ("lsa.indexer.dump", "one backbone pass over a corpus -> indexer training shards"),
    "train": ("lsa.indexer.train", "train a memory indexer from shards (never loads the backbone)"),
    "eval": ("lsa.eval.cli", "RULER accuracy vs KV footprint for dense, lsa and baselines"),
    "longgen": ("lsa.eval.long_cli", "long-generation fidelity: per-token KL vs dense, every τ"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in COMMANDS.items()
        if importlib.util.find_spec(spec[0]) is not None
    }


def main(argv: list[str] | None = None) -> int:
    commands = _available()
    parser = Parser(prog="python -m lsa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(commands) + "}"
    )
    parsers = {name: sub.add_parser(name, help=help_) for name, (_, help_) in commands.items()}
    # Only the chosen command's module is imported to declare its arguments.
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in commands else None
    if chosen is not None:
        importlib.import_module(commands[chosen][0]).add_arguments(parsers[chosen])

    def parse_and_run() -> int | None:
        args = parser.parse_args(argv)
        return importlib.import_module(commands[args.command][0]).run(args)

    return run_command("python -m lsa" + (f" {chosen}" if chosen else ""), parse_and_run)


if __name__ == "__main__":
    sys.exit(main())
