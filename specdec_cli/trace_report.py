"""`specdec trace-report FILE...`: the per-round breakdown of exported spans (median, p90, share of wall
time), a PNG chart and a Chrome / Perfetto trace-event JSON with each round on a timeline.

Knows where to find and how to print; the arithmetic is trace_analysis.breakdown's.
"""

from __future__ import annotations

import json
from pathlib import Path

from trace_analysis.breakdown import PARTS, Round, rounds_from_spans, summarize
from trace_analysis.span_reader import read_spans


def format_summary(summary: dict) -> str:
    lines = [f"{summary['traces']} generations, {summary['rounds']} rounds, "
             f"{summary['wall_ms'] / 1000:.3f} s of round wall time"
             + (f" ({summary['overlapped_rounds']} overlapped)" if summary["overlapped_rounds"] else ""),
             f"{'part':<22}{'median ms':>10}{'p90 ms':>10}{'share':>9}"]
    for name in PARTS:
        part = summary["parts"][name]
        lines.append(f"{name:<22}{part['median_ms']:>10.3f}{part['p90_ms']:>10.3f}{part['share']:>9.1%}")
    lines.append(f"{'sum of parts':<42}{summary['covers_wall_fraction']:>9.1%}")
    lines.append(f"{'round wall':<22}{summary['round_ms']['median_ms']:>10.3f}{summary['round_ms']['p90_ms']:>10.3f}")
    lines.append(f"network one-way p50 {summary['one_way_ms_p50']:.3f} ms "
                 "(client-observed - server-reported, halved; no clock sync)")
    return "\n".join(lines)


def load_rounds(files: list[Path], trace_id: str | None = None) -> list[Round]:
    rounds = rounds_from_spans(read_spans(files))
    if trace_id:
        rounds = [r for r in rounds if r.trace_id.startswith(trace_id.lower())]
    return rounds


def trace_report(files: list[Path], png: Path | None, perfetto: Path | None, as_json: bool,
                 trace_id: str | None = None) -> dict:
    """Print the report; returns the summary with the written paths. Raises ValueError without round spans."""
    from trace_analysis.chart import rounds_chart
    from trace_analysis.perfetto import write_trace_events

    rounds = load_rounds(files, trace_id)
    if not rounds:
        raise ValueError(f"no `round` spans in {', '.join(map(str, files))} (is the orchestrator's file among "
                         "them, and was tracing on? SPECDEC_TRACE_FILE / OTEL_TRACES_EXPORTER)")
    base = files[0] if files[0].is_dir() else files[0].with_suffix("")
    png = png or Path(f"{base}.breakdown.png")
    perfetto = perfetto or Path(f"{base}.perfetto.json")
    summary = summarize(rounds)
    summary["png"] = str(rounds_chart(rounds, png))
    summary["perfetto"] = str(write_trace_events(rounds, perfetto))
    if as_json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        print(f"chart {png}\ntimeline {perfetto} (open in https://ui.perfetto.dev)")
    return summary
