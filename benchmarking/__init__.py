"""`specdec bench`: ours against target-only decoding and HF assisted generation, in one run."""
