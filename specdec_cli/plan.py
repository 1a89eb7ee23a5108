"""`specdec plan`: which placement of draft and target pays, and at which gamma (speculation/placement.py does the
arithmetic), from measured step costs, a `specdec bench --json` report, or devices and model sizes; and
`--check-reference`, which measures the shipped pair on this machine and sets the planner's predictions beside
the measured tokens/s."""

from __future__ import annotations

import json
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path

from speculation import placement as pl

# --- model sizes -----------------------------------------------------------------------------------------------


def params_of_model_dir(path: str | Path) -> float:
    """A local model directory's parameter count: config.json's num_parameters if it states one, else the tensor
    shapes in its *.safetensors headers (read, not loaded), else an estimate from a Llama-style config. No hub."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json (a local Hugging Face model directory is needed)")
    config = json.loads(config_path.read_text())
    if config.get("num_parameters"):
        return float(config["num_parameters"])
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        total = 0
        for shard in shards:
            with shard.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for name, tensor in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in tensor["shape"]:
                        count *= dim
                    total += count
        return float(total)
    try:
        h, layers, mlp = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        vocab, heads = config["vocab_size"], config["num_attention_heads"]
    except KeyError as missing:
        raise ValueError(f"{folder}: no weights and config.json lacks {missing}: give --*-params") from None
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads)
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return float(layers * (attention + 3 * h * mlp + 2 * h) + embeddings + h)


def _size(params: float) -> str:
    return f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"


def costs_from_description(draft_device: str | None, target_device: str | None, draft_params: str | None,
                           target_params: str | None, draft_model: str | Path | None, target_model: str | Path | None,
                           dtype: str = "bfloat16", bandwidth_gbs: float | None = None,
                           draft_bandwidth_gbs: float | None = None, target_bandwidth_gbs: float | None = None) -> dict:
    """Weight-read floors (speculation.placement.costs_from_devices) from GPUs of the table or given bandwidths,
    and parameter counts given or read from local model directories."""
    if dtype.lower() not in pl.DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype!r}: one of {', '.join(pl.DTYPE_BYTES)}")
    counts = {}
    for role, given, folder in (("draft", draft_params, draft_model), ("target", target_params, target_model)):
        if given is not None:
            counts[role] = pl.parse_params(given)
        elif folder is not None:
            counts[role] = params_of_model_dir(folder)
        else:
            raise ValueError(f"the device description needs the {role}'s size: --{role}-params or --{role}-model")
    devices = {role: pl.device(name) if name else None
               for role, name in (("draft", draft_device), ("target", target_device))}
    bandwidth = {}
    for role, own in (("draft", draft_bandwidth_gbs), ("target", target_bandwidth_gbs)):
        found = own or bandwidth_gbs or (devices[role].bandwidth_gbs if devices[role] else None)
        if found is None:
            raise ValueError(f"no bandwidth for the {role}: --{role}-device or --{role}-bandwidth-gbs")
        bandwidth[role] = found
    per_param = pl.DTYPE_BYTES[dtype.lower()]
    costs = pl.costs_from_devices(
        1.0, counts["draft"], counts["target"], draft_bandwidth_gbs=bandwidth["draft"],
        target_bandwidth_gbs=bandwidth["target"], draft_dtype_bytes=per_param, target_dtype_bytes=per_param,
        target_memory_gb=devices["target"].memory_gb if devices["target"] else None)
    notes = [f"weight-read floors: draft {_size(counts['draft'])} parameters at {bandwidth['draft']:.0f} GB/s, target "
             f"{_size(counts['target'])} at {bandwidth['target']:.0f} GB/s, {dtype}", *costs.notes]
    return {"draft_step_ms": costs.draft_step_ms, "colocated_draft_step_ms": costs.colocated_draft_step_ms,
            "verify_base_ms": costs.verify_base_ms, "verify_per_token_ms": 0.0, "colocated_fits": costs.colocated_fits,
            "notes": tuple(notes)}


# --- costs from a bench report ---------------------------------------------------------------------------------


def costs_from_bench(report: dict, **overrides) -> dict:
    """The planner's inputs from `specdec bench --json` (its top-level `specdec` and `target_only`, the greedy
    run) or one line of `python -m benchmarking.sweep`: alpha, the draft step, the verify pass at gamma + 1 tokens
    (and the target alone at 1 token, when the report has it: then the verify slope), the per-round overhead."""
    ours = report.get("specdec", report)
    split = ours.get("round_split_ms_p50", {})
    gamma = int(ours["num_draft_tokens"])
    found = {"alpha": float(ours["alpha"]), "draft_step_ms": float(ours["draft_step_ms_p50"]),
             "overhead_ms": float(ours.get("overhead_ms_p50", 0.0))}
    verify = float(split["verify_compute_ms"])
    points = [(gamma + 1, verify)]
    base = report.get("target_only", {}).get("p50_ms_per_token")
    if base:
        points.append((1, float(base)))
        found["target_step_ms"] = float(base)
    found["verify_base_ms"], found["verify_per_token_ms"] = pl.fit_verify(points)
    found.update({k: v for k, v in overrides.items() if v is not None})
    return found


# --- printing --------------------------------------------------------------------------------------------------


def plan_report(costs: pl.Costs, max_gamma: int, gamma: int | None = None) -> dict:
    ranked = pl.plan(costs, max_gamma)
    report = {"inputs": {k: v for k, v in costs.__dict__.items() if k != "notes"}, "notes": list(costs.notes),
              "ranked": [p.as_dict() for p in ranked], "recommendation": pl.recommendation(ranked, costs)}
    if gamma is not None:
        report["at_gamma"] = [pl.predict(p.placement, gamma, costs).as_dict() for p in ranked
                              if p.placement != pl.TARGET_ALONE]
    return report


def format_report(report: dict) -> str:
    lines = [f"{'placement':18s} {'best γ':>6s} {'tokens/s':>9s} {'speedup':>8s}  reason"]
    for p in report["ranked"]:
        gamma = "-" if p["placement"] == pl.TARGET_ALONE else str(p["gamma"])
        lines.append(f"{p['placement']:18s} {gamma:>6s} {p['tokens_per_s']:9.1f} {p['speedup']:7.2f}x  {p['reason']}")
    if report.get("at_gamma"):
        lines.append("")
        for p in report["at_gamma"]:
            lines.append(f"at γ={p['gamma']}: {p['placement']:18s} {p['tokens_per_s']:9.1f} tokens/s  x{p['speedup']:.2f}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"\nrecommendation: {report['recommendation']}")
    return "\n".join(lines)


# --- checked against measured runs -----------------------------------------------------------------------------

# The four placements on this machine's CPU cores, as `specdec bench` pins its stack: "a device" is one core
# with one torch thread; the orchestrator has core 0.
CPU_LAYOUTS = {
    pl.SPLIT: dict(draft_cpu=0, verify_cpu=1, overlap=False),
    pl.SPLIT_OVERLAP: dict(draft_cpu=0, verify_cpu=1, overlap=True),
    pl.COLOCATED: dict(draft_cpu=1, verify_cpu=1, overlap=False),
    pl.COLOCATED_OVERLAP: dict(draft_cpu=1, verify_cpu=1, overlap=True),
}


@dataclass
class Measured:
    """Decode rounds at one gamma: every generation's first round (it holds the prompt's prefill) and the
    rounds the orchestrator shortened near max_new_tokens are left out; what is left is what the planner
    predicts, a steady decode."""
    gamma: int
    rounds: list[tuple[dict, int]]  # (the round's timing, tokens it committed)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * sum(n for _, n in self.rounds) / sum(float(r["round_ms"]) for r, _ in self.rounds)

    def mean(self, key: str) -> float:
        return statistics.fmean(float(r[key]) for r, _ in self.rounds)

    @property
    def alpha(self) -> float:
        """Leviathan's per-token alpha, the maximum-likelihood estimate over truncated geometric rounds."""
        accepted = sum(int(r["accepted"]) for r, _ in self.rounds)
        rejections = sum(1 for r, _ in self.rounds if int(r["accepted"]) < int(r["num_draft_tokens"]))
        return accepted / (accepted + rejections) if accepted + rejections else 0.0

    @property
    def draft_step_ms(self) -> float:
        steps = [float(r["draft_step_ms"]) for r, _ in self.rounds if float(r["draft_step_ms"]) > 0]
        return statistics.fmean(steps) if steps else 0.0

    @property
    def overhead_ms(self) -> float:
        """Per round, what is not model compute on the critical path."""
        return statistics.fmean(float(r["round_ms"]) - float(r["draft_critical_compute_ms"])
                                - float(r["verify_compute_ms"]) for r, _ in self.rounds)


