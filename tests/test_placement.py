"""The placement planner (speculation/placement.py, `specdec plan`): Leviathan's expected tokens per round, the
round time of each placement, the issue's 1B-on-an-L4 against 8B-on-an-H100 number, and a small check of its
predictions against the shipped pair measured on this machine's cores."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from specdec_cli import plan as planner
from specdec_cli.main import app
from speculation import placement as pl
from speculation.gamma_policy import expected_speedup

# Llama-3.2-1B and Llama-3.1-8B as their model cards count them.
LLAMA_1B, LLAMA_8B = 1.236e9, 8.03e9


def test_expected_tokens_per_round_at_the_limits_and_monotone():
    for gamma in range(1, 17):
        assert pl.expected_tokens(0.0, gamma) == 1.0  # every first draft rejected: the recovered token alone
        assert pl.expected_tokens(1.0, gamma) == gamma + 1
        assert pl.expected_tokens(1 - 1e-9, gamma) == pytest.approx(gamma + 1, rel=1e-6)
        values = [pl.expected_tokens(a / 20, gamma) for a in range(21)]
        assert all(x < y for x, y in zip(values, values[1:])), "E grows with alpha"
    for alpha in (0.3, 0.8, 0.95):
        values = [pl.expected_tokens(alpha, g) for g in range(1, 17)]
        assert all(x < y for x, y in zip(values, values[1:])), "E grows with gamma"
        assert values[-1] < 1 / (1 - alpha), "and stays under its limit 1 / (1 - alpha)"
    assert pl.expected_tokens(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)


def test_the_split_placement_without_overhead_is_leviathans_formula():
    # Flat verify (the weight-read floor), no overhead, no network: speedup = E / (gamma * c + 1).
    for alpha in (0.0, 0.5, 0.8, 0.99):
        for c in (0.05, 0.4, 1.7):
            costs = pl.Costs(alpha=alpha, draft_step_ms=c * 10.0, verify_base_ms=10.0)
            for gamma in (1, 4, 9):
                assert pl.predict(pl.SPLIT, gamma, costs).speedup == pytest.approx(expected_speedup(alpha, gamma, c))


def test_the_issues_pairing_a_1b_draft_on_an_l4_against_an_8b_target_on_an_h100():
    """The issue: 'at weight-read floors a 1B draft on an L4 costs ~1.7x an 8B verify step on an H100: Leviathan's
    formula gives 0.43x at alpha 0.8, gamma 4'. Our floors (bf16 weights / vendor bandwidth: L4 300 GB/s, H100 SXM
    3350 GB/s) give c = 1.72 and x0.427 with the real parameter counts of Llama-3.2-1B (1.236B) and Llama-3.1-8B
    (8.03B): that is where the issue's 1.7 comes from. With round 1B and 8B, c = 1.40 and x0.51."""
    costs = pl.costs_from_devices(0.8, LLAMA_1B, LLAMA_8B, draft_bandwidth_gbs=pl.device("L4").bandwidth_gbs,
                                  target_bandwidth_gbs=pl.device("H100").bandwidth_gbs, target_memory_gb=80)
    assert costs.draft_step_ms / costs.verify(1) == pytest.approx(1.72, abs=0.01)
    assert pl.predict(pl.SPLIT, 4, costs).speedup == pytest.approx(0.43, abs=0.005)
    nominal = pl.costs_from_devices(0.8, 1e9, 8e9, draft_bandwidth_gbs=300, target_bandwidth_gbs=3350)
    assert pl.predict(pl.SPLIT, 4, nominal).speedup == pytest.approx(0.51, abs=0.005)
    # What the planner makes of that pairing: no gamma saves the split, and the draft on the H100 beside the target
    # pays (its step there is 0.74 ms): co-located without overlap, about x2.
    ranked = pl.plan(costs)
    assert ranked[0].placement == pl.COLOCATED and ranked[0].speedup == pytest.approx(2.08, abs=0.02)
    split = next(p for p in ranked if p.placement == pl.SPLIT)
    assert split.speedup < 1 and "too slow" in split.reason
    assert pl.recommendation(ranked, costs).startswith("colocated")


