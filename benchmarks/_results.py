"""Write a benchmark's numbers into benchmarks/RESULTS.md, one replaceable section per benchmark."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\n"
    "Each section is rewritten by the script named in it. Quote medians; compare ratios from one run.\n"
)


def machine() -> str:
    """One line describing this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.machine()}"
    return f"{system}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def record(section: str, body: str) -> None:
    """Replace (or append) the section called ``section`` with ``body`` plus date, machine and command."""
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    block = (
        f"<!-- {section} -->\n## {section}\n\n"
        f"- date: {datetime.date.today().isoformat()}\n- machine: {machine()}\n- command: `{command}`\n\n"
        f"{body.strip()}\n<!-- /{section} -->\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(section)} -->.*?<!-- /{re.escape(section)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")
