"""`specdec demo` on tiny models: the prompt, a marker where the generated text starts, and per prompt the speedup
against the target alone measured in the same run; plain text when the output is not a terminal."""

from __future__ import annotations

import json

from specdec_cli.demo import footer, run_demo, speedup_line, symbols
from tests.conftest import PROMPTS


def test_the_demo_marks_each_generation_and_compares_it_with_the_target_alone(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    run_demo(str(tiny.target), str(tiny.noisy_draft), prompts, count=2, max_new_tokens=12, gamma=3)
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    marker, times = symbols()
    for i, prompt in enumerate(PROMPTS[:2], 1):
        assert f"--- prompt {i} of 2 " in out
        assert prompt + marker in out  # the generated text starts right after the prompt, at the marker
    lines = [line for line in out.splitlines() if "the target alone (" in line]
    assert len(lines) == 2
    for line in lines:  # greedy: the speculative tokens are the target's own
        assert line.startswith("12 tokens in ") and f"{times} the target alone (" in line
        assert line.endswith("same tokens as the target alone")
    assert "2 prompts: " in out and "tok/s for the target alone: " in out and "num_draft_tokens=0" in out


def test_the_speedup_line_and_footer_read_as_sentences():
    ours = {"new_tokens": 64, "wall_ms": 500.0, "tokens_per_s": 128.0}
    alone = {"new_tokens": 64, "wall_ms": 1000.0, "tokens_per_s": 64.0}
    assert speedup_line(ours, alone, True) == ("64 tokens in 500 ms: 128.0 tok/s, 2.00× the target alone (64.0 tok/s); "
                                               "same tokens as the target alone")
    assert speedup_line(ours, alone, False, "x").endswith("2.00x the target alone (64.0 tok/s); NOT the target "
                                                          "alone's tokens")
    assert footer([(ours, alone), (ours, alone)]).startswith("2 prompts: 128.0 tok/s with speculation, 64.0 tok/s for "
                                                             "the target alone: 2.00×")
    assert symbols("ascii") == (">>", "x") and symbols("utf-8") == ("▌", "×")
