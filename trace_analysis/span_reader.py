"""Reading exported spans back: our JSONL span files, or OTLP/JSON lines (an OpenTelemetry Collector's
`file` exporter), from files or directories, into the span_file record shape.

Knows the two file formats, not what any span means.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# OTLP's SpanKind enum, by number.
_OTLP_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _otlp_value(value: dict):
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])  # OTLP/JSON writes 64-bit ints as strings
    if "arrayValue" in value:
        return [_otlp_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def _otlp_attributes(items: list) -> dict:
    return {item["key"]: _otlp_value(item.get("value", {})) for item in items or ()}


def _from_otlp(message: dict) -> Iterable[dict]:
    for resource_spans in message.get("resourceSpans", ()):
        resource = _otlp_attributes(resource_spans.get("resource", {}).get("attributes"))
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                kind = span.get("kind", 0)
                yield {
                    "trace_id": span["traceId"].lower(),
                    "span_id": span["spanId"].lower(),
                    "parent_span_id": span.get("parentSpanId", "").lower() or None,
                    "parent_is_remote": None,
                    "name": span["name"],
                    "kind": _OTLP_KINDS.get(kind, "UNSPECIFIED") if isinstance(kind, int) else
                    str(kind).removeprefix("SPAN_KIND_"),
                    "start_time_unix_nano": int(span["startTimeUnixNano"]),
                    "end_time_unix_nano": int(span["endTimeUnixNano"]),
                    "attributes": _otlp_attributes(span.get("attributes")),
                    "status": span.get("status", {}).get("code", "UNSET"),
                    "resource": resource,
                }


def _files(paths: Iterable[str | Path]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            # Only span files: a study's directory also holds its results and timeline as .json.
            found.extend(sorted(path.glob("*.jsonl")))
        else:
            found.append(path)
    return found


def read_spans(paths: Iterable[str | Path]) -> list[dict]:
    """All spans in the files (directories: their *.jsonl), in file order.

    A process killed mid-write leaves at most a torn last line; such lines are skipped, anything else
    that is not JSON is an error."""
    spans: list[dict] = []
    for path in _files(paths):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue
                raise ValueError(f"{path}:{number}: not a JSON span record") from None
            if "resourceSpans" in message:
                spans.extend(_from_otlp(message))
            else:
                spans.append(message)
    return spans
