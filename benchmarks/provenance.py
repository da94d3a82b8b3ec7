"""What a benchmark's results say about where they came from, without this machine's paths: the command as typed
from the repo root, and every path in the text made relative (the repo root as ".", a work dir and an out dir
outside the repo by name)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def relative_paths(work: Path, out_dir: Path):
    """text -> text with work as WORK, out_dir as OUT_DIR (when outside the repo) and the repo root as '.'."""
    aliases = [(work, "WORK")] + ([] if out_dir.is_relative_to(ROOT) else [(out_dir, "OUT_DIR")]) + [(ROOT, ".")]

    def rel(text: str) -> str:
        for path, name in aliases:
            text = text.replace(str(path) + "/", name + "/").replace(str(path), name)
        return text

    return rel


def command_line(script: str, argv: list[str] | None, rel) -> str:
    """The command that ran `script` (benchmarks/NAME.py), interpreter relative to the repo where it is inside."""
    exe = Path(sys.executable)
    exe = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else exe.name
    return rel(shlex.join([str(exe), script, *(argv if argv is not None else sys.argv[1:])]))
