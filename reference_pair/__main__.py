"""`python -m reference_pair`: the same as `specdec train-pair`."""

from reference_pair.cli import main

main()
