"""A benchmark's headline figure beside its baseline, collected for the runner's summary.

Each benchmark calls `report()` once per target; `python -m bench` prints every line again
in one table at the end of the run, with the load average, so one run shows every ratio.
"""

from __future__ import annotations

import os

import msgspec

SUMMARY_ENV = "BENCH_SUMMARY_FILE"  # set by the runner: where the lines are appended


class Figure(msgspec.Struct, kw_only=True):
    bench: str
    what: str
    value: str  # the figure measured, with its unit
    baseline: str  # what it is compared with, measured in the same run
    ratio: float
    target: str
    met: bool
    load: str


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def report(
    bench: str, what: str, *, value: str, baseline: str, ratio: float, target: str, met: bool
) -> Figure:
    figure = Figure(
        bench=bench,
        what=what,
        value=value,
        baseline=baseline,
        ratio=ratio,
        target=target,
        met=met,
        load=_load(),
    )
    print(f"RESULT {line(figure)}", flush=True)
    path = os.environ.get(SUMMARY_ENV)
    if path:
        with open(path, "ab") as out:
            out.write(msgspec.json.encode(figure) + b"\n")
    return figure


def line(figure: Figure) -> str:
    verdict = "met" if figure.met else "NOT MET"
    return (
        f"{figure.what}: {figure.value} vs {figure.baseline} = {figure.ratio:.3g}x "
        f"(target {figure.target}: {verdict}; load {figure.load})"
    )


def read(path: str) -> list[Figure]:
    try:
        with open(path, "rb") as source:
            return [msgspec.json.decode(row, type=Figure) for row in source if row.strip()]
    except FileNotFoundError:
        return []
