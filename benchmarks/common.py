"""Shared by the benchmark scripts: timing side by side and the `name: value` output format."""

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (ROOT, os.path.join(ROOT, "tests")):  # the module, and the tests' reference tooling
    if folder not in sys.path:
        sys.path.insert(0, folder)


def side_by_side(fns, repeats, warmup=2):
    """Median seconds of each function, calls alternating between them after a warm-up, so that
    a background load or a clock change slows all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def format_value(value) -> str:
    """A figure as text: ints and strings as they are, other numbers to 3 significant digits."""
    return str(value) if isinstance(value, (int, str)) else f"{value:.3g}"


def report(name, value):
    """Print one figure as ``name: value`` (3 significant digits for floats)."""
    print(f"{name}: {format_value(value)}", flush=True)