def test_overlap_hides_the_draft_only_on_a_device_of_its_own():
    costs = pl.Costs(alpha=0.8, draft_step_ms=0.5, colocated_draft_step_ms=0.5, verify_base_ms=10.0,
                     verify_per_token_ms=1.0, overhead_ms=2.0, rtt_ms=1.0)
    for gamma in range(1, 17):
        split, ahead = pl.predict(pl.SPLIT, gamma, costs), pl.predict(pl.SPLIT_OVERLAP, gamma, costs)
        colocated, contended = pl.predict(pl.COLOCATED, gamma, costs), pl.predict(pl.COLOCATED_OVERLAP, gamma, costs)
        assert ahead.round_ms < split.round_ms  # the draft-ahead hides behind a longer verify
        assert contended.round_ms > colocated.round_ms  # on one device it adds (gamma + 1) steps to save p * gamma
    # Every guess right (alpha 1): the round is max(draft ahead, verify) + overhead + one call's network.
    always = pl.Costs(alpha=1.0, draft_step_ms=3.0, verify_base_ms=5.0, overhead_ms=1.0, rtt_ms=0.5)
    assert pl.predict(pl.SPLIT_OVERLAP, 4, always).round_ms == pytest.approx(max(5 * 3.0, 5.0) + 1.0 + 0.5)
    assert pl.guess_holds(0.8, 4) == pytest.approx(0.8 ** 5)


def test_plan_ranks_best_first_picks_gamma_in_range_and_says_when_nothing_pays():
    costs = pl.Costs(alpha=0.7, draft_step_ms=1.0, colocated_draft_step_ms=0.5, verify_base_ms=10.0, overhead_ms=1.0)
    ranked = pl.plan(costs)
    assert [p.speedup for p in ranked] == sorted((p.speedup for p in ranked), reverse=True)
    assert {p.placement for p in ranked} == {*pl.PLACEMENTS, pl.TARGET_ALONE}
    for p in ranked:
        if p.placement != pl.TARGET_ALONE:
            assert 1 <= p.gamma <= pl.MAX_GAMMA and p.reason
            assert p.speedup == max(pl.predict(p.placement, g, costs).speedup for g in range(1, 17))
    useless = pl.Costs(alpha=0.1, draft_step_ms=20.0, verify_base_ms=10.0, overhead_ms=5.0)
    ranked = pl.plan(useless)
    assert ranked[0].placement == pl.TARGET_ALONE
    assert pl.recommendation(ranked, useless).startswith("run the target alone")
    # Co-located weights that do not fit rank last, whatever their speed.
    too_big = pl.costs_from_devices(0.9, 70e9, 405e9, draft_bandwidth_gbs=3350, target_bandwidth_gbs=3350,
                                    target_memory_gb=80)
    ranked = pl.plan(too_big)
    assert not too_big.colocated_fits and all(p.placement.startswith("colocated") for p in ranked[-2:])
    assert "do not fit" in ranked[-1].reason


def test_inputs_are_checked_and_parsed():
    with pytest.raises(ValueError):
        pl.Costs(alpha=1.2, draft_step_ms=1, verify_base_ms=1)
    with pytest.raises(ValueError):
        pl.Costs(alpha=0.5, draft_step_ms=-1, verify_base_ms=1)
    assert pl.parse_params("1B") == 1e9 and pl.parse_params("350M") == 3.5e8
    assert pl.parse_params("8.03b") == pytest.approx(8.03e9) and pl.parse_params(2e6) == 2e6
    assert pl.device("h100 sxm").name == "H100-SXM" and pl.device("a100").name == "A100-80GB"
    with pytest.raises(ValueError, match="unknown device"):
        pl.device("Voodoo2")
    assert pl.fit_verify([(3, 9.0), (7, 13.0)]) == pytest.approx((6.0, 1.0))


def test_parameters_are_counted_from_a_local_model_directory():
    # The safetensors headers of the shipped pair (models/README.md: 24.24 M and 0.95 M, embeddings tied).
    assert planner.params_of_model_dir("models/target") == pytest.approx(24.24e6, rel=1e-3)
    assert planner.params_of_model_dir("models/draft") == pytest.approx(0.95e6, rel=1e-2)


