"""Client SDK for the specdec orchestrator. Imports grpcio and protobuf only (no torch, no transformers).

    from specdec_client import Client
    with Client("localhost:50051") as client:
        result = client.generate("def fib(n):", max_new_tokens=64)
        for chunk in client.stream("import os", max_new_tokens=32):
            print(chunk.text, end="")
"""

from specdec_client.client import AsyncClient, Client
from specdec_client.errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, OutOfRange,
                                   PermissionDenied, ResourceExhausted, SpecDecError, Unauthenticated,
                                   Unavailable)
from specdec_client.results import Chunk, GenerationResult

__all__ = ["AsyncClient", "Client", "Chunk", "GenerationResult", "SpecDecError", "InvalidArgument",
           "OutOfRange", "FailedPrecondition", "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Cancelled",
           "Unauthenticated", "PermissionDenied"]
