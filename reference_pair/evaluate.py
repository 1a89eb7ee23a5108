"""Measures a draft/target pair the way the model card reports it: cost ratio c, acceptance alpha, and
Leviathan's predicted speedup.

  c      draft per-token decode time / target per-token decode time: KV cache on, the same context
         length, one torch thread, each model in the runtime its service uses (target: the HF forward,
         draft: the lean Llama forward when supported), plus both in the HF runtime for comparison.
  alpha  greedy: how often the draft's argmax equals the target's along the target's own greedy path
         (teacher forcing: one draft forward over the target's continuation).
         temperature 1: the exact per-token acceptance probability sum_x min(p(x), q(x)), averaged
         over the same positions.
  bound  max over gamma of (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)).

Runs in one process; pin it to one core for the protocol (`taskset -c 1 ...`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.runtimes import make_runtime
from serving.runtimes.hf import ModelRunner
from speculation.gamma_policy import best_gamma, expected_speedup

REPO_ROOT = Path(__file__).resolve().parent.parent


def decode_ms_per_token(runner, prompt_ids: list[int], context: int, steps: int = 48, repeats: int = 3) -> float:
    """Median over repeats of the mean time of one single-token step at ~`context` tokens of context."""
    ids = (prompt_ids * (context // max(1, len(prompt_ids)) + 1))[:context]
    timings = []
    for _ in range(repeats):
        cache = runner.new_cache()
        logits = runner.extend(cache, ids, keep=1)
        token = int(logits[-1].argmax())
        for _ in range(4):  # warm up allocations
            token = int(runner.extend(cache, [token], keep=1)[-1].argmax())
        started = time.perf_counter()
        for _ in range(steps):
            token = int(runner.extend(cache, [token], keep=1)[-1].argmax())
        timings.append((time.perf_counter() - started) / steps * 1000)
    return statistics.median(timings)


@torch.inference_mode()
def acceptance(target, draft, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    matches = positions = 0
    overlap_sum = 0.0
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        path = target.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)  # [1, prompt + new]
        start = inputs["input_ids"].shape[1]
        if path.shape[1] <= start:
            continue
        # Logits at positions start-1 .. end-2 predict the generated tokens start .. end-1.
        target_logits = target(path).logits[0, start - 1:-1].float()
        draft_logits = draft(path).logits[0, start - 1:-1].float()
        matches += int((draft_logits.argmax(-1) == path[0, start:]).sum())
        positions += path.shape[1] - start
        p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
        overlap_sum += float(torch.minimum(p, q).sum(-1).sum())
    return {"alpha_greedy": matches / positions, "alpha_t1": overlap_sum / positions, "positions": positions}


def repo_code_prompts(count: int, chars: int = 400) -> list[str]:
    """Code written in this repo: certainly not in the stdlib corpus the pair trained on."""
    prompts = []
    for path in sorted(REPO_ROOT.glob("*/*.py")):
        if path.parts[-2] in {".venv", "specdec_api"} or path.stat().st_size < 2000:
            continue
        text = path.read_text()
        middle = text.find("\n", len(text) // 3) + 1
        prompts.append(text[middle:middle + chars])
        if len(prompts) == count:
            break
    return prompts


def evaluate(target_dir: str, draft_dir: str, prompts_path: str, new_tokens: int = 64, context: int = 256,
             max_gamma: int = 12, prompt_count: int = 16) -> dict:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    held_out = [json.loads(line)["prompt"] for line in Path(prompts_path).read_text().splitlines() if line][:prompt_count]
    probe = tokenizer(held_out[0])["input_ids"]

    cpu = torch.device("cpu")
    target_ms = decode_ms_per_token(ModelRunner(target, cpu), probe, context)
    draft_runner = make_runtime(draft, cpu, "auto")
    draft_ms = decode_ms_per_token(draft_runner, probe, context)
    draft_hf_ms = decode_ms_per_token(ModelRunner(draft, cpu), probe, context)
    c = draft_ms / target_ms

    result = {
        "target_params_m": round(sum(p.numel() for p in target.parameters()) / 1e6, 2),
        "draft_params_m": round(sum(p.numel() for p in draft.parameters()) / 1e6, 2),
        "context_tokens": context, "threads": 1,
        "target_decode_ms": round(target_ms, 3), "draft_decode_ms": round(draft_ms, 3),
        "draft_runtime": draft_runner.name, "draft_decode_ms_hf_runtime": round(draft_hf_ms, 3),
        "cost_ratio_c": round(c, 4), "cost_ratio_c_hf_runtime": round(draft_hf_ms / target_ms, 4),
    }
    for name, prompts in (("held_out_stdlib", held_out), ("repo_code", repo_code_prompts(8))):
        measured = acceptance(target, draft, tokenizer, prompts, new_tokens)
        alpha = measured["alpha_greedy"]
        gamma = best_gamma(min(alpha, 0.999), c, max_gamma)
        result[name] = {
            "prompts": len(prompts), "positions": measured["positions"],
            "alpha_greedy": round(alpha, 4), "alpha_t1": round(measured["alpha_t1"], 4),
            "best_gamma": gamma, "predicted_speedup": round(expected_speedup(min(alpha, 0.999), gamma, c), 3),
        }
    return result
