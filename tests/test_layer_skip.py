"""The layer-skip drafter (draft_service/drafters/layer_skip.py): the lean runtime skipping exactly the named layers
(its logits equal an HF forward of the model with those layers removed), its kept-layers-only cache rolling back as
a fresh run, the skip-set search and its save file, the flags refused at startup, and over real gRPC greedy output
equal to the target alone and the sampled first token distributed as the target's."""

from __future__ import annotations

import copy
import json

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import draft_service.server as draft_server
import orchestrator.server as orchestrator_server
import verify_service.server as verify_server
from draft_service.drafters import build_drafter, drafter_names
from draft_service.drafters import skip_search
from draft_service.drafters.base import ProposeJob
from draft_service.drafters.layer_skip import LayerSkipDrafter, parse_skip_layers
from serving.runtimes import make_runtime
from serving.runtimes.lean import LeanLlama
from serving.model_loading import load_model
from serving.model_server import ModelServerSettings
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2_grpc
from speculation.sampling import Sampling, logits_to_probs
from tests.conftest import PROMPTS, Stack
from tests.test_drafters import _first_token_counts
from tests.test_greedy_exactness import reference  # noqa: F401 - the fixture: the target's own greedy `generate`
from tests.test_rejection_sampler import chi_square_p
from tests.tiny_models import VOCAB, build_llama

GREEDY = Sampling(0.0)
MAX_NEW = 24
TOKENS = [5, 17, 3, 99, 250, 12, 7, 7, 64, 300, 2, 45, 180, 33, 8, 271, 9, 150, 61, 4]


