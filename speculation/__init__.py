"""The speculative decoding algorithm as pure functions over tensors.

Knows nothing about gRPC, sessions, tokenizers or models: callers pass logits, probabilities, token
ids and a torch.Generator, and get tensors back.
"""
