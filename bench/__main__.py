"""Run the benchmarks: every `bench/*.py` module's `main()` in turn, or the named ones.

    python -m bench                      # all of them
    python -m bench evolution_reader     # one (several names may be given)
    python -m bench intake -- --duration 5   # arguments after `--` go to the module(s)

Exit status: 0 when every benchmark returned 0 (or None), else the first failure's status.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._report import SUMMARY_ENV, line, read

HERE = Path(__file__).parent


def discover() -> list[str]:
    """Names of the benchmark modules (every module of this package but this runner)."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules([str(HERE)])
        if not info.ispkg and not info.name.startswith("_")
    )


def run_one(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"bench.{name}")
    entry: Callable[..., Any] | None = getattr(module, "main", None)
    if entry is None:
        print(f"bench {name}: no main() — skipped", file=sys.stderr)
        return 0
    # Benchmarks that take an argv get only the arguments meant for them, never the
    # runner's own command line.
    takes_argv = bool(inspect.signature(entry).parameters)
    result = entry(argv) if takes_argv else entry()
    return int(result or 0)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, passthrough = args[:cut], args[cut + 1 :]
    available = discover()
    unknown = [name for name in args if name not in available]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    status = 0
    summary = tempfile.NamedTemporaryFile(prefix="bench-summary-", suffix=".jsonl", delete=False)
    summary.close()
    os.environ[SUMMARY_ENV] = summary.name
    for name in args or available:
        # The machine is shared: the load beside each figure says how far to trust it.
        print(f"=== bench {name} (load average {_load()})", flush=True)
        started = time.monotonic()
        code = run_one(name, passthrough)
        print(
            f"=== bench {name}: exit {code} in {time.monotonic() - started:.1f} s "
            f"(load average {_load()})",
            flush=True,
        )
        status = status or code
    figures = read(summary.name)
    os.unlink(summary.name)
    if figures:
        # Every target of the run together, each ratio beside the baseline it was measured
        # against in this same run.
        print(f"=== summary (load average {_load()})")
        for figure in figures:
            print(f"  {figure.bench:16} {line(figure)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
