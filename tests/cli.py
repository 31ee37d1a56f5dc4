"""Running the `mmoe` command as a user would, in a subprocess."""

from __future__ import annotations

import subprocess
import sys


def mmoe(*args: str, timeout: float = 900) -> str:
    """Runs `python -m mmoe ARGS`; returns stdout, fails the test with stderr on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe", *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
