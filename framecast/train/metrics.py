"""metrics.jsonl: the rows a Trainer logs (one JSON object per logged step), read back and cut back on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows a Trainer logged: `path` is a run directory or its metrics.jsonl."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (redone after a resume) and a torn last line, atomically."""
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line)
    if keep != lines or not text.endswith("\n") and text:  # an unterminated last row would merge with the next
        ckpt.atomic_write_text(path, "".join(f"{line}\n" for line in keep))
