#!/usr/bin/env python
"""Run commands side by side, each on its own share of this machine's cores: what `make test` does.

    python tools/run_lanes.py "unit=make unit" "notebooks=make notebooks"

The unit tests and the notebooks are independent, and each runs mostly on one thread, so on a
2-core machine one after the other leaves a core idle most of the time. Here each command (a
*lane*) is pinned to its own cores (``os.sched_setaffinity``, Linux): a lane's torch threads and
the processes it starts stay on its cores, and the course's ``training_threads`` sees only those,
so no lane's OpenMP threads wait on cores that the other lane keeps busy (that slowed a training
step 15-fold, ``make bench``'s ``busy_*`` figures). Each output line is prefixed with its lane's
name; at the end one line gives each lane's time and result. The exit status is 1 if any lane
failed. With fewer cores than lanes, or without ``sched_setaffinity``, the lanes run in turn.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def parse_lane(text: str) -> tuple[str, str]:
    """``"name=command"`` -> ``(name, command)``."""
    name, sep, command = text.partition("=")
    if not sep or not name.strip() or not command.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give a lane as NAME=COMMAND, e.g. 'unit=make unit'")
    return name.strip(), command.strip()


def split_cores(lanes: int) -> list[set[int]] | None:
    """This process's cores dealt into ``lanes`` groups of (nearly) equal size, or None when there
    are fewer cores than lanes or the platform cannot pin a process to cores."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < lanes:
        return None
    share = len(cores) // lanes
    return [set(cores[i * share:(i + 1) * share if i < lanes - 1 else len(cores)])
            for i in range(lanes)]


def run_one(name: str, command: str, cores: set[int] | None, width: int, began: float,
            results: dict) -> None:
    """Run one lane's command in a shell, pinned to ``cores``, printing each line of its output
    prefixed by ``name``; records ``results[name] = (exit status, seconds since began)``."""
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=pin)
    for line in iter(process.stdout.readline, ""):
        if not line.strip():  # the progress relay's blank separators: noise once prefixed
            continue
        sys.stdout.write(f"{name:<{width}} | {line}")
        sys.stdout.flush()
    results[name] = (process.wait(), time.perf_counter() - began)


def run_lanes(lanes: list[tuple[str, str]]) -> int:
    """Run the lanes (side by side where the cores allow) and print one summary line."""
    groups = split_cores(len(lanes))
    width, began, results = max(len(name) for name, _ in lanes), time.perf_counter(), {}
    if groups is None:
        print(f"run_lanes: {len(lanes)} lanes, fewer cores (or no pinning here): one after another")
        for name, command in lanes:
            run_one(name, command, None, width, began, results)
    else:
        threads = [threading.Thread(target=run_one, args=(name, command, cores, width, began, results))
                   for (name, command), cores in zip(lanes, groups)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    parts = []
    for (name, _), cores in zip(lanes, groups or [None] * len(lanes)):
        code, seconds = results[name]
        verdict = "passed" if code == 0 else f"FAILED (exit {code})"
        parts.append(f"{name} {verdict} at {seconds:.0f} s"
                     + (f" on core(s) {sorted(cores)}" if cores else ""))
    print(f"run_lanes: {'; '.join(parts)}; {time.perf_counter() - began:.0f} s in all")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lanes", nargs="+", type=parse_lane, help="NAME=COMMAND, one per lane")
    lanes = parser.parse_args().lanes
    if len({name for name, _ in lanes}) < len(lanes):
        parser.error("each lane needs its own NAME")
    return run_lanes(lanes)


if __name__ == "__main__":
    sys.exit(main())
