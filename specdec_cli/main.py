"""`specdec`: one console script for every process and tool of the project.

Every flag of `serve` also reads an environment variable (SPECDEC_<FLAG>), the Kubernetes way.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path

import typer

from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, REPO_ROOT

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class Role(str, Enum):
    draft = "draft"
    verify = "verify"
    orchestrator = "orchestrator"
    openai = "openai"


def _env(name: str) -> str:
    return "SPECDEC_" + name.upper().replace("-", "_")


def _from_checkout(command: str, package: str) -> None:
    """Make a development package (benchmarking, reference_pair, netlab) importable for `command`, or exit
    with what to do. The wheel leaves them out (a deployment needs none of them), so the console script's
    path finder does not know them even in an editable install; they load from the source checkout
    instead, whose root goes on sys.path. An installed wheel has no checkout beside it: say so."""
    if (REPO_ROOT / package / "__init__.py").is_file():
        if str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))  # last: the checkout's top-level folders shadow nothing installed
        return
    typer.echo(f"specdec: `specdec {command}` runs from a source checkout: it needs the `{package}` package, which "
               "the installed wheel leaves out. Get a checkout with `git clone <the specdec repository> specdec && "
               f"cd specdec && ./setup.sh`, then run `.venv/bin/specdec {command}` there.", err=True)
    raise typer.Exit(2)


@app.command()
def serve(
    role: Role = typer.Argument(..., help="which service this process runs"),
    model: str | None = typer.Option(None, envvar=_env("model"), help="draft/verify: HF name or local path"),
    port: int | None = typer.Option(None, envvar=_env("port"), help="default 50051; openai: 8000"),
    host: str = typer.Option("[::]", envvar=_env("host")),
    device: str = typer.Option("cpu", envvar=_env("device"), help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", envvar=_env("dtype"), help="auto, float32, bfloat16, float16"),
    threads: int = typer.Option(0, envvar=_env("threads"), help="torch threads (0: torch default)"),
    session_memory_mb: float = typer.Option(4096.0, envvar=_env("session_memory_mb"),
                                            help="KV cache budget; idle sessions are evicted LRU beyond it"),
    max_sessions: int = typer.Option(1024, envvar=_env("max_sessions")),
    session_ttl_s: float = typer.Option(600.0, envvar=_env("session_ttl_s"), help="idle sessions expire"),
    max_draft_tokens: int = typer.Option(32, envvar=_env("max_draft_tokens"), help="largest gamma accepted"),
    runtime: str = typer.Option(
        "auto", envvar=_env("runtime"),
        help="auto | lean | static | hf. auto (default): where the architecture allows, static on CUDA (a "
             "preallocated KV pool, batched attention, decode steps as CUDA graphs) and the lean Llama forward "
             "elsewhere (pre-transposed, fused projections: ~40% cheaper draft steps, 10-20% cheaper verify), "
             "else the model's own HF forward"),
    slot_tokens: int = typer.Option(
        0, envvar=_env("slot_tokens"),
        help="static runtime: each session's KV slot, in tokens (0: the model's context, at most 8192: a slot is "
             "reserved whole per session); the service's context (max_context) is at most this"),
    gpu_memory_fraction: float = typer.Option(
        0.9, envvar=_env("gpu_memory_fraction"),
        help="static runtime on CUDA: the fraction of the free device memory (after the weights, less a reserve "
             "for activations and graphs) its KV pool takes; on a CPU --session-memory-mb sizes it"),
    drafter: str | None = typer.Option(
        None, envvar=_env("drafter"), show_default="model",
        help="draft: what proposes the tokens. model: the causal LM --model names. ngram: prompt lookup, no weights: "
             "proposes what followed the most recent earlier occurrence of the session's last n tokens (prompt and "
             "generated; n from --ngram-max down to --ngram-min), nothing when there is none; --model then names the "
             "target's checkpoint (or a directory with its tokenizer), whose config gives the vocabulary size the "
             "target's logits pair with, the context and EOS ids, and whose tokenizer the fingerprint. Several "
             "comma-separated are a chain, e.g. ngram,model: each round the first that proposes anything (prompt "
             "lookup when the tokens hold a match, else the draft model --model names)"),
    ngram_min: int | None = typer.Option(
        None, envvar=_env("ngram_min"), show_default="1",
        help="draft, --drafter ngram: the shortest suffix of the session's tokens looked up (1: any repeated token)"),
    ngram_max: int | None = typer.Option(
        None, envvar=_env("ngram_max"), show_default="3",
        help="draft, --drafter ngram: the longest suffix looked up; the longest that occurred before wins"),
    skip_layers: str | None = typer.Option(
        None, envvar=_env("skip_layers"), show_default="auto",
        help="draft, --drafter layer-skip (the target's own checkpoint as --model, drafting with some of its decoder "
             "layers skipped; Llama-family models): 0-based indices of the layers to skip, comma-separated (e.g. "
             "2,4; at least one kept), auto (search held-out prompts for the set with the highest predicted "
             "speedup; logged; 40-80 s on the reference target), or @FILE (a set --skip-layers-save wrote)"),
    skip_search_prompts: str | None = typer.Option(
        None, envvar=_env("skip_search_prompts"), show_default="the second half of models/prompts.jsonl",
        help="draft, --skip-layers auto: the held-out prompts to search on (JSONL, one {\"prompt\": ...} per line; "
             "the first 32)"),
    skip_layers_save: str | None = typer.Option(
        None, envvar=_env("skip_layers_save"),
        help="draft, --skip-layers auto: write the chosen set here (JSON), for a later start with "
             "--skip-layers @FILE"),
    draft: str | None = typer.Option(
        None, envvar=_env("draft"),
        help="orchestrator: the draft replicas: HOST:PORT, several comma-separated, or dns:///NAME:PORT (every "
             "address NAME resolves to, e.g. a headless Service, re-resolved periodically and on failure)"),
    verify: str | None = typer.Option(
        None, envvar=_env("verify"),
        help="orchestrator: the verify replicas: HOST:PORT, several comma-separated, or dns:///NAME:PORT; each "
             "generation stays on one replica of each role, chosen by the load they report"),
    resolve_interval_s: float = typer.Option(
        10.0, envvar=_env("resolve_interval_s"),
        help="orchestrator: re-resolve dns:/// replica names and poll every replica's load this often"),
    drain_timeout_s: float = typer.Option(
        20.0, envvar=_env("drain_timeout_s"),
        help="on SIGTERM: health turns NOT_SERVING and new sessions (orchestrator: generations) are refused "
             "while those in flight go on, up to this long; then in-flight calls get a short grace and it stops"),
    tokenizer: str | None = typer.Option(None, envvar=_env("tokenizer"),
                                            help="orchestrator: default is the target's model path"),
    num_draft_tokens: int = typer.Option(4, envvar=_env("num_draft_tokens"), help="orchestrator: default gamma"),
    adaptive_cost_ratio: float | None = typer.Option(
        None, envvar=_env("adaptive_cost_ratio"),
        help="orchestrator: adapt gamma per session from measured acceptance at this draft/target cost ratio"),
    gamma_policy: str = typer.Option(
        "fixed", envvar=_env("gamma_policy"),
        help="orchestrator: fixed (--num-draft-tokens; seeded runs reproducible) or load (gamma per session from "
             "measured acceptance and verify cost at the current batch size, down to 0 under heavy load)"),
    overlap: bool | None = typer.Option(
        None, "--overlap/--no-overlap", envvar=_env("overlap"), show_default="on, unless draft and target share a GPU",
        help="orchestrator: while the target verifies, let the draft continue as if all drafts will be accepted; "
             "when they are and its guess of the bonus token is right, the next round needs no draft call. Unset: "
             "on, except when the draft and verify services report the same GPU (ModelInfo.device_id), where the "
             "drafted-ahead steps would compete with verification"),
    draft_confidence: float = typer.Option(
        0.0, envvar=_env("draft_confidence"),
        help="orchestrator: the draft stops proposing once its probability of a token falls below this (0: off)"),
    rpc_timeout_s: float = typer.Option(30.0, envvar=_env("rpc_timeout_s"), help="orchestrator: verify call deadline"),
    draft_timeout_s: float = typer.Option(5.0, envvar=_env("draft_timeout_s"),
                                          help="orchestrator: draft call deadline; past it the round goes target-only"),
    max_batch: int = typer.Option(32, envvar=_env("max_batch"),
                                  help="draft/verify: sessions per forward pass (cross-session batching needs the lean runtime, the default for Llama)"),
    max_wait_ms: float = typer.Option(0.0, envvar=_env("max_wait_ms"),
                                      help="draft/verify: hold a pass open up to this long for sessions expected back from their previous pass (0: batch what is queued)"),
    max_queue: int = typer.Option(256, envvar=_env("max_queue"),
                                  help="draft/verify: queued requests before RESOURCE_EXHAUSTED"),
    prefill_cpus: str | None = typer.Option(
        None, envvar=_env("prefill_cpus"),
        help="draft/verify: run prefills (calls feeding >= --prefill-min-tokens) on a second thread pinned to these "
             "CPUs (a list like 0 or 0,2-3), beside the batched rounds; lean runtime only"),
    prefill_min_tokens: int = typer.Option(64, envvar=_env("prefill_min_tokens"),
                                           help="draft/verify: with --prefill-cpus, the tokens that make a call a prefill"),
    prefill_chunk_tokens: int | None = typer.Option(
        None, envvar=_env("prefill_chunk_tokens"), show_default="128 on cpu, 512 on an accelerator",
        help="draft/verify: feed calls longer than this in chunks of this many tokens, letting other callers' "
             "rounds run between them, so a round waits for at most one chunk of someone's long prefill "
             "(0: never chunk)"),
    max_queue_per_caller: int | None = typer.Option(
        None, envvar=_env("max_queue_per_caller"), show_default="half of --max-queue",
        help="draft/verify: requests one caller (TLS identity, else peer host) may have waiting before "
             "RESOURCE_EXHAUSTED"),
    pass_tokens: int = typer.Option(
        256, envvar=_env("pass_tokens"),
        help="draft/verify: a forward pass shared by several callers, or of several prefills, stops at this many "
             "tokens (a lone caller's rounds still batch up to --max-batch)"),
    max_concurrent_rpcs: int | None = typer.Option(None, envvar=_env("max_concurrent_rpcs"),
                                                      help="refuse calls beyond this with RESOURCE_EXHAUSTED"),
    max_workers: int = typer.Option(
        256, envvar=_env("max_workers"),
        help="gRPC handler threads (started as calls need them): each call in flight holds one, a Generate "
             "stream until it ends"),
    max_calls_per_caller: int | None = typer.Option(
        None, envvar=_env("max_calls_per_caller"), show_default="half of --max-workers",
        help="calls one caller may have in flight (orchestrator: by API key when --api-key-file is set, else "
             "client certificate, else peer host; draft/verify: certificate, else peer host, IPv6 by /64); "
             "beyond it RESOURCE_EXHAUSTED at once, so no caller can hold every handler thread (0: no limit)"),
    metrics_port: int | None = typer.Option(None, envvar=_env("metrics_port"),
                                               help="serve Prometheus metrics on this port (bound to --host)"),
    tls_cert: str | None = typer.Option(
        None, envvar=_env("tls_cert"),
        help="PEM certificate chain: with --tls-key, serve TLS; the orchestrator also presents it to draft/verify "
             "(re-read when the file changes)"),
    tls_key: str | None = typer.Option(None, envvar=_env("tls_key"), help="PEM private key of --tls-cert"),
    tls_ca: str | None = typer.Option(
        None, envvar=_env("tls_ca"),
        help="PEM CA bundle: with --tls-require-client-cert, callers' certificates must be signed by it; the "
             "orchestrator also verifies draft/verify with it"),
    tls_require_client_cert: bool = typer.Option(
        False, "--tls-require-client-cert", envvar=_env("tls_require_client_cert"),
        help="mTLS: refuse callers without a certificate signed by --tls-ca"),
    tls_server_name: str | None = typer.Option(
        None, envvar=_env("tls_server_name"),
        help="orchestrator: the name to check on draft/verify certificates (default: the host of --draft/--verify)"),
    api_key_file: str | None = typer.Option(
        None, envvar=_env("api_key_file"),
        help="callers must send 'authorization: Bearer <key>' with a key from this file (one per line, '#' "
             "comments; re-read when it changes); health and reflection stay open"),
    service_api_key_file: str | None = typer.Option(
        None, envvar=_env("service_api_key_file"),
        help="orchestrator: send the first key in this file to draft/verify (their --api-key-file)"),
    orchestrator: str | None = typer.Option(None, envvar=_env("orchestrator"), help="openai: the orchestrator HOST:PORT"),
    model_name: str | None = typer.Option(
        None, envvar=_env("model_name"), help="openai: the model name /v1/models lists and requests must name "
                                              "(default: the target model the orchestrator reports)"),
    orchestrator_api_key_file: str | None = typer.Option(
        None, envvar=_env("orchestrator_api_key_file"),
        help="openai: send the first key in this file to the orchestrator (its --api-key-file)"),
    health_port: int | None = typer.Option(
        None, envvar=_env("health_port"),
        help="also serve gRPC health alone, in plaintext, on this port (for Kubernetes probes when TLS is on)"),
    max_request_mb: float = typer.Option(
        4.0, envvar=_env("max_request_mb"),
        help="larger requests are refused before they are parsed (RESOURCE_EXHAUSTED; `serve openai`: HTTP 413)"),
    log_level: str = typer.Option("INFO", envvar=_env("log_level")),
):
    """Run one service: `draft`, `verify` (both need --model), `orchestrator` (needs --verify) or `openai`, the
    OpenAI-compatible HTTP API in front of an orchestrator (needs --orchestrator; --tokenizer, --api-key-file,
    --host and --port are its own, and --tls-ca / --tls-cert / --tls-key / --tls-server-name are how it dials
    the orchestrator, as `specdec generate` takes them).

    Tracing and metrics exporters follow the standard OTEL_* variables; SPECDEC_TRACE_FILE writes spans
    to a local JSONL file instead (see `specdec trace-report`)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from telemetry.metrics import configure_metrics, shutdown_metrics
    from telemetry.tracing import configure_tracing, shutdown_tracing
    from transport import TLSSettings

    tls = TLSSettings(cert=tls_cert, key=tls_key, ca=tls_ca, require_client_cert=tls_require_client_cert,
                      server_name=tls_server_name)
    problems = tls.problems()
    if role is Role.openai:
        _serve_openai(problems, orchestrator, port, host, tokenizer, model_name, api_key_file, orchestrator_api_key_file,
                      tls_ca, tls_cert, tls_key, tls_server_name, tls_require_client_cert, log_level, max_request_mb)
        return
    port = 50051 if port is None else port
    if service_api_key_file and role is not Role.orchestrator:
        problems.append("--service-api-key-file is the orchestrator's (the key it sends to draft and verify)")
    if role is not Role.draft and (drafter, ngram_min, ngram_max) != (None, None, None):
        problems.append("--drafter, --ngram-min and --ngram-max are the draft service's")
    layer_skip_flags = (skip_layers, skip_search_prompts, skip_layers_save) != (None, None, None)
    if layer_skip_flags and (role is not Role.draft or
                             "layer-skip" not in [name.strip() for name in (drafter or "model").split(",")]):
        problems.append("--skip-layers, --skip-search-prompts and --skip-layers-save are for --drafter layer-skip")
    if max_workers < 1:
        problems.append(f"--max-workers must be at least 1, got {max_workers}")
    if max_calls_per_caller is not None and max_calls_per_caller < 0:
        problems.append(f"--max-calls-per-caller must be >= 0 (0: no limit), got {max_calls_per_caller}")
    if problems:
        typer.echo(f"specdec: {role.value} refused to start: {'; '.join(problems)}", err=True)
        raise typer.Exit(2)
    security = dict(tls=tls, api_key_file=api_key_file, health_port=health_port, max_request_mb=max_request_mb,
                    max_workers=max_workers, max_calls_per_caller=max_calls_per_caller)
    configure_tracing(f"specdec-{role.value}")
    configure_metrics(f"specdec-{role.value}", metrics_port, host)
    if role is Role.orchestrator:
        from orchestrator.server import OrchestratorSettings, start

        if not verify:
            raise typer.BadParameter("the orchestrator needs --verify HOST:PORT (and usually --draft HOST:PORT)")
        try:
            running = start(OrchestratorSettings(
                verify=verify, draft=draft, port=port, host=host, tokenizer=tokenizer,
                num_draft_tokens=num_draft_tokens, max_draft_tokens=max_draft_tokens,
                adaptive_cost_ratio=adaptive_cost_ratio, rpc_timeout_s=rpc_timeout_s,
                draft_timeout_s=draft_timeout_s, gamma_policy=gamma_policy, overlap=overlap,
                draft_confidence=draft_confidence, service_api_key_file=service_api_key_file,
                resolve_interval_s=resolve_interval_s, **security))
        except Exception as error:  # noqa: BLE001 - startup refusals are for a person to read, not a traceback
            typer.echo(f"specdec: orchestrator refused to start: {error}", err=True)
            raise typer.Exit(2)
    else:
        from serving.model_server import ModelServerSettings

        if not model:
            raise typer.BadParameter(f"`serve {role.value}` needs --model PATH_OR_ID")
        settings = ModelServerSettings(
            model=model, port=port, host=host, device=device, dtype=dtype, threads=threads,
            session_memory_mb=session_memory_mb, max_sessions=max_sessions, session_ttl_s=session_ttl_s,
            max_draft_tokens=max_draft_tokens,
            runtime=runtime, slot_tokens=slot_tokens, gpu_memory_fraction=gpu_memory_fraction, max_batch=max_batch,
            max_wait_ms=max_wait_ms, max_queue=max_queue, max_concurrent_rpcs=max_concurrent_rpcs,
            prefill_cpus=prefill_cpus, prefill_min_tokens=prefill_min_tokens,
            prefill_chunk_tokens=prefill_chunk_tokens, max_queue_per_caller=max_queue_per_caller,
            pass_tokens=pass_tokens, **security)
        if role is Role.draft:
            settings.drafter = drafter or settings.drafter
            settings.ngram_min = settings.ngram_min if ngram_min is None else ngram_min
            settings.ngram_max = settings.ngram_max if ngram_max is None else ngram_max
            settings.skip_layers = settings.skip_layers if skip_layers is None else skip_layers
            settings.skip_search_prompts, settings.skip_layers_save = skip_search_prompts, skip_layers_save

            from draft_service.server import start
        else:
            from verify_service.server import start
        try:
            running = start(settings)
        except (ValueError, OSError) as error:  # a bad flag, a missing model, a model we cannot serve
            typer.echo(f"specdec: {role.value} service refused to start: {error}", err=True)
            raise typer.Exit(2)
    typer.echo(f"{role.value} listening on port {running.port}"
               + (f", plaintext health on port {running.health_port}" if running.health_server else ""), err=True)
    running.wait_for_termination(drain_timeout_s=drain_timeout_s)
    shutdown_tracing()
    shutdown_metrics()


