"""The `specdec` console script: serve, generate, demo, train-pair, bench, trace-report, study."""
