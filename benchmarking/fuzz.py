"""Protocol fuzzing of every RPC of every specdec service: `python -m benchmarking.fuzz --long`.

Starts draft, verify and orchestrator (as `specdec serve` processes here, so a crash is a dead process;
in-process in the CI test, tests/test_fuzz.py), discovers every RPC from the service descriptors in
specdec_api/*_pb2.py and sends, per RPC, valid requests mutated
  field by field   edge values of each field's type (0, -1, type limits, the deployment's vocabulary, context
                   and gamma limits, NaN, ±inf, 1e-40, 1e38, empty / huge / unicode strings), unset oneofs
                   and optionals, long repeated fields, out-of-range token ids, nested messages; or 2-4 at once
  byte by byte     bit flips, truncation, random bytes, the body twice, duplicated fields, wrong wire types,
                   huge and negative length prefixes, overlong varints, invalid UTF-8, deep nesting, big
                   unknown fields (sent with identity serializers, so the server parses what we wrote)
  header by header trace context, credentials, many headers
  in sessions      a valid call, then on the same session a mutated call, another caller's valid call that
                   rewrites its tokens (tamper), a call cut short by a deadline or a cancel, or two releases;
                   then a valid continuation, compared with the same continuation on an untouched session
with `--workers` cases in flight, so mutated calls share the services' batched passes with valid ones.

A failure is one of:
  crash        a service process died, or its health check stopped answering SERVING
  hang         a call hit its deadline; deadlines are sized to the work the request asks for (tokens to
               feed or generate, bytes to parse), so legitimate long work is not a hang
  status       UNKNOWN or INTERNAL, or a refusal without a message: it must say what was wrong
  slow-refusal a request was refused only after more than --slow-refusal seconds (best of 3 tries): a limit
               checked after work proportional to the input (DESIGN.md principle 10)
  refused      a valid request (a setup or control step) was refused
  integrity    after a mutated call, a valid continuation answered other tokens than on an untouched
               session (DESIGN.md principle 9), a canary generation changed, or an OK reply held a token
               id outside the vocabulary
  exactness    after the fuzzing, greedy generation through the orchestrator differs from the target's
               own `generate`

Knows nothing of what the services compute beyond `valid_request`, the one place that says what a valid
request of each RPC looks like: new RPCs and new fields are fuzzed as soon as they are in the descriptors.
Every case is a pure function of (seed, service, index), so `--case verify:17` replays one (alone: a
failure that needed a concurrent neighbour may not come back).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import pkgutil
import random
import re
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

import specdec_api

FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
UNEXPLAINED_OK = (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)  # need no message
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 512 << 20), ("grpc.max_receive_message_length", 512 << 20)]
MAX_HEX_BYTES = 64 << 10  # requests larger than this are stored truncated; `--case` regenerates them


# -- discovery --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rpc:
    service: str  # full name, e.g. specdec.v1.VerifyService
    method: str
    request_class: type
    response_class: type
    server_streaming: bool
    client_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def name(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method}"

    def has(self, *names: str) -> bool:
        return all(n in self.request_class.DESCRIPTOR.fields_by_name for n in names)

    @property
    def opens_session(self) -> bool:
        """Propose, Verify and any later RPC with the same session shape."""
        return self.has("session_id", "prefix_len", "append_tokens")

    @property
    def releases_session(self) -> bool:
        return self.has("session_id") and not self.opens_session and self.method.startswith("Release")


def discover_rpcs() -> dict[str, list[Rpc]]:
    """Every RPC of every service in specdec_api/*_pb2.py, by service full name."""
    from google.protobuf import message_factory

    services: dict[str, list[Rpc]] = {}
    for module_info in sorted(pkgutil.iter_modules(specdec_api.__path__), key=lambda m: m.name):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"specdec_api.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            services[service.full_name] = [
                Rpc(service.full_name, m.name, message_factory.GetMessageClass(m.input_type),
                    message_factory.GetMessageClass(m.output_type), m.server_streaming, m.client_streaming)
                for m in service.methods]
    return services


# -- the deployment under test -----------------------------------------------------------------------------
@dataclass
class Limits:
    vocab_size: int
    max_context: int
    max_draft_tokens: int


@dataclass
class Endpoint:
    role: str  # draft | verify | orchestrator
    address: str
    service: str  # the full service name it serves
    process: object | None = None  # subprocess.Popen when it runs as a process
    log_path: Path | None = None

    def problem(self, timeout_s: float = 5.0) -> str | None:
        """None while the service lives and answers health SERVING; else what is wrong."""
        if self.process is not None and self.process.poll() is not None:
            return f"{self.role} process exited with code {self.process.returncode}"
        try:
            with grpc.insecure_channel(self.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as error:
            return f"{self.role} health check failed: {error.code().name} {error.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"{self.role} health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    def log_mark(self) -> int:
        """Where the service's log ends now (0 without a log)."""
        try:
            return Path(self.log_path).stat().st_size if self.log_path else 0
        except OSError:
            return 0

    def log_since(self, mark: int, limit: int = 4000) -> str:
        """What the service logged after `mark`: the traceback behind an INTERNAL, the last words of a crash."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return text if len(text) <= limit else "…" + text[-limit:]


def read_limits(endpoints: dict[str, Endpoint]) -> Limits:
    from specdec_api import common_pb2, verify_pb2_grpc

    with grpc.insecure_channel(endpoints["verify"].address) as channel:
        info = verify_pb2_grpc.VerifyServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
    return Limits(info.vocab_size, info.max_context, info.max_draft_tokens)


# -- valid requests: THE place to change when a service starts requiring a field ------------------------------
@dataclass
class SessionCall:
    """One call on a session: the caller assumes the service holds `committed` (prefix_len = its length)."""
    session_id: str
    committed: list[int]
    append: list[int]
    gamma: int
    drafts: list[int]
    sampled: bool
    seed: int


def prefix_fingerprint(tokens: Sequence[int]) -> bytes:
    """What names a cached prefix (DESIGN.md principle 9): service_common/session_fingerprint.py's running hash."""
    from service_common.session_fingerprint import fingerprint

    return fingerprint(tokens)


def valid_request(rpc: Rpc, limits: Limits, rng: random.Random, call: SessionCall | None = None) -> Message:
    """A request of `rpc` that the service must accept. Fields it does not know stay unset, so a field
    added to a proto is fuzzed (from its default) without a change here, unless the service requires it."""
    request = rpc.request_class()
    fields = rpc.request_class.DESCRIPTOR.fields_by_name
    if call is not None and rpc.opens_session:  # Propose, Verify
        request.session_id = call.session_id
        request.prefix_len = len(call.committed)
        request.append_tokens.extend(call.append)
        if "prefix_fingerprint" in fields and call.committed:
            request.prefix_fingerprint = prefix_fingerprint(call.committed)
        if "num_draft_tokens" in fields:
            request.num_draft_tokens = call.gamma
        if "draft_token_ids" in fields:
            request.draft_token_ids.extend(call.drafts)
        if "sampling" in fields and call.sampled:
            request.sampling.temperature, request.sampling.top_k, request.sampling.top_p = 0.8, 20, 0.95
        if "seed" in fields:
            request.seed = call.seed
    elif call is not None and "session_id" in fields:  # ReleaseSession
        request.session_id = call.session_id
    if "max_new_tokens" in fields:  # Orchestrator.Generate: short, so that no valid base is long work
        if rng.random() < 0.5:
            request.token_ids.ids.extend(rng.randrange(1, limits.vocab_size) for _ in range(rng.randint(1, 8)))
        else:
            request.text = rng.choice(PROMPTS)
        request.max_new_tokens = rng.randint(1, 8)
        if rng.random() < 0.7:
            request.num_draft_tokens = rng.randint(0, min(4, limits.max_draft_tokens))
        if rng.random() < 0.3:
            request.temperature, request.seed = 0.8, rng.randrange(1 << 32)
    return request


def session_plan(limits: Limits, rng: random.Random, session_id: str) -> tuple[SessionCall, SessionCall]:
    """A session's first call (prefix_len 0) and a continuation that assumes the first call's tokens."""
    vocab = limits.vocab_size
    prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))]
    gamma = rng.randint(1, min(4, limits.max_draft_tokens))
    sampled, seed = rng.random() < 0.25, rng.randrange(1 << 32)
    first = SessionCall(session_id, [], prompt, gamma, [rng.randrange(vocab) for _ in range(gamma)], sampled, seed)
    nxt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 3))]
    then = SessionCall(session_id, prompt, nxt, gamma, [rng.randrange(vocab) for _ in range(gamma)], sampled, seed + 1)
    return first, then


def foreign_call(limits: Limits, rng: random.Random, first: SessionCall) -> SessionCall:
    """A valid call on `first`'s session that keeps k of its tokens and writes others after them, at least as
    many as the session held: a continuation that assumed `first` would find a long enough, wrong cache."""
    k = rng.randint(0, len(first.append) - 1)
    others = [rng.randrange(1, limits.vocab_size) for _ in range(len(first.append) - k + rng.randint(0, 3))]
    if others[: len(first.append) - k] == first.append[k:]:
        others[0] = first.append[k] % (limits.vocab_size - 1) + 1  # another token, still in [1, vocab)
    return SessionCall(first.session_id, first.append[:k], others, first.gamma, first.drafts, first.sampled, first.seed)


PROMPTS = ["def main():\n", "import os\n", "class Foo(object):\n    def", "for i in range(", "print(", "x = [1, 2, 3]\n"]


# -- mutations: values ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    label: str
    apply: Callable[[Message], None]


_INT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
              FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64,
              FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_UINT64,
              FieldDescriptor.TYPE_FIXED64}
_FLOAT_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
HUGE_STRING = 1 << 20


def edge_values(fd: FieldDescriptor, limits: Limits) -> list:
    """Values at the edges of a scalar field's type and of the deployment's limits."""
    v, c, d = limits.vocab_size, limits.max_context, limits.max_draft_tokens
    if fd.type in _INT_TYPES:
        values = [0, 1, -1, 2, v - 1, v, v + 1, c - 1, c, c + 1, d, d + 1, 1 << 16, (1 << 31) - 1, -(1 << 31),
                  (1 << 32) - 1, 1 << 32, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1]
        return list(dict.fromkeys(values))  # the setter refuses what the type cannot hold: skipped there
    if fd.type in _FLOAT_TYPES:
        values = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-5, 1e-6, 1.0000001, 0.9999999, math.nan, -math.nan, math.inf,
                  -math.inf, 1e-40, 1e-45, 1e38, 3.4028234e38, -1e38, 2.0, 100.0]
        return values + ([1e308, 5e-324, -1e308] if fd.type == FieldDescriptor.TYPE_DOUBLE else [])
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return [True, False]
    if fd.type == FieldDescriptor.TYPE_STRING:
        return ["", "x", "a" * 256, "a" * 257, "a" * HUGE_STRING, "é", "🙂" * 300, "\x00", "a\x00b", "\u202egnp.",
                "\ufeff", "\U0010ffff", "語" * 5000, "\n\r\t", "%s%n%x", "../../etc/passwd", " ", "fuzz-🙂-id"]
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return [b"", b"\x00", b"\x00" * 16, b"\xff" * 16, b"\xff" * 15, b"\x01" * 17, bytes(range(256)),
                b"\xaa" * HUGE_STRING]
    if fd.type == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in fd.enum_type.values]
        return numbers + [max(numbers) + 1, -1, (1 << 31) - 1]
    return []


def repeated_values(fd: FieldDescriptor, limits: Limits) -> list[list]:
    v, c, d = limits.vocab_size, limits.max_context, limits.max_draft_tokens
    if fd.type in _INT_TYPES:
        return [[], [0], [-1], [v - 1], [v], [v + 5], [(1 << 31) - 1], [-(1 << 31)], [1, 2, v + 5], [1] * (d + 1),
                [1] * (c - 1), [1] * c, [1] * (c + 1), [7] * 100_000, list(range(v)) * 3]
    values = edge_values(fd, limits)
    if fd.type == FieldDescriptor.TYPE_STRING:
        values = [s for s in values if len(s) < 10_000]
        return [[]] + [[s] for s in values] + [["x"] * 17, ["stop"] * 1000, ["a" * 1001]]
    return [[]] + [[x] for x in values[:6]] + [values[:1] * 1000]


def _target(message: Message, path: Sequence[str]) -> Message:
    for name in path:
        message = getattr(message, name)
    return message


def _setter(path: tuple[str, ...], name: str, value) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        setattr(_target(message, path), name, value)
    return apply


def _repeated_setter(path: tuple[str, ...], name: str, values: list) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        container = getattr(_target(message, path), name)
        del container[:]
        container.extend(values)
    return apply


def _clearer(path: tuple[str, ...], name: str) -> Callable[[Message], None]:
    return lambda message: _target(message, path).ClearField(name)


def _value_repr(value) -> str:
    if isinstance(value, (str, bytes)) and len(value) > 24:
        return f"{value[:8]!r}…({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, list):
        return f"[{', '.join(_value_repr(x) for x in value[:4])}{', …' if len(value) > 4 else ''}] (len {len(value)})"
    return repr(value)


def field_mutations(descriptor: Descriptor, limits: Limits, path: tuple[str, ...] = (), depth: int = 0) -> list[Mutation]:
    """Every single-field mutation of a message type, nested messages included (to depth 3)."""
    out: list[Mutation] = []
    probe = None
    for fd in descriptor.fields:
        where = ".".join((*path, fd.name))
        is_map = fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry
        if fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE:
            if is_map:
                continue  # none in the protos today; a map's keys and values would go here
            out.append(Mutation(f"{where} = []", _clearer(path, fd.name)))

            def add_many(message, path=path, name=fd.name, n=1000):
                container = getattr(_target(message, path), name)
                for _ in range(n):
                    container.add()
            out.append(Mutation(f"{where} += 1000 empty", add_many))
        elif fd.is_repeated:
            out += [Mutation(f"{where} = {_value_repr(vals)}", _repeated_setter(path, fd.name, vals))
                    for vals in repeated_values(fd, limits)]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            out.append(Mutation(f"{where} unset", _clearer(path, fd.name)))
            out.append(Mutation(f"{where} = {{}}", lambda m, p=path, n=fd.name: getattr(_target(m, p), n).SetInParent()))
            if depth < 3:
                out += field_mutations(fd.message_type, limits, (*path, fd.name), depth + 1)
        else:
            if fd.has_presence:
                out.append(Mutation(f"{where} unset", _clearer(path, fd.name)))
            if probe is None:
                probe = _message_class(descriptor)()
            for value in edge_values(fd, limits):
                try:  # the setter refuses a value the field's type cannot hold
                    setattr(probe, fd.name, value)
                except (ValueError, TypeError, OverflowError):
                    continue
                out.append(Mutation(f"{where} = {_value_repr(value)}", _setter(path, fd.name, value)))
    for oneof in descriptor.oneofs:
        if len(oneof.fields) > 1 or not oneof.name.startswith("_"):  # a real oneof, not a proto3 `optional`
            out.append(Mutation(f"{'.'.join((*path, oneof.name))} (oneof) unset",
                                lambda m, p=path, n=oneof.name: _target(m, p).ClearField(n)))
    return out


def _message_class(descriptor: Descriptor) -> type:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


# -- mutations: bytes -------------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _wire_type(fd: FieldDescriptor) -> int:
    length_delimited = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
    if fd.is_repeated and fd.type not in length_delimited:
        return 2  # packed
    return {FieldDescriptor.TYPE_DOUBLE: 1, FieldDescriptor.TYPE_FIXED64: 1, FieldDescriptor.TYPE_SFIXED64: 1,
            FieldDescriptor.TYPE_FLOAT: 5, FieldDescriptor.TYPE_FIXED32: 5, FieldDescriptor.TYPE_SFIXED32: 5,
            FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_BYTES: 2, FieldDescriptor.TYPE_MESSAGE: 2,
            FieldDescriptor.TYPE_GROUP: 3}.get(fd.type, 0)


def _payload_for(wire_type: int, rng: random.Random) -> bytes:
    return {0: varint(rng.choice([0, 1, (1 << 64) - 1, 1 << 40])), 1: rng.randbytes(8), 5: rng.randbytes(4),
            2: varint(3) + b"abc", 3: b"", 4: b""}[wire_type]


def byte_mutation(rng: random.Random, payload: bytes, descriptor: Descriptor) -> tuple[str, bytes]:
    """One mutation of a serialized request, at the wire level (what a field mutation cannot express)."""
    fields = list(descriptor.fields)
    fd = rng.choice(fields) if fields else None
    kind = rng.choice(["bitflip", "bitflip", "truncate", "random", "empty", "twice", "duplicate-field",
                       "wrong-wire-type", "huge-length", "overlong-varint", "varint-overflow", "invalid-utf8",
                       "unknown-field", "field-zero", "deep-groups", "unterminated-group", "bad-packed",
                       "truncated-fixed", "big-unknown", "negative-length"])
    data = bytearray(payload)
    if kind == "bitflip":
        if not data:
            return "bitflip of empty: one random byte", rng.randbytes(1)
        flips = rng.randint(1, 8)
        for _ in range(flips):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return f"bitflip x{flips}", bytes(data)
    if kind == "truncate":
        cut = rng.randrange(len(data)) if data else 0
        return f"truncate to {cut}/{len(data)} bytes", bytes(data[:cut])
    if kind == "random":
        n = rng.choice([1, 2, 5, 16, 64, 256, 4096])
        return f"{n} random bytes", rng.randbytes(n)
    if kind == "empty":
        return "empty body", b""
    if kind == "twice":
        return "the request twice (merged)", bytes(data) * 2
    if fd is None:
        return "unknown field 1000 (varint)", bytes(data) + tag(1000, 0) + varint(1)
    number, wt = fd.number, _wire_type(fd)
    if kind == "duplicate-field":
        return f"{fd.name} again (field {number}, wire type {wt})", bytes(data) + tag(number, wt) + _payload_for(wt, rng)
    if kind == "wrong-wire-type":
        wrong = rng.choice([w for w in (0, 1, 2, 5, 3) if w != wt])
        body = _payload_for(wrong, rng) + (tag(number, 4) if wrong == 3 else b"")
        return f"{fd.name} with wire type {wrong} (is {wt})", bytes(data) + tag(number, wrong) + body
    if kind == "huge-length":
        length = rng.choice([1 << 31, (1 << 31) - 1, 1 << 62, 1 << 28])
        return f"{fd.name} length prefix {length}", bytes(data) + tag(number, 2) + varint(length) + b"abc"
    if kind == "negative-length":
        return f"{fd.name} length prefix -1 (10-byte varint)", bytes(data) + tag(number, 2) + varint(-1) + b"abc"
    if kind == "overlong-varint":
        return f"{fd.name} 11-byte varint", bytes(data) + tag(number, 0) + b"\xff" * 10 + b"\x01"
    if kind == "varint-overflow":
        value = rng.choice([1 << 32, 1 << 40, (1 << 64) - 1, (1 << 31)])
        return f"{fd.name} varint {value}", bytes(data) + tag(number, 0) + varint(value)
    if kind == "invalid-utf8":
        strings = [f for f in fields if f.type == FieldDescriptor.TYPE_STRING] or [fd]
        target = rng.choice(strings)
        junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b"])
        return f"{target.name} invalid UTF-8 {junk!r}", bytes(data) + tag(target.number, 2) + varint(len(junk)) + junk
    if kind == "unknown-field":
        number = rng.choice([999, 19000, (1 << 29) - 1, 16, 50])
        wt = rng.choice([0, 1, 2, 5])
        return f"unknown field {number} wire type {wt}", bytes(data) + tag(number, wt) + _payload_for(wt, rng)
    if kind == "field-zero":
        return "field number 0", bytes(data) + b"\x00\x00"
    if kind == "deep-groups":
        depth = rng.choice([64, 101, 10_000, 100_000])
        return f"{depth} nested unknown groups", bytes(data) + tag(1000, 3) * depth + tag(1000, 4) * depth
    if kind == "unterminated-group":
        return "unterminated group", bytes(data) + tag(1000, 3) + tag(1001, 0) + b"\x01"
    if kind == "bad-packed":
        return f"{fd.name} packed with a cut varint", bytes(data) + tag(number, 2) + varint(3) + b"\x01\x80\x80"
    if kind == "truncated-fixed":
        return "truncated fixed64 (unknown field 1000)", bytes(data) + tag(1000, 1) + b"\x01\x02\x03"
    n = rng.choice([1 << 20, 4 << 20])  # big-unknown
    return f"unknown field 1000 of {n} bytes", bytes(data) + tag(1000, 2) + varint(n) + b"\x00" * n


# -- mutations: headers ------------------------------------------------------------------------------------
def metadata_mutation(rng: random.Random) -> tuple[str, tuple]:
    """Request headers a server parses or passes on: W3C trace context, credentials, many or long headers.
    Only what the client library sends: it refuses illegal values itself and drops headers over ~2 KB."""
    choices = [
        ("traceparent", "garbage"), ("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"),
        ("traceparent", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"), ("traceparent", "00-" + "a" * 1000),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz"), ("tracestate", "k=" + "v" * 1500),
        ("tracestate", ",,,=,=,"), ("baggage", "a=b;" * 300), ("authorization", "Bearer " + "x" * 1500),
        ("authorization", "Basic"), ("x-api-key", " "), ("x-api-key", "k" * 300),
        ("specdec-error", "session-lost"),
        ("grpc-trace-bin", bytes(rng.randbytes(29))), ("grpc-tags-bin", b"\x00" * 64), ("x-long", "h" * 1900),
        ("user-agent", "u" * 1500), ("content-type", "application/grpc+json"),
    ]
    if rng.random() < 0.15:
        n = rng.choice([10, 100])  # a few KB of headers more is refused by gRPC itself, without a message
        return f"{n} headers", tuple((f"x-fuzz-{i}", str(i)) for i in range(n))
    key, value = rng.choice(choices)
    return f"{key}: {_value_repr(value)}", ((key, value),)


# -- cases -------------------------------------------------------------------------------------------------
@dataclass
class Step:
    rpc: Rpc
    payload: bytes
    label: str
    role: str  # setup | mutant | check | control
    message: Message | None = None  # the request when it is a message (else only bytes)
    timeout_s: float | None = None  # a deadline meant to cut the call short (DEADLINE_EXCEEDED is fine then)
    cancel_after_s: float | None = None  # the client cancels the call this long after sending it
    metadata: tuple = ()  # request headers
    concurrent: bool = False  # sent alongside the next step, not before it


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    deadline_s: float
    replies: list[bytes]
    trailing: tuple = ()


@dataclass
class Failure:
    kind: str
    role: str  # the service being fuzzed
    rpc: str
    code: str
    details: str
    mutation: str
    case: str  # role:index, for --case
    steps: list[dict]
    log_tail: str = ""

    @property
    def signature(self) -> tuple:
        return (self.kind, self.rpc, self.code, normalize(self.details))


def normalize(details: str) -> str:
    """A status message with its numbers and quoted values blanked, so one bug is one signature."""
    details = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", details)
    details = re.sub(r"\[[^\]]*\]", "[…]", details)
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?|nan|inf", "N", details)[:160]


def describe(rpc: Rpc, payload: bytes, limit: int = 1500) -> str:
    """The request in text format when it parses (long values shortened), else why it does not."""
    try:
        message = rpc.request_class.FromString(payload)
    except DecodeError as error:
        return f"<does not parse as {rpc.request_class.DESCRIPTOR.name}: {error}>"
    text = text_format.MessageToString(message, as_utf8=True, as_one_line=True)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def step_record(step: Step, outcome: Outcome | None) -> dict:
    record = {"rpc": step.rpc.path, "role": step.role, "label": step.label, "bytes": len(step.payload),
              "text": describe(step.rpc, step.payload),
              "hex": step.payload[:MAX_HEX_BYTES].hex()}
    if len(step.payload) > MAX_HEX_BYTES:
        record["hex_truncated"] = True
        record["sha256"] = hashlib.sha256(step.payload).hexdigest()
    if outcome is not None:
        record.update(code=outcome.code.name, details=outcome.details[:500], seconds=round(outcome.seconds, 4))
    return record


# -- one service's fuzzing ----------------------------------------------------------------------------------
@dataclass
class Options:
    requests: int = 300  # calls per service (a bound; `seconds` is the other)
    seconds: float = 30.0
    seed: int = 0
    base_deadline_s: float = 10.0
    max_hangs: int = 3  # stop fuzzing a service after this many calls hit their deadline
    check_every: int = 20  # health-check every service every this many cases
    only_case: str | None = None  # "role:index": run just that case
    workers: int = 2  # cases in flight at once
    slow_refusal_s: float = 0.5  # a refusal slower than this (plus 1 s per 20 MB sent) is a failure
    load_refusals_ok: bool = False  # a valid call may be RESOURCE_EXHAUSTED (services started with tight budgets)


@dataclass
class ServiceReport:
    role: str
    service: str
    requests: int = 0
    cases: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    per_rpc: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)  # case kinds
    continuations: Counter = field(default_factory=Counter)  # after a mutated call: equal | session-lost | differ
    slowest: dict | None = None
    stopped: str = ""

    def as_dict(self) -> dict:
        return {"role": self.role, "service": self.service, "requests": self.requests, "cases": self.cases,
                "seconds": round(self.seconds, 2), "statuses": dict(self.statuses), "per_rpc": dict(self.per_rpc),
                "case_kinds": dict(self.mutations),
                "continuations": dict(self.continuations), "slowest": self.slowest, "stopped": self.stopped}


class Fuzzer:
    """Runs cases against one deployment; collects reports and failures."""

    def __init__(self, endpoints: dict[str, Endpoint], options: Options, limits: Limits | None = None):
        self.endpoints = endpoints
        self.options = options
        self.limits = limits or read_limits(endpoints)
        self.services = discover_rpcs()
        self.channels = {role: grpc.insecure_channel(e.address, options=CHANNEL_OPTIONS) for role, e in endpoints.items()}
        self.failures: list[Failure] = []
        self.reports: dict[str, ServiceReport] = {}
        self.per_token_s = 0.01
        self.canary: tuple[Step, list] | None = None
        self._mutations: dict[str, list[Mutation]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    # -- calls --
    def deadline_s(self, rpc: Rpc, payload: bytes) -> float:
        """Enough for the work the request asks for: the tokens it feeds or generates (each bounded by the
        context: a service must refuse more before doing it) and the bytes to parse, with a wide margin."""
        return (self.options.base_deadline_s + 10 * self.per_token_s * requested_tokens(rpc, payload, self.limits)
                + len(payload) / 1e6)

    def call(self, role: str, step: Step) -> Outcome:
        rpc, channel = step.rpc, self.channels[role]
        deadline = step.timeout_s or self.deadline_s(rpc, step.payload)
        started = time.perf_counter()
        replies: list[bytes] = []
        timer = None
        try:
            if rpc.client_streaming and rpc.server_streaming:
                call = channel.stream_stream(rpc.path)(iter([step.payload]), timeout=deadline, metadata=step.metadata)
            elif rpc.client_streaming:
                call = channel.stream_unary(rpc.path).future(iter([step.payload]), timeout=deadline,
                                                             metadata=step.metadata)
            elif rpc.server_streaming:
                call = channel.unary_stream(rpc.path)(step.payload, timeout=deadline, metadata=step.metadata)
            else:
                call = channel.unary_unary(rpc.path).future(step.payload, timeout=deadline, metadata=step.metadata)
            if step.cancel_after_s is not None:
                timer = threading.Timer(step.cancel_after_s, call.cancel)
                timer.start()
            if rpc.server_streaming:
                for reply in call:
                    replies.append(reply)
            else:
                replies = [call.result()]
            code, details, trailing = grpc.StatusCode.OK, "", ()
        except grpc.FutureCancelledError:
            code, details, trailing = grpc.StatusCode.CANCELLED, "cancelled by the client", ()
        except grpc.RpcError as error:
            code, details, trailing = error.code(), error.details() or "", tuple(error.trailing_metadata() or ())
        finally:
            if timer is not None:
                timer.cancel()
        return Outcome(code, details, time.perf_counter() - started, deadline, replies, trailing)

    def calibrate(self) -> None:
        """Time per generated token, from one valid generation; sizes the deadlines."""
        rpc = self._rpc("Orchestrator", "Generate")
        if rpc is None:
            return
        request = valid_request(rpc, self.limits, random.Random(0))
        request.max_new_tokens = 16
        step = Step(rpc, request.SerializeToString(), "calibration", "setup", request)
        self.per_token_s = 0.5  # generous while not yet measured
        outcome = self.call("orchestrator", step)
        if outcome.code == grpc.StatusCode.OK:
            self.per_token_s = max(outcome.seconds / 16, 0.002)
            self.canary = (step, essence(rpc, outcome.replies))

    def _rpc(self, service_suffix: str, method: str) -> Rpc | None:
        for name, rpcs in self.services.items():
            if name.endswith("." + service_suffix):
                for rpc in rpcs:
                    if rpc.method == method:
                        return rpc
        return None

    # -- building cases --
    def mutations_of(self, rpc: Rpc) -> list[Mutation]:
        if rpc.path not in self._mutations:
            found = field_mutations(rpc.request_class.DESCRIPTOR, self.limits)
            random.Random(f"{self.options.seed}:{rpc.path}").shuffle(found)
            self._mutations[rpc.path] = found
        return self._mutations[rpc.path]

    def build_case(self, role: str, index: int) -> tuple[str, list[Step]]:
        """Case `index` of a service: a pure function of (seed, role, index)."""
        rpcs = self.services[self.endpoints[role].service]
        rng = random.Random(f"{self.options.seed}:{role}:{index}")
        rpc = rpcs[index % len(rpcs)]
        openers = [r for r in rpcs if r.opens_session]
        kinds = ["field"] * 5 + ["fields"] * 2 + ["bytes"] * 5 + ["metadata"]
        if rpc.opens_session or rpc.server_streaming:
            kinds += ["interrupt"]
        if rpc.opens_session:
            kinds += ["session"] * 3 + ["tamper"] * 2 + ["race"] * 2
            kinds += ["release"] * (2 if any(r.releases_session for r in rpcs) else 0)
        kind = rng.choice(kinds)
        sid = f"fuzz-{role}-{self.options.seed}-{index}"
        steps: list[Step] = []

        def mutate(base_rpc: Rpc, base: Message) -> tuple[str, bytes, Message | None, tuple]:
            how = kind if kind in ("field", "fields", "bytes", "metadata") else rng.choice(["field", "bytes"])
            if how == "metadata":  # a valid request under odd headers (trace context, keys, sheer size)
                label, metadata = metadata_mutation(rng)
                return f"metadata: {label}", base.SerializeToString(), base, metadata
            if how == "bytes":
                label, payload = byte_mutation(rng, base.SerializeToString(), base_rpc.request_class.DESCRIPTOR)
                return f"bytes: {label}", payload, None, ()
            all_mutations = self.mutations_of(base_rpc)
            if not all_mutations:
                return "no fields to mutate: the valid request", base.SerializeToString(), base, ()
            chosen = ([all_mutations[(index // len(rpcs)) % len(all_mutations)]] if how == "field"
                      else rng.sample(all_mutations, min(len(all_mutations), rng.randint(2, 4))))
            mutated = type(base)()
            mutated.CopyFrom(base)
            for mutation in chosen:
                mutation.apply(mutated)
            return "field: " + "; ".join(m.label for m in chosen), mutated.SerializeToString(), mutated, ()

        def mutant(base_rpc: Rpc, base: Message) -> Step:
            label, payload, message, metadata = mutate(base_rpc, base)
            return Step(base_rpc, payload, label, "mutant", message, metadata=metadata)

        def step(step_rpc: Rpc, message: Message, label: str, step_role: str) -> Step:
            return Step(step_rpc, message.SerializeToString(), label, step_role, message)

        if rpc.releases_session and openers:  # releases of live sessions, mutated
            opener = rng.choice(openers)
            first, then = session_plan(self.limits, rng, sid)
            steps.append(step(opener, valid_request(opener, self.limits, rng, first), "open the session", "setup"))
            steps.append(mutant(rpc, valid_request(rpc, self.limits, rng, first)))
            steps += self._continuation(opener, then, rng)
            return f"{kind}", steps
        if rpc.opens_session:
            first, then = session_plan(self.limits, rng, sid)
            if kind in ("field", "fields", "bytes", "metadata"):  # alone, on a fresh session
                return kind, [mutant(rpc, valid_request(rpc, self.limits, rng, first))]
            steps.append(step(rpc, valid_request(rpc, self.limits, rng, first), "open the session", "setup"))
            if kind == "session":  # a mutated call on the live session, then a valid continuation
                steps.append(mutant(rpc, valid_request(rpc, self.limits, rng, then)))
            elif kind == "interrupt":  # the valid continuation cut short by the client, then resent
                steps.append(self._interrupted(step(rpc, valid_request(rpc, self.limits, rng, then), "", "mutant"), rng))
            elif kind == "tamper":  # another caller's valid call on the same session id rewrites its tokens
                foreign = foreign_call(self.limits, rng, first)
                steps.append(Step(rpc, valid_request(rpc, self.limits, rng, foreign).SerializeToString(),
                                  f"tamper: prefix_len {len(foreign.committed)} then {len(foreign.append)} other tokens",
                                  "mutant"))
            elif kind == "race":  # a tamper, a mutated call or a release sent at the same time as the continuation
                how = rng.choice(["tamper", "mutated", "release"])
                if how == "tamper":
                    foreign = foreign_call(self.limits, rng, first)
                    racer = Step(rpc, valid_request(rpc, self.limits, rng, foreign).SerializeToString(),
                                 "race: a tamper", "mutant")
                elif how == "release" and any(r.releases_session for r in rpcs):
                    release = next(r for r in rpcs if r.releases_session)
                    racer = step(release, valid_request(release, self.limits, rng, first), "race: a release", "mutant")
                else:
                    racer = mutant(rpc, valid_request(rpc, self.limits, rng, then))
                    racer.label = "race: " + racer.label
                racer.concurrent = True
                steps.append(racer)
            else:  # release the live session (twice: idempotent), then continue: a lost session, never a wrong token
                release = next(r for r in rpcs if r.releases_session)
                for _ in range(2):
                    steps.append(step(release, valid_request(release, self.limits, rng, first),
                                      "release the live session", "setup"))
            steps += self._continuation(rpc, then, rng)
            return kind, steps
        if kind == "interrupt":  # a longer valid call, cut short
            request = valid_request(rpc, self.limits, rng)
            if "max_new_tokens" in rpc.request_class.DESCRIPTOR.fields_by_name:
                request.max_new_tokens = rng.randint(16, 64)
            steps.append(self._interrupted(step(rpc, request, "", "mutant"), rng))
        else:
            steps.append(mutant(rpc, valid_request(rpc, self.limits, rng)))
        if rpc.server_streaming and self.canary is not None and (index % 5 == 0 or kind == "interrupt"):
            steps.append(Step(self.canary[0].rpc, self.canary[0].payload, "canary generation", "control"))
        return kind, steps

    @staticmethod
    def _interrupted(step: Step, rng: random.Random) -> Step:
        after = rng.choice([0.0, 0.0005, 0.002, 0.01, 0.03])
        if rng.random() < 0.5:
            step.timeout_s, step.label = max(after, 0.0001), f"interrupt: a {after * 1000:g} ms deadline"
        else:
            step.cancel_after_s, step.label = after, f"interrupt: cancelled {after * 1000:g} ms after sending"
        return step

    def _continuation(self, rpc: Rpc, then: SessionCall, rng: random.Random) -> list[Step]:
        """The valid continuation, and the same two calls on an untouched session to compare it with."""
        control_first = SessionCall(then.session_id + "-control", [], then.committed, then.gamma,
                                    [rng.randrange(self.limits.vocab_size) for _ in range(then.gamma)], then.sampled,
                                    then.seed - 1)
        control_then = SessionCall(then.session_id + "-control", then.committed, then.append, then.gamma, then.drafts,
                                   then.sampled, then.seed)
        return [Step(rpc, valid_request(rpc, self.limits, rng, call).SerializeToString(), label, role)
                for call, label, role in ((then, "valid continuation", "check"), (control_first, "control: open", "control"),
                                          (control_then, "control: continue", "control"))]

    # -- running --
    def run_case(self, role: str, index: int) -> tuple[str, list[tuple[Step, Outcome]], list[Failure], Counter]:
        """Run case `index` of `role`'s service: its steps, what failed, and how continuations compared."""
        kind, steps = self.build_case(role, index)
        done: list[tuple[Step, Outcome]] = []
        failures: list[Failure] = []
        continuations: Counter = Counter()
        mutant_label = next((s.label for s in steps if s.role == "mutant"), kind)
        racing: list[tuple[Step, threading.Thread, list]] = []
        for step in steps:
            if step.role == "control" and any(s.role == "check" and o.code != grpc.StatusCode.OK for s, o in done):
                continuations["session-lost"] += 1
                break  # the continuation was refused (session lost): nothing to compare
            if step.concurrent:  # started with the next step
                box: list = []
                racing.append((step, threading.Thread(target=lambda st=step, b=box: b.append(self.call(role, st)),
                                                      daemon=True), box))
                continue
            for _, thread, _ in racing:
                thread.start()
            done.append((step, self.call(role, step)))
            for racer, thread, box in racing:
                thread.join()
                done.append((racer, box[0]))
            for judged, outcome in done[len(done) - 1 - len(racing):]:
                label = judged.label if judged.role == "mutant" else mutant_label
                found = self.judge(judged, outcome, done, continuations) + self.slow_refusal(role, judged, outcome)
                for kind_, details in found:
                    failures.append(Failure(kind_, role, judged.rpc.name, outcome.code.name, details, label,
                                            f"{role}:{index}", [step_record(s, o) for s, o in done]))
            racing = []
        return kind, done, failures, continuations

    def slow_refusal(self, role: str, step: Step, outcome: Outcome) -> list[tuple[str, str]]:
        """A refusal that took long: a limit checked after work proportional to the input (DESIGN.md
        principle 10). Timed again twice before it counts, so a busy machine's pause is not one."""
        allowed = self.options.slow_refusal_s + len(step.payload) / 20e6  # the bytes themselves, at 20 MB/s
        if outcome.code in UNEXPLAINED_OK or outcome.seconds <= allowed or step.concurrent:
            return []
        again = min(self.call(role, step).seconds for _ in range(2))
        if again <= allowed:
            return []
        return [("slow-refusal", f"refused ({outcome.code.name}) after {again:.2f} s at best of 3 tries, more than "
                                 f"{allowed:.2f} s: a limit checked after work proportional to the input")]

    def judge(self, step: Step, outcome: Outcome, done: list[tuple[Step, Outcome]],
              continuations: Counter) -> list[tuple[str, str]]:
        """What is wrong with one step's outcome, as (failure kind, details); `done` holds the case so far."""
        found = []
        if outcome.code in FORBIDDEN:
            found.append(("status", outcome.details))
        elif outcome.code not in UNEXPLAINED_OK and not outcome.details.strip():
            found.append(("status", "refused without a message (a status message over the peer's header limit "
                                    "is dropped)"))
        elif outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and step.timeout_s is None:
            found.append(("hang", f"no answer within {outcome.deadline_s:.1f} s (request asks for "
                                  f"{requested_tokens(step.rpc, step.payload, self.limits)} tokens of work)"))
        elif step.label == "control: continue" and outcome.code == grpc.StatusCode.FAILED_PRECONDITION:
            continuations["control session lost"] += 1  # evicted between its two calls: allowed, inconclusive
        elif (step.role in ("setup", "control") and outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
              and self.options.load_refusals_ok):
            continuations["valid call refused for load"] += 1
        elif step.role in ("setup", "control") and outcome.code != grpc.StatusCode.OK:
            found.append(("refused", f"a valid request ({step.label}) was refused: {outcome.details}"))
        elif step.role == "check" and outcome.code not in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION):
            found.append(("refused", f"the valid continuation was refused: {outcome.details}"))
        if outcome.code != grpc.StatusCode.OK:
            return found
        bad = out_of_vocab(step.rpc, outcome.replies, self.limits.vocab_size)
        if bad:
            found.append(("integrity", f"reply holds token ids outside [0, {self.limits.vocab_size}): {bad[:5]}"))
        if step.label == "canary generation" and essence(step.rpc, outcome.replies) != self.canary[1]:
            found.append(("integrity", f"the canary generation answered {essence(step.rpc, outcome.replies)} after "
                                       f"the mutated request, {self.canary[1]} before the fuzzing"))
        if step.label == "control: continue":
            continuation = next(o for s, o in done if s.role == "check")
            same = essence(step.rpc, continuation.replies) == essence(step.rpc, outcome.replies)
            continuations["equal" if same else "differ"] += 1
            if not same:
                found.append(("integrity", f"the valid continuation after the mutated call answered "
                                           f"{essence(step.rpc, continuation.replies)}, on an untouched session "
                                           f"{essence(step.rpc, outcome.replies)}"))
        return found

    def check_alive(self, role: str, case: str, recent: Iterable[list[dict]], marks: dict[str, int] | None = None) -> bool:
        for name, endpoint in self.endpoints.items():
            problem = endpoint.problem()
            if problem:
                with self._lock:
                    self.failures.append(Failure("crash", role, "-", "-", problem, "one of the last cases", case,
                                                 [r for records in recent for r in records],
                                                 endpoint.log_since((marks or {}).get(name, 0))))
                return False
        return True

    def logs_since(self, marks: dict[str, int]) -> str:
        parts = []
        for name, endpoint in self.endpoints.items():
            text = endpoint.log_since(marks[name]).strip()
            if text:
                parts.append(f"[{name}] {text}")
        return "\n".join(parts)

    def fuzz_service(self, role: str) -> ServiceReport:
        """Cases 0, 1, 2, ... of one service on `options.workers` threads (so mutated calls share the
        services' batched passes with valid ones), until the request or time budget is spent."""
        endpoint = self.endpoints[role]
        report = self.reports.setdefault(role, ServiceReport(role, endpoint.service))
        started = time.monotonic()
        recent: deque = deque(maxlen=5)
        indices: Iterator[int] = iter(range(sys.maxsize))
        if self.options.only_case:
            only_role, only_index = self.options.only_case.split(":")
            indices = iter([int(only_index)] if only_role == role else [])
        crash_marks = {name: e.log_mark() for name, e in self.endpoints.items()}
        stop = threading.Event()

        def work() -> None:
            nonlocal crash_marks
            while not stop.is_set():
                with self._lock:
                    if report.requests >= self.options.requests or time.monotonic() - started >= self.options.seconds:
                        return
                    index = next(indices, None)
                    if index is None:
                        return
                    report.requests += 1  # reserved; set right once the case has run
                marks = {name: e.log_mark() for name, e in self.endpoints.items()}
                if index % 50 == 0:
                    crash_marks = marks  # a crash's last words are in the logs since a few cases back
                kind, done, failures, continuations = self.run_case(role, index)
                records = [step_record(s, o) for s, o in done]
                if self.options.only_case:  # a replay: every step, as sent and as answered
                    print(f"case {role}:{index} ({kind})")
                    for record in records:
                        print(f"  {record['role']:<7} {record['rpc']} [{record['label']}] -> {record['code']} "
                              f"{record['details']} ({record['seconds']} s)\n    text: {record['text']}\n"
                              f"    hex ({record['bytes']} bytes): {record['hex']}")
                logged = self.logs_since(marks) if failures else ""
                with self._lock:
                    report.requests += len(done) - 1
                    report.cases += 1
                    report.mutations[kind] += 1
                    report.continuations.update(continuations)
                    for step, outcome in done:
                        report.statuses[outcome.code.name] += 1
                        report.per_rpc[step.rpc.name] += 1
                        if report.slowest is None or outcome.seconds > report.slowest["seconds"]:
                            report.slowest = {"seconds": round(outcome.seconds, 4), "rpc": step.rpc.name,
                                              "label": step.label, "case": f"{role}:{index}",
                                              "deadline_s": round(outcome.deadline_s, 2)}
                    for failure in failures:
                        failure.log_tail = logged
                    self.failures += failures
                    recent.append(records)
                    hangs = sum(f.kind == "hang" and f.role == role for f in self.failures)
                if hangs >= self.options.max_hangs:
                    report.stopped = f"{hangs} calls hit their deadline"
                    stop.set()
                suspicious = any(o.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                            grpc.StatusCode.CANCELLED) for _, o in done)
                if (suspicious or index % self.options.check_every == 0) and \
                        not self.check_alive(role, f"{role}:{index}", list(recent), crash_marks):
                    report.stopped = "a service stopped serving"
                    stop.set()

        threads = [threading.Thread(target=work, name=f"fuzz-{role}-{n}", daemon=True)
                   for n in range(max(1, self.options.workers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report.seconds = time.monotonic() - started
        return report


def requested_tokens(rpc: Rpc, payload: bytes, limits: Limits) -> int:
    """Tokens of work a request asks for: repeated ids to feed and counts to generate, each at most the
    context (a service must refuse more before working on it)."""
    try:
        message = rpc.request_class.FromString(payload)
    except DecodeError:
        return 0
    c = limits.max_context

    def walk(msg: Message) -> int:
        work = 0
        for fd, value in msg.ListFields():
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                work += sum(walk(m) for m in value) if fd.is_repeated else walk(value)
            elif fd.is_repeated and fd.type in _INT_TYPES:
                work += min(len(value), c)
            elif fd.name in ("max_new_tokens", "num_draft_tokens") and isinstance(value, int):
                work += min(max(value, 0), c)
        return work

    return min(walk(message), 3 * c)


def _top_level_ints(message: Message) -> dict:
    out = {}
    for fd, value in message.ListFields():
        if fd.type in _INT_TYPES or fd.type in (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_BOOL):
            out[fd.name] = list(value) if fd.is_repeated else value
    return out


def essence(rpc: Rpc, replies: Sequence[bytes]) -> list[dict]:
    """What a reply decides, for comparing two replies: its top-level integers (token ids, lengths, finish
    reason), not timings or probabilities (those may differ in the last bits when batched differently)."""
    return [_top_level_ints(rpc.response_class.FromString(r)) for r in replies]


def out_of_vocab(rpc: Rpc, replies: Sequence[bytes], vocab: int) -> list[int]:
    bad = []
    for reply in replies:
        try:
            message = rpc.response_class.FromString(reply)
        except DecodeError:
            return [-1]
        for fd, value in message.ListFields():
            if fd.name.endswith("token_ids") and fd.is_repeated and fd.type in _INT_TYPES:
                bad += [t for t in value if not 0 <= t < vocab]
    return bad


# -- the whole run ----------------------------------------------------------------------------------------
@dataclass
class Summary:
    seed: int
    limits: dict
    reports: list[dict]
    failures: list[Failure]
    rpcs: list[str]
    exactness: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def distinct(self) -> list[tuple[tuple, list[Failure]]]:
        groups: dict[tuple, list[Failure]] = {}
        for failure in self.failures:
            groups.setdefault(failure.signature, []).append(failure)
        return list(groups.items())

    def as_dict(self) -> dict:
        return {
            "seed": self.seed, "seconds": round(self.seconds, 2), "limits": self.limits, "rpcs": self.rpcs,
            "services": self.reports, "exactness": self.exactness, "failures": len(self.failures),
            "distinct_failures": [
                {"kind": sig[0], "rpc": sig[1], "code": sig[2], "details": group[0].details, "count": len(group),
                 "mutations": sorted({f.mutation for f in group})[:20], "cases": [f.case for f in group[:20]],
                 "example": {"case": group[0].case, "mutation": group[0].mutation, "steps": group[0].steps,
                             "log_tail": group[0].log_tail}}
                for sig, group in self.distinct]}


def check_greedy(address: str, prompts: Sequence[str], reference: Callable[[str, int], list[int]],
                 max_new_tokens: int = 24) -> tuple[dict, list[Failure]]:
    """Greedy generation through the orchestrator equals the target alone, prompt by prompt."""
    from specdec_client import Client, SpecDecError

    failures, checked = [], 0
    with Client(address, timeout=120) as client:
        for prompt in prompts:
            expected = reference(prompt, max_new_tokens)
            try:
                got = client.generate(prompt, max_new_tokens=max_new_tokens).token_ids
            except SpecDecError as error:
                got = f"{type(error).__name__}: {error}"
            checked += 1
            if got != expected:
                failures.append(Failure("exactness", "orchestrator", "Orchestrator.Generate", "-",
                                        f"prompt {prompt!r}: served {got}, target alone {expected}",
                                        "after fuzzing", "-", []))
    return {"prompts": checked, "equal": checked - len(failures)}, failures


def fuzz(endpoints: dict[str, Endpoint], options: Options, roles: Sequence[str] = ("verify", "draft", "orchestrator"),
         reference: Callable[[str, int], list[int]] | None = None, prompts: Sequence[str] = PROMPTS,
         progress: Callable[[str], None] = lambda line: None) -> Summary:
    """Fuzz each role's service in turn, then (with `reference`) check greedy exactness."""
    started = time.monotonic()
    fuzzer = Fuzzer(endpoints, options)
    try:
        fuzzer.calibrate()
        for role in roles:
            progress(f"fuzzing {role} ({endpoints[role].service}) ...")
            report = fuzzer.fuzz_service(role)
            progress(f"  {report.requests} requests in {report.seconds:.1f} s, {len(fuzzer.failures)} failures so far")
            if any(f.kind == "crash" for f in fuzzer.failures):
                break
        if not any(f.kind == "crash" for f in fuzzer.failures):  # the end state, whatever the last case was
            fuzzer.check_alive(roles[-1], "end", [])
        exactness = {}
        if reference is not None and not any(f.kind == "crash" for f in fuzzer.failures):
            exactness, failures = check_greedy(endpoints["orchestrator"].address, prompts, reference)
            fuzzer.failures += failures
    finally:
        fuzzer.close()
    rpcs = [rpc.path for role in roles for rpc in fuzzer.services[endpoints[role].service]]
    return Summary(options.seed, vars(fuzzer.limits), [r.as_dict() for r in fuzzer.reports.values() if r.cases],
                   fuzzer.failures, rpcs, exactness, time.monotonic() - started)


def format_report(summary: Summary, hex_chars: int = 400) -> str:
    lines = [f"fuzz: seed {summary.seed}, {summary.seconds:.1f} s, limits {summary.limits}"]
    for r in summary.reports:
        slow = r["slowest"] or {}
        lines.append(f"  {r['role']:<12} {r['requests']:>6} requests in {r['cases']} cases, {r['seconds']:.1f} s; "
                     f"statuses {dict(sorted(r['statuses'].items()))}")
        lines.append(f"  {'':<12} per RPC {r['per_rpc']}; case kinds {r['case_kinds']}")
        if r["continuations"]:
            lines.append(f"  {'':<12} valid continuations after a mutated call or a release: {r['continuations']}")
        if slow:
            lines.append(f"  {'':<12} slowest {slow['seconds']:.3f} s (deadline {slow['deadline_s']} s): "
                         f"{slow['rpc']} {slow['label']} [{slow['case']}]")
        if r["stopped"]:
            lines.append(f"  {'':<12} STOPPED: {r['stopped']}")
    if summary.exactness:
        lines.append(f"  greedy exactness after fuzzing: {summary.exactness}")
    distinct = summary.distinct
    lines.append(f"{len(summary.failures)} failures, {len(distinct)} distinct" if summary.failures else "no failures")
    for n, ((kind, rpc, code, _), group) in enumerate(distinct, 1):
        first = group[0]
        lines.append(f"\n[{n}] {kind} {rpc} {code} x{len(group)}: {first.details[:300]}")
        mutations = sorted({f.mutation for f in group})
        lines.append(f"    mutations ({len(mutations)}): " + " | ".join(m[:80] for m in mutations[:6])
                     + (" | …" if len(mutations) > 6 else ""))
        lines.append(f"    replay: python -m benchmarking.fuzz --seed {summary.seed} --case {first.case}")
        for s in first.steps:
            hx = s["hex"][:hex_chars] + ("…" if len(s["hex"]) > hex_chars or s.get("hex_truncated") else "")
            lines.append(f"    {s['role']:<7} {s['rpc']} [{s['label'][:80]}] -> {s.get('code')} "
                         f"{s.get('details', '')[:120]}")
            lines.append(f"            text: {s['text'][:300]}")
            lines.append(f"            hex ({s['bytes']} bytes): {hx}")
        if first.log_tail:
            lines.append("    service log tail:\n      " + first.log_tail.replace("\n", "\n      "))
    return "\n".join(lines)


# -- the CLI: services as processes ------------------------------------------------------------------------
def build_tiny_models(root: Path) -> tuple[Path, Path]:
    """The test suite's tiny target and draft (tests/conftest.py), built on the spot."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import build_llama, build_tokenizer

    tokenizer = build_tokenizer(root / "tokenizer")
    target = build_llama(root / "target", tokenizer, hidden=64, layers=2, seed=1, sharpen=6.0)
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():  # as conftest: EOS (token 0) is never the target's argmax
        model.lm_head.weight[0].zero_()
        model.lm_head.weight[0] -= 5.0 * model.lm_head.weight[1:].mean(0)
    model.save_pretrained(target)
    draft = build_llama(root / "draft", tokenizer, hidden=32, layers=1, seed=2, sharpen=6.0)
    return target, draft


def hf_reference(target: Path) -> Callable[[str, int], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)

    def reference(prompt: str, max_new_tokens: int) -> list[int]:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return reference


TIGHT_ARGS = ("--max-sessions", "6", "--session-memory-mb", "2", "--max-queue", "8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarking.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="ten thousand requests per service (at most 20 min each)")
    parser.add_argument("--requests", type=int, help="requests per service (default 300; 10000 with --long)")
    parser.add_argument("--seconds", type=float, help="time per service (default 60; 1200 with --long)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", choices=["tiny", "reference"], default="tiny",
                        help="tiny: the test suite's tiny models, built now; reference: the shipped pair in models/")
    parser.add_argument("--roles", default="verify,draft,orchestrator", help="services to fuzz, in order")
    parser.add_argument("--case", help="replay one case, ROLE:INDEX (from a report), and print every step")
    parser.add_argument("--deadline", type=float, default=10.0, help="base deadline of a call, seconds")
    parser.add_argument("--slow-refusal", type=float, default=0.5, help="seconds a refusal may take (best of 3)")
    parser.add_argument("--workers", type=int, default=2, help="cases in flight at once (1: strictly one by one)")
    parser.add_argument("--tight", action="store_true",
                        help="draft and verify with tiny session and queue budgets, so eviction and refusals under load "
                             f"are fuzzed too ({' '.join(TIGHT_ARGS)})")
    for role in ("draft", "verify", "orchestrator"):
        parser.add_argument(f"--{role}-args", default="", help=f"extra `specdec serve {role}` flags, one string")
    parser.add_argument("--no-exactness", action="store_true", help="skip the greedy check after fuzzing")
    parser.add_argument("--out", type=Path, help="write the JSON summary here")
    parser.add_argument("--log-dir", type=Path, help="service logs (default: a temporary directory)")
    args = parser.parse_args(argv)

    from local_stack.paths import DEFAULT_DRAFT, DEFAULT_TARGET
    from local_stack.processes import local_stack

    options = Options(requests=args.requests or (10000 if args.long else 300),
                      seconds=args.seconds or (1200.0 if args.long else 60.0), seed=args.seed,
                      base_deadline_s=args.deadline, only_case=args.case, workers=1 if args.case else args.workers,
                      load_refusals_ok=args.tight, slow_refusal_s=args.slow_refusal)
    with tempfile.TemporaryDirectory(prefix="specdec-fuzz-") as scratch:
        scratch = Path(scratch)
        if args.models == "tiny":
            print("building tiny models ...", file=sys.stderr)
            target, draft = build_tiny_models(scratch / "models")
        else:
            target, draft = DEFAULT_TARGET, DEFAULT_DRAFT
        log_dir = args.log_dir or scratch / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        reference = None if args.no_exactness or args.case else hf_reference(target)
        print(f"starting draft, verify and orchestrator processes (logs in {log_dir}) ...", file=sys.stderr)
        tight = TIGHT_ARGS if args.tight else ()
        with local_stack(str(target), str(draft), log_dir=log_dir, verify_args=(*tight, *shlex.split(args.verify_args)),
                         draft_args=(*tight, *shlex.split(args.draft_args)),
                         orchestrator_args=tuple(shlex.split(args.orchestrator_args))) as stack:
            names = _service_names()
            processes = dict(zip(("draft", "verify", "orchestrator"), stack.processes))
            addresses = {"draft": stack.draft, "verify": stack.verify, "orchestrator": stack.orchestrator}
            endpoints = {role: Endpoint(role, addresses[role], names[role], processes[role], log_dir / f"{role}.log")
                         for role in addresses}
            summary = fuzz(endpoints, options, [r for r in args.roles.split(",") if r], reference,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary.as_dict(), indent=1, default=str))
        print(f"summary written to {args.out}", file=sys.stderr)
    return 1 if summary.failures else 0


def _service_names() -> dict[str, str]:
    from draft_service.server import SERVICE_NAME as DRAFT
    from orchestrator.server import SERVICE_NAME as ORCHESTRATOR
    from verify_service.server import SERVICE_NAME as VERIFY

    return {"draft": DRAFT, "verify": VERIFY, "orchestrator": ORCHESTRATOR}


if __name__ == "__main__":
    sys.exit(main())
