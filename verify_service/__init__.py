"""The verify service: hosts the target and scores gamma draft tokens in one forward pass."""
