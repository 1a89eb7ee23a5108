"""The orchestrator: owns each generation (tokens, sampling, RNG, gamma, acceptance) and streams it."""
