"""What mTLS costs: a plaintext and an mTLS stack of the reference pair side by side (pinned as `specdec
bench` pins), greedy generations alternating between them prompt by prompt in rotating order, so that
the machine's drift weighs on both alike. Prints the pooled tokens/s of each, the per-prompt ratio's
median with a 95 % bootstrap interval, and whether the tokens were identical.

    python -m benchmarking.tls_overhead --passes 6 [--out FILE.json]

The mTLS stack requires client certificates on every hop (a throwaway CA, transport/throwaway_ca.py).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from local_stack.processes import local_stack
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts
from specdec_client import Client


def bootstrap_median(values: list[float], rng: random.Random, draws: int = 2000) -> tuple[float, float]:
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def run(passes: int, prompts: int, max_new_tokens: int, gamma: int) -> dict:
    texts = load_prompts(DEFAULT_PROMPTS, prompts)
    pinning = dict(draft_cpu=0, verify_cpu=1, orchestrator_cpu=0, threads=1)
    with tempfile.TemporaryDirectory() as certs, \
            local_stack(str(DEFAULT_TARGET), str(DEFAULT_DRAFT), **pinning) as plain, \
            local_stack(str(DEFAULT_TARGET), str(DEFAULT_DRAFT), tls_dir=Path(certs), **pinning) as tls, \
            Client(plain.orchestrator) as plain_client, Client(tls.orchestrator, **tls.client_tls) as tls_client:
        clients = {"plain": plain_client, "mtls": tls_client}
        for client in clients.values():  # warm both
            client.generate(texts[0], max_new_tokens=8)
        rows: dict[str, list[tuple[int, float, list[int]]]] = {"plain": [], "mtls": []}
        for p in range(passes):
            for i, prompt in enumerate(texts):
                for name in (("plain", "mtls") if (i + p) % 2 == 0 else ("mtls", "plain")):
                    started = time.perf_counter()
                    result = clients[name].generate(prompt, max_new_tokens=max_new_tokens, num_draft_tokens=gamma)
                    rows[name].append((len(result.token_ids), time.perf_counter() - started, result.token_ids))
    speed = {name: sum(n for n, _, _ in r) / sum(w for _, w, _ in r) for name, r in rows.items()}
    ratios = [(t[0] / t[1]) / (p[0] / p[1]) for p, t in zip(rows["plain"], rows["mtls"])]
    low, high = bootstrap_median(ratios, random.Random(0))
    return {
        "plain_tokens_per_s": round(speed["plain"], 2), "mtls_tokens_per_s": round(speed["mtls"], 2),
        "mtls_cost_pct_pooled": round(100 * (1 - speed["mtls"] / speed["plain"]), 2),
        "mtls_cost_pct_median_pair": round(100 * (1 - statistics.median(ratios)), 2),
        "mtls_cost_pct_95ci": [round(100 * (1 - high), 2), round(100 * (1 - low), 2)],
        "pairs": len(ratios), "same_tokens": all(p[2] == t[2] for p, t in zip(rows["plain"], rows["mtls"])),
        "ratios": [round(r, 4) for r in ratios],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=6, help="passes over the prompts (pairs = passes x prompts)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.passes, args.prompts, args.max_new_tokens, args.num_draft_tokens)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "ratios"}))


if __name__ == "__main__":
    main()