def _measure(client, prompts: list[str], gamma: int, max_new_tokens: int) -> Measured:
    kept = []
    for prompt in prompts:
        first = True
        for chunk in client.stream(prompt, max_new_tokens, num_draft_tokens=gamma):
            if chunk.round is None:
                continue
            if not first and int(chunk.round["num_draft_tokens"]) == gamma:
                kept.append((chunk.round, len(chunk.token_ids)))
            first = False
    return Measured(gamma, kept)


def measure_layout(layout: dict, gammas: list[int], prompts: list[str], max_new_tokens: int) -> dict[int, Measured]:
    """The shipped pair's stack pinned as `layout` says, greedy, each gamma in turn (after a warm-up)."""
    from local_stack.paths import DEFAULT_DRAFT, DEFAULT_TARGET
    from local_stack.processes import local_stack
    from specdec_client import Client

    args = () if layout["overlap"] else ("--no-overlap",)
    with local_stack(str(DEFAULT_TARGET), str(DEFAULT_DRAFT), draft_cpu=layout["draft_cpu"],
                     verify_cpu=layout["verify_cpu"], orchestrator_cpu=0, threads=1,
                     orchestrator_args=args) as stack, Client(stack.orchestrator, timeout=300) as client:
        client.generate(prompts[0], max_new_tokens=16)  # warm-up
        return {g: _measure(client, prompts, g, max_new_tokens) for g in gammas}


