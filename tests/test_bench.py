"""`specdec bench` end to end on tiny models: every system runs for real and the report is complete."""

import json
import os
import subprocess
import sys

from tests.conftest import PROMPTS


def test_bench_json_reports_every_system_and_identical_greedy_outputs(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    done = subprocess.run(
        [sys.executable, "-m", "specdec_cli", "bench", "--target", str(tiny.target), "--draft", str(tiny.noisy_draft),
         "--prompts", str(prompts), "--count", "2", "--max-new-tokens", "12", "--num-draft-tokens", "3",
         "--no-pinned", "--greedy-only", "--json", "--png", str(tmp_path / "bench.png")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["greedy_outputs_identical"] is True
    for system in ("target_only", "hf_assisted", "specdec"):
        assert report[system]["tokens_per_s"] > 0
        assert report[system]["tokens"] == 24
    ours = report["specdec"]
    for key in ("alpha", "mean_accepted_len", "round_ms_p50", "overhead_ms_p50", "bytes_per_round",
                "p50_ms_per_token", "p99_ms_per_token", "leviathan_predicted_speedup"):
        assert key in ours
    assert 0 < ours["alpha"] < 1 and ours["rounds"] >= 2 and ours["bytes_per_round"] > 0
    assert report["protocol"]["pinned"] is False
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_concurrency_json_has_every_level(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]))
    done = subprocess.run(
        [sys.executable, "-m", "specdec_cli", "bench", "--target", str(tiny.target), "--draft", str(tiny.noisy_draft),
         "--prompts", str(prompts), "--max-new-tokens", "10", "--concurrency", "1,4", "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    levels = report["concurrency"]
    assert set(levels) == {"1", "4"}
    # pinned by default, like the batch-1 bench, where the machine has the two cores to pin to
    assert report["protocol"]["pinned"] is (sys.platform.startswith("linux") and (os.cpu_count() or 1) >= 2)
    for entry in levels.values():
        for key in ("tokens_per_s", "target_only_tokens_per_s", "p50_ms_per_token", "p99_ms_per_token"):
            assert entry[key] > 0
        by_threads = entry["target_only_tokens_per_s_by_threads"]  # target-only at its faster thread count
        assert set(by_threads) == {"1", "2"} and entry["target_only_tokens_per_s"] == max(by_threads.values())
    assert levels["1"]["tokens"] == levels["4"]["tokens"] == 40 and sum(levels["4"]["verify_batch_size_histogram"].values()) > 0
    for entry in levels.values():  # CPU per process in clock ticks: a short level may read 0, never > 2 cores
        assert set(entry["cpu_cores"]) == {"draft", "verify", "orchestrator", "client"}
        assert all(0 <= cores <= 2.5 for cores in entry["cpu_cores"].values()), entry["cpu_cores"]
    assert sum(levels["4"]["cpu_cores"].values()) > 0


def test_repeated_concurrency_runs_report_medians_and_pooled_histograms():
    from benchmarking.concurrency import _merge_runs

    def run(rate, p99, gamma_zero):
        return {"tokens": 40, "wall_s": 40 / rate, "tokens_per_s": rate, "p50_ms_per_token": 1000 / rate,
                "p99_ms_per_token": p99, "verify_batch_size_histogram": {"1": 3, "2": 4},
                "gamma_histogram": {"0": gamma_zero, "4": 5}, "cpu_cores": {"verify": 0.9, "draft": 0.3}}

    merged = _merge_runs([run(100.0, 30.0, 1), run(300.0, 10.0, 2), run(120.0, 50.0, 3)])
    assert merged["tokens_per_s"] == 120.0 and merged["p99_ms_per_token"] == 30.0  # medians, each on its own
    assert merged["tokens_per_s_runs"] == [100.0, 300.0, 120.0]
    assert merged["gamma_histogram"] == {"0": 6, "4": 15} and merged["verify_batch_size_histogram"] == {"1": 9, "2": 12}
    assert merged["tokens"] == 120 and merged["cpu_cores"] == {"verify": 0.9, "draft": 0.3}
