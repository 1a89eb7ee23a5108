"""Layer-skip drafting against the target alone and the model drafter, side by side (issue 21).

    python -m benchmarking.layer_skip --skip-layers @skip.json --gammas 1,4

Greedy, the bench's held-out prompts (the first 8 of models/prompts.jsonl), 128 new tokens, pinned as
`specdec bench` pins (the target side on core 1, drafts and orchestrators on core 0, one torch thread
each), systems interleaved per prompt. Two "target alone" rows: HF `generate` (the bench's baseline) and
this stack's own verify service behind an orchestrator without a draft (the lean runtime), so a speedup
can be read against either. Prints one JSON report; every system's greedy tokens are compared with HF's.
"""

from __future__ import annotations

import argparse
import json
import os

import grpc

from benchmarking.bench import BaselineWorker, BenchSettings, _summary, specdec_generate, summarise_specdec
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts
from local_stack.processes import local_stack, spawn, stop_processes, wait_healthy
from specdec_api import common_pb2, draft_pb2_grpc
from specdec_client import Client
from transport import free_port


def run(skip_layers: str, gammas: list[int], prompts_n: int = 8, max_new_tokens: int = 128) -> dict:
    prompts = load_prompts(DEFAULT_PROMPTS, prompts_n)
    target, draft = str(DEFAULT_TARGET), str(DEFAULT_DRAFT)
    report: dict = {"load_before": os.getloadavg()}
    worker = BaselineWorker("target_only", BenchSettings(target=target, draft=draft, prompts=prompts))
    pinned = {"draft_cpu": 0, "verify_cpu": 1, "orchestrator_cpu": 0, "threads": 1}
    with local_stack(target, target, draft_args=("--drafter", "layer-skip", "--skip-layers", skip_layers),
                     **pinned) as skipping, local_stack(target, draft, **pinned) as modelled:
        port = free_port()
        alone = spawn(["serve", "orchestrator", "--port", str(port), "--verify", skipping.verify], 0)
        try:
            wait_healthy(f"127.0.0.1:{port}", 120, alone)
            clients = {"layer_skip": Client(skipping.orchestrator), "model": Client(modelled.orchestrator),
                       "stack_target_only": Client(f"127.0.0.1:{port}")}
            for client in clients.values():  # warm-up
                client.generate(prompts[0], max_new_tokens=8)
            worker.generate(prompts[0], 8, False, 0)
            systems = ["hf_target_only", "stack_target_only"] + [
                f"{d}_g{g}" for d in ("layer_skip", "model") for g in gammas]
            rows = {s: [] for s in systems}
            rounds = {s: [] for s in systems}
            stats = {s: [] for s in systems}
            for i, prompt in enumerate(prompts):
                for system in systems[i % len(systems):] + systems[:i % len(systems)]:  # rotate the order
                    if system == "hf_target_only":
                        rows[system].append(worker.generate(prompt, max_new_tokens, False, 0))
                        continue
                    name, extra = system, {}
                    if system != "stack_target_only":
                        name, gamma = system.rsplit("_g", 1)
                        extra = {"num_draft_tokens": int(gamma)}
                    row, round_rows, stat = specdec_generate(clients[name], prompt, max_new_tokens, extra)
                    rows[system].append(row)
                    rounds[system].extend(round_rows)
                    stats[system].append(stat)
            with grpc.insecure_channel(skipping.draft) as channel:
                report["layer_skip_drafter"] = draft_pb2_grpc.DraftServiceStub(channel).GetModelInfo(
                    common_pb2.GetModelInfoRequest(), timeout=10).drafter
        finally:
            stop_processes([alone])
            worker.close()
    report["load_after"] = os.getloadavg()
    base = _summary(rows["hf_target_only"])["tokens_per_s"]
    stack_base = _summary(rows["stack_target_only"])["tokens_per_s"]
    for system in systems:
        if system in ("hf_target_only", "stack_target_only"):
            summary = _summary(rows[system])
        else:
            summary = summarise_specdec(rows[system], rounds[system], stats[system], int(system.rsplit("_g", 1)[1]))
            summary.pop("token_ids", None)
        summary["vs_hf_target_only"] = round(summary["tokens_per_s"] / base, 3)
        summary["vs_stack_target_only"] = round(summary["tokens_per_s"] / stack_base, 3)
        summary["greedy_identical_to_hf"] = ([r["token_ids"] for r in rows[system]]
                                             == [r["token_ids"] for r in rows["hf_target_only"]])
        report[system] = summary
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-layers", default="auto", help="as `serve draft --skip-layers`: 1,2 | auto | @FILE")
    parser.add_argument("--gammas", default="1,4")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    report = run(args.skip_layers, [int(g) for g in args.gammas.split(",")], args.prompts, args.max_new_tokens)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
