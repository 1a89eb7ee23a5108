"""Tries orchestrator settings (gamma, draft confidence, overlap) on the pinned protocol, specdec only.

    python -m benchmarking.sweep --count 8 --max-new-tokens 128 "--num-draft-tokens 4" "--num-draft-tokens 6" ...

Each argument is one configuration: extra `serve orchestrator` flags, optionally followed by `||` and
extra `serve verify` flags (e.g. "--num-draft-tokens 4 || --runtime lean"). Prints one JSON line per
configuration with tokens/s, alpha, mean accepted length and the round split.
"""

from __future__ import annotations

import argparse
import json
import shlex

from benchmarking.bench import BenchSettings, specdec_generate, summarise_specdec
from local_stack.processes import local_stack
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts
from specdec_client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    prompts = load_prompts(DEFAULT_PROMPTS, args.count)
    for config in args.configs:
        orchestrator_part, _, verify_part = config.partition("||")
        flags = tuple(shlex.split(orchestrator_part))
        gamma = int(flags[flags.index("--num-draft-tokens") + 1]) if "--num-draft-tokens" in flags else 4
        settings = BenchSettings(str(DEFAULT_TARGET), str(DEFAULT_DRAFT), prompts, args.max_new_tokens, gamma)
        with local_stack(settings.target, settings.draft, draft_cpu=0, verify_cpu=1, orchestrator_cpu=0, threads=1,
                         orchestrator_args=flags, verify_args=tuple(shlex.split(verify_part))) as stack, Client(stack.orchestrator) as client:
            client.generate(prompts[0], max_new_tokens=8)  # warm-up
            runs = [specdec_generate(client, p, args.max_new_tokens, {"num_draft_tokens": gamma}) for p in prompts]
        result = summarise_specdec([r[0] for r in runs], [x for r in runs for x in r[1]], [r[2] for r in runs], gamma)
        result.pop("token_ids")
        print(json.dumps({"config": config, **result}), flush=True)


if __name__ == "__main__":
    main()
