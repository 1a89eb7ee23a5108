"""The microbenchmarks behind docs/benchmarks.md's per-change numbers, each printing one JSON line.

    python -m benchmarking.microbench logits    # HF and lean, 5 positions at once vs HF one-token decode
    python -m benchmarking.microbench sdpa      # attention with 3-D vs 4-D inputs (math vs fused kernel)
    python -m benchmarking.microbench forward   # draft step and verify of 5 tokens, default runtime
    python -m benchmarking.microbench handler   # Verify's non-compute time per call, servicer in-process
    python -m benchmarking.microbench spans     # CPU per span and per traced gRPC call
    python -m benchmarking.microbench batch     # one ragged verify forward: sessions x tokens each
    python -m benchmarking.microbench propose   # one batched greedy draft proposal: CPU ms per call
    python -m benchmarking.microbench sample    # one sampled token: the race sampler, torch.multinomial, coupled
    python -m benchmarking.microbench bf16      # greedy vs generate in bfloat16: ours and HF assisted

Run them pinned (`taskset -c 1 ...`) with one torch thread, as the bench pins the target side. The VM's
speed drifts, so compare numbers from runs made back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from service_common.session_fingerprint import fingerprint
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 4)


def _loaded(path):
    from serving.runtimes import make_runtime
    from serving.model_loading import load_model

    loaded = load_model(str(path), "cpu", "auto")
    return loaded, make_runtime(loaded.model, loaded.device, "auto")


def logits(prompts: int = 6, new_tokens: int = 40) -> dict:
    """Greedy continuations from `generate`; each runtime re-scores them 5 positions per pass."""
    from transformers import AutoTokenizer

    from serving.runtimes.hf import ModelRunner
    from serving.runtimes.lean import LeanLlama

    loaded, _ = _loaded(DEFAULT_TARGET)
    model, tokenizer = loaded.model, AutoTokenizer.from_pretrained(str(DEFAULT_TARGET))
    hf, lean = ModelRunner(model, loaded.device), LeanLlama(model)
    worst = {"hf": 0.0, "lean": 0.0}
    for prompt in load_prompts(DEFAULT_PROMPTS, prompts):
        ids = tokenizer(prompt)["input_ids"]
        new = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids):].tolist()
        cache = hf.new_cache()
        reference = torch.cat([hf.extend(cache, ids, 1)] + [hf.extend(cache, [t], 1) for t in new[:-1]])
        for name, runner in (("hf", hf), ("lean", lean)):
            cache = runner.new_cache()
            scored = [runner.extend(cache, ids, 1)]
            for start in range(0, len(new) - 1, 5):
                chunk = new[start:min(start + 5, len(new) - 1)]
                scored.append(runner.extend(cache, chunk, len(chunk)))
            worst[name] = max(worst[name], float((torch.cat(scored) - reference).abs().max()))
    return {"max_abs_logit_diff_vs_one_token_decode": worst}


def sdpa(keys: int = 300, repeats: int = 300) -> dict:
    import torch.nn.functional as F

    out = {}
    for label, heads, dim, queries in (("draft layer", 4, 32, 1), ("verify layer", 8, 64, 5)):
        q, k, v = torch.randn(heads, queries, dim), torch.randn(heads, keys, dim), torch.randn(heads, keys, dim)
        mask = None if queries == 1 else torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
        out[label] = {
            "3d_us": 1000 * _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats),
            "4d_us": 1000 * _median_ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None],
                                                                              attn_mask=mask), repeats)}
    return out


def forward(repeats: int = 60) -> dict:
    _, draft = _loaded(DEFAULT_DRAFT)
    _, target = _loaded(DEFAULT_TARGET)
    out = {}
    for name, runner, tokens in (("draft_step_ms", draft, [5]), ("verify_5_tokens_ms", target, [5, 6, 7, 8, 9])):
        cache = runner.new_cache()
        runner.extend(cache, list(range(100, 300)), 1)

        def step():
            cache.crop(200)
            runner.extend(cache, tokens, len(tokens))
        out[name] = _median_ms(step, repeats)
    return out


def batch(repeats: int = 7, context: int = 150) -> dict:
    """The target's ragged batched forward (extend_batch) for B sessions x T new tokens each, every
    session holding `context` tokens: what one verify pass costs at a batch size and gamma (T = gamma+1).
    Reports ms per pass and per position; speculation under load pays off where T > 1 costs little more."""
    _, target = _loaded(DEFAULT_TARGET)
    out = {}
    for sessions in (1, 4, 16, 32):
        caches = []
        for _ in range(sessions):
            cache = target.new_cache()
            target.extend(cache, list(range(100, 100 + context)), 1)
            caches.append(cache)
        for tokens in (1, 2, 3, 5):
            def run():
                for cache in caches:
                    cache.crop(context)
                target.extend_batch(caches, [list(range(5, 5 + tokens))] * sessions, [tokens] * sessions)
            ms = _median_ms(run, repeats)
            out[f"{sessions}x{tokens}"] = {"ms": ms, "ms_per_position": round(ms / (sessions * tokens), 3)}
    return out


def propose(blocks: int = 7, calls: int = 20, gamma: int = 4, context: int = 200) -> dict:
    """The draft service's batched proposal (propose_batch: one forward per draft position for all
    sessions) at 1 and 16 sessions, greedy: CPU ms per call, the minimum and median over `blocks` blocks
    of `calls` (process CPU time: the draft's steps are op overhead, which wall time on a shared VM hides)."""
    from draft_service.drafters.base import ProposeJob
    from draft_service.drafters.model import propose_batch
    from speculation.sampling import Sampling

    _, draft = _loaded(DEFAULT_DRAFT)
    out = {}
    for sessions in (1, 16):
        caches = []
        for _ in range(sessions):
            cache = draft.new_cache()
            draft.extend(cache, list(range(100, 100 + context)), 1)
            caches.append(cache)

        def run():
            for cache in caches:
                cache.crop(context)
            propose_batch(draft, [ProposeJob(cache, [7], gamma, Sampling(0.0, 0, 1.0)) for cache in caches])
        run()
        per_call = []
        for _ in range(blocks):
            started = time.process_time()
            for _ in range(calls):
                run()
            per_call.append((time.process_time() - started) * 1000 / calls)
        out[f"{sessions}_sessions_gamma_{gamma}"] = {"cpu_ms_min": round(min(per_call), 3),
                                                      "cpu_ms_median": round(statistics.median(per_call), 3)}
    return out


def sample(repeats: int = 2000, vocab: int = 4096) -> dict:
    """One draw from a [1, vocab] distribution (the reference pair's vocabulary), in microseconds:
    speculation.sampling.sample (the exponential race on hashed noise, which runs on any device), torch.multinomial
    and coupled_sample."""
    from speculation.sampling import Sampling, coupled_sample, logits_to_probs
    from speculation.sampling import sample as race_sample

    probs = logits_to_probs(torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 3, Sampling(1.0))
    generator = torch.Generator().manual_seed(1)
    out = {}
    for _ in range(3):  # alternating, for this VM's drift
        for name, draw in (("race_us", lambda: race_sample(probs, generator)),
                           ("multinomial_us", lambda: torch.multinomial(probs, 1, generator=generator)),
                           ("coupled_us", lambda: coupled_sample(probs[0], 7))):
            out.setdefault(name, []).append(round(1000 * _median_ms(draw, repeats // 3), 1))
    return out


def bf16(prompts: int = 23, new_tokens: int = 40) -> dict:
    """How often greedy speculative output differs from the target's own one-token `generate` when both
    run in bfloat16: ours (services started with --dtype bfloat16, gamma 1 and 4) and HF assisted
    generation, on a tiny random Llama pair (hidden 128 / 3 layers and 64 / 1) with the shipped tokenizer.
    Random weights make near-ties common, so this is a worst case; float32 is what the exactness tests check."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from local_stack.processes import local_stack
    from specdec_client import Client

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_TARGET))
    texts = load_prompts(DEFAULT_PROMPTS, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, (hidden, layers, seed) in {"target": (128, 3, 1), "draft": (64, 1, 2)}.items():
            torch.manual_seed(seed)
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden,
                                 max_position_embeddings=1024, eos_token_id=0, bos_token_id=0, pad_token_id=0)
            paths[name] = Path(tmp) / name
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(paths[name])
            tokenizer.save_pretrained(paths[name])
        target = LlamaForCausalLM.from_pretrained(paths["target"], dtype=torch.bfloat16).eval()
        draft = LlamaForCausalLM.from_pretrained(paths["draft"], dtype=torch.bfloat16).eval()
        inputs = [tokenizer(text[-400:], return_tensors="pt") for text in texts]
        with torch.inference_mode():
            reference = [target.generate(**x, do_sample=False, max_new_tokens=new_tokens)[0, x["input_ids"].shape[1]:]
                         .tolist() for x in inputs]
            assisted = [target.generate(**x, do_sample=False, max_new_tokens=new_tokens, assistant_model=draft,
                                        num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant")
                        [0, x["input_ids"].shape[1]:].tolist() for x in inputs for gamma in (1, 4)]
        flags = ("--dtype", "bfloat16")
        with local_stack(str(paths["target"]), str(paths["draft"]), verify_args=flags, draft_args=flags) as stack, \
                Client(stack.orchestrator, timeout=600) as client:
            ours = [client.generate(x["input_ids"][0].tolist(), max_new_tokens=new_tokens, num_draft_tokens=gamma)
                    .token_ids for x in inputs for gamma in (1, 4)]
    expected = [r for r in reference for _ in (1, 4)]
    return {"generations": len(expected),
            "ours_differ": sum(a != b for a, b in zip(ours, expected)),
            "hf_assisted_differ": sum(a != b for a, b in zip(assisted, expected))}


def handler(repeats: int = 60) -> dict:
    """Verify through the servicer without gRPC: time around the call minus the worker's compute."""
    from serving.sessions import SessionStore
    from specdec_api import common_pb2, verify_pb2
    from verify_service.servicer import VerifyServicer

    loaded, runner = _loaded(DEFAULT_TARGET)
    servicer = VerifyServicer(loaded, runner, SessionStore(runner.new_cache, max_bytes=1 << 30, max_sessions=4,
                                                           ttl_s=600))

    class Context:
        def is_active(self):
            return True

        def time_remaining(self):
            return 60.0

    prompt = list(range(100, 300))
    servicer.Verify(verify_pb2.VerifyRequest(session_id="s", append_tokens=prompt,
                                             sampling=common_pb2.SamplingParams()), Context())
    non_compute = []
    for _ in range(repeats):
        request = verify_pb2.VerifyRequest(session_id="s", prefix_len=len(prompt), append_tokens=[7],
                                           draft_token_ids=[8, 9, 10, 11], sampling=common_pb2.SamplingParams(),
                                           prefix_fingerprint=fingerprint(prompt))
        started = time.perf_counter()
        reply = servicer.Verify(request, Context())
        non_compute.append((time.perf_counter() - started) * 1000 - reply.timing.compute_us / 1000)
    return {"verify_non_compute_ms_p50": round(statistics.median(non_compute), 4)}


def _process_seconds(run) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def spans(count: int = 5000, calls: int = 1500) -> dict:
    """CPU per span (the SDK's tracer, alone and into the JSONL file), per exported span (JSONL, OTLP
    encoding) and per unary call untraced vs traced (client and server span, JSONL)."""
    import tempfile
    from concurrent import futures

    import grpc
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from telemetry.client_spans import traced_channel
    from telemetry.server_spans import TracingServerInterceptor
    from telemetry.span_file import JsonlSpanExporter
    from telemetry.tracing import install_provider

    class Discard(SpanExporter):
        def export(self, batch):
            return SpanExportResult.SUCCESS

    attributes = {"specdec.session_id": "s", "specdec.gamma": 4, "specdec.accepted": 3, "specdec.round_ms": 1.5}
    out, directory = {}, tempfile.mkdtemp()

    def per_span_us(tracer, provider) -> float:
        started = time.process_time()
        for _ in range(count):
            tracer.start_span("round", attributes=attributes).end()
        provider.force_flush()
        return round((time.process_time() - started) / count * 1e6, 1)

    sdk, jsonl = TracerProvider(), TracerProvider()
    queue = {"max_queue_size": count + 1}  # every span exported, none dropped
    sdk.add_span_processor(BatchSpanProcessor(Discard(), **queue))
    jsonl.add_span_processor(BatchSpanProcessor(JsonlSpanExporter(f"{directory}/spans.jsonl"), **queue))
    # sdk: the SDK's Tracer with a batch processor that discards; sdk_jsonl: into the local span file.
    out["span_us"] = {"sdk": per_span_us(sdk.get_tracer("bench"), sdk),
                      "sdk_jsonl": per_span_us(jsonl.get_tracer("bench"), jsonl)}
    # What each exporter spends on a batch of 512 finished spans, per span: the JSONL file's export and the
    # OTLP encoding (the SDK's encode_spans and the serialisation; no network).
    memory_provider, memory = TracerProvider(), InMemorySpanExporter()
    memory_provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = memory_provider.get_tracer("bench")
    for _ in range(512):
        tracer.start_span("round", attributes=attributes).end()
    finished, exporter = memory.get_finished_spans(), JsonlSpanExporter(f"{directory}/export.jsonl")

    def per_exported_span_us(export) -> float:
        best = min(_process_seconds(export) for _ in range(7))
        return round(best / len(finished) * 1e6, 1)

    out["export_us"] = {"jsonl": per_exported_span_us(lambda: exporter.export(finished)),
                        "otlp_encode": per_exported_span_us(lambda: encode_spans(finished).SerializeToString())}

    install_provider(jsonl)

    def per_call_us(traced: bool) -> float:
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=(
            [TracingServerInterceptor(jsonl.get_tracer("bench"))] if traced else []))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}),))
        port = server.add_insecure_port("localhost:0")
        server.start()
        channel = grpc.insecure_channel(f"localhost:{port}")
        call = (traced_channel(channel) if traced else channel).unary_unary("/bench.Echo/Call")
        for _ in range(100):
            call(b"x")
        started = time.process_time()
        for _ in range(calls):
            call(b"x")
        spent = (time.process_time() - started) / calls * 1e6
        channel.close()
        server.stop(None)
        return round(spent)

    out["call_cpu_us"] = {"untraced": per_call_us(False), "traced_client_and_server": per_call_us(True)}
    return out


MEASUREMENTS = {"logits": logits, "sdpa": sdpa, "forward": forward, "handler": handler, "spans": spans,
                "batch": batch, "sample": sample, "bf16": bf16, "propose": propose}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measurement", choices=sorted(MEASUREMENTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"measurement": args.measurement, **MEASUREMENTS[args.measurement]()}))


if __name__ == "__main__":
    main()