def calibrate(baseline: Measured, runs: list[Measured], rtt_ms: float = 0.0) -> pl.Costs:
    """The planner's inputs from runs of the split placement without overlap: gamma 0 (the target alone through the
    same stack: its step and per-token overhead) and runs at two or more gammas (the verify line through their
    gamma + 1; alpha, the draft step and the per-round overhead, averaged over them). On a CPU one token is a
    cheaper pass than the line through longer ones gives (5.5 ms against the 7 ms of the line), so the target
    alone keeps its own measured step. Here a co-located draft step costs what it does on its own core (the cores
    are alike): colocated_draft_step_ms = draft_step_ms."""
    a, b = pl.fit_verify([(m.gamma + 1, m.mean("verify_compute_ms")) for m in runs])
    return pl.Costs(alpha=statistics.fmean(m.alpha for m in runs),
                    draft_step_ms=statistics.fmean(m.draft_step_ms for m in runs),
                    colocated_draft_step_ms=statistics.fmean(m.draft_step_ms for m in runs),
                    verify_base_ms=a, verify_per_token_ms=b,
                    overhead_ms=statistics.fmean(m.overhead_ms for m in runs), rtt_ms=rtt_ms,
                    target_step_ms=baseline.mean("verify_compute_ms"), target_overhead_ms=baseline.overhead_ms)


def check_reference(gammas: list[int], count: int, max_new_tokens: int,
                    placements: tuple[str, ...] = tuple(CPU_LAYOUTS), calibrate_at: tuple[int, ...] | None = None) -> dict:
    """Calibrate on the split placement without overlap (gamma 0 and `calibrate_at`, by default the smallest and
    largest of `gammas`), then measure every placement at `gammas` and set each measured decode tokens/s beside the
    planner's prediction."""
    calibrate_at = tuple(calibrate_at or (min(gammas), max(gammas)))
    prompts = load_default_prompts(count)
    runs = {pl.SPLIT: measure_layout(CPU_LAYOUTS[pl.SPLIT], sorted({0, *calibrate_at, *gammas}), prompts,
                                     max_new_tokens)}
    costs = calibrate(runs[pl.SPLIT][0], [runs[pl.SPLIT][g] for g in calibrate_at])
    for name in placements:
        if name not in runs:
            runs[name] = measure_layout(CPU_LAYOUTS[name], list(gammas), prompts, max_new_tokens)
    rows = []
    for name in placements:
        for gamma in gammas:
            measured, predicted = runs[name][gamma], pl.predict(name, gamma, costs)
            rows.append({"placement": name, "gamma": gamma, "predicted_tokens_per_s": round(predicted.tokens_per_s, 1),
                         "measured_tokens_per_s": round(measured.tokens_per_s, 1),
                         "error": round(predicted.tokens_per_s / measured.tokens_per_s - 1, 4),
                         "calibration_run": name == pl.SPLIT and gamma in calibrate_at,
                         "measured_alpha": round(measured.alpha, 4), "rounds": len(measured.rounds),
                         "predicted_round_ms": round(predicted.round_ms, 3),
                         "measured_round_ms": round(measured.mean("round_ms"), 3)})
    target = runs[pl.SPLIT][0]
    return {"calibration": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in costs.__dict__.items()
                            if k != "notes"},
            "calibrated_at_gamma": list(calibrate_at), "prompts": count, "max_new_tokens": max_new_tokens,
            "target_alone": {"predicted_tokens_per_s": round(1000 / costs.target_ms_per_token, 1),
                             "measured_tokens_per_s": round(target.tokens_per_s, 1)},
            "rows": rows}


def format_check(result: dict) -> str:
    c = result["calibration"]
    at = " and ".join(map(str, result["calibrated_at_gamma"]))
    lines = [f"calibrated on split, no overlap, γ 0 and {at}: α {c['alpha']}, draft step {c['draft_step_ms']} ms, "
             f"verify(k) = {c['verify_base_ms']} + {c['verify_per_token_ms']}·k ms, overhead {c['overhead_ms']} ms/round; "
             f"target alone {c['target_step_ms']} + {c['target_overhead_ms']} ms/token",
             f"target alone: predicted {result['target_alone']['predicted_tokens_per_s']} tokens/s, measured "
             f"{result['target_alone']['measured_tokens_per_s']}",
             f"{'placement':18s} {'γ':>3s} {'predicted':>10s} {'measured':>9s} {'error':>7s} {'α meas.':>8s}"]
    for r in result["rows"]:
        lines.append(f"{r['placement']:18s} {r['gamma']:3d} {r['predicted_tokens_per_s']:10.1f} "
                     f"{r['measured_tokens_per_s']:9.1f} {100 * r['error']:+6.1f}% {r['measured_alpha']:8.3f}"
                     + ("  (calibration run)" if r["calibration_run"] else ""))
    return "\n".join(lines)


def load_default_prompts(count: int) -> list[str]:
    from local_stack.paths import DEFAULT_PROMPTS, load_prompts

    return load_prompts(DEFAULT_PROMPTS, count)
