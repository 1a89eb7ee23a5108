"""Red team of the GPU path on the CPU: the static runtime (KV pool, slots, buckets, fused weights, the graph
path through a stand-in), the race sampler and the device-side draft loop, attacked directly and through the
real gRPC services."""

from __future__ import annotations

import copy
import gc
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from draft_service.drafters.base import ProposeJob
from draft_service.drafters.model import propose_batch
from service_common.session_fingerprint import fingerprint
from serving.runtimes.hf import ModelRunner
from serving.runtimes.static import StaticRuntime
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from speculation.sampling import Sampling, coupled_sample, logits_to_probs, race, race_key, sample
from tests.test_rejection_sampler import chi_square_p
from tests.test_static_runtime import stand_in_graphs
from tests.tiny_models import real_config, real_model


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


def greedy_loop(runtime, prompt, steps):
    """Greedy decode through the runtime: a prefill, then decode_step with device tokens."""
    cache = runtime.new_cache()
    logits = runtime.extend(cache, prompt, 1)
    out = []
    for _ in range(steps):
        token = logits.argmax(-1)
        out.append(int(token[0]))
        logits = runtime.decode_step([cache], token)
    return out


# -- fused weights: two runtimes over one model -----------------------------------------------------------------

def test_a_second_runtime_over_one_model_shares_the_first_ones_fusion():
    """fuse_in_place's promise: a second runtime finds the fusion done and shares it (no second copy of the
    q/k/v and gate/up weights, which on a GPU are most of a model's memory)."""
    model = real_model(real_config("qwen2.5"), seed=3)
    first, second = StaticRuntime(model, slots=2), StaticRuntime(model, slots=2)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    # The model's parameters are views of the SECOND runtime's fused tensor; is the first one's still the model's?
    assert attn.k_proj.weight.untyped_storage().data_ptr() == second.layers[1].qkv.untyped_storage().data_ptr()
    first_qkv, second_qkv = first.layers[1].qkv.data_ptr(), second.layers[1].qkv.data_ptr()
    assert first_qkv == second_qkv, "q/k/v fused twice: the first runtime holds a second copy of the weights"
    first_gate_up, model_gate = first.layers[1].gate_up.data_ptr(), mlp.gate_proj.weight.data_ptr()
    assert first_gate_up == model_gate, "gate/up fused twice"


def test_hf_generate_on_a_model_two_runtimes_fused_stays_exact_and_both_runtimes_compute_it():
    model = real_model(real_config("qwen2.5"), seed=3)  # q/k/v biases: the bias is fused too
    untouched = copy.deepcopy(model)
    prompt = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.inference_mode():
        expected = untouched.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
    first, second = StaticRuntime(model, slots=2), StaticRuntime(model, slots=2)
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.bias.untyped_storage().data_ptr() == second.layers[1].qkv_bias.untyped_storage().data_ptr()
    with torch.inference_mode():
        assert torch.equal(model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0), expected)
    for name, p in untouched.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    tokens = expected[0, prompt.shape[1]:].tolist()
    assert greedy_loop(first, prompt[0].tolist(), 20) == tokens
    assert greedy_loop(stand_in_graphs(second), prompt[0].tolist(), 20) == tokens


def test_a_runtime_built_after_the_models_weights_were_replaced_computes_the_new_weights():
    """load_state_dict(assign=True) (or model.to(...) of another dtype/device) gives the model new parameter
    tensors; a runtime built afterwards must compute THOSE weights, not the fused copy of the old ones."""
    model = real_model(real_config("llama-2"), seed=1)
    StaticRuntime(model, slots=1)
    new_weights = real_model(real_config("llama-2"), seed=2).state_dict()
    model.load_state_dict(new_weights, assign=True)
    runtime = StaticRuntime(model, slots=1)
    reference = ModelRunner(model, torch.device("cpu"))
    prompt = [5, 17, 42, 9, 100, 3, 7, 7]
    close(runtime.extend(runtime.new_cache(), prompt, len(prompt)),
          reference.extend(reference.new_cache(), prompt, len(prompt)))


