"""The ``guardrail`` command run as users run it: a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m guardrail.cli ARGS`` with the hub offline; its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "guardrail.cli", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
