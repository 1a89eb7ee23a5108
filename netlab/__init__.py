"""Network laboratory for latency studies: an asyncio relay that delays every chunk, and the ip-netns / veth
plumbing that puts services on their own network stacks.

Knows sockets, namespaces and time; nothing of gRPC or models.
"""
