"""The draft service: a drafter (draft_service/drafters/: a small causal LM, prompt lookup, or a chain of them)
that proposes gamma tokens per call for a session."""
