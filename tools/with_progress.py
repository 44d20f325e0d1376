#!/usr/bin/env python
"""Run a command with the course's progress lines shown on the terminal while it runs.

    python tools/with_progress.py python -m pytest --nbval-lax notebooks      # what `make test` does

The module's progress bars (``frcnn_engine.ProgressBar``: training steps, evaluation) append a
plain line (steps done/planned, elapsed<left, losses) to the file that the environment variable
``FRCNN_PROGRESS_FILE`` names, every ``PROGRESS_FILE_SECONDS``. A bar drawn inside a notebook's
kernel reaches only the notebook, so a long cell is silent on the terminal; this sets the variable
to a temporary file for the command and every kernel it starts, and prints each new line of it on
stderr. ``tools/run_notebooks.py`` (``make run``) uses the same :class:`ProgressRelay`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading


class ProgressRelay:
    """While active, ``FRCNN_PROGRESS_FILE`` names a fresh temporary file, and a thread passes each
    complete line written to it to ``show`` (every ``every`` seconds, and once more at the end)."""

    def __init__(self, show, every: float = 1.0):
        self.show, self.every = show, every
        self._stop, self._lock = threading.Event(), threading.Lock()

    def __enter__(self) -> "ProgressRelay":
        handle, self.path = tempfile.mkstemp(prefix="frcnn-progress-", suffix=".txt")
        os.close(handle)
        self._previous = os.environ.get("FRCNN_PROGRESS_FILE")
        os.environ["FRCNN_PROGRESS_FILE"] = self.path
        self._file = open(self.path)
        self._partial = ""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.flush()

    def flush(self) -> None:
        """Show the lines written since the last call (also called by the thread)."""
        with self._lock:
            text = self._partial + self._file.read()
            *lines, self._partial = text.split("\n")
            for line in lines:
                if line.strip():
                    self.show(line)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()
        self._file.close()
        os.remove(self.path)
        if self._previous is None:
            os.environ.pop("FRCNN_PROGRESS_FILE", None)
        else:
            os.environ["FRCNN_PROGRESS_FILE"] = self._previous


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit(__doc__.split("\n\n")[0] + "\nusage: with_progress.py COMMAND [ARGS...]")

    def show(line: str) -> None:  # on a line of its own, also in the middle of pytest's dots
        print(f"\n    {line}", file=sys.stderr, flush=True)

    with ProgressRelay(show):
        child = subprocess.Popen(argv)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the command got the Ctrl-C too: let it stop its own way
                continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
