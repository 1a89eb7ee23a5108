"""Every RPC's full method path ("/package.Service/Method"), derived from the generated descriptors, so a
renamed package, service or method changes them everywhere at once (spans, trace reports, limits, tests)."""

from __future__ import annotations

from specdec_api import draft_pb2, orchestrator_pb2, verify_pb2


def method_path(file_descriptor, service: str, method: str) -> str:
    """The path gRPC calls `method` of `service` by; KeyError if the descriptor has no such method."""
    descriptor = file_descriptor.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}"


PROPOSE = method_path(draft_pb2.DESCRIPTOR, "DraftService", "Propose")
VERIFY = method_path(verify_pb2.DESCRIPTOR, "VerifyService", "Verify")
GENERATE = method_path(orchestrator_pb2.DESCRIPTOR, "Orchestrator", "Generate")
DRAFT_SERVICE = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name
VERIFY_SERVICE = verify_pb2.DESCRIPTOR.services_by_name["VerifyService"].full_name
ORCHESTRATOR_SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
