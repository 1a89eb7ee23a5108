"""The local span file: one JSON object per finished span, one span per line, for machines without a collector.

Each process appends to its own file; a batch goes out in one O_APPEND write, so lines stay whole even
when processes share a file. Fields: trace_id, span_id, parent_span_id (hex, or null for a root),
parent_is_remote, name, kind (SERVER, CLIENT, INTERNAL, ...), start_time_unix_nano, end_time_unix_nano,
attributes, status, resource (its attributes, service.name among them).

Knows the span data model, not what any span means.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def span_record(span: ReadableSpan, with_resource: bool = True) -> dict:
    context = span.get_span_context()
    parent = span.parent
    record = {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "parent_is_remote": bool(parent is not None and parent.is_remote),
        "name": span.name,
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }
    if with_resource:
        record["resource"] = dict(span.resource.attributes)
    return record


_encode = json.JSONEncoder(default=str).encode  # one encoder for every field, not one per call


class JsonlSpanExporter(SpanExporter):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._resources: dict[int, str] = {}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(map(self._line, spans)).encode()
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            view = memoryview(data)
            while view:  # a regular file takes it all at once; the loop is for the rare short write
                view = view[os.write(self._fd, view):]
        return SpanExportResult.SUCCESS

    def _line(self, span: ReadableSpan) -> str:
        """span_record(span) as one JSON line, formatted field by field: half the CPU of building the dict
        and encoding it (~6 vs ~13 us per span here), and this runs for every span a round makes.
        tests/test_span_file.py holds the two equal. The resource is the same for every span of a process:
        encoded once, not per span."""
        context, parent = span.get_span_context(), span.parent
        resource = self._resources.get(id(span.resource))
        if resource is None:
            resource = self._resources[id(span.resource)] = _encode(dict(span.resource.attributes))
        if parent is None:
            parent_fields = '"parent_span_id": null, "parent_is_remote": false'
        else:
            parent_fields = f'"parent_span_id": "{parent.span_id:016x}", "parent_is_remote": ' + \
                ("true" if parent.is_remote else "false")
        return (f'{{"trace_id": "{context.trace_id:032x}", "span_id": "{context.span_id:016x}", {parent_fields}, '
                f'"name": {_encode(span.name)}, "kind": "{span.kind.name}", '
                f'"start_time_unix_nano": {_encode(span.start_time)}, "end_time_unix_nano": {_encode(span.end_time)}, '
                f'"attributes": {_encode(dict(span.attributes or {}))}, "status": "{span.status.status_code.name}", '
                f'"resource": {resource}}}\n')

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is already written through to the file