# -- sliding windows, RoPE types, through decode graphs (stand-in) ----------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2-window", "mistral-7b-v0.1", "llama-3.1", "qwen3"])
def test_the_graph_path_over_windows_and_rope_types_equals_hf_with_rollbacks_past_the_window(arch):
    model = real_model(real_config(arch), seed=4)
    runtime = stand_in_graphs(StaticRuntime(model, slots=4, length_step=16))
    reference = ModelRunner(model, torch.device("cpu"))
    prompts = [list(range(3, 21)), [7, 8], list(range(50, 80))]
    caches, solo = [runtime.new_cache() for _ in prompts], [reference.new_cache() for _ in prompts]
    ours = runtime.extend_batch(caches, prompts, [2, 1, 3])
    theirs = [reference.extend(c, p, k) for c, p, k in zip(solo, prompts, [2, 1, 3])]
    for step in range(12):  # 32 crosses a bucket; windows of 8 bind long before
        tokens = [11 + step, 60 + step, 200 + step]
        ours.append(runtime.decode_step(caches, torch.tensor(tokens)))
        theirs.append(torch.cat([reference.extend(c, [t], 1) for c, t in zip(solo, tokens)]))
        if step % 4 == 3:  # a rejected verify: 5 tokens in, 3 rolled back
            verify = [[1, 2, 3, 4, 5], [6], [9, 10, 11]]
            ours += runtime.extend_batch(caches, verify, [5, 1, 3])
            theirs += [reference.extend(c, v, len(v)) for c, v in zip(solo, verify)]
            for group in (caches, solo):
                for cache in group:
                    cache.crop(cache.length - 3 if cache.length > 40 else cache.length - 1)
    close(torch.cat(ours), torch.cat(theirs))
    assert [c.length for c in caches] == [c.length for c in solo]
    stats = runtime.stats()
    assert stats["graph_replays"] == 12 and stats["extend_graph_replays"] == 3


# -- the race sampler --------------------------------------------------------------------------------------------

def test_the_race_draws_exactly_its_row_and_never_a_zero_probability_id():
    probs = torch.tensor([0.3, 0.0, 0.05, 0.25, 0.0, 0.15, 0.25, 1e-3])
    unnormalised = probs * 7.5  # a residual is not normalised
    n = 20000
    keys = [race_key(seed, 0, 0) for seed in range(n)]
    for row in (probs, unnormalised):
        drawn = race(row.expand(n, -1), keys)
        counts = torch.bincount(drawn, minlength=8).float()
        assert counts[probs == 0].sum() == 0
        assert chi_square_p(counts, probs) > 1e-3
    # A row's noise does not depend on its width: a draw over a prefix of the ids equals the one over the whole
    # row when the prefix holds all the mass (the draft's vocab_limit).
    padded = torch.cat([probs, torch.zeros(50)])
    assert torch.equal(race(padded.expand(200, -1), keys[:200]), race(probs.expand(200, -1), keys[:200]))


def test_coupled_draws_are_each_exact_and_equal_for_equal_rows():
    target = torch.tensor([0.5, 0.2, 0.0, 0.3])
    draft = torch.tensor([0.1, 0.6, 0.3, 0.0])
    n = 6000
    pairs = [(coupled_sample(target, s), coupled_sample(draft, s)) for s in range(n)]
    t = torch.bincount(torch.tensor([p[0] for p in pairs]), minlength=4).float()
    d = torch.bincount(torch.tensor([p[1] for p in pairs]), minlength=4).float()
    assert chi_square_p(t, target) > 1e-3 and chi_square_p(d, draft) > 1e-3
    assert t[2] == 0 and d[3] == 0
    assert all(coupled_sample(target, s) == coupled_sample(target.clone() * 3, s) for s in range(200))
    # sample() refuses rows it cannot draw from
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 4), torch.Generator().manual_seed(0))


# -- the device-side draft loop ---------------------------------------------------------------------------------