def test_the_command_prints_a_table_and_json_and_reads_a_bench_report(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["plan", "--alpha", "0.8", "--draft-device", "L4", "--target-device", "H100-SXM",
                               "--draft-params", "1.236B", "--target-params", "8.03B", "--gamma", "4"])
    assert done.exit_code == 0, done.output
    assert "recommendation: colocated" in done.output and "x0.43" in done.output
    done = runner.invoke(app, ["plan", "--alpha", "0.8", "--draft-step-ms", "2", "--verify-ms", "10",
                               "--overhead-ms", "1", "--rtt-ms", "0.5", "--json"])
    report = json.loads(done.output)
    assert {p["placement"] for p in report["ranked"]} == {pl.SPLIT, pl.SPLIT_OVERLAP, pl.TARGET_ALONE}
    assert any("co-located placements left out" in n for n in report["notes"])
    bench = {"specdec": {"alpha": 0.84, "draft_step_ms_p50": 0.5, "overhead_ms_p50": 3.0, "num_draft_tokens": 4,
                         "round_split_ms_p50": {"verify_compute_ms": 11.0}},
             "target_only": {"p50_ms_per_token": 7.0}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    done = runner.invoke(app, ["plan", "--bench-json", str(tmp_path / "bench.json"), "--json"])
    inputs = json.loads(done.output)["inputs"]
    assert inputs["alpha"] == 0.84 and inputs["target_step_ms"] == 7.0
    assert inputs["verify_base_ms"] + 5 * inputs["verify_per_token_ms"] == pytest.approx(11.0)
    done = runner.invoke(app, ["plan", "--alpha", "0.8"])
    assert done.exit_code == 2 and "--draft-step-ms" in done.output


# docs/gpu.md, "Checked against measured runs" (`specdec plan --check-reference 2,4,6`, the shipped pair on this
# machine's cores): the calibration it printed, and each placement's measured decode tokens/s at gamma 2, 4, 6.
RECORDED_CALIBRATION = dict(alpha=0.8164, draft_step_ms=0.5597, verify_base_ms=6.9957, verify_per_token_ms=0.9272,
                            colocated_draft_step_ms=0.5597, overhead_ms=2.9882, target_step_ms=5.1837,
                            target_overhead_ms=1.1516)
RECORDED_MEASURED = {pl.SPLIT: (174.2, 209.2, 210.3), pl.SPLIT_OVERLAP: (189.1, 212.1, 214.0),
                     pl.COLOCATED: (178.3, 210.1, 203.3), pl.COLOCATED_OVERLAP: (155.4, 179.7, 173.2)}


def test_the_model_reproduces_the_recorded_measured_runs():
    """The planner's model against the runs it was checked on: from the recorded calibration, every placement's
    prediction at gamma 2, 4 and 6 is within 8 % of what was measured (the run agreed within 7 %), and the model
    ranks co-located overlap slowest as measured. Timing the runs again belongs to the benchmark command (its
    numbers drift with the machine's load), not to the suite; this keeps the model honest against real numbers:
    a model that hid the contended draft-ahead would predict colocated+overlap ~20 % too fast and fail here."""
    costs = pl.Costs(**RECORDED_CALIBRATION)
    for placement, measured in RECORDED_MEASURED.items():
        for gamma, tokens_per_s in zip((2, 4, 6), measured):
            predicted = pl.predict(placement, gamma, costs).tokens_per_s
            assert predicted == pytest.approx(tokens_per_s, rel=0.08), (placement, gamma, predicted)
    for gamma in (2, 4, 6):
        slowest = min(RECORDED_MEASURED, key=lambda placement: pl.predict(placement, gamma, costs).tokens_per_s)
        assert slowest == pl.COLOCATED_OVERLAP


def test_the_reference_check_measures_every_placement_and_calibrates_from_it():
    """The live check's machinery on a short run (2 prompts x 24 tokens): split without overlap measured at gamma
    0, 2 and 6 calibrates costs that are positive and an alpha in (0, 1], and the contended placement runs and
    reports rounds; how close its predictions come is the benchmark's to say (docs/gpu.md)."""
    prompts = planner.load_default_prompts(2)
    split = planner.measure_layout(planner.CPU_LAYOUTS[pl.SPLIT], [0, 2, 6], prompts, 24)
    costs = planner.calibrate(split[0], [split[2], split[6]])
    assert 0.0 < costs.alpha <= 1.0 and costs.draft_step_ms > 0 and costs.verify_base_ms > 0
    contended = planner.measure_layout(planner.CPU_LAYOUTS[pl.COLOCATED_OVERLAP], [4], prompts, 24)
    assert contended[4].rounds and contended[4].tokens_per_s > 0
    assert math.isfinite(pl.predict(pl.COLOCATED_OVERLAP, 4, costs).tokens_per_s)