def _serve_openai(problems: list[str], orchestrator, port, host, tokenizer, model_name, api_key_file,
                  orchestrator_api_key_file, tls_ca, tls_cert, tls_key, tls_server_name, tls_require_client_cert,
                  log_level, max_request_mb) -> None:
    """`serve openai`: the HTTP front, in the foreground until SIGTERM."""
    from openai_api.server import OpenAISettings
    from openai_api.server import serve as serve_http

    if not orchestrator:
        problems.append("`serve openai` needs --orchestrator HOST:PORT")
    if tls_require_client_cert:
        problems.append("--tls-require-client-cert is not for `serve openai` (its TLS flags dial the orchestrator)")
    if problems:
        typer.echo(f"specdec: openai refused to start: {'; '.join(problems)}", err=True)
        raise typer.Exit(2)
    settings = OpenAISettings(
        orchestrator=orchestrator, port=8000 if port is None else port, host=host, tokenizer=tokenizer,
        model_name=model_name, api_key_file=api_key_file, orchestrator_api_key_file=orchestrator_api_key_file,
        tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name, log_level=log_level,
        max_request_mb=max_request_mb)
    try:
        serve_http(settings)
    except Exception as error:  # noqa: BLE001 - startup refusals are for a person to read, not a traceback
        typer.echo(f"specdec: openai refused to start: {error}", err=True)
        raise typer.Exit(2)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="prompt text"),
    server: str = typer.Option("localhost:50051", envvar=_env("server"), help="orchestrator HOST:PORT"),
    max_new_tokens: int = typer.Option(128),
    temperature: float | None = typer.Option(None, help="0 (default) = greedy"),
    top_k: int | None = typer.Option(None),
    top_p: float | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    num_draft_tokens: int | None = typer.Option(None, help="gamma (default: the server's)"),
    stop: list[str] = typer.Option([], help="stop string; repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: text, token_ids, stats"),
    timeout: float = typer.Option(300.0, help="seconds for the whole call"),
    api_key: str | None = typer.Option(None, envvar="SPECDEC_API_KEY",
                                          help="sent as 'authorization: Bearer <key>' (env SPECDEC_API_KEY)"),
    tls_ca: str | None = typer.Option(None, help="PEM CA that signed the orchestrator's certificate: use TLS"),
    tls_cert: str | None = typer.Option(None, help="PEM client certificate, for an orchestrator that requires one"),
    tls_key: str | None = typer.Option(None, help="PEM private key of --tls-cert"),
    tls_server_name: str | None = typer.Option(None, help="name to check on the orchestrator's certificate"),
):
    """Generate from a running orchestrator, streaming the text (or one JSON object with --json)."""
    from specdec_client import Client, SpecDecError
    from specdec_client.results import GenerationResult

    if bool(tls_cert) != bool(tls_key):
        typer.echo("specdec: --tls-cert and --tls-key go together (a client certificate and its key)", err=True)
        raise typer.Exit(2)
    result = GenerationResult()
    try:
        with Client(server, timeout=timeout, api_key=api_key, root_certificates=tls_ca, private_key=tls_key,
                    certificate_chain=tls_cert, server_name=tls_server_name) as client:
            for chunk in client.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed, num_draft_tokens=num_draft_tokens, stop=stop):
                result.add(chunk)
                if not as_json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    except (SpecDecError, OSError) as error:  # OSError: a certificate file that cannot be read
        typer.echo(f"specdec: {error}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps({"text": result.text, "token_ids": result.token_ids,
                               "finish_reason": result.finish_reason, "stats": result.stats}))
    else:
        typer.echo("")
        s = result.stats
        typer.echo(f"[{result.finish_reason}] {s.get('new_tokens', 0)} tokens, {s.get('tokens_per_s', 0):.1f} tok/s, "
                   f"acceptance {s.get('acceptance_rate', 0):.2f}, {s.get('mean_accepted_len', 0):.2f} tokens/round",
                   err=True)


