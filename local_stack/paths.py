"""Where the shipped reference pair and prompt set live."""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
DEFAULT_TARGET = MODELS_DIR / "target"
DEFAULT_DRAFT = MODELS_DIR / "draft"
DEFAULT_PROMPTS = MODELS_DIR / "prompts.jsonl"


def load_prompts(path: Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[str]:
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows
