"""The static runtime (serving/runtimes/static.py) on the CPU: its KV pool (slots, reuse, exhaustion, eviction,
rollback), ragged batches across length buckets, the context clamp, and greedy exactness through the services.
(The conformance test in test_runtimes.py runs it too: it is in RUNTIMES.) Its CUDA graphs need a GPU."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service_common.errors import OUT_OF_MEMORY, OutOfRange, ResourceExhausted, out_of_memory
from serving.model_server import ModelServerSettings, fit_to_pool, runtime_options_from, sessions_for_slots
from serving.runtimes import RuntimeOptions, make_runtime
from serving.runtimes.hf import ModelRunner
from serving.runtimes.static import StaticRuntime, length_bucket
from serving.sessions import SessionStore
from tests.test_runtimes import tiny_llama


def llama(context=128, kv_heads=2, bias=True):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=context,
                         attention_bias=bias)
    return LlamaForCausalLM(config).eval()


def stand_in_graphs(runtime: StaticRuntime) -> StaticRuntime:
    """No GPU: the runtime's graphs become stand-ins whose replay reruns the captured function on the same static
    buffers, so everything around a graph (static inputs, padding, reading the rows back) runs for real."""

    def stand_in(run):
        out = run()

        class Replay:
            def replay(self):
                out.copy_(run())

        return Replay(), out

    runtime._capture_graph_locked = stand_in  # the lock and the output accounting around it run for real
    runtime.use_graphs = True
    return runtime


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


def test_a_released_or_dropped_cache_gives_its_slot_back_and_a_full_pool_refuses_clearly():
    runtime = StaticRuntime(tiny_llama(), slots=2)
    first, second = runtime.new_cache(), runtime.new_cache()
    assert {first.slot, second.slot} == {1, 2} and runtime.stats()["free_slots"] == 0
    with pytest.raises(ResourceExhausted, match="KV pool is full: all 2 session slots of 128 tokens"):
        runtime.new_cache()
    runtime.extend(first, list(range(10, 30)), 1)
    slot = first.slot
    del first  # the session store just drops caches
    gc.collect()
    third = runtime.new_cache()
    assert third.slot == slot and third.length == 0
    # A reused slot still holds the old session's keys: a new session must not see them.
    fresh = StaticRuntime(tiny_llama(), slots=1)
    expected = fresh.extend(fresh.new_cache(), [5, 6, 7], 3)
    close(runtime.extend(third, [5, 6, 7], 3), expected)
    second.release()
    assert runtime.new_cache().slot == 2
    with pytest.raises(RuntimeError, match="released"):
        runtime.extend(second, [1], 1)


def test_nbytes_is_the_whole_slot_whatever_the_length():
    runtime = StaticRuntime(tiny_llama(), slots=3)
    cache = runtime.new_cache()
    # 2 layers x K,V x 128 tokens x 4 kv heads x 16 dims x 4 bytes
    assert cache.nbytes() == runtime.slot_bytes == 2 * 2 * 128 * 4 * 16 * 4
    runtime.extend(cache, [1, 2, 3], 1)
    assert cache.nbytes() == runtime.slot_bytes
    assert runtime.pool_bytes == 4 * runtime.slot_bytes  # three sessions and the scratch slot


def test_the_cpu_pool_is_sized_by_session_memory_and_bounded_by_max_sessions():
    model = tiny_llama()
    slot_mb = StaticRuntime(model, slots=1).slot_bytes / (1 << 20)
    assert StaticRuntime(model, pool_mb=slot_mb * 6).session_slots == 5  # one slot is the scratch slot
    assert StaticRuntime(model, pool_mb=4096, max_sessions=8).session_slots == 8 + 2 + 1
    with pytest.raises(ValueError, match="no room for one session"):
        StaticRuntime(model, pool_mb=slot_mb)


def test_evicting_a_session_frees_its_slot():
    """The store is bounded below the pool (fit_to_pool): it evicts its least recently used idle session before
    the pool runs out, and the evicted cache's slot comes back."""
    runtime = StaticRuntime(tiny_llama(), slots=6)
    store = SessionStore(runtime.new_cache, max_bytes=1 << 30, max_sessions=sessions_for_slots(6))
    assert store.max_sessions == 4
    for i in range(12):
        with store.use(f"s{i}", 0) as session:
            runtime.extend(session.cache, [1 + i, 2, 3], 1)
            session.record([1 + i, 2, 3])
    assert store.stats().live_sessions == 4 and store.stats().evictions == 8
    gc.collect()
    assert runtime.stats()["free_slots"] == 2
    # Restarting a held session (prefix 0) makes its new cache before dropping the old: one spare slot does.
    for i in range(8, 12):
        with store.use(f"s{i}", 0) as session:
            runtime.extend(session.cache, [9], 1)
            session.record([9])
    # A store bounded past the pool: the pool's refusal is what the caller gets (RESOURCE_EXHAUSTED).
    loose = SessionStore(runtime.new_cache, max_bytes=1 << 30, max_sessions=100)
    with pytest.raises(ResourceExhausted, match="KV pool is full"):
        for i in range(10):
            with loose.use(f"t{i}", 0):
                pass