def test_a_batched_proposal_draws_what_each_job_draws_alone_and_its_guess_is_the_coupled_draw():
    """Mixed jobs in one batch (greedy, sampled, top-k, a narrower vocab_limit, gamma 0, different gammas) on the
    static runtime with the graph path: each job's tokens and draft_probs equal a solo run's (the race is keyed by
    the job's seed), and the first token is what the orchestrator's coupled_sample draws from the row with it."""
    model = real_model(real_config("llama-2"), seed=5)

    def jobs_for(runtime, which):
        specs = [
            (list(range(3, 15)), 3, Sampling(), 0, 0),
            ([9, 8, 7], 5, Sampling(1.0), 0, 1234),
            (list(range(40, 71)), 2, Sampling(0.8, top_k=5), 0, 99),
            ([4, 4, 4, 4], 4, Sampling(1.0), 150, 7),  # vocab_limit
            ([1, 2], 0, Sampling(1.0), 0, 5),
            (list(range(100, 120)), 6, Sampling(1.2, top_p=0.7), 0, 1 << 60),
        ]
        return [ProposeJob(runtime.new_cache(), append, gamma, sampling, 0.0, limit, seed)
                for i, (append, gamma, sampling, limit, seed) in enumerate(specs) if i in which]

    batched_rt = stand_in_graphs(StaticRuntime(model, slots=8, length_step=16))
    everything = range(6)
    batched = propose_batch(batched_rt, jobs_for(batched_rt, everything))
    for i in everything:
        solo_rt = StaticRuntime(model, slots=2, length_step=16)
        alone = propose_batch(solo_rt, jobs_for(solo_rt, [i]))[0]
        assert batched[i].token_ids == alone.token_ids, i
        if alone.draft_probs is None:
            assert batched[i].draft_probs is None
            continue
        close(batched[i].draft_probs, alone.draft_probs)
        probs = batched[i].draft_probs
        assert (probs[torch.arange(len(alone.token_ids)), torch.tensor(alone.token_ids)] > 0).all()
        seed = jobs_for(solo_rt, [i])[0].seed
        assert coupled_sample(probs[0], seed) == batched[i].token_ids[0]
    assert [len(p.token_ids) for p in batched] == [3, 5, 2, 4, 0, 6]
    assert max(batched[3].token_ids) < 150 and batched[3].draft_probs.shape[1] == 150


# -- through the services ----------------------------------------------------------------------------------------

SLOT = 48
DRAFT_SLOT = 32


