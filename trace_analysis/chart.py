"""PNG charts of round breakdowns: the parts of each round stacked in time order, or the median parts of
several groups of rounds (one per delay level in a study) side by side.

Knows Round objects and matplotlib, not where the rounds came from.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from trace_analysis.breakdown import PARTS, Round

COLORS = dict(zip(PARTS, ("#1f77b4", "#aec7e8", "#c5dbee", "#ff7f0e", "#2ca02c", "#98df8a", "#c9ecc4",
                          "#ffbb78", "#9467bd", "#7f7f7f")))


def _stacked(ax, labels, rows: list[dict[str, float]]) -> None:
    bottoms = [0.0] * len(rows)
    for part in PARTS:
        heights = [row[part] for row in rows]
        if any(heights):
            ax.bar(labels, heights, bottom=bottoms, color=COLORS[part], label=part, width=0.85)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("ms")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def rounds_chart(rounds: list[Round], path: Path, title: str = "", limit: int = 300) -> Path:
    plt = _pyplot()
    shown = rounds[:limit]
    figure, ax = plt.subplots(figsize=(max(8.0, len(shown) * 0.06 + 4), 4.5))
    _stacked(ax, list(range(len(shown))), [r.parts for r in shown])
    ax.set_xlabel("round (time order)" + (f", first {limit} of {len(rounds)}" if len(rounds) > limit else ""))
    ax.set_title(title or "round breakdown on the critical path")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def groups_chart(groups: dict[str, list[Round]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    labels = list(groups)
    rows = [{p: statistics.mean(r.parts[p] for r in rs) if rs else 0.0 for p in PARTS} for rs in groups.values()]
    figure, ax = plt.subplots(figsize=(3 + 1.4 * len(labels), 4.5))
    _stacked(ax, labels, rows)
    ax.set_title(title or "mean round breakdown")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
