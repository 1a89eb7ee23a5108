"""The training corpus: the Python standard library source of the running interpreter.

Every machine with Python has it, so the pair can be rebuilt offline. Files are split into train and
held-out by a hash of their path, so the split is stable across machines and Python patch releases.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

HELD_OUT_PERCENT = 5


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return digest[0] * 100 // 256 < HELD_OUT_PERCENT


def source_files(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every readable .py file under the stdlib, sorted by path."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("site-packages/", "dist-packages/")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append((relative, text))
    return files


def split(files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train = [f for f in files if not is_held_out(f[0])]
    held_out = [f for f in files if is_held_out(f[0])]
    return train, held_out
