"""The draft service: a cheap causal LM that proposes gamma tokens per call for a session."""