@app.command()
def demo(
    target: str = typer.Option(str(DEFAULT_TARGET), help="target model (default: the shipped reference pair)"),
    draft: str = typer.Option(str(DEFAULT_DRAFT)),
    prompts: Path = typer.Option(DEFAULT_PROMPTS, help="JSONL with a `prompt` field"),
    count: int = typer.Option(3, help="how many prompts"),
    max_new_tokens: int = typer.Option(64),
    num_draft_tokens: int = typer.Option(4),
):
    """Start draft, verify and orchestrator locally, generate from a few prompts, print text and stats."""
    from specdec_cli.demo import run_demo

    run_demo(target, draft, prompts, count, max_new_tokens, num_draft_tokens)


@app.command()
def bench(
    target: str = typer.Option(str(DEFAULT_TARGET)),
    draft: str = typer.Option(str(DEFAULT_DRAFT)),
    prompts: Path = typer.Option(DEFAULT_PROMPTS),
    count: int = typer.Option(8, help="how many held-out prompts"),
    max_new_tokens: int = typer.Option(128),
    num_draft_tokens: int = typer.Option(4, help="gamma for specdec"),
    pinned: bool = typer.Option(True, help="target side on core 1, draft + orchestrator on core 0"),
    greedy_only: bool = typer.Option(False, help="skip the temperature-1 runs"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    png: Path = typer.Option(Path("bench.png"), help="chart of the results"),
    concurrency: str | None = typer.Option(
        None, help="e.g. 1,4,16,32: aggregate tokens/s at each level of concurrent streams vs batched target-only"),
    gamma_policy: str = typer.Option("load", help="with --concurrency: the orchestrator's --gamma-policy (load | fixed)"),
    workload: int | None = typer.Option(
        None, help="with --concurrency: prompts every level serves (default: the largest level)"),
    repeats: int = typer.Option(1, min=1, help="with --concurrency: runs per level (ours and target-only in turn); medians reported"),
    prefill_lane: bool = typer.Option(True, help="with --concurrency and pinned: the verify prefills on core 0 "
                                                 "(--prefill-cpus), beside its batched rounds on core 1"),
    tls: bool = typer.Option(False, "--tls", help="mTLS between the bench's client, orchestrator, draft and verify "
                                                  "(a throwaway CA in a temporary directory; needs trustme)"),
):
    """target_only vs hf_assisted vs specdec on the reference pair: tokens/s, speedup, alpha, round split."""
    _from_checkout("bench", "benchmarking")
    from benchmarking.bench import BenchSettings, add_leviathan_bound, plot, run_bench
    from local_stack.paths import load_prompts

    if concurrency:
        from benchmarking.concurrency import run_concurrency

        if tls:
            typer.echo("specdec: --tls is for the batch-1 bench; --concurrency runs in plaintext", err=True)
            raise typer.Exit(2)
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
        result, protocol = run_concurrency(target, draft, load_prompts(prompts), levels, max_new_tokens,
                                           num_draft_tokens, gamma_policy=gamma_policy, pinned=pinned,
                                           workload=workload, repeats=repeats, prefill_lane=prefill_lane)
        if as_json:
            typer.echo(json.dumps({"concurrency": result, "protocol": protocol}))
            return
        for level, r in result.items():
            typer.echo(f"x{level:>3}: ours {r['tokens_per_s']:8.1f} tok/s (x{r['vs_one_stream']:.2f} of 1 stream)  "
                       f"target-only batched {r['target_only_tokens_per_s']:8.1f} tok/s  ratio {r['vs_target_only']:.2f}  "
                       f"p50/p99 {r['p50_ms_per_token']:.1f}/{r['p99_ms_per_token']:.1f} ms/tok  "
                       f"batch sizes {r['verify_batch_size_histogram']}  gamma {r['gamma_histogram']}")
        return

    settings = BenchSettings(target=target, draft=draft, prompts=load_prompts(prompts, count),
                             max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, pinned=pinned,
                             modes=("greedy",) if greedy_only else ("greedy", "temperature_1"), tls=tls)
    report = run_bench(settings)
    ours, base = report["specdec"], report["target_only"]
    # c from this run: the draft's compute per proposed token over target-only's time per token.
    add_leviathan_bound(report, ours["draft_step_ms_p50"] / base["p50_ms_per_token"] if base["p50_ms_per_token"] else 0.0)
    plot(report, png)
    if as_json:
        typer.echo(json.dumps(report))
        return
    for mode in settings.modes:
        typer.secho(f"\n{mode} ({'pinned' if pinned else 'unpinned'}{', mTLS' if tls else ''})", bold=True)
        for system, r in report[mode].items():
            extra = ""
            if system == "specdec":
                extra = (f" alpha {r['alpha']:.3f}  accepted/round {r['mean_accepted_len']:.2f}  round p50 "
                         f"{r['round_ms_p50']:.1f} ms  overhead p50 {r['overhead_ms_p50']:.2f} ms  "
                         f"{r['bytes_per_round']:.0f} B/round")
            typer.echo(f"  {system:12s} {r['tokens_per_s']:8.1f} tok/s  x{r['speedup_vs_target_only']:.2f}  "
                       f"p50 {r['p50_ms_per_token']:.1f} ms/tok  p99 {r['p99_ms_per_token']:.1f}{extra}")
    typer.echo(f"\ngreedy outputs identical: {report['greedy_outputs_identical']}; "
               f"Leviathan bound x{ours['leviathan_predicted_speedup']} (c={ours['cost_ratio_c']}), "
               f"achieved {ours['fraction_of_leviathan_bound']:.2f} of it; chart: {png}")


@app.command("pair-report")
def pair_report(
    target: str = typer.Option(str(DEFAULT_TARGET)),
    draft: str = typer.Option(str(DEFAULT_DRAFT)),
    prompts: Path = typer.Option(DEFAULT_PROMPTS),
    new_tokens: int = typer.Option(64, help="greedy tokens per prompt for the acceptance measurement"),
    context: int = typer.Option(256, help="context length for the decode timings"),
):
    """Measure a pair: cost ratio c, greedy and temperature-1 acceptance, Leviathan's predicted speedup.

    The protocol runs on one core with one thread: `taskset -c 1 specdec pair-report`."""
    _from_checkout("pair-report", "reference_pair")
    from reference_pair.evaluate import evaluate

    typer.echo(json.dumps(evaluate(target, draft, str(prompts), new_tokens, context), indent=2))


# add_help_option=False: --help goes on to train-pair's own parser, which knows its flags (typer's would list none).
@app.command("train-pair", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_pair(ctx: typer.Context):
    """Train the reference tokenizer, target and distilled draft (`specdec train-pair --help`)."""
    _from_checkout("train-pair", "reference_pair")
    from reference_pair.cli import main

    main(list(ctx.args))


@app.command("trace-report")
def trace_report_command(
    files: list[Path] = typer.Argument(..., help="span files (JSONL from SPECDEC_TRACE_FILE, or a collector's "
                                                 "OTLP/JSON) or directories of them"),
    png: Path | None = typer.Option(None, help="chart path (default: FILE.breakdown.png)"),
    perfetto: Path | None = typer.Option(None, help="trace-event JSON path (default: FILE.perfetto.json)"),
    trace: str | None = typer.Option(None, help="only this trace id (or its prefix)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Per-round breakdown of exported spans (median, p90, share of wall), a PNG chart and a Perfetto timeline."""
    from specdec_cli.trace_report import trace_report

    try:
        trace_report(files, png, perfetto, as_json, trace)
    except (ValueError, FileNotFoundError) as error:
        typer.echo(f"specdec: {error}", err=True)
        raise typer.Exit(1)


@app.command()
def study(
    delay_ms: list[float] = typer.Option(..., help="one-way delay on each service link; repeatable"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per delay level, one per line"),
    target: str = typer.Option(str(DEFAULT_TARGET)),
    draft: str = typer.Option(str(DEFAULT_DRAFT)),
    prompts: Path = typer.Option(DEFAULT_PROMPTS, help="JSONL with a `prompt` field"),
    count: int = typer.Option(6, help="generations per delay level"),
    max_new_tokens: int = typer.Option(48),
    num_draft_tokens: int = typer.Option(4),
    isolation: str = typer.Option("auto", help="auto | netns | loopback"),
    out: Path | None = typer.Option(None, help="run directory (default: runs/study-TIMESTAMP)"),
    hold_cores_awake: bool = typer.Option(
        True, help="a lowest-priority spinner per core during the run, so idle-core wake-up latency is not "
                   "measured as network time"),
):
    """Latency study: services in network namespaces behind a one-way delay, breakdown from the traces."""
    import signal
    import time

    _from_checkout("study", "netlab")
    from local_stack.paths import load_prompts
    from specdec_cli.study import StudyPlan, print_study, run_study

    # SIGTERM unwinds like Ctrl-C, so the namespaces and processes are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = out or Path("runs") / time.strftime("study-%Y%m%d-%H%M%S")
    plan = StudyPlan(target, draft, load_prompts(prompts, count), list(delay_ms), out, max_new_tokens,
                     num_draft_tokens, isolation=isolation, hold_cores_awake=hold_cores_awake)
    try:
        results = run_study(plan)
    except RuntimeError as error:
        typer.echo(f"specdec: study failed: {error}", err=True)
        raise typer.Exit(1)
    print_study(results, as_json)


@app.command()
def plan(
    alpha: float | None = typer.Option(None, help="acceptance rate: Leviathan's per-token alpha (`specdec bench` "
                                                  "reports it as alpha)"),
    draft_step_ms: float | None = typer.Option(None, help="measured: one draft token on the draft's own device, ms"),
    colocated_draft_step_ms: float | None = typer.Option(
        None, help="measured: one draft token on the target's GPU, ms (plans the co-located placements)"),
    verify_ms: float | None = typer.Option(
        None, help="measured: a verify pass's cost A, ms; with --verify-per-token-ms B a pass feeding k tokens costs "
                   "A + B*k (a round feeds gamma + 1)"),
    verify_per_token_ms: float | None = typer.Option(None, help="measured: B of the verify pass, ms per fed token"),
    target_step_ms: float | None = typer.Option(None, help="measured: the target alone, ms per token (default: "
                                                           "verify(1))"),
    overhead_ms: float | None = typer.Option(
        None, help="measured per-round overhead, ms: the round's wall time less draft and verify compute (`specdec "
                   "bench`: overhead; default 0, then the predictions are floors)"),
    target_overhead_ms: float | None = typer.Option(
        None, help="the target alone's overhead per token beside its step, ms (default 0: the bare forward)"),
    rtt_ms: float = typer.Option(0.0, help="split placements: network round trip added to each call, ms"),
    draft_device: str | None = typer.Option(None, help="device description: the draft's GPU (H200, H100-SXM, "
                                                       "H100-PCIe, A100-80GB, L40S, L4, A10G, T4, RTX-4090)"),
    target_device: str | None = typer.Option(None, help="device description: the target's GPU"),
    draft_params: str | None = typer.Option(None, help="draft parameters, e.g. 1B, 1.24B, 350M"),
    target_params: str | None = typer.Option(None, help="target parameters, e.g. 8B"),
    draft_model: Path | None = typer.Option(None, help="a local model directory to count the draft's parameters in"),
    target_model: Path | None = typer.Option(None, help="a local model directory to count the target's parameters in"),
    dtype: str = typer.Option("bfloat16", help="weights' dtype for the device description (bytes per parameter)"),
    bandwidth_gbs: float | None = typer.Option(None, help="memory bandwidth (GB/s) of both devices, overriding the "
                                                          "table (one GPU, or a device it lacks)"),
    draft_bandwidth_gbs: float | None = typer.Option(None, help="the draft device's memory bandwidth, GB/s"),
    target_bandwidth_gbs: float | None = typer.Option(None, help="the target device's memory bandwidth, GB/s"),
    bench_json: Path | None = typer.Option(
        None, help="take alpha, the draft step, the verify pass and the overhead from `specdec bench --json` output "
                   "(or a line of benchmarking.sweep); other flags override what it gives"),
    gamma: int | None = typer.Option(None, help="also show every placement at this gamma"),
    max_gamma: int = typer.Option(16, min=1, help="the largest gamma considered"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    check_reference: str | None = typer.Option(
        None, help="e.g. 2,4,6: measure the shipped pair on this machine's cores in every placement at these "
                   "gammas (calibrating on split, no overlap, at gamma 0 and the smallest and largest) and print "
                   "predicted against measured tokens/s"),
    count: int = typer.Option(6, help="--check-reference: prompts per run"),
    max_new_tokens: int = typer.Option(96, help="--check-reference: tokens per generation"),
):
    """Predict which placement of draft and target pays (split over two devices, with or without overlap, or both on
    one GPU) and at which gamma, from measured step costs, a bench report, or GPUs and model sizes."""
    from speculation import placement as pl
    from specdec_cli import plan as planner

    if check_reference:
        _from_checkout("plan --check-reference", "benchmarking")
        result = planner.check_reference([int(g) for g in check_reference.split(",") if g.strip()], count,
                                         max_new_tokens)
        typer.echo(json.dumps(result) if as_json else planner.format_check(result))
        return
    try:
        values: dict = {}
        if draft_device or target_device or draft_params or target_params or draft_model or target_model:
            values.update(planner.costs_from_description(
                draft_device, target_device, draft_params, target_params, draft_model, target_model, dtype,
                bandwidth_gbs, draft_bandwidth_gbs, target_bandwidth_gbs))
        if bench_json:
            values.update(planner.costs_from_bench(json.loads(bench_json.read_text().splitlines()[0]
                                                              if bench_json.suffix == ".jsonl" else bench_json.read_text())))
        given = dict(alpha=alpha, draft_step_ms=draft_step_ms, colocated_draft_step_ms=colocated_draft_step_ms,
                     verify_base_ms=verify_ms, verify_per_token_ms=verify_per_token_ms, target_step_ms=target_step_ms,
                     overhead_ms=overhead_ms, target_overhead_ms=target_overhead_ms)
        values.update({k: v for k, v in given.items() if v is not None})
        missing = [flag for flag, key in (("--alpha", "alpha"), ("--draft-step-ms or --draft-device", "draft_step_ms"),
                                          ("--verify-ms or --target-device", "verify_base_ms")) if key not in values]
        if missing:
            raise ValueError(f"give {', '.join(missing)} (or --bench-json)")
        notes = list(values.pop("notes", ()))
        if values.get("colocated_draft_step_ms") is None:
            notes.append("co-located placements left out: give --colocated-draft-step-ms or --target-device")
        if "overhead_ms" not in values:
            notes.append("no --overhead-ms: predictions are floors (measure it with `specdec bench`)")
        costs = pl.Costs(rtt_ms=rtt_ms, notes=tuple(notes), **values)
        report = planner.plan_report(costs, max_gamma, gamma)
    except (ValueError, OSError, KeyError) as error:
        typer.echo(f"specdec: plan: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(report) if as_json else planner.format_report(report))


if __name__ == "__main__":
    app()