def test_rollback_then_append_equals_a_run_that_never_had_the_rolled_back_tokens():
    model = llama()
    runtime = StaticRuntime(model, slots=2)
    cache = runtime.new_cache()
    runtime.extend(cache, list(range(10, 40)), 1)
    runtime.decode_step([cache], torch.tensor([7]))
    cache.crop(12)
    assert cache.length == 12
    ours = runtime.extend(cache, [50, 51, 52], 3)
    reference = ModelRunner(model, torch.device("cpu"))
    expected = reference.extend(reference.new_cache(), list(range(10, 22)) + [50, 51, 52], 3)
    close(ours, expected)
    assert cache.length == 15


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_ragged_batches_across_length_buckets_equal_solo_runs(kv_heads):
    """Sessions at lengths on both sides of several length buckets (16 tokens here), prefilling, verifying and
    decoding together, give what each gives alone (to the float rounding of a batched product)."""
    model = llama(context=160, kv_heads=kv_heads)
    runtime = StaticRuntime(model, slots=8, length_step=16)
    assert [length_bucket(n, 16) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 128, 128]
    # 11, 30, 60, 1 tokens: the longest crosses from the 64 bucket into the 128 one at the last step
    prompts = [list(range(1, 12)), list(range(20, 50)), list(range(60, 120)), [3]]
    batch = [runtime.new_cache() for _ in prompts]
    out = runtime.extend_batch(batch, prompts, [2, 1, 3, 1])
    out.append(runtime.decode_step(batch, torch.tensor([4, 5, 6, 7])))  # lengths 12, 31, 61, 2
    out += runtime.extend_batch(batch, [[8, 9, 10, 11, 12], [13], [14, 15], [16, 17, 18, 19]], [5, 1, 2, 4])
    for cache in batch[:2]:
        cache.crop(cache.length - 2)
    out += runtime.extend_batch(batch, [[21, 22], [23], [24], [25]], [2, 1, 1, 1])
    out.append(runtime.decode_step(batch, torch.tensor([31, 32, 33, 34])))

    reference = ModelRunner(model, torch.device("cpu"))
    solo = [reference.new_cache() for _ in prompts]
    expected = [reference.extend(c, p, k) for c, p, k in zip(solo, prompts, [2, 1, 3, 1])]
    expected.append(torch.cat([reference.extend(c, [t], 1) for c, t in zip(solo, [4, 5, 6, 7])]))
    expected += [reference.extend(c, t, k) for c, t, k in
                 zip(solo, [[8, 9, 10, 11, 12], [13], [14, 15], [16, 17, 18, 19]], [5, 1, 2, 4])]
    for cache in solo[:2]:
        cache.crop(cache.length - 2)
    expected += [reference.extend(c, t, 1 if len(t) == 1 else 2) for c, t in zip(solo, [[21, 22], [23], [24], [25]])]
    expected.append(torch.cat([reference.extend(c, [t], 1) for c, t in zip(solo, [31, 32, 33, 34])]))
    close(torch.cat(out), torch.cat(expected))
    assert [c.length for c in batch] == [c.length for c in solo] == [18, 32, 65, 8]


