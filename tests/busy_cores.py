"""Other programs on the machine, for tests and benchmarks of latency a person feels: a laptop
always runs something else besides the app."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """n processes, each keeping a core busy, for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