@pytest.fixture(scope="module")
def four_layers(tiny, tmp_path_factory):
    """A 4-layer tiny Llama with the tiny models' tokenizer: room for skip sets of 1 to 3 layers."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.target)
    return build_llama(tmp_path_factory.mktemp("four") / "target", tokenizer, hidden=64, layers=4, seed=7, sharpen=4.0)


@pytest.fixture(scope="module")
def four_model(four_layers):
    return AutoModelForCausalLM.from_pretrained(four_layers).eval()


def hf_without(model, skip) -> torch.nn.Module:
    """The HF model with the decoder layers `skip` removed from its layer list: the obviously correct reference."""
    pruned = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(pruned.model.layers) if i not in set(skip)]
    for position, layer in enumerate(kept):  # its place in the cache `generate` keeps
        layer.self_attn.layer_idx = position
    pruned.model.layers = torch.nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [pruned.config.layer_types[i] for i in range(len(model.model.layers))
                                     if i not in set(skip)]
    return pruned.eval()


# -- the runtime: skipping exactly those layers -------------------------------------------------------------
@pytest.mark.parametrize("skip", [(0,), (1,), (3,), (0, 2), (1, 2, 3)], ids=str)
def test_skipped_logits_equal_an_hf_forward_with_those_layers_removed(four_model, skip):
    full = LeanLlama(four_model)
    skipped = full.skipping(skip)
    logits = skipped.extend(skipped.new_cache(), TOKENS, len(TOKENS))  # [positions, vocab]
    with torch.inference_mode():
        expected = hf_without(four_model, skip)(torch.tensor([TOKENS]), use_cache=False).logits[0]
        whole = four_model(torch.tensor([TOKENS]), use_cache=False).logits[0]
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4), (logits - expected).abs().max()
    assert (logits - whole).abs().max() > 1e-2  # it is not the whole model
    assert skipped.layer_indices == [i for i in range(4) if i not in skip]
    # the runner it came from still runs every layer
    assert torch.allclose(full.extend(full.new_cache(), TOKENS, len(TOKENS)), whole, atol=1e-4, rtol=1e-4)


def test_skipping_composes_by_model_index_and_the_cache_holds_kept_layers_only(four_model):
    full = LeanLlama(four_model)
    assert full.skipping([1]).skipping([3]).layer_indices == full.skipping([1, 3]).layer_indices == [0, 2]
    whole, half = full.new_cache(), full.skipping([1, 3]).new_cache()
    full.extend(whole, TOKENS, 1)
    full.skipping([1, 3]).extend(half, TOKENS, 1)
    assert len(half.keys) == len(half.values) == 2 and half.nbytes() * 2 == whole.nbytes()


def test_crop_and_extend_of_the_skipped_cache_match_a_fresh_run(four_model):
    """Rejected drafts cropped away, other tokens appended, in a random order of calls: every step's logits equal
    a fresh cache fed the same tokens at once."""
    import random

    skipped = LeanLlama(four_model).skipping([1, 2])
    rng = random.Random(0)
    cache, tokens = skipped.new_cache(), []
    for _ in range(30):
        if tokens and rng.random() < 0.4:
            keep = rng.randrange(len(tokens))
            cache.crop(keep)
            del tokens[keep:]
        new = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 6))]
        got = skipped.extend(cache, new, len(new))
        tokens += new
        fresh = skipped.extend(skipped.new_cache(), tokens, len(new))
        assert cache.length == len(tokens)
        assert torch.allclose(got, fresh, atol=1e-5, rtol=1e-5), (got - fresh).abs().max()


# -- the drafter ----------------------------------------------------------------------------------------------
def test_proposals_are_the_skipped_models_and_sampled_rows_its_probabilities(four_layers, four_model):
    drafter = build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers="1,2"))
    assert isinstance(drafter, LayerSkipDrafter) and drafter.description == "layer-skip(skip=1,2 of 4)"
    reference_model = hf_without(four_model, (1, 2))
    # greedy, several sessions in one call: each the argmax chain of the pruned HF model
    prompts = [TOKENS[:7], TOKENS[3:15], TOKENS]
    jobs = [ProposeJob(drafter.new_cache(), list(p), 5, GREEDY) for p in prompts]
    for job, prompt, proposal in zip(jobs, prompts, drafter.propose_batch(jobs)):
        with torch.inference_mode():
            expected = reference_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5,
                                                min_new_tokens=5)[0, len(prompt):].tolist()
        assert proposal.token_ids == expected and proposal.drafter == "layer-skip" and proposal.draft_probs is None
        assert job.cache.length == len(prompt) + 4  # all but the last proposal fed, as the model drafter
    # sampled: the first row is the shared transform of the pruned model's logits
    sampling = Sampling(0.8, top_k=20)
    (proposal,) = drafter.propose_batch([ProposeJob(drafter.new_cache(), TOKENS, 3, sampling, seed=5)])
    with torch.inference_mode():
        logits = reference_model(torch.tensor([TOKENS]), use_cache=False).logits[0, -1:]
    assert proposal.draft_probs.shape == (3, VOCAB)
    assert torch.allclose(proposal.draft_probs[0], logits_to_probs(logits, sampling)[0], atol=1e-5)


def test_the_search_returns_a_valid_set_and_the_save_file_restarts_without_searching(four_layers, tmp_path,
                                                                                      monkeypatch):
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in PROMPTS[:6]))
    saved = tmp_path / "skip.json"
    drafter = build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers="auto",
                                              skip_search_prompts=str(prompts), skip_layers_save=str(saved)))
    record = json.loads(saved.read_text())
    assert record["skip_layers"] == drafter.skip and record["num_layers"] == 4 and record["prompts"] == 6
    assert 0 < len(drafter.skip) < 4 and set(drafter.skip) <= {0, 1, 2, 3}
    assert 0.0 <= record["alpha"] <= 1.0 and 0.0 < record["cost_ratio"] < 1.0 and 1 <= record["gamma"] <= 8
    assert drafter.description == f"layer-skip(skip={','.join(map(str, drafter.skip))} of 4)"

    def no_search(*args, **kwargs):
        raise AssertionError("a saved set needs no search")

    monkeypatch.setattr(skip_search, "search", no_search)
    again = build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers=f"@{saved}"))
    assert again.skip == drafter.skip
    record["num_layers"] = 7
    saved.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="saved for a model of 7 layers; this one has 4"):
        build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers=f"@{saved}"))


def test_the_search_picks_the_best_set_it_evaluated_by_predicted_speedup(four_layers):
    loaded = load_model(str(four_layers))
    full = make_runtime(loaded.model, loaded.device, "lean")
    tokenizer = AutoTokenizer.from_pretrained(four_layers)
    report = skip_search.search(full, [tokenizer(text)["input_ids"] for text in PROMPTS[:5]], beam=1)
    chosen = report.chosen
    assert chosen in report.evaluated and all(c.predicted_speedup <= chosen.predicted_speedup for c in report.evaluated)
    assert {c.skip for c in report.evaluated} >= {(0,), (1,), (2,), (3,)}  # every single layer tried first
    assert len({c.skip for c in report.evaluated}) == len(report.evaluated)  # none evaluated twice
    # alpha is the pruned model's greedy agreement with the whole model's continuation, position by position
    one = next(c for c in report.evaluated if c.skip == (2,))
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS[:5]]
    continuations = skip_search.greedy_continuations(full, prompts)
    assert one.alpha == skip_search.greedy_alpha(full.skipping([2]), prompts, continuations)
    assert skip_search.greedy_alpha(full, prompts, continuations) == 1.0  # the whole model agrees with itself
    gamma, speedup = skip_search.best_gamma_speedup(one.alpha, one.cost_ratio)
    assert (gamma, speedup) == (one.gamma, one.predicted_speedup)
    assert "skip layers" in report.summary() and report.seconds < skip_search.BUDGET_S


# -- refused at startup -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("4", "the model has 4 decoder layers \\(0..3\\); 4 is out of range"),
    ("-1", "-1 is out of range"),
    ("0,1,2,3", "skips all 4 layers; keep at least one"),
    ("1,1", "names a layer twice"),
    ("a", "0-based layer indices separated by commas"),
    ("1.5", "0-based layer indices separated by commas"),
    ("", "0-based layer indices separated by commas"),
    ("2,", "0-based layer indices separated by commas"),
])
def test_bad_skip_layers_are_refused_before_the_weights_load(four_layers, spec, message, monkeypatch):
    import draft_service.drafters.layer_skip as layer_skip

    monkeypatch.setattr(layer_skip, "load_model", lambda *a: pytest.fail("loaded weights for a bad --skip-layers"))
    with pytest.raises(ValueError, match=message):
        build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers=spec))


def test_other_architectures_the_hf_runtime_and_a_save_without_a_search_are_refused(tiny, four_layers, tmp_path):
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(tiny.target).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="supports Llama-family models .* is 'gpt2'"):
        build_drafter(ModelServerSettings(str(tmp_path / "gpt2"), drafter="layer-skip", skip_layers="1"))
    with pytest.raises(ValueError, match="runs on the lean runtime"):
        build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers="1", runtime="hf"))
    with pytest.raises(ValueError, match="--skip-layers-save writes what --skip-layers auto chooses"):
        build_drafter(ModelServerSettings(str(four_layers), drafter="layer-skip", skip_layers="1",
                                        skip_layers_save=str(tmp_path / "x.json")))
    assert parse_skip_layers(" 3, 1 ") == [1, 3] and drafter_names("ngram,layer-skip") == ["ngram", "layer-skip"]


def test_serve_draft_refuses_bad_skip_layers_and_the_flags_without_layer_skip(tiny):
    from tests.test_cli import specdec

    bad = specdec("serve", "draft", "--model", str(tiny.target), "--drafter", "layer-skip", "--skip-layers", "0,1",
                  "--port", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "draft service refused to start: --skip-layers skips all 2 layers; keep at least one" in bad.stderr
    elsewhere = specdec("serve", "draft", "--model", str(tiny.target), "--skip-layers", "1", "--port", "0")
    assert elsewhere.returncode == 2
    assert "--skip-layers, --skip-search-prompts and --skip-layers-save are for --drafter layer-skip" in elsewhere.stderr


# -- over gRPC --------------------------------------------------------------------------------------------------
def start_layer_skip_stack(target, **layer_skip) -> Stack:
    """Verify (the target), a layer-skip draft service on the same checkpoint, and an orchestrator."""
    verify = verify_server.start(ModelServerSettings(str(target), host="localhost"))
    draft = draft_server.start(ModelServerSettings(str(target), host="localhost", drafter="layer-skip", **layer_skip))
    orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{verify.port}", draft=f"localhost:{draft.port}", host="localhost"))
    return Stack(verify, draft, orchestrator)


@pytest.fixture(scope="module")
def layer_skip_stacks(tiny):
    """The tiny 2-layer target drafting with layer 1 skipped, or with the set the search chooses (on the default
    held-out prompts, models/prompts.jsonl)."""
    started: dict[str, Stack] = {}

    def get(kind: str) -> Stack:
        if kind not in started:
            started[kind] = start_layer_skip_stack(tiny.target, skip_layers={"skip-1": "1", "auto": "auto"}[kind])
        return started[kind]

    yield get
    for stack in started.values():
        stack.stop()


@pytest.mark.parametrize("gamma", [1, 4, 8])
@pytest.mark.parametrize("kind", ["skip-1", "auto"])
def test_greedy_output_equals_the_target_alone(layer_skip_stacks, reference, kind, gamma):  # noqa: F811
    drafted = accepted = 0
    with layer_skip_stacks(kind).client() as client:
        for prompt in PROMPTS[:20]:
            result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=gamma)
            assert result.token_ids == reference(prompt), f"prompt {prompt!r}, {kind}, gamma {gamma}"
            drafted += result.stats["drafted_tokens"]
            accepted += result.stats["accepted_tokens"]
    assert 0 < accepted < drafted  # the skipped model agrees with the target often, not always: both branches ran


def test_sampled_first_token_is_distributed_as_the_target_alone(layer_skip_stacks, target_model):
    prompt = [40, 41, 7, 99, 120, 6]
    with torch.inference_mode():
        target_probs = logits_to_probs(target_model(torch.tensor([prompt])).logits[:, -1], Sampling(1.0))[0]
    draws = 300
    counts, accepted = _first_token_counts(layer_skip_stacks("skip-1"), prompt, draws)
    assert 0 < accepted < draws, accepted  # acceptance and the residual both happened
    assert counts[target_probs == 0].sum() == 0
    assert chi_square_p(counts, target_probs) > 1e-3


def test_the_service_says_what_it_is_and_pairs_with_the_target(layer_skip_stacks):
    stack = layer_skip_stacks("skip-1")
    request = common_pb2.GetModelInfoRequest()
    with grpc.insecure_channel(f"localhost:{stack.verify.port}") as channel:
        target = verify_pb2_grpc.VerifyServiceStub(channel).GetModelInfo(request, timeout=10)
    with grpc.insecure_channel(f"localhost:{stack.draft.port}") as channel:
        stub = draft_pb2_grpc.DraftServiceStub(channel)
        info = stub.GetModelInfo(request, timeout=10)
        reply = stub.Propose(draft_pb2.ProposeRequest(session_id="s", append_tokens=TOKENS, num_draft_tokens=3),
                             timeout=10)
    assert info.drafter == "layer-skip(skip=1 of 2)" and reply.drafter == "layer-skip" and len(reply.token_ids) == 3
    assert (info.model, info.vocab_size, info.tokenizer_fingerprint) == (target.model, target.vocab_size,
                                                                         target.tokenizer_fingerprint)
    # every session's cache: one layer's keys and values of the two
    caches = [session.cache for session in stack.draft.servicer.store._sessions.values()]
    assert caches and all(len(cache.keys) == len(cache.values) == 1 for cache in caches)
