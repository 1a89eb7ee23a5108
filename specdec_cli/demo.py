"""`specdec demo`: the three services as local processes, a few prompts, text and stats."""

from __future__ import annotations

from pathlib import Path

import typer

from local_stack.processes import local_stack
from local_stack.paths import load_prompts
from specdec_client import Client
from specdec_client.results import GenerationResult


def run_demo(target: str, draft: str, prompts_path: Path, count: int, max_new_tokens: int, gamma: int) -> None:
    for path in (target, draft):
        if not Path(path).exists() and Path(path).is_absolute():
            raise typer.BadParameter(f"model directory {path} does not exist (run `specdec train-pair`?)")
    prompts = load_prompts(prompts_path, count)
    typer.echo(f"starting draft ({draft}), verify ({target}) and orchestrator ...")
    with local_stack(target, draft) as stack, Client(stack.orchestrator) as client:
        typer.echo(f"orchestrator on {stack.orchestrator}\n")
        for i, prompt in enumerate(prompts, 1):
            typer.secho(f"--- prompt {i} " + "-" * 60, bold=True)
            typer.echo(prompt, nl=False)
            result = GenerationResult()
            for chunk in client.stream(prompt, max_new_tokens, num_draft_tokens=gamma):
                result.add(chunk)
                typer.secho(chunk.text, fg="green", nl=False)
            s = result.stats
            typer.echo("")
            typer.secho(
                f"[{result.finish_reason}] {s['new_tokens']} tokens in {s['wall_ms']:.0f} ms "
                f"({s['tokens_per_s']:.1f} tok/s) | gamma {gamma} | rounds {s['rounds']} | "
                f"acceptance {s['acceptance_rate']:.2f} | {s['mean_accepted_len']:.2f} tokens/round | "
                f"draft {s['draft_ms']:.0f} ms, verify {s['verify_ms']:.0f} ms, other {s['other_ms']:.0f} ms",
                fg="cyan")
