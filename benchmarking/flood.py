"""A generation's time alone and beside a flood of long Verify calls from another caller.

    python -m benchmarking.flood --chunk-tokens 0,64,128     # one fresh stack per chunk size

In one process: the verify and draft services (the reference pair by default) and an orchestrator, all on
localhost. A client generates through the orchestrator, alone and then while `--flood-threads` threads
call VerifyService directly with `--flood-tokens`-token prefills from the other loopback address (IPv4
against IPv6 or the other way: another caller to the model worker's fair queueing, service_common/callers.py).
No prefill lane. For each chunk size (--prefill-chunk-tokens) it prints one line of JSON:

- alone_ms / flooded_ms: median generation time, and slowdown = flooded / alone;
- verify_calls: the generation's verify passes; flood_pass_ms: median of the flood's passes (one chunk);
- predicted_max: the slowdown if every verify waited one whole flood pass, (alone + calls * pass) / alone;
  predicted_mean: waiting half a pass on average (arriving at a random point of the pass in progress);
- victim_pass_ms: median of the victim's own verify passes beside the flood, alone_pass_ms without it;
- victim_wait_ms: median queue wait the victim's verifies reported (ServerTiming.queue_us);
- flood_calls_per_s: the flood's throughput, what chunking costs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def measure(args, chunk: int) -> dict:
    import grpc

    import draft_service.server as draft_server
    import orchestrator.server as orchestrator_server
    import verify_service.server as verify_server
    from serving.model_server import ModelServerSettings
    from specdec_api import verify_pb2, verify_pb2_grpc
    from specdec_client import Client

    verify = verify_server.start(ModelServerSettings(args.target, host="localhost", prefill_chunk_tokens=chunk))
    draft = draft_server.start(ModelServerSettings(args.draft, host="localhost", prefill_chunk_tokens=chunk))
    orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{verify.port}", draft=f"localhost:{draft.port}", host="localhost"))
    worker = verify.servicer.worker
    passes = []  # (seconds, [(caller, tokens fed)])
    submit, run_batch = worker.submit, worker.run_batch
    callers: dict[int, str] = {}  # id(session cache) -> caller (a chunk is a new payload on the same cache)
    waits = []  # the victim's verify queue waits (ms)

    def recording_submit(payload, *a, **kw):
        callers[id(payload.cache)] = kw.get("caller")
        done = submit(payload, *a, **kw)
        if len(payload.tokens) < args.flood_tokens:
            waits.append(done.queue_us / 1000)
        return done

    def recording_run_batch(payloads):
        started = time.perf_counter()
        try:
            return run_batch(payloads)
        finally:
            passes.append((time.perf_counter() - started, [(callers.get(id(p.cache)), len(p.tokens)) for p in payloads]))

    worker.submit, worker.run_batch = recording_submit, recording_run_batch
    stop, flood_calls = threading.Event(), []
    try:
        with Client(f"localhost:{orchestrator.port}", timeout=600) as client:
            def generate():
                started = time.perf_counter()
                result = client.generate(args.prompt, max_new_tokens=args.max_new_tokens, num_draft_tokens=args.gamma)
                return result, time.perf_counter() - started

            generate()  # warm up
            passes.clear()
            alone = [generate() for _ in range(args.runs)]
            victim = {c for _, jobs in passes for c, _ in jobs}
            alone_pass = statistics.median(s for s, _ in passes)
            verify_calls = len(passes) / args.runs
            host = "127.0.0.1" if victim == {"ipv6:[::1]"} else "[::1]"
            tokens = [1 + (7 * i) % 500 for i in range(args.flood_tokens)]

            def flood(thread: int):
                with grpc.insecure_channel(f"{host}:{verify.port}") as channel:
                    stub = verify_pb2_grpc.VerifyServiceStub(channel)
                    request = verify_pb2.VerifyRequest(session_id=f"flood-{thread}", prefix_len=0, append_tokens=tokens)
                    while not stop.is_set():
                        try:
                            stub.Verify(request, timeout=120)
                        except grpc.RpcError as error:
                            if not stop.is_set():
                                print("flood error:", error.code(), error.details())
                            return
                        flood_calls.append(time.perf_counter())

            threads = [threading.Thread(target=flood, args=(t,), daemon=True) for t in range(args.flood_threads)]
            for thread in threads:
                thread.start()
            while len(flood_calls) < args.flood_threads:
                time.sleep(0.05)
            passes.clear()
            waits.clear()
            flood_start, calls_before = time.perf_counter(), len(flood_calls)
            flooded = [generate() for _ in range(args.runs)]
            flood_rate = (len(flood_calls) - calls_before) / (time.perf_counter() - flood_start)
            stop.set()
            for thread in threads:
                thread.join(120)
    finally:
        stop.set()
        for server in (orchestrator, draft, verify):
            server.stop(grace=None)
    assert all(r.token_ids == alone[0][0].token_ids for r, _ in alone + flooded), "a generation changed"
    flood_passes = [s for s, jobs in passes if any(c not in victim for c, _ in jobs)]
    victim_passes = [s for s, jobs in passes if all(c in victim for c, _ in jobs)]
    alone_s = statistics.median(s for _, s in alone)
    flooded_s = statistics.median(s for _, s in flooded)
    flood_pass = statistics.median(flood_passes)
    return {
        "chunk_tokens": chunk, "alone_ms": round(alone_s * 1000), "flooded_ms": round(flooded_s * 1000),
        "slowdown": round(flooded_s / alone_s, 2), "verify_calls": verify_calls,
        "flood_pass_ms": round(flood_pass * 1000, 1),
        "predicted_max": round((alone_s + verify_calls * flood_pass) / alone_s, 2),
        "predicted_mean": round((alone_s + verify_calls * flood_pass / 2) / alone_s, 2),
        "alone_pass_ms": round(alone_pass * 1000, 1),
        "victim_pass_ms": round(statistics.median(victim_passes) * 1000, 1) if victim_passes else None,
        "victim_wait_ms": round(statistics.median(waits), 1) if waits else None,
        "flood_calls_per_s": round(flood_rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-tokens", default="128", help="comma-separated prefill chunk sizes (0: no chunks)")
    parser.add_argument("--target", default="models/target")
    parser.add_argument("--draft", default="models/draft")
    parser.add_argument("--flood-tokens", type=int, default=512)
    parser.add_argument("--flood-threads", type=int, default=4)
    parser.add_argument("--prompt", default="def parse_args(argv):\n")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="generations alone and beside the flood (median)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (every service is in this process; 1: the draft and verify "
                             "workers each get a core of 2)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    for chunk in (int(c) for c in args.chunk_tokens.split(",")):
        print(json.dumps(measure(args, chunk)), flush=True)
    os._exit(0)  # the flood's channels and the servers' threads need not wind down


if __name__ == "__main__":
    main()
