"""Writing a benchmark's results into a Markdown file, between markers of its own.

Each script owns one section, ``<!-- name:start -->`` … ``<!-- name:end -->``;
running it again replaces that section and leaves the others as they are.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nScripts under `bench/`; each writes its own section between markers.\n"


def elapsed_logger(began):
    """A ``log(message)`` that prints to stderr with the seconds since ``began`` (a perf_counter value)."""

    def log(message):
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    return log


def write_section(name, text, path=BENCHMARKS):
    """Put ``text`` between ``name``'s markers in ``path``; append the section when it is not there yet."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.rstrip(chr(10))}\n{end}"
    current = path.read_text() if path.exists() else (HEADER if path == BENCHMARKS else "")
    if start in current and end in current:
        before, rest = current.split(start, 1)
        path.write_text(before + section + rest.split(end, 1)[1])
    else:
        path.write_text(current.rstrip("\n") + "\n\n" + section + "\n")
