"""The course's own times: `make run` notebook by notebook, and `make test`'s two parts run in
turn against side by side (`tools/run_lanes.py`, what `make test` does), on this machine.

    python benchmarks/bench_course.py                # about 30 min on 2 cores
    python benchmarks/bench_course.py --skip test    # the course only (about 5 min)

Each figure is a wall-clock time of the real command (`make run`, `make unit`, `make notebooks`,
`make test`), so the machine must be quiet: anything else running slows it.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from common import ROOT, report


def run_make(*goals: str) -> tuple[float, str]:
    """Seconds that ``make goals`` took, and its output; stops the benchmark if it failed."""
    start = time.perf_counter()
    done = subprocess.run(["make", "--no-print-directory", *goals], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"make {' '.join(goals)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return seconds, done.stdout


def course_times() -> None:
    """``make run`` into a temporary folder: each notebook's seconds and the whole run's."""
    with tempfile.TemporaryDirectory() as out:
        seconds, text = run_make("run", f"OUT={out}")
    for name, value in re.findall(r"^\s+(\d\d)_\w+\.ipynb\s+([\d.]+) s$", text, re.M):
        report(f"course_s_{name}", float(value))
    report("course_s_make_run", seconds)


def test_times() -> None:
    """``make test``'s parts one after the other, then side by side as ``make test`` runs them."""
    unit, _ = run_make("unit")
    notebooks, _ = run_make("notebooks")
    report("test_s_unit_alone", unit)
    report("test_s_notebooks_alone", notebooks)
    report("test_s_in_turn", unit + notebooks)
    lanes, text = run_make("test")
    for name, value in re.findall(r"(\w+) passed at (\d+) s", text.splitlines()[-1]):
        report(f"test_s_{name}_beside_the_other", int(value))
    report("test_s_side_by_side", lanes)
    report("test_in_turn_over_side_by_side", (unit + notebooks) / lanes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["course", "test"],
                        help="leave out the course's times (make run) or make test's")
    args = parser.parse_args()
    report("course_cores", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count())
    if "course" not in args.skip:
        course_times()
    if "test" not in args.skip:
        test_times()


if __name__ == "__main__":
    main()
