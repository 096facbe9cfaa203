"""Collects benchmark rows and writes them, with the environment, under bench/results/."""

import pytest

from bench.common import write_results

_ROWS: dict[str, list[dict]] = {}


@pytest.fixture
def record_row():
    def record(suite: str, row: dict) -> None:
        _ROWS.setdefault(suite, []).append(row)

    return record


def pytest_sessionfinish(session, exitstatus):
    for suite, rows in _ROWS.items():
        path = write_results(suite, rows)
        print(f"\nlsa bench: {len(rows)} rows -> {path}")
