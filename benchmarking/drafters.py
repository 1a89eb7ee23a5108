"""The drafters side by side (issue 21): our draft service's drafters against HF's in-process speculation.

    python -m benchmarking.drafters                          # both workloads, 3 repeats, pinned (~10 min)
    python -m benchmarking.drafters --json docs/bench-drafters.json
    python -m benchmarking.drafters --build-lookup-prompts   # rewrite benchmarking/lookup_prompts.jsonl

Methods, each at a fixed γ:
  target            HF `generate` of the target alone (one forward per token)
  hf_prompt_lookup  HF `generate(prompt_lookup_num_tokens=γ, max_matching_ngram_size=3)`
  hf_assisted       HF `generate(assistant_model=draft)`, γ constant (no heuristic schedule, no confidence stop)
  ours_target       our verify service through the orchestrator with num_draft_tokens=0 (the target alone)
  ours_model, ours_ngram, ours_chain   `specdec serve draft --drafter model | ngram | ngram,model`
  ours_chain_g8     the chain at the n-gram's γ
  ours_layer_skip   `--drafter layer-skip`, when the draft service has it (--layer-skip-args passes its flags)

Workloads: (a) `held_out`, the reference pair's held-out prompts (models/prompts.jsonl); (b) `lookup`,
benchmarking/lookup_prompts.jsonl: each held-out prompt P followed by the target's own greedy continuation G of
P, a blank line, and P again, so that the text to generate is quoted in the prompt. (The shipped target is too
small to copy by induction: a function followed by its own first lines is not continued by copying; see
docs/benchmarks.md.)

Protocol: greedy; the same prompts and max_new_tokens for every method; everything on the target's side (HF in a
worker process, our verify service) on core 1 with one torch thread, our draft services, orchestrators and this
client on core 0 (as `specdec bench` pins them); one warm-up generation per method and workload; then `repeats`
runs, each running every prompt on every method, methods in rotating order prompt by prompt so the VM's drift
weighs on all alike. tokens/s is per single stream (one generation at a time, as HF generates): a run's tokens
over its wall time; the median run and the spread (min-max) are reported. Greedy outputs must be identical across
all methods, or the run fails (OutputsDiffer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarking.bench import specdec_generate
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, REPO_ROOT, load_prompts
from local_stack.processes import spawn, stop_processes, wait_healthy
from specdec_client import Client
from transport import free_port

LOOKUP_PROMPTS = Path(__file__).resolve().parent / "lookup_prompts.jsonl"
NGRAM_MAX = 3  # our --ngram-max default; HF's max_matching_ngram_size is set to the same


@dataclass(frozen=True)
class Method:
    name: str
    gamma: int
    drafter: str | None = None  # ours: the draft service's --drafter (None: target alone, num_draft_tokens=0)
    hf: str | None = None  # HF: "target" | "prompt_lookup" | "assisted"

    @property
    def ours(self) -> bool:
        return self.hf is None


def default_methods(ngram_gamma: int = 8, model_gamma: int = 4, layer_skip: bool | None = None) -> list[Method]:
    """The methods at their pinned γ: n-gram lookups at 8 (ours and HF's alike), model drafters at 4 (`specdec
    bench`'s γ); the chain at both (with the fixed γ policy one γ serves both members). layer-skip when the draft
    service has it."""
    methods = [Method("target", 0, hf="target"), Method("hf_prompt_lookup", ngram_gamma, hf="prompt_lookup"),
               Method("hf_assisted", model_gamma, hf="assisted"), Method("ours_target", 0, drafter=None),
               Method("ours_model", model_gamma, drafter="model"), Method("ours_ngram", ngram_gamma, drafter="ngram"),
               Method("ours_chain", model_gamma, drafter="ngram,model"),
               Method(f"ours_chain_g{ngram_gamma}", ngram_gamma, drafter="ngram,model")]
    if layer_skip is None:
        from draft_service.drafters import DRAFTERS

        layer_skip = "layer-skip" in DRAFTERS
    if layer_skip:  # the hook for the self-speculative drafter (draft_service/drafters/layer_skip.py)
        methods.append(Method("ours_layer_skip", model_gamma, drafter="layer-skip"))
    return methods


# --- the workloads -------------------------------------------------------------------------------------------


def build_lookup_prompts(target: str, prompts: list[str], quoted_tokens: int = 128) -> list[str]:
    """Each prompt P becomes P + G + "\\n\\n" + P, where G is the target's greedy continuation of P
    (quoted_tokens long): a request that quotes an earlier answer, as "redo this" and "edit this" requests do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    built = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=quoted_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        quoted = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        built.append(f"{prompt}{quoted}\n\n{prompt}")
    return built


def write_lookup_prompts(path: Path = LOOKUP_PROMPTS, target: str = str(DEFAULT_TARGET), count: int = 16,
                         quoted_tokens: int = 128) -> None:
    sources = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()][:count]
    prompts = build_lookup_prompts(target, [s["prompt"] for s in sources], quoted_tokens)
    path.write_text("".join(json.dumps({"source": s["source"], "held_out_line": i + 1, "quoted_tokens": quoted_tokens,
                                        "prompt": p}) + "\n" for i, (s, p) in enumerate(zip(sources, prompts))))


def workloads(count: int, lookup_path: Path = LOOKUP_PROMPTS, held_out_path: Path = DEFAULT_PROMPTS) -> dict:
    return {"held_out": load_prompts(held_out_path, count), "lookup": load_prompts(lookup_path, count)}


# --- HF, in a worker process pinned like the target ----------------------------------------------------------


class HFRunner:
    """The target (and the draft, for assisted generation) in this process; `generate` runs one prompt greedily
    with one method and counts rounds (one streamer put each), drafted tokens and the target's forward time."""

    def __init__(self, target: str, draft: str, threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(target)
        self.target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        self.assistant = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
        self.drafted = 0
        self.forward_s = 0.0
        self._started = 0.0
        self.target.register_forward_pre_hook(self._forward_starts)
        self.target.register_forward_hook(self._forward_ends)
        _count_candidates(self)

    def _forward_starts(self, *_):
        self._started = time.perf_counter()

    def _forward_ends(self, *_):
        self.forward_s += time.perf_counter() - self._started

    def generate(self, prompt: str, max_new_tokens: int, method: str, gamma: int) -> dict:
        kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.eos_token_id}
        if method == "prompt_lookup":
            kwargs.update(prompt_lookup_num_tokens=gamma, max_matching_ngram_size=NGRAM_MAX)
        elif method == "assisted":
            config = self.assistant.generation_config  # HF keeps the heuristic's γ on the assistant between calls
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = gamma, "constant"
            config.assistant_confidence_threshold = 0.0
            kwargs["assistant_model"] = self.assistant
        inputs = self.tokenizer(prompt, return_tensors="pt")
        clock = RoundCounter()
        self.drafted, self.forward_s = 0, 0.0
        started = time.perf_counter()
        with self.torch.inference_mode():
            out = self.target.generate(**inputs, streamer=clock, **kwargs)
        wall = time.perf_counter() - started
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        rounds = clock.rounds
        return {"token_ids": ids, "wall_s": wall, "rounds": rounds, "drafted": self.drafted,
                # every round commits one token of the target's own (recovered or bonus) after what it accepts
                "accepted": len(ids) - rounds if method != "target" else 0,
                "forward_ms": self.forward_s * 1000}


class RoundCounter:
    """A streamer that counts generate's puts after the prompt: one a round (a target forward and what it commits)."""

    def __init__(self):
        self.rounds = -1  # the prompt comes first

    def put(self, value):
        self.rounds += 1

    def end(self):
        pass


def _count_candidates(runner: HFRunner) -> None:
    """Counts the tokens HF's candidate generators propose (its generate does not report them)."""
    from transformers.generation import candidate_generator

    for cls in (candidate_generator.AssistedCandidateGenerator, candidate_generator.PromptLookupCandidateGenerator):
        if getattr(cls.get_candidates, "_counted", False):
            continue

        def counted(self, input_ids, *args, _original=cls.get_candidates, **kwargs):
            candidates, logits = _original(self, input_ids, *args, **kwargs)
            runner.drafted += candidates.shape[1] - input_ids.shape[1]
            return candidates, logits

        counted._counted = True
        cls.get_candidates = counted


def _serve_hf(target: str, draft: str) -> None:
    """Worker mode: one JSON request a stdin line, one JSON row a stdout line."""
    runner = HFRunner(target, draft)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(runner.generate(request["prompt"], request["max_new_tokens"], request["method"],
                                         request["gamma"])), flush=True)


class HFWorker:
    """The HFRunner in a process of its own (taskset to `cpu`), so it sits where the target would."""

    def __init__(self, target: str, draft: str, cpu: int | None):
        command = [sys.executable, "-m", "benchmarking.drafters", "--hf-worker", "--target", target, "--draft", draft]
        if cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO_ROOT)
        if "ready" not in self._read():
            raise RuntimeError("the HF worker did not start")

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the HF worker exited with code {self.process.wait()}")
        return json.loads(line)

    def generate(self, prompt: str, max_new_tokens: int, method: str, gamma: int) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens, "method": method,
                                             "gamma": gamma}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


# --- ours: one verify service, a draft service and an orchestrator per drafter --------------------------------


@dataclass
class OurStacks:
    orchestrators: dict[str | None, str]  # --drafter (None: target alone) -> orchestrator address
    processes: list[subprocess.Popen] = field(default_factory=list)


def draft_args(drafter: str, target: str, draft: str, layer_skip_args: tuple[str, ...] = ()) -> list[str]:
    """The draft service's flags for a drafter: ngram reads only the target's vocabulary; layer-skip loads the
    target; a chain with a model member loads the draft."""
    names = drafter.split(",")
    model = draft if "model" in names else target
    extra = list(layer_skip_args) if "layer-skip" in names else []
    return ["--model", model, "--drafter", drafter, *extra]


@contextmanager
def our_stacks(target: str, draft: str, drafters: list[str], *, target_cpu: int | None, draft_cpu: int | None,
               layer_skip_args: tuple[str, ...] = (), timeout_s: float = 180.0) -> Iterator[OurStacks]:
    """One verify service (the target, on target_cpu) shared by one draft service and one orchestrator per drafter
    (on draft_cpu); generations run one at a time, so sharing the verify changes nothing but the start-up time."""
    processes: list[subprocess.Popen] = []
    if not drafters:
        yield OurStacks({})
        return
    try:
        verify_port = free_port()
        processes.append(spawn(["serve", "verify", "--model", target, "--port", str(verify_port), "--threads", "1"],
                               target_cpu))
        drafts = {}
        for drafter in drafters:
            port = free_port()
            processes.append(spawn(["serve", "draft", *draft_args(drafter, target, draft, layer_skip_args),
                                    "--port", str(port), "--threads", "1"], draft_cpu))
            drafts[drafter] = (port, processes[-1])
        wait_healthy(f"127.0.0.1:{verify_port}", timeout_s, processes[0])
        orchestrators: dict[str | None, str] = {}
        for drafter, (port, process) in drafts.items():
            wait_healthy(f"127.0.0.1:{port}", timeout_s, process)
            orchestrator_port = free_port()
            processes.append(spawn(["serve", "orchestrator", "--port", str(orchestrator_port), "--verify",
                                    f"127.0.0.1:{verify_port}", "--draft", f"127.0.0.1:{port}"], draft_cpu))
            orchestrators[drafter] = f"127.0.0.1:{orchestrator_port}"
        for address, process in zip(orchestrators.values(), processes[len(drafts) + 1:]):
            wait_healthy(address, timeout_s, process)
        orchestrators[None] = next(iter(orchestrators.values()))  # the target alone: num_draft_tokens=0
        yield OurStacks(orchestrators, processes)
    finally:
        stop_processes(list(reversed(processes)))


def ours_generate(client: Client, prompt: str, max_new_tokens: int, gamma: int) -> dict:
    row, _rounds, stats = specdec_generate(client, prompt, max_new_tokens, {"num_draft_tokens": gamma})
    return {"token_ids": row["token_ids"], "wall_s": row["wall_s"], "stats": stats}


# --- the run -------------------------------------------------------------------------------------------------


@dataclass
class DrafterBenchSettings:
    target: str = str(DEFAULT_TARGET)
    draft: str = str(DEFAULT_DRAFT)
    workloads: dict[str, list[str]] = field(default_factory=dict)  # name -> prompts
    methods: list[Method] = field(default_factory=default_methods)
    max_new_tokens: int = 128
    repeats: int = 3
    pinned: bool = True
    target_cpu: int = 1
    draft_cpu: int = 0
    layer_skip_args: tuple[str, ...] = ()
    progress: bool = True


class OutputsDiffer(AssertionError):
    """Greedy outputs that should be the target's own, and are not."""


def check_identical(outputs: dict[str, list[list[int]]], workload: str = "") -> None:
    """outputs: method -> one token list per prompt. Raises OutputsDiffer naming the first method, prompt and
    position that differ from the first method's."""
    (reference_name, reference), *others = outputs.items()
    for name, rows in others:
        if len(rows) != len(reference):
            raise OutputsDiffer(f"{workload}: {name} has {len(rows)} outputs, {reference_name} {len(reference)}")
        for i, (expected, got) in enumerate(zip(reference, rows)):
            if expected != got:
                at = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
                raise OutputsDiffer(f"{workload}: greedy outputs differ: {name} vs {reference_name} on prompt {i}, "
                                    f"token {at} of {len(expected)} / {len(got)}: {got[at:at + 5]} vs "
                                    f"{expected[at:at + 5]}")


def run_drafter_bench(settings: DrafterBenchSettings) -> dict:
    """Every method on every prompt of every workload, `repeats` times: the report (summarise) with the protocol."""
    runs, protocol = collect_runs(settings)
    return {**summarise(runs, settings.methods), "protocol": protocol}


def collect_runs(settings: DrafterBenchSettings) -> tuple[dict, dict]:
    """The rows of every generation (workload -> method -> repeat -> one row per prompt) and the protocol."""
    from tqdm import tqdm

    cpu = (lambda c: c) if settings.pinned and sys.platform.startswith("linux") else (lambda c: None)
    if cpu(settings.draft_cpu) is not None:
        os.sched_setaffinity(0, {settings.draft_cpu})  # this client sits with the orchestrators
    load_at_start = os.getloadavg()[0]
    methods = settings.methods
    ours = [m for m in methods if m.ours]
    drafters = list(dict.fromkeys(m.drafter or "model" for m in ours))
    runs: dict = {w: {m.name: [[] for _ in range(settings.repeats)] for m in methods} for w in settings.workloads}
    total = settings.repeats * sum(len(p) for p in settings.workloads.values())
    progress = tqdm(total=total, desc="drafters", unit="prompt", file=sys.stderr, disable=not settings.progress)
    worker = HFWorker(settings.target, settings.draft, cpu(settings.target_cpu)) if len(ours) < len(methods) else None
    started = time.time()
    try:
        with our_stacks(settings.target, settings.draft, drafters, target_cpu=cpu(settings.target_cpu),
                        draft_cpu=cpu(settings.draft_cpu), layer_skip_args=settings.layer_skip_args) as stacks:
            clients = {d: Client(a) for d, a in stacks.orchestrators.items()}

            def generate(method: Method, prompt: str, max_new_tokens: int) -> dict:
                if method.ours:
                    return ours_generate(clients[method.drafter], prompt, max_new_tokens, method.gamma)
                return worker.generate(prompt, max_new_tokens, method.hf, method.gamma)

            for prompts in settings.workloads.values():  # warm-up, each method at each workload's context
                for method in methods:
                    generate(method, prompts[0], 16)
            turn = 0
            for repeat in range(settings.repeats):
                for workload, prompts in settings.workloads.items():
                    for prompt in prompts:
                        shift = turn % len(methods)
                        for method in methods[shift:] + methods[:shift]:
                            runs[workload][method.name][repeat].append(generate(method, prompt,
                                                                                settings.max_new_tokens))
                        turn += 1
                        progress.update(1)
            for client in clients.values():
                client.close()
    finally:
        progress.close()
        if worker is not None:
            worker.close()
    protocol = {
        "target": settings.target, "draft": settings.draft, "max_new_tokens": settings.max_new_tokens,
        "repeats": settings.repeats, "prompts": {w: len(p) for w, p in settings.workloads.items()},
        "gamma": {m.name: m.gamma for m in methods}, "pinned": cpu(0) is not None,
        "target_cpu": cpu(settings.target_cpu), "draft_cpu": cpu(settings.draft_cpu), "threads_per_process": 1,
        "order": "methods rotate prompt by prompt", "tokens_per_s": "per single stream (one generation at a time)",
        "load_avg_1m_at_start": round(load_at_start, 2), "wall_s": round(time.time() - started, 1),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started))}
    return runs, protocol


def summarise(runs: dict, methods: list[Method]) -> dict:
    """runs: workload -> method -> repeat -> rows. Checks the greedy outputs (every repeat, every method), then
    per workload and method: tokens/s per run, acceptance, tokens per round and where a round's time went."""
    report: dict = {"workloads": {}}
    for workload, by_method in runs.items():
        outputs = {f"{name} (run {r})": [row["token_ids"] for row in rows]
                   for name, repeats in by_method.items() for r, rows in enumerate(repeats)}
        check_identical(outputs, workload)
        results = {}
        for method in methods:
            repeats = by_method[method.name]
            rows = [row for rows in repeats for row in rows]
            per_run = [sum(len(r["token_ids"]) for r in rows) / sum(r["wall_s"] for r in rows) for rows in repeats]
            results[method.name] = {"gamma": method.gamma, "tokens_per_s": round(statistics.median(per_run), 2),
                                    "tokens_per_s_runs": [round(x, 2) for x in per_run],
                                    **(_ours_split(rows) if method.ours else _hf_split(rows))}
        base = results.get("target", {}).get("tokens_per_s")
        for name, result in results.items():
            if base:
                result["x_target"] = round(result["tokens_per_s"] / base, 3)
            if "hf_prompt_lookup" in results and name == "ours_ngram":
                result["x_hf_prompt_lookup"] = round(result["tokens_per_s"] / results["hf_prompt_lookup"]
                                                     ["tokens_per_s"], 3)
        report["workloads"][workload] = results
    report["greedy_outputs_identical"] = True  # else check_identical raised
    return report


def _ours_split(rows: list[dict]) -> dict:
    stats = [r["stats"] for r in rows]

    def total(key):
        return sum(float(s.get(key, 0)) for s in stats)

    tokens, rounds, drafted = total("new_tokens"), max(total("rounds"), 1), total("drafted_tokens")
    per_round = {key: round(total(key) / rounds, 3) for key in ("draft_ms", "verify_ms", "network_ms", "other_ms",
                                                                 "draft_compute_ms", "verify_compute_ms")}
    return {"acceptance_rate": round(total("accepted_tokens") / drafted, 4) if drafted else 0.0,
            "tokens_per_round": round(tokens / rounds, 3), "rounds": int(rounds), "drafted": int(drafted),
            "rounds_without_drafts": int(total("target_only_rounds")),
            "overlapped_rounds": int(total("overlapped_rounds")),
            "round_ms": round(sum(r["wall_s"] for r in rows) * 1000 / rounds, 3), "per_round_ms": per_round}


def _hf_split(rows: list[dict]) -> dict:
    tokens = sum(len(r["token_ids"]) for r in rows)
    rounds = max(sum(r["rounds"] for r in rows), 1)
    drafted, forward = sum(r["drafted"] for r in rows), sum(r["forward_ms"] for r in rows)
    wall_ms = sum(r["wall_s"] for r in rows) * 1000
    return {"acceptance_rate": round(sum(r["accepted"] for r in rows) / drafted, 4) if drafted else 0.0,
            "tokens_per_round": round(tokens / rounds, 3), "rounds": rounds, "drafted": drafted,
            "round_ms": round(wall_ms / rounds, 3),
            "per_round_ms": {"target_forward_ms": round(forward / rounds, 3),
                             "other_ms": round((wall_ms - forward) / rounds, 3)}}


def format_table(report: dict) -> str:
    lines = []
    for workload, results in report["workloads"].items():
        lines += [f"\n{workload}: tokens/s per single stream (one generation at a time), median of the runs "
                  "(min-max); a round is one target forward (HF) or one draft + verify (ours); ours' draft and "
                  "verify are client-observed on the critical path, compute is server-reported (draft compute "
                  "includes drafting hidden behind the verify)",
                  f"{'method':<18}{'γ':>3}{'tok/s':>9}{'(min-max)':>16}{'× target':>10}{'accept':>8}{'tok/round':>10}"
                  f"{'ms/round':>10}  where a round's time goes (ms)"]
        for name, r in results.items():
            runs = r["tokens_per_s_runs"]
            split = r["per_round_ms"]
            if "target_forward_ms" in split:
                where = f"target forward {split['target_forward_ms']:.1f}, rest {split['other_ms']:.1f}"
            else:
                where = (f"draft {split['draft_ms']:.1f} (compute {split['draft_compute_ms']:.1f}), verify "
                         f"{split['verify_ms']:.1f} (compute {split['verify_compute_ms']:.1f}), network "
                         f"{split['network_ms']:.1f}, other {split['other_ms']:.1f}")
            lines.append(f"{name:<18}{r['gamma']:>3}{r['tokens_per_s']:>9.1f}{f'({min(runs):.1f}-{max(runs):.1f})':>16}"
                         f"{r.get('x_target', 0):>10.2f}{r['acceptance_rate']:>8.3f}{r['tokens_per_round']:>10.2f}"
                         f"{r['round_ms']:>10.2f}  {where}")
        if "x_hf_prompt_lookup" in results.get("ours_ngram", {}):
            lines.append(f"ours_ngram / hf_prompt_lookup: {results['ours_ngram']['x_hf_prompt_lookup']:.2f}×")
    lines.append("greedy outputs identical across all methods and runs: "
                 + ("yes" if report.get("greedy_outputs_identical") else "NO"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--count", type=int, default=8, help="prompts per workload")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ngram-gamma", type=int, default=8, help="γ of ours_ngram and hf_prompt_lookup")
    parser.add_argument("--model-gamma", type=int, default=4, help="γ of the model drafters and the chain")
    parser.add_argument("--methods", default="", help="comma-separated subset of the method names (default: all)")
    parser.add_argument("--workloads", default="held_out,lookup")
    parser.add_argument("--no-pinned", action="store_true")
    parser.add_argument("--layer-skip-args", default="", help="flags for `--drafter layer-skip`, e.g. '--skip-layers 2,4'")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--build-lookup-prompts", action="store_true", help=f"rewrite {LOOKUP_PROMPTS.name} and exit")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        _serve_hf(args.target, args.draft)
        return
    if args.build_lookup_prompts:
        write_lookup_prompts(target=args.target)
        print(f"wrote {LOOKUP_PROMPTS}")
        return
    methods = default_methods(args.ngram_gamma, args.model_gamma)
    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in methods if m.name in wanted]
    all_workloads = workloads(args.count)
    settings = DrafterBenchSettings(args.target, args.draft, {w: all_workloads[w] for w in args.workloads.split(",")},
                                    methods, args.max_new_tokens, args.repeats, not args.no_pinned,
                                    layer_skip_args=tuple(args.layer_skip_args.split()))
    try:
        report = run_drafter_bench(settings)
    except OutputsDiffer as error:
        print(f"FAILED: {error}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))


if __name__ == "__main__":
    main()
