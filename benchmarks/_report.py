"""Shared tail of the benchmark scripts: print a markdown report and optionally write it."""

from __future__ import annotations

from pathlib import Path


def emit_report(lines: list[str], out: str | None) -> str:
    """Join ``lines`` into markdown, print it, write it to ``out`` if given; return the text."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return text
