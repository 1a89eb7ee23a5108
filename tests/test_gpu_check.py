"""benchmarking/gpu_check.py's CPU smoke run: every section on tiny configs, as the GPU run does them.

The GPU check gets one try on a machine with no network; this runs the same code paths here (the services as
processes, the oracle drafter, the runtimes, the report), so that it does not fail there first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_tiny_cpu_run_reports_every_section_with_numbers(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}
    done = subprocess.run([sys.executable, "-m", "benchmarking.gpu_check", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path), "--budget-s", "400"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    for name in ("environment", "verify", "draft", "exactness", "services"):
        assert sections[name]["status"] == "ok", (name, sections[name].get("error"))
        assert "skipped" not in sections[name], (name, sections[name]["skipped"])

    env_section = sections["environment"]
    assert env_section["bandwidth"]["d2d_copy_GBps"] > 0
    assert env_section["matmul"]["TFLOPs"] >= 0

    verify = sections["verify"]
    assert "floor_ms = " in verify["floor_formula"]
    rows = [row for row in verify["rows"] if "error" not in row]
    assert rows and len(rows) == len(verify["rows"])
    assert all(row["ms"] > 0 and row["floor_ms"] > 0 and row["ratio_to_floor"] > 0 for row in rows)
    assert {(1, 1), (1, 5)} <= {(row["sessions"], row["new_tokens"]) for row in rows}
    assert isinstance(verify["done_when"]["ratio"], float)

    draft = sections["draft"]
    one = draft["results"]["1"]
    assert one and all(row.get("ms_per_step", 0) > 0 for row in one.values()), one
    assert draft["graphs"].startswith("unavailable")  # no CUDA here: recorded, not an error

    exact = sections["exactness"]
    assert exact["shipped_pair"]["equal"] is True, exact["shipped_pair"]["checks"]
    vias = {check.get("via") for check in exact["shipped_pair"]["checks"] if "equal" in check}
    assert vias == {"runtimes", "services"}
    assert 0 <= exact["bf16_drift"]["rate"] <= 1 and exact["bf16_drift"]["positions"] > 0

    services = sections["services"]
    runs = {run["label"]: run for run in services["runs"]}
    assert runs["target-only, 1 stream"]["tokens_per_s"] > 0
    speculative = [run for run in services["runs"] if run["alpha"] is not None]
    assert {run["alpha"] for run in speculative} == {0.8, 0.6}
    assert any(run["streams"] > 1 for run in speculative)
    for run in speculative:
        assert run["tokens_per_s"] > 0 and run["speedup_vs_target_only"] > 0
        assert run["outputs_equal_target_only"] is True, run["label"]
        assert run["round_p50"]["verify_ms"] > 0
    # The oracle proposes the target's continuation with probability alpha: alpha 0.8 is accepted more than 0.6.
    by_alpha = {run["alpha"]: run["tokens_per_round"] for run in speculative if run["streams"] == 1}
    assert by_alpha[0.8] > by_alpha[0.6] > 1.0
    assert isinstance(services["done_when"]["speedup"], float)
