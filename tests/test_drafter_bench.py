"""benchmarking/drafters.py on tiny models: every piece runs for real (HF's prompt lookup and assisted generation
in their worker, our drafters behind real processes), the report is complete, and a run whose greedy outputs
differ fails. No timing is asserted."""

from __future__ import annotations

import copy

import pytest

from benchmarking.drafters import (DrafterBenchSettings, OutputsDiffer, build_lookup_prompts,
                                   check_identical, collect_runs, default_methods, draft_args, format_table,
                                   summarise)
from tests.conftest import PROMPTS


def test_a_lookup_prompt_quotes_the_targets_own_continuation_then_repeats_the_prompt(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    [built] = build_lookup_prompts(str(tiny.target), [PROMPTS[0]], quoted_tokens=6)
    tokenizer = AutoTokenizer.from_pretrained(tiny.target)
    model = AutoModelForCausalLM.from_pretrained(tiny.target).eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    continuation = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    quoted = tokenizer.decode(continuation[0, ids.shape[1]:], skip_special_tokens=True)
    assert built == PROMPTS[0] + quoted + "\n\n" + PROMPTS[0]


def test_each_drafter_gets_the_checkpoint_it_reads():
    assert draft_args("ngram", "T", "D") == ["--model", "T", "--drafter", "ngram"]
    assert draft_args("ngram,model", "T", "D") == ["--model", "D", "--drafter", "ngram,model"]
    assert draft_args("layer-skip", "T", "D", ("--skip-layers", "2")) == ["--model", "T", "--drafter", "layer-skip",
                                                                         "--skip-layers", "2"]
    names = [m.name for m in default_methods(layer_skip=False)]
    assert names == ["target", "hf_prompt_lookup", "hf_assisted", "ours_target", "ours_model", "ours_ngram",
                     "ours_chain", "ours_chain_g8"]
    assert "ours_layer_skip" in [m.name for m in default_methods(layer_skip=True)]


def test_the_identical_output_check_names_the_first_difference():
    check_identical({"a": [[1, 2, 3], [4]], "b": [[1, 2, 3], [4]]})
    with pytest.raises(OutputsDiffer, match=r"lookup: greedy outputs differ: b vs a on prompt 1, token 2"):
        check_identical({"a": [[1], [5, 6, 7]], "b": [[1], [5, 6, 8]]}, "lookup")
    with pytest.raises(OutputsDiffer, match="token 2 of 3 / 2"):  # one stopped early
        check_identical({"a": [[5, 6, 7]], "b": [[5, 6]]})


def test_the_bench_runs_every_method_and_fails_on_a_different_output(tiny):
    methods = [m for m in default_methods(ngram_gamma=4, model_gamma=3, layer_skip=False)
               if m.name not in ("ours_model", "ours_chain_g4")]  # the chain covers the model drafter
    settings = DrafterBenchSettings(str(tiny.target), str(tiny.noisy_draft),
                                    {"held_out": PROMPTS[:2], "lookup": [PROMPTS[2] * 3]}, methods,
                                    max_new_tokens=10, repeats=2, pinned=False, progress=False)
    runs, protocol = collect_runs(settings)
    report = summarise(runs, methods)
    assert report["greedy_outputs_identical"] is True and protocol["repeats"] == 2 and not protocol["pinned"]
    for workload in ("held_out", "lookup"):
        results = report["workloads"][workload]
        assert list(results) == [m.name for m in methods]
        for name, result in results.items():
            assert result["tokens_per_s"] > 0 and len(result["tokens_per_s_runs"]) == 2, name
            assert result["rounds"] >= 1 and result["tokens_per_round"] >= 1, name
        assert results["target"]["x_target"] == 1.0 and "x_hf_prompt_lookup" in results["ours_ngram"]
        assert results["ours_target"]["tokens_per_round"] == 1.0  # num_draft_tokens=0: one token a round
        assert set(results["ours_ngram"]["per_round_ms"]) == {"draft_ms", "verify_ms", "network_ms", "other_ms",
                                                              "draft_compute_ms", "verify_compute_ms"}
        assert set(results["hf_assisted"]["per_round_ms"]) == {"target_forward_ms", "other_ms"}
        assert 0 < results["hf_assisted"]["acceptance_rate"] <= 1
    # the lookup prompt repeats itself, so both prompt lookups find matches to propose
    lookup = report["workloads"]["lookup"]
    assert lookup["ours_ngram"]["rounds_without_drafts"] < lookup["ours_ngram"]["rounds"]
    assert lookup["ours_ngram"]["drafted"] > 0 and lookup["hf_prompt_lookup"]["drafted"] > 0
    table = format_table({**report, "protocol": protocol})
    assert "greedy outputs identical across all methods and runs: yes" in table and "ours_chain" in table

    changed = copy.deepcopy(runs)
    changed["lookup"]["ours_chain"][1][0]["token_ids"][-1] += 1
    with pytest.raises(OutputsDiffer, match=r"lookup: greedy outputs differ: ours_chain \(run 1\) vs target"):
        summarise(changed, methods)