def test_sliding_window_models_are_masked_as_hf_masks_them():
    """A Mistral with a window shorter than the sessions: the window's mask applies per layer as HF's does."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, sliding_window=8)).eval()
    runtime = StaticRuntime(model, slots=2, length_step=16)
    reference = ModelRunner(model, torch.device("cpu"))
    caches, solo = [runtime.new_cache() for _ in range(2)], [reference.new_cache() for _ in range(2)]
    out = runtime.extend_batch(caches, [list(range(10, 30)), [3, 4]], [3, 2])
    out.append(runtime.decode_step(caches, torch.tensor([5, 6])))
    expected = [reference.extend(solo[0], list(range(10, 30)), 3), reference.extend(solo[1], [3, 4], 2),
                torch.cat([reference.extend(c, [t], 1) for c, t in zip(solo, [5, 6])])]
    close(torch.cat(out), torch.cat(expected))


def test_a_session_cannot_pass_its_slot_and_the_service_context_is_clamped_to_it():
    runtime = StaticRuntime(llama(context=128), slot_tokens=40, slots=2)
    assert runtime.slot_tokens == runtime.max_context == 40
    cache = runtime.new_cache()
    runtime.extend(cache, list(range(1, 39)), 1)
    with pytest.raises(OutOfRange, match="past the static runtime's 40-token slots"):
        runtime.extend(cache, [1, 2, 3], 1)
    assert cache.length == 38  # refused before anything changed
    runtime.decode_step([cache], torch.tensor([1]))
    runtime.decode_step([cache], torch.tensor([1]))
    with pytest.raises(OutOfRange):
        runtime.decode_step([cache], torch.tensor([1]))
    assert StaticRuntime(llama(context=128), slot_tokens=4096, slots=1).max_context == 128
    # The service: the store's bounds from the pool, GetModelInfo's max_context from the slots.
    identity = SimpleNamespace(max_context=128)
    hosted = SimpleNamespace(runner=runtime, identity=identity)
    max_sessions, max_bytes = fit_to_pool(hosted, ModelServerSettings("m", max_sessions=1024))
    assert identity.max_context == 40 and max_sessions == 1 and max_bytes == runtime.slot_bytes
    # Other runners: the flags' bounds.
    other = SimpleNamespace(runner=ModelRunner(llama(), torch.device("cpu")), identity=SimpleNamespace(max_context=128))
    assert fit_to_pool(other, ModelServerSettings("m", max_sessions=7, session_memory_mb=1)) == (7, 1 << 20)
    assert other.identity.max_context == 128


def test_auto_picks_lean_on_the_cpu_and_options_size_the_static_pool():
    model = tiny_llama()
    assert make_runtime(model, torch.device("cpu"), "auto").name == "lean"
    runtime = make_runtime(model, torch.device("cpu"), "static", RuntimeOptions(slot_tokens=64, max_sessions=4))
    assert runtime.name == "static" and runtime.slot_tokens == 64 and runtime.session_slots == 4 + 1 + 1
    assert runtime.capabilities.batches_sessions and not runtime.capabilities.concurrent_passes
    assert not runtime.capabilities.graphs  # CUDA graphs on CUDA only
    settings = ModelServerSettings("m", runtime="static", slot_tokens=32, max_sessions=2, session_memory_mb=64)
    assert make_runtime(model, torch.device("cpu"), "static", runtime_options_from(settings)).slot_tokens == 32
    assert runtime.stats()["free_slots"] == runtime.session_slots  # check()'s slot was given back


def test_out_of_memory_is_resource_exhausted():
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError, by name
        pass

    assert out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(ValueError("out of memory"))
    assert "--gpu-memory-fraction" in OUT_OF_MEMORY


@pytest.fixture(scope="module")
def static_stack(tiny):
    from tests.conftest import start_stack

    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings={"runtime": "static", "slot_tokens": 200},
                        draft_settings={"runtime": "static", "session_memory_mb": 64})
    yield stack
    stack.stop()


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_output_through_the_services_on_the_static_runtime_equals_generate(static_stack, target_model,
                                                                                 tokenizer, gamma):
    from tests.conftest import PROMPTS

    assert static_stack.verify.servicer.runner.name == static_stack.draft.servicer.runner.name == "static"
    drafted = 0
    with static_stack.client() as client:
        assert client.info().max_context == 200
        for prompt in PROMPTS[:8]:
            inputs = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                expected = target_model.generate(**inputs, do_sample=False, max_new_tokens=24)
            result = client.generate(prompt, max_new_tokens=24, num_draft_tokens=gamma)
            assert result.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist(), prompt
            drafted += result.stats["drafted_tokens"]
    assert drafted > 0


def test_the_graph_path_pads_onto_the_scratch_slot_and_a_failed_capture_runs_eagerly(monkeypatch, caplog):
    """No GPU here: a stand-in for the CUDA graph whose replay runs the captured function on the static buffers
    checks what decode_step does around it (the static inputs, padding rows on the scratch slot, the clone
    of the output rows, one graph per shape); then a capture that fails leaves that shape eager, said once."""
    from serving.runtimes import static

    model = llama(context=160)
    graphed = StaticRuntime(model, slots=4, length_step=16)
    eager = StaticRuntime(model, slots=4, length_step=16, graphs=False)

    def capture(bucket, length):
        meta, tokens = torch.zeros(2, bucket, dtype=torch.long), torch.zeros(bucket, dtype=torch.long)
        out = torch.empty(bucket, graphed.vocab)

        class Replay:
            def replay(self):
                out.copy_(graphed._decode(tokens, meta[0], meta[1], length))

        return static._Graph(Replay(), meta, tokens, out)

    monkeypatch.setattr(graphed, "_capture", capture)
    graphed.use_graphs = True
    results = []
    for runtime in (graphed, eager):
        caches = [runtime.new_cache() for _ in range(3)]
        out = runtime.extend_batch(caches, [list(range(1, 12)), list(range(20, 33)), [3]], [1, 1, 1])
        for step in range(8):  # lengths cross from the 16 bucket into the 32 one
            out.append(runtime.decode_step(caches, torch.tensor([40 + step, 50 + step, 60 + step])))
        out.append(runtime.decode_step(caches[:1], torch.tensor([7])))
        results.append(torch.cat(out))
    close(results[0], results[1])
    stats = graphed.stats()
    assert stats["graph_replays"] == 9 and stats["graphs_captured"] == 3
    assert stats["graph_shapes"] == [(1, 32), (4, 16), (4, 32)] and eager.stats()["eager_decode_steps"] == 9

    def broken(bucket, length):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(graphed, "_capture", broken)
    cache = graphed.new_cache()
    graphed.extend(cache, list(range(1, 40)), 1)
    with caplog.at_level("WARNING", logger="serving.runtimes.static"):
        for _ in range(3):
            graphed.decode_step([cache], torch.tensor([5]))
    assert graphed.stats()["capture_failures"] == 1 and graphed.stats()["eager_decode_steps"] == 3
    assert len([r for r in caplog.records if "runs eagerly" in r.message]) == 1


def test_short_passes_replay_graphs_of_padded_shapes_and_write_only_their_own_slots():
    """No GPU here: `_capture_graph` is replaced by a stand-in whose replay reruns the captured function on the
    same static buffers, so what extend_batch does around a graph runs for real: every session padded to the
    pass's longest (a padding token's key and value go to the scratch slot), padding sessions on the scratch slot,
    the kept rows read after the replay. Logits and every session's keys and values must equal an eager runtime's
    on the same weights, through verify-sized passes of several shapes, a rollback, and a length bucket crossed."""
    model = llama(context=160)
    graphed = StaticRuntime(model, slots=6, length_step=16)
    eager = StaticRuntime(model, slots=6, length_step=16, graphs=False)

    stand_in_graphs(graphed)
    outputs, pools = [], []
    for runtime in (graphed, eager):
        caches = [runtime.new_cache() for _ in range(3)]
        out = runtime.extend_batch(caches, [list(range(1, 12)), list(range(20, 26)), [3]], [1, 2, 1])
        for step in range(6):  # verify-like passes of 5, then ragged 1..3 tokens; lengths cross 16 -> 32
            if step % 2:
                out += runtime.extend_batch(caches, [[40 + step] * 3, [50 + step], [60 + step] * 2], [3, 1, 2])
            else:
                out += runtime.extend_batch(caches, [[40 + step + j for j in range(5)]] * 3, [5, 5, 5])
            caches[step % 3].crop(caches[step % 3].length - 2)  # a rollback
        out += runtime.extend_batch(caches[:1], [[7, 8]], [2])
        outputs.append(torch.cat(out))
        pools.append([runtime.kv[:, :, c.slot, :c.length].clone() for c in caches])
    close(outputs[0], outputs[1])
    for ours, theirs in zip(*pools):
        assert torch.equal(ours, theirs)
    stats = graphed.stats()
    assert stats["extend_graph_replays"] == 8 and stats["extend_passes"] == 0 and stats["extend_capture_failures"] == 0
    assert stats["extend_graph_shapes"] == [(1, 2, 48), (4, 3, 32), (4, 5, 16), (4, 5, 32), (4, 11, 16)]
    assert eager.stats()["extend_passes"] == 8 and eager.stats()["extend_graph_replays"] == 0


def test_by_default_a_slot_is_the_models_context_up_to_8192_tokens():
    """A slot is reserved whole per session, so the default caps it: a long-context model still serves many sessions
    (its service's max_context says how far), and --slot-tokens asks for more."""
    from serving.runtimes.static import DEFAULT_SLOT_TOKENS

    long_context = StaticRuntime(llama(context=3 * DEFAULT_SLOT_TOKENS), slots=1)
    assert long_context.slot_tokens == long_context.max_context == DEFAULT_SLOT_TOKENS
    assert StaticRuntime(llama(context=128), slots=1).slot_tokens == 128
    assert StaticRuntime(llama(context=3 * DEFAULT_SLOT_TOKENS), slots=1,
                         slot_tokens=2 * DEFAULT_SLOT_TOKENS).max_context == 2 * DEFAULT_SLOT_TOKENS


def test_graph_outputs_stay_within_their_budget_and_past_it_passes_run_without_a_graph(monkeypatch):
    """Each graph keeps its output rows (float32 logits of every row of its shape) for as long as the runtime lives:
    past GRAPH_OUTPUT_BYTES together, a new shape runs eagerly instead of capturing, and gives the same logits."""
    from serving.runtimes import static

    model = llama(context=160)
    runtime = stand_in_graphs(StaticRuntime(model, slots=4, length_step=16))
    eager = StaticRuntime(model, slots=4, length_step=16, graphs=False)
    monkeypatch.setattr(static, "GRAPH_OUTPUT_BYTES", 11 * runtime.vocab * 4)  # 11 rows of logits in all
    outputs = []
    for rt in (runtime, eager):
        cache = rt.new_cache()
        out = rt.extend_batch([cache], [list(range(1, 9))], [8])  # 8 rows: captured
        out += rt.extend_batch([cache], [[3, 4, 5, 6, 7]], [5])  # 5 more would pass 11: eager
        out += rt.extend_batch([cache], [[9, 10, 11]], [3])  # 3 more fit: captured
        out.append(rt.decode_step([cache], torch.tensor([12])))  # 1 more would pass 11: eager
        outputs.append(torch.cat(out))
    close(outputs[0], outputs[1])
    stats = runtime.stats()
    assert stats["extend_graph_shapes"] == [(1, 3, 16), (1, 8, 16)] and stats["extend_passes"] == 1
    assert stats["graphs_captured"] == 0 and stats["eager_decode_steps"] == 1
    assert runtime._graph_output_bytes == 11 * runtime.vocab * 4


def test_a_new_session_never_sees_a_recycled_slots_old_values():
    """A slot given back keeps what its session wrote, overflowed values included; the next session's first pass
    zeroes it, so its masked-out positions are finite (0 * inf would be NaN) and its output is the clean run's."""
    model = llama(context=160)
    runtime = StaticRuntime(model, slots=1, length_step=16)
    first = runtime.new_cache()
    runtime.extend(first, list(range(1, 30)), 1)
    runtime.kv[:, :, first.slot] = float("inf")  # as a fp16 overflow would leave it
    slot = first.slot
    del first
    gc.collect()
    second = runtime.new_cache()
    assert second.slot == slot
    logits = runtime.extend(second, [5, 6, 7], 3)
    clean = StaticRuntime(model, slots=1, length_step=16)
    close(logits, clean.extend(clean.new_cache(), [5, 6, 7], 3))


def test_a_pass_of_one_token_a_session_replays_the_decode_steps_graph_not_a_second_one():
    """One token per session is the decode step's computation: the same graph serves both, and the logits are the
    eager runtime's."""
    model = llama(context=160)
    graphed = stand_in_graphs(StaticRuntime(model, slots=4, length_step=16))
    eager = StaticRuntime(model, slots=4, length_step=16, graphs=False)
    outputs = []
    for runtime in (graphed, eager):
        caches = [runtime.new_cache() for _ in range(2)]
        out = runtime.extend_batch(caches, [list(range(1, 6)), [7, 8]], [1, 1])
        out += runtime.extend_batch(caches, [[9], [10]], [1, 1])
        out.append(runtime.decode_step(caches, torch.tensor([11, 12])))
        outputs.append(torch.cat(out))
    close(outputs[0], outputs[1])
    stats = graphed.stats()
    assert stats["graph_shapes"] == [(2, 16)] and stats["graph_replays"] == 2
    assert all(per > 1 for _, per, _ in stats["extend_graph_shapes"])
