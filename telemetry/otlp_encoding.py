"""OTLP trace export with less CPU per span: the same ExportTraceServiceRequest the SDK's encode_spans builds,
written as protobuf wire bytes field by field and parsed into the message by the protobuf runtime (C).

Why: the SDK's encoder builds a Python protobuf object per span, per attribute and per value, and hashes
the Resource (a JSON dump of its attributes) once per span: ~46 us of CPU per span here against ~9 us for
the JSONL line, which put tracing over OTLP at ~4 % of tokens/s on the reference pair
(docs/benchmarks.md). Spans this module does not write itself (events, links, attribute values other than
str, bool, int64 and float) are encoded by the SDK's encoder, one span at a time; resources and
instrumentation scopes, once per batch, too. tests/test_otlp_encoding.py holds the result equal to
encode_spans.

Knows the OTLP trace protobuf, not what the spans mean.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from typing import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanKind

_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags: the parent's is_remote is known / is true
_INT64 = (-(1 << 63), (1 << 63) - 1)
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(128)]
_LENGTH_TAGS = [_varint(number << 3 | 2) for number in range(16)]


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message); numbers up to 15 here."""
    size = len(payload)
    return _LENGTH_TAGS[number] + (_ONE_BYTE[size] if size < 128 else _varint(size)) + payload


_FLAGS_TAG, _START_TAG, _END_TAG = _varint(16 << 3 | 5), _varint(7 << 3 | 1), _varint(8 << 3 | 1)
_KIND_FIELDS = {kind: _varint(6 << 3) + _varint(value) for kind, value in _KIND.items()}
_FLAGS = {remote: _FLAGS_TAG + _fixed32(_HAS_IS_REMOTE | (_IS_REMOTE if remote else 0)) for remote in (False, True)}


def _any_value(value) -> bytes | None:
    """An AnyValue's bytes for the common types; None for what is left to the SDK's encoder."""
    kind = type(value)
    if kind is str:
        return _field(1, value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int and _INT64[0] <= value <= _INT64[1]:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _double(value)
    return None


def _span_bytes(span: ReadableSpan, keys: dict) -> bytes | None:
    """One Span message's bytes, or None when the SDK's encoder has to write it."""
    if span.events or span.links:
        return None
    context, parent, status = span.get_span_context(), span.parent, span.status
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_field(3, ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (_field(5, span.name.encode()), _KIND_FIELDS[span.kind],
              _START_TAG, _fixed64(span.start_time), _END_TAG, _fixed64(span.end_time))
    for key, value in (span.attributes or {}).items():
        encoded = _any_value(value)
        if encoded is None:
            return None
        key_field = keys.get(key)
        if key_field is None:
            key_field = keys[key] = _field(1, key.encode())
        parts.append(_field(9, key_field + _field(2, encoded)))
    for number, dropped in ((10, span.dropped_attributes), (12, span.dropped_events), (14, span.dropped_links)):
        if dropped:
            parts.append(_varint(number << 3) + _varint(dropped))
    code = status.status_code.value
    status_bytes = (_field(2, status.description.encode()) if status.description else b"") + \
        (b"\x18" + _varint(code) if code else b"")
    parts += (_field(15, status_bytes), _FLAGS[bool(parent is not None and parent.is_remote)])
    return b"".join(parts)


def encode_request(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """encode_spans(spans), with the spans written as wire bytes where this module can."""
    groups: dict = defaultdict(lambda: defaultdict(list))  # resource -> scope -> span bytes, as the SDK groups
    canonical: dict[int, object] = {}  # id -> the first equal resource: hashing a Resource dumps it as JSON
    keys: dict[str, bytes] = {}
    for span in spans:
        resource = canonical.get(id(span.resource))
        if resource is None:
            resource = next((known for known in canonical.values() if known == span.resource), span.resource)
            canonical[id(span.resource)] = resource
        encoded = _span_bytes(span, keys)
        if encoded is None:
            encoded = encode_spans([span]).resource_spans[0].scope_spans[0].spans[0].SerializeToString()
        groups[id(resource)][span.instrumentation_scope or None].append(encoded)
    resources = {id(resource): resource for resource in canonical.values()}
    out = []
    for resource_id, scopes in groups.items():
        resource = resources[resource_id]
        # The SDK's own encoding of the resource and each scope, taken from a one-span request.
        scope_fields = []
        for scope, encoded_spans in scopes.items():
            shell = encode_spans([_Shell(resource, scope)]).resource_spans[0]
            scope_message = shell.scope_spans[0]
            scope_bytes = _field(1, scope_message.scope.SerializeToString()) if scope_message.HasField("scope") else b""
            scope_bytes += b"".join(_field(2, s) for s in encoded_spans)
            if scope_message.schema_url:
                scope_bytes += _field(3, scope_message.schema_url.encode())
            scope_fields.append(_field(2, scope_bytes))
        resource_bytes = _field(1, shell.resource.SerializeToString()) + b"".join(scope_fields)
        if shell.schema_url:
            resource_bytes += _field(3, shell.schema_url.encode())
        out.append(_field(1, resource_bytes))
    return ExportTraceServiceRequest.FromString(b"".join(out))


class _Shell(ReadableSpan):
    """A span that only carries a resource and a scope: what the SDK's encoder needs to write those two."""

    def __init__(self, resource, scope):
        super().__init__("", resource=resource, instrumentation_scope=scope, start_time=0, end_time=0)

    def get_span_context(self):
        return INVALID_SPAN_CONTEXT


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter (endpoint, headers, TLS, compression, retries from OTEL_*), with
    the request encoded by encode_request."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return encode_request(data)