def _prompt_ids(tokenizer, n):
    from tests.conftest import PROMPTS

    ids = [t for p in PROMPTS for t in tokenizer(p)["input_ids"]]
    return (ids * (n // len(ids) + 1))[:n]


def _expected(model, ids, max_new):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def pool_stack(tiny):
    """A verify service on the static runtime with 48-token slots and a pool of 5 slots (max_sessions 3), a
    draft on the static runtime with smaller, 32-token slots."""
    from tests.conftest import start_stack

    stack = start_stack(tiny.target, tiny.noisy_draft,
                        verify_settings={"runtime": "static", "slot_tokens": SLOT, "max_sessions": 3},
                        draft_settings={"runtime": "static", "slot_tokens": DRAFT_SLOT, "session_memory_mb": 64})
    yield stack
    stack.stop()


def _verify_stub(stack):
    return verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{stack.verify.port}"))


def _slots_back(runtime, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if runtime.stats()["free_slots"] == runtime.session_slots:
            return True
        time.sleep(0.05)
    return False


def test_a_generation_to_exactly_the_slot_is_exact_and_one_past_it_is_out_of_range(pool_stack, target_model,
                                                                                 tokenizer):
    """The draft's slots (32) are shorter than the target's (48): past 32 the draft refuses (OUT_OF_RANGE) and
    the generation goes on target-only, exactly."""
    from specdec_client.errors import OutOfRange as ClientOutOfRange

    runner = pool_stack.verify.servicer.runner
    assert runner.name == "static" and runner.slot_tokens == SLOT
    with pool_stack.client() as client:
        assert client.info().max_context == SLOT
        for length, gamma in ((20, 4), (5, 3), (47, 2)):
            ids = _prompt_ids(tokenizer, length)
            result = client.generate(ids, max_new_tokens=SLOT - length, num_draft_tokens=gamma)
            assert result.token_ids == _expected(target_model, ids, SLOT - length), (length, gamma)
            with pytest.raises(ClientOutOfRange, match=f"context of {SLOT}"):
                client.generate(ids, max_new_tokens=SLOT - length + 1, num_draft_tokens=gamma)


def test_raw_verify_at_the_slot_edge_refuses_clearly_and_the_session_survives(pool_stack, target_model, tokenizer):
    stub = _verify_stub(pool_stack)
    ids = _prompt_ids(tokenizer, SLOT)
    full = stub.Verify(verify_pb2.VerifyRequest(session_id="edge", append_tokens=ids), timeout=30)
    over = verify_pb2.VerifyRequest(session_id="edge", prefix_len=SLOT, prefix_fingerprint=fingerprint(ids),
                                    append_tokens=[5])
    with pytest.raises(grpc.RpcError) as refused:
        stub.Verify(over, timeout=30)
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE and str(SLOT) in refused.value.details()
    with pytest.raises(grpc.RpcError) as too_long:
        stub.Verify(verify_pb2.VerifyRequest(session_id="edge2", append_tokens=ids + [5]), timeout=30)
    assert too_long.value.code() == grpc.StatusCode.OUT_OF_RANGE
    # The refused session still holds its 48 tokens: roll back to 40 and re-feed 8 others.
    other = [7, 8, 9, 10, 11, 12, 13, 14]
    again = stub.Verify(verify_pb2.VerifyRequest(session_id="edge", prefix_len=40,
                                                 prefix_fingerprint=fingerprint(ids[:40]), append_tokens=other),
                        timeout=30)
    assert again.cached_len == SLOT
    # ... and rolling back to 0 re-prefills anew: the same answer as the first time.
    restart = stub.Verify(verify_pb2.VerifyRequest(session_id="edge", append_tokens=ids), timeout=30)
    assert list(restart.argmax_token_ids) == list(full.argmax_token_ids)
    with torch.inference_mode():
        logits = target_model(torch.tensor([ids[:40] + other])).logits[0]
    assert list(again.argmax_token_ids)[-1] == int(logits[-1].argmax())
    for sid in ("edge", "edge2"):
        stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=sid), timeout=5)


def test_raw_propose_past_the_drafts_slot_is_out_of_range_not_a_crash(pool_stack, tokenizer):
    stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{pool_stack.draft.port}"))
    ids = _prompt_ids(tokenizer, DRAFT_SLOT - 2)
    sampling = common_pb2.SamplingParams(temperature=1.0)
    ok = stub.Propose(draft_pb2.ProposeRequest(session_id="d", append_tokens=ids, num_draft_tokens=3,
                                               sampling=sampling, seed=3), timeout=30)
    assert len(ok.token_ids) == 3
    with pytest.raises(grpc.RpcError) as refused:
        stub.Propose(draft_pb2.ProposeRequest(session_id="d2", append_tokens=ids, num_draft_tokens=4,
                                              sampling=sampling, seed=3), timeout=30)
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE, refused.value.details()
    stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id="d"), timeout=5)


def test_many_concurrent_generations_on_a_small_pool_are_exact_or_refused_clearly(
        pool_stack, target_model, tokenizer):
    """Nine generations of different lengths at once against a verify store of 3 sessions (5 slots): sessions
    are evicted between rounds (the orchestrator re-prefills) or a call is refused RESOURCE_EXHAUSTED with an
    actionable message; every generation that finishes equals generate, and the service stays whole."""
    from specdec_client.errors import ResourceExhausted as ClientExhausted

    jobs = [(_prompt_ids(tokenizer, 4 + 3 * i), 10 + (i * 5) % 17, 1 + i % 4) for i in range(9)]
    expected = [_expected(target_model, ids, n) for ids, n, _ in jobs]

    def run(job):
        ids, n, gamma = job
        try:
            with pool_stack.client() as client:
                return client.generate(ids, max_new_tokens=n, num_draft_tokens=gamma)
        except ClientExhausted as error:
            return error

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(run, jobs))
    refused = [r for r in results if isinstance(r, Exception)]
    for error in refused:
        assert "retry" in error.details and ("--session-memory-mb" in error.details or "--max-sessions" in error.details
                                             or "--slot-tokens" in error.details), error.details
    done = [(r, e) for r, e in zip(results, expected) if not isinstance(r, Exception)]
    assert len(done) >= 5, [str(r) for r in refused]
    for result, want in done:
        assert result.token_ids == want
    assert pool_stack.verify.servicer.store.stats().live_sessions == 0
    ids = _prompt_ids(tokenizer, 9)
    with pool_stack.client() as client:  # the service is still whole
        assert client.generate(ids, max_new_tokens=12, num_draft_tokens=2).token_ids == _expected(target_model, ids, 12)


