"""Command-line entry for training the pair (also mounted as `specdec train-pair`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reference_pair.train import TrainSettings, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSettings()
    parser.add_argument("--out", type=Path, default=Path("models"), help="where target/ and draft/ are written")
    parser.add_argument("--work-dir", type=Path, default=Path(".train"), help="checkpoints; rerun to resume")
    for name in ("target_steps", "draft_steps", "batch_size", "seq_len", "seed", "threads", "vocab_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))


def run(args: argparse.Namespace) -> None:
    settings = TrainSettings(**{k: getattr(args, k) for k in (
        "target_steps", "draft_steps", "batch_size", "seq_len", "seed", "threads", "vocab_size")})
    Trainer(args.work_dir, args.out, settings).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="specdec train-pair", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
