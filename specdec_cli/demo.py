"""`specdec demo`: the three services as local processes, a few prompts, text and stats.

Each prompt runs twice through the same orchestrator: first the target alone (num_draft_tokens=0: one target
forward per token, the same verify service and gRPC path), then with speculation, streamed. The demo prints the
prompt dimmed, a marker where the generated text starts, and the speculative run's tokens/s beside the target
alone's, so the speedup is measured in the same run on the same machine. Colours only on a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from local_stack.paths import load_prompts
from local_stack.processes import local_stack
from specdec_client import Client
from specdec_client.results import GenerationResult

BASELINE = ("target alone: the same verify service and orchestrator with num_draft_tokens=0, one target forward per "
            "token, run just before each prompt; tokens/s of one generation at a time")


def symbols(encoding: str | None = None) -> tuple[str, str]:
    """The generation-start marker and the times sign, in ASCII where the output cannot encode them."""
    encoding = encoding or getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "▌×".encode(encoding)
        return "▌", "×"
    except (UnicodeEncodeError, LookupError):
        return ">>", "x"


def speedup_line(stats: dict, baseline: dict, same_tokens: bool, times: str = "×") -> str:
    """'64 tokens in 540 ms: 118.5 tok/s, 1.94× the target alone (61.2 tok/s); same tokens as the target alone'."""
    tps, base_tps = stats["tokens_per_s"], baseline["tokens_per_s"]
    ratio = f"{tps / base_tps:.2f}{times}" if base_tps else "n/a"
    same = "same tokens as the target alone" if same_tokens else "NOT the target alone's tokens"
    return (f"{stats['new_tokens']} tokens in {stats['wall_ms']:.0f} ms: {tps:.1f} tok/s, {ratio} the target alone "
            f"({base_tps:.1f} tok/s); {same}")


def rounds_line(stats: dict, gamma: int, finish_reason: str | None) -> str:
    return (f"[{finish_reason}] gamma {gamma} | rounds {stats['rounds']} | acceptance {stats['acceptance_rate']:.2f} | "
            f"{stats['mean_accepted_len']:.2f} tokens/round | draft {stats['draft_ms']:.0f} ms, verify "
            f"{stats['verify_ms']:.0f} ms, other {stats['other_ms']:.0f} ms")


def footer(results: list[tuple[dict, dict]], times: str = "×") -> str:
    """Over all prompts: tokens over wall time, speculative and target alone."""
    def rate(which):
        tokens = sum(r[which]["new_tokens"] for r in results)
        wall = sum(r[which]["wall_ms"] for r in results) / 1000
        return tokens / wall if wall else 0.0

    ours, alone = rate(0), rate(1)
    ratio = f"{ours / alone:.2f}{times}" if alone else "n/a"
    return (f"{len(results)} prompts: {ours:.1f} tok/s with speculation, {alone:.1f} tok/s for the target alone: "
            f"{ratio}\n({BASELINE})")


def run_demo(target: str, draft: str, prompts_path: Path, count: int, max_new_tokens: int, gamma: int) -> None:
    for path in (target, draft):
        if not Path(path).exists() and Path(path).is_absolute():
            raise typer.BadParameter(f"model directory {path} does not exist (run `specdec train-pair`?)")
    prompts = load_prompts(prompts_path, count)
    marker, times = symbols()
    typer.echo(f"starting draft ({draft}), verify ({target}) and orchestrator ...")
    with local_stack(target, draft) as stack, Client(stack.orchestrator) as client:
        typer.echo(f"orchestrator on {stack.orchestrator}; warming up ...")
        client.generate(prompts[0], max_new_tokens=8, num_draft_tokens=0)
        client.generate(prompts[0], max_new_tokens=8, num_draft_tokens=gamma)
        typer.echo(f"each prompt is printed dimmed; generated text starts at {marker}\n")
        results = []
        for i, prompt in enumerate(prompts, 1):
            alone = client.generate(prompt, max_new_tokens=max_new_tokens, num_draft_tokens=0)
            typer.secho(f"--- prompt {i} of {len(prompts)} " + "-" * 50, bold=True)
            typer.echo(typer.style(prompt, dim=True) + typer.style(marker, fg="yellow", bold=True), nl=False)
            result = GenerationResult()
            for chunk in client.stream(prompt, max_new_tokens, num_draft_tokens=gamma):
                result.add(chunk)
                typer.secho(chunk.text, fg="green", nl=False)
            typer.echo("")
            typer.secho(speedup_line(result.stats, alone.stats, result.token_ids == alone.token_ids, times),
                        fg="cyan", bold=True)
            typer.secho(rounds_line(result.stats, gamma, result.finish_reason), fg="cyan")
            results.append((result.stats, alone.stats))
        typer.echo("-" * 64)
        typer.secho(footer(results, times), bold=True)