def test_a_released_sessions_slot_comes_back_after_a_pass_on_the_worker_thread(pool_stack, tokenizer):
    """On a GPU every forward runs on the worker's thread (inline only on a CPU). After a pass there, the
    session is released (or evicted, or expires): its cache is dead and its slot must return to the pool."""
    servicer = pool_stack.verify.servicer
    runtime, worker = servicer.runner, servicer.worker
    stub = _verify_stub(pool_stack)
    saved = worker.inline
    worker.inline = False  # the GPU's path: the pass runs on the worker thread
    try:
        stub.Verify(verify_pb2.VerifyRequest(session_id="linger", append_tokens=_prompt_ids(tokenizer, 10)),
                    timeout=30)
        gc.collect()
        assert runtime.stats()["free_slots"] == runtime.session_slots - 1  # the pass let go of older batches
        assert stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id="linger"), timeout=5).released
        assert servicer.store.stats().live_sessions == 0
        assert _slots_back(runtime, timeout=1.0), (
            f"{runtime.session_slots - runtime.stats()['free_slots']} slot(s) still held with no session live")
    finally:
        worker.inline = saved


def test_sessions_expiring_every_round_cost_reprefills_not_tokens(pool_stack, target_model, tokenizer):
    """TTL 0: every idle session expires before the next call, so each round finds its session gone (evicted
    mid-generation) and the orchestrator re-prefills; the output is still generate's, and the slots come back."""
    stores = [pool_stack.verify.servicer.store, pool_stack.draft.servicer.store]
    saved = [s.ttl_s for s in stores]
    try:
        for s in stores:
            s.ttl_s = 0.0
        ids = _prompt_ids(tokenizer, 12)
        with pool_stack.client() as client:
            result = client.generate(ids, max_new_tokens=30, num_draft_tokens=3)
        assert result.token_ids == _expected(target_model, ids, 30)
        assert result.stats["reprefills"] > 0
    finally:
        for s, ttl in zip(stores, saved):
            s.ttl_s = ttl
    assert all(s.stats().live_sessions == 0 for s in stores)


# -- length buckets through the services, on the graph path (stand-in) -------------------------------------------

LONG_CONTEXT = 600


