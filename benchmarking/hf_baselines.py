"""The baselines a user would pick instead of us, run in one process (pinned by the caller):

  target_only   model.generate with the KV cache (greedy or sampled)
  hf_assisted   model.generate(assistant_model=draft): HF's in-process assisted generation

    python -m benchmarking.hf_baselines --system target_only --target T --draft D --prompts P ...

Prints one JSON object: per prompt the generated ids, wall seconds and per-token times.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """Times each generated token: a put() of k tokens after dt seconds gives each of them dt / k."""

    def __init__(self):
        self.last = None
        self.per_token_s: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        now = time.perf_counter()
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            self.last = now
            return
        count = int(value.numel())
        self.per_token_s.extend([(now - self.last) / count] * count)
        self.last = now

    def end(self):
        pass


class Baseline:
    """One loaded system; `generate` runs one prompt and times it."""

    def __init__(self, system: str, target_dir: str, draft_dir: str, threads: int):
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(target_dir)
        self.target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        self.assistant = None
        if system == "hf_assisted":
            self.assistant = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()

    def generate(self, prompt: str, max_new_tokens: int, sample: bool, seed: int) -> dict:
        kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.eos_token_id}
        if sample:
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        inputs = self.tokenizer(prompt, return_tensors="pt")
        clock = TokenClock()
        torch.manual_seed(seed)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.target.generate(**inputs, streamer=clock, **kwargs)
        wall = time.perf_counter() - started
        return {"token_ids": out[0, inputs["input_ids"].shape[1]:].tolist(), "wall_s": wall,
                "per_token_s": clock.per_token_s}


def run(system: str, target_dir: str, draft_dir: str, prompts: list[str], max_new_tokens: int, sample: bool,
        seed: int, threads: int) -> dict:
    baseline = Baseline(system, target_dir, draft_dir, threads)
    baseline.generate(prompts[0], 8, sample, seed)  # warm-up
    return {"system": system, "rows": [baseline.generate(p, max_new_tokens, sample, seed + i)
                                       for i, p in enumerate(prompts)]}


def serve_lines(system: str, target_dir: str, draft_dir: str, threads: int) -> None:
    """Worker mode: one JSON request per stdin line ({"prompt", "max_new_tokens", "sample", "seed"}),
    one JSON row per stdout line. Lets a benchmark interleave systems prompt by prompt."""
    import sys

    baseline = Baseline(system, target_dir, draft_dir, threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(baseline.generate(request["prompt"], request["max_new_tokens"], request["sample"],
                                           request["seed"])), flush=True)


def run_batched(target_dir: str, prompts: list[str], max_new_tokens: int, threads: int,
                batch_size: int | None = None) -> dict:
    """Target-only decoding of `prompts`, `batch_size` at a time (each batch one `generate` call, left
    padding: static batching, what HF offers), greedy; tokens, wall time and per-step times over all."""
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    tokenizer.padding_side = "left"
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    eos = target.generation_config.eos_token_id
    batch_size = batch_size or len(prompts)
    tokens, wall, clock = 0, 0.0, TokenClock()
    with torch.inference_mode():
        target.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        for first in range(0, len(prompts), batch_size):
            inputs = tokenizer(prompts[first:first + batch_size], return_tensors="pt", padding=True)
            clock.prompt_seen = False
            started = time.perf_counter()
            out = target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                  streamer=_BatchClock(clock), pad_token_id=tokenizer.pad_token_id)
            wall += time.perf_counter() - started
            for row in out[:, inputs["input_ids"].shape[1]:].tolist():  # each stream's tokens up to its EOS
                tokens += next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
    return {"tokens": tokens, "wall_s": wall, "step_s": clock.per_token_s}


class _BatchClock(BaseStreamer):
    """generate() refuses batched streamers' prompts only in TextStreamer; time each batched step."""

    def __init__(self, clock: TokenClock):
        self.clock = clock

    def put(self, value):
        now = time.perf_counter()
        if not self.clock.prompt_seen:
            self.clock.prompt_seen, self.clock.last = True, now
            return
        self.clock.per_token_s.append(now - self.clock.last)  # every stream got one token in this step
        self.clock.last = now

    def end(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=["target_only", "hf_assisted", "target_batched"], required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", default="[]", help="JSON list of prompt strings")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="target_batched: prompts per generate call")
    parser.add_argument("--serve", action="store_true", help="worker mode: prompts on stdin, rows on stdout")
    args = parser.parse_args()
    if args.serve:
        serve_lines(args.system, args.target, args.draft, args.threads)
        return
    prompts = json.loads(args.prompts)
    if args.system == "target_batched":
        print(json.dumps(run_batched(args.target, prompts, args.max_new_tokens, args.threads, args.batch_size)))
        return
    print(json.dumps(run(args.system, args.target, args.draft, prompts, args.max_new_tokens, args.sample, args.seed,
                         args.threads)))


if __name__ == "__main__":
    main()
