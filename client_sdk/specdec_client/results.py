"""What the SDK returns: plain dataclasses, so callers never touch protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.json_format import MessageToDict

from specdec_api import orchestrator_pb2

FINISH_REASONS = {
    orchestrator_pb2.FINISH_REASON_LENGTH: "length",
    orchestrator_pb2.FINISH_REASON_EOS: "eos",
    orchestrator_pb2.FINISH_REASON_STOP_STRING: "stop",
}


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length" | "eos" | "stop" on the last chunk
    stats: dict | None = None  # on the last chunk
    round: dict | None = None  # the measured split of the round that produced this chunk

    @classmethod
    def from_message(cls, message: orchestrator_pb2.GenerateChunk) -> Chunk:
        stats = None
        if message.HasField("stats"):
            stats = MessageToDict(message.stats, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
        round_timing = None
        if message.HasField("round"):
            round_timing = MessageToDict(message.round, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
        return cls(list(message.token_ids), message.text, FINISH_REASONS.get(message.finish_reason), stats,
                   round_timing)


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: dict = field(default_factory=dict)

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.stats is not None:
            self.stats = chunk.stats