def _longer_context_copy(src, dst):
    """The same weights with a 600-token context (default RoPE does not depend on it): slots past 256, the
    static runtime's first length bucket."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _inner_runtime(servicer):
    runner = servicer.runner
    return getattr(runner, "runner", runner)


@pytest.fixture(scope="module")
def long_stack(tiny, tmp_path_factory):
    from tests.conftest import start_stack

    root = tmp_path_factory.mktemp("long")
    target = _longer_context_copy(tiny.target, root / "target")
    draft = _longer_context_copy(tiny.noisy_draft, root / "draft")
    stack = start_stack(target, draft,
                        verify_settings={"runtime": "static", "slot_tokens": LONG_CONTEXT, "max_sessions": 8,
                                         "max_wait_ms": 5.0},
                        draft_settings={"runtime": "static", "slot_tokens": LONG_CONTEXT, "max_sessions": 8,
                                        "max_wait_ms": 5.0})
    for server in (stack.verify, stack.draft):
        stand_in_graphs(_inner_runtime(server.servicer))
    yield stack
    stack.stop()


def test_concurrent_generations_crossing_a_length_bucket_on_the_graph_path_equal_generate(long_stack, target_model,
                                                                                         tokenizer):
    """Sessions of 250, 240, 120 and 6 prompt tokens generate together (ragged verify passes batched across
    sessions, rollbacks after rejections) while the longer ones cross the 256-token bucket into the 512 one."""
    jobs = [(_prompt_ids(tokenizer, 250) , 24, 4), (_prompt_ids(tokenizer, 240)[::-1], 30, 3),
            (_prompt_ids(tokenizer, 120), 20, 5), (_prompt_ids(tokenizer, 6), 28, 2)]
    assert all(len(ids) == n for (ids, _, _), n in zip(jobs, (250, 240, 120, 6)))
    expected = [_expected(target_model, ids, n) for ids, n, _ in jobs]

    def run(job):
        ids, n, gamma = job
        with long_stack.client() as client:
            return client.generate(ids, max_new_tokens=n, num_draft_tokens=gamma)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, jobs))
    for result, want, job in zip(results, expected, jobs):
        assert result.token_ids == want, len(job[0])
    assert sum(r.stats["drafted_tokens"] for r in results) > sum(r.stats["accepted_tokens"] for r in results) > 0
    stats = _inner_runtime(long_stack.verify.servicer).stats()
    lengths = {shape[2] for shape in stats["extend_graph_shapes"]}
    assert stats["extend_graph_replays"] > 0 and {256, 512} <= lengths, stats["extend_graph_shapes"]
    draft_stats = _inner_runtime(long_stack.draft.servicer).stats()
    assert draft_stats["graph_replays"] > 0 and {b for b, _ in draft_stats["graph_shapes"]} - {1}, draft_stats


# -- sampled output through the services on the static runtime ----------------------------------------------------

PROMPT = "def main():\n"


def _probs_after(model, ids, sampling):
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[:, -1]
    return logits_to_probs(logits, sampling)[0]


def test_sampled_first_and_coupled_bonus_tokens_have_the_targets_distribution(pool_stack, target_model, tokenizer):
    """gamma 1, three tokens: the first token (accepted draft or residual) must follow the target's row; the
    second, when the draft token was accepted, is the bonus drawn coupled with the draft's guess (the same
    seed), and must follow the target's row after the first token."""
    sampling = Sampling(0.3)
    ids = tokenizer(PROMPT)["input_ids"]
    first_probs = _probs_after(target_model, ids, sampling)
    first, pairs = torch.zeros_like(first_probs), []
    draws, accepted = 500, 0
    with pool_stack.client() as client:
        for seed in range(draws):
            result = client.generate(ids, max_new_tokens=3, num_draft_tokens=1, seed=seed, temperature=0.3)
            first[result.token_ids[0]] += 1
            pairs.append(result.token_ids[:2])
            accepted += result.stats["accepted_tokens"]
    assert 0 < accepted < 2 * draws
    assert first[first_probs == 0].sum() == 0 and chi_square_p(first, first_probs) > 1e-3
    # The second token, per first token: one chi-square over every first token drawn often enough.
    from scipy.stats import chi2

    groups: dict[int, torch.Tensor] = {}
    for pair in pairs:
        if len(pair) == 2:
            groups.setdefault(pair[0], torch.zeros_like(first_probs))[pair[1]] += 1
    statistic, dof, used = 0.0, 0, 0
    for a, counts in groups.items():
        n = counts.sum()
        if n < 15:
            continue
        expected = _probs_after(target_model, ids + [a], sampling) * n
        assert counts[expected == 0].sum() == 0
        keep = expected >= 5
        obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
        exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
        statistic += float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
        dof += len(obs) - 1
        used += int(n)
    assert used >= 150, (used, sorted(((int(c.sum()), a) for a, c in groups.items()), reverse=True)[:5], first.topk(5), first_probs.topk(5), sum(len(p) for p in pairs))
    assert dof >= 5 and chi2.sf(statistic, dof) > 1e-3, (statistic, dof)


@pytest.mark.parametrize("sampling", [Sampling(0.8, top_k=6), Sampling(1.0, top_p=0.7)], ids=str)
def test_top_k_and_top_p_first_tokens_have_the_targets_distribution_and_never_a_cut_id(pool_stack, target_model,
                                                                                      tokenizer, sampling):
    ids = tokenizer(PROMPT)["input_ids"]
    probs = _probs_after(target_model, ids, sampling)
    counts = torch.zeros_like(probs)
    with pool_stack.client() as client:
        for seed in range(300):
            result = client.generate(ids, max_new_tokens=2, num_draft_tokens=1, seed=10_000 + seed,
                                     temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            counts[result.token_ids[0]] += 1
    assert counts[probs == 0].sum() == 0
    assert chi_square_p(counts, probs) > 1e-3


def test_a_seed_reproduces_a_whole_sampled_generation_on_the_static_runtime(pool_stack, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    with pool_stack.client() as client:
        runs = [client.generate(ids, max_new_tokens=40, temperature=1.0, top_k=20, seed=s, num_draft_tokens=3)
                for s in (5, 5, 6, 5 + (1 << 40))]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 40
    assert runs[0].token_ids != runs[2].token_ids and runs[0].token_ids != runs[3].token_ids
    assert runs[0].stats["drafted_tokens"] > 0
