"""What all three services (orchestrator, draft, verify) share above transport/: the server scaffold
(health, reflection, graceful stop), errors and their one translation into gRPC status codes, who a
caller is and how many calls it may hold, and the session protocol the orchestrator and the model
services agree on beyond the .proto files (prefix fingerprints, the session-lost error kind).
"""
