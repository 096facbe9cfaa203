"""Bad command lines: one line on stderr and exit status 2, found before anything heavy loads.

Every ``python -m lsa`` command raises :class:`UsageError` for a bad input (the message names the
option, what was expected and what came); :func:`run_command` prints it as ``<prog>: <message>``
and returns 2. argparse's own errors take the same road (:class:`Parser`), so a bad input never
ends in a traceback or a usage dump. The ``type=`` helpers (:class:`Number`, :func:`device_option`)
check each option's range while it is parsed; the ``check_*`` helpers check paths and
packages. Nothing here imports torch at module level: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn


class UsageError(ValueError):
    """A bad command line; the message names the option, what was expected and what came."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def run_command(prog: str, action: Callable[[], int | None]) -> int:
    """``action()``'s status; a :class:`UsageError` becomes one line ``prog: message`` on stderr
    and status 2."""
    try:
        return int(action() or 0)
    except UsageError as err:
        # the contract is one line: a message assembled from several (a tool's stderr) is joined
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{prog}: {text}", file=sys.stderr)
        return 2


@dataclass(frozen=True)
class Number:
    """An argparse ``type=``: an int (or a finite float) within bounds, e.g. ``Number(int, 1)``.

    ``low_open`` excludes ``low`` itself (``Number(float, 0, 1, low_open=True)`` is (0, 1]).
    :meth:`check` applies the same rule to a value that did not come through argparse.
    """

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def expected(self) -> str:
        what = "an int" if self.kind is int else "a number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.low_open else '['}{lo:g}, {hi:g}]"
        if lo is not None:
            return f"{what} {'>' if self.low_open else '>='} {lo:g}"
        return f"{what} <= {hi:g}" if hi is not None else what

    def fits(self, value) -> bool:
        if self.kind is float and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, option: str, value):
        """``value`` if it fits, else :class:`UsageError` naming ``option``."""
        if not self.fits(value):
            raise UsageError(f"{option} must be {self.expected}, got {value}")
        return value

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        if not self.fits(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text}")
        return value


#: the ranges most options share
COUNT = Number(int, 1)  # sizes, counts, steps
NON_NEGATIVE = Number(int, 0)  # sink / recent chunks, layer indices, seeds, optional caps
FRACTION = Number(float, 0, 1, low_open=True)  # budgets
SECONDS = Number(float, 0)  # time limits


def device_option(text: str) -> str:
    """argparse ``type=``: ``cpu`` or ``cuda[:N]``, refused at once where it cannot run."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"got {text!r}, but this machine has no CUDA device (torch {torch.__version__}); "
                "use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(
                f"got {text!r}, but this machine has {count} CUDA device(s)"
            )
    return text


def check_input_file(option: str, path: Path) -> Path:
    """``path`` if it is an existing file."""
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder, expected a file")
    if not path.is_file():
        raise UsageError(f"{option}: {path} does not exist")
    return path


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def check_output_dir(option: str, path: Path) -> Path:
    """``path`` if it is a folder or can be made one (no file in the way)."""
    found = _existing_ancestor(Path(path))
    if found.is_dir():
        return path
    if found == Path(path):
        raise UsageError(f"{option}: {path} is a file, expected a folder (new or existing)")
    raise UsageError(f"{option}: {found} is a file, so {path} cannot be a folder")


def check_output_file(option: str, path: Path) -> Path:
    """``path`` if a file can be written there (not a folder, no file where a folder must be)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder, expected a file name")
    check_output_dir(option, path.parent)
    return path


def check_installed(
    what: str,
    requirements: Iterable[tuple[str, str]],
    hint: str = "",
    error: type[UsageError] = UsageError,
) -> None:
    """Raise ``error`` naming the missing modules of ``requirements`` ((module, the command that
    installs it) pairs) and every command to run, on one line; ``hint`` is appended."""
    missing = [(m, cmd) for m, cmd in requirements if importlib.util.find_spec(m) is None]
    if missing:
        commands = "; ".join(dict.fromkeys(cmd for _, cmd in missing))
        modules = ", ".join(m for m, _ in missing)
        raise error(f"{what} needs {modules}; install with: {commands}{hint}")
