"""OpenAI's request bodies (pydantic) and response objects (plain dicts), and what a request asks of the
orchestrator.

Honoured: `max_tokens` (chat: also `max_completion_tokens`, which wins), `temperature` (absent: 1.0,
OpenAI's default; 0 is greedy), `top_p`, `top_k` (vLLM's extension), `seed`, `stop` (a string or a list),
`stream`, `stream_options.include_usage`, `model` (must name the served model, as vLLM requires).
Refused with 400 unless absent or neutral: `n` and `best_of` other than 1, `logprobs`, `top_logprobs`,
`echo`, `suffix`, `logit_bias`, `frequency_penalty` / `presence_penalty` other than 0, `tools`,
`functions`, `response_format` other than text, audio output: honouring them would change the output.
Every other field is ignored, as OpenAI-compatible servers (vLLM) ignore fields they do not know; among
them `user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, `tool_choice`, `prompt_cache_key`,
`safety_identifier`, `prediction`, `reasoning_effort`, `verbosity`, `stream_options.continuous_usage_stats`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from openai_api.errors import bad_request

# The SDK says "eos" for an end-of-sequence token; OpenAI calls that "stop", like a stop string.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
DEFAULT_TEMPERATURE = 1.0  # OpenAI's, when a request has none
UINT64 = 1 << 64
INT32 = 1 << 31  # the gRPC API's max_new_tokens, top_k and token ids are int32


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, not refused
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None


def _refuse(param: str, why: str):
    raise bad_request(f"{param} is not supported by this server: {why}", param, "unsupported_parameter")


def check_supported(request: _Common) -> None:
    """400 for a field whose value this server cannot honour."""
    if request.n not in (None, 1):
        _refuse("n", f"it returns one choice per request (n=1), got n={request.n}; send {request.n} requests "
                     "(with different seeds) instead")
    if isinstance(request, CompletionRequest):
        if request.logprobs is not None:
            _refuse("logprobs", "the orchestrator returns tokens without their log probabilities")
        if request.best_of not in (None, 1):
            _refuse("best_of", f"it generates one candidate (best_of=1), got {request.best_of}")
        if request.echo:
            _refuse("echo", "the prompt is not returned with the completion")
        if request.suffix:
            _refuse("suffix", "insertion (a suffix after the completion) is not supported")
    if isinstance(request, ChatCompletionRequest):
        if request.logprobs:
            _refuse("logprobs", "the orchestrator returns tokens without their log probabilities")
        if request.top_logprobs:
            _refuse("top_logprobs", "the orchestrator returns tokens without their log probabilities")
        if request.tools or request.functions:
            _refuse("tools" if request.tools else "functions", "tool calls are not parsed from the output")
        if request.response_format and request.response_format.get("type", "text") != "text":
            _refuse("response_format", f"constrained output ({request.response_format.get('type')}) is not "
                                       "supported; only {'type': 'text'}")
        if request.audio or (request.modalities and set(request.modalities) - {"text"}):
            _refuse("modalities", "the model produces text only")
    if request.logit_bias:
        _refuse("logit_bias", "sampling has no per-token bias")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            _refuse(name, "sampling has no repetition penalties; send 0 or leave it out")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def sampling_options(request: _Common) -> dict:
    """The SDK's keyword arguments for what the request asks (not max_new_tokens)."""
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    if not (math.isfinite(temperature) and temperature >= 0):
        raise bad_request(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}", "temperature")
    options = {"temperature": temperature, "stop": stop_strings(request.stop)}
    if request.top_p is not None:
        if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
            raise bad_request(f"top_p must be in (0, 1], got {request.top_p}", "top_p")
        options["top_p"] = request.top_p
    if request.top_k is not None:
        if not 0 <= request.top_k < INT32:
            raise bad_request(f"top_k must be >= 0 (0: no top-k) and below 2**31, got {request.top_k}", "top_k")
        options["top_k"] = request.top_k
    if request.seed is not None:
        if not -(1 << 63) <= request.seed < UINT64:
            raise bad_request(f"seed must be a 64-bit integer, got {request.seed}", "seed")
        options["seed"] = request.seed % UINT64  # a negative seed stands for its two's complement
    return options


def requested_max_tokens(request: _Common) -> int | None:
    value, name = request.max_tokens, "max_tokens"
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        value, name = request.max_completion_tokens, "max_completion_tokens"
    if value is not None and value < 1:
        raise bad_request(f"{name} must be at least 1, got {value}", name)
    if value is not None and value >= INT32:
        raise bad_request(f"{name} is too large: {value} (the prompt plus it must fit the model's context)", name)
    return value


def completion_prompt(request: CompletionRequest) -> str | list[int]:
    """One prompt: a string or token ids (a list of one of either is unwrapped)."""
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        raise bad_request("prompt: one prompt per request (a string or a list of token ids); got a batch of "
                          f"{len(prompt)}: send one request each", "prompt")
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if isinstance(prompt, list) and not all(0 <= t < INT32 for t in prompt):
        bad = next(t for t in prompt if not 0 <= t < INT32)
        raise bad_request(f"prompt: token id {bad} is not in the model's vocabulary", "prompt")
    return prompt


def message_dicts(request: ChatCompletionRequest) -> list[dict]:
    """Messages for the template: content given as a list of text parts becomes one string (the parts joined
    by newlines, as vLLM does for string-content templates)."""
    if not request.messages:
        raise bad_request("messages is empty: send at least one message", "messages")
    messages = []
    for i, message in enumerate(request.messages):
        if not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] has no role", f"messages.{i}.role")
        content = message.get("content")
        if content is None and message["role"] != "assistant":
            raise bad_request(f"messages[{i}] ({message['role']}) has no content", f"messages.{i}.content")
        if not isinstance(content, (str, list, type(None))):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts, got "
                              f"{type(content).__name__}", f"messages.{i}.content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad_request(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                      f"messages.{i}.content")
                texts.append(part["text"])
            message = {**message, "content": "\n".join(texts)}
        messages.append(message)
    return messages


def usage(stats: dict) -> dict:
    prompt, completion = int(stats.get("prompt_tokens", 0)), int(stats.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def spec_decode_stats(stats: dict) -> dict:
    """The generation's speculative-decoding statistics, under vLLM's names where vLLM has them (its
    SpecDecodingStats and metrics): num_drafts (rounds that drafted), num_draft_tokens, num_accepted_tokens,
    draft_acceptance_rate = num_accepted_tokens / num_draft_tokens (a fraction; vLLM logs it as a percentage),
    mean_acceptance_length = 1 + num_accepted_tokens / num_drafts (tokens per drafting round, the recovered or
    bonus token included). Then this project's own: rounds (target-only ones too), target_only_rounds,
    recovered_tokens, bonus_tokens, alpha (Leviathan's per-token acceptance estimate),
    acceptance_by_position (accepted / drafted at each draft position), tokens_per_s and wall_ms as the
    orchestrator measured them."""
    rounds = int(stats.get("rounds", 0))
    target_only = int(stats.get("target_only_rounds", 0))
    drafted = int(stats.get("drafted_tokens", 0))
    accepted = int(stats.get("accepted_tokens", 0))
    drafts = rounds - target_only
    return {
        "num_drafts": drafts, "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
        "draft_acceptance_rate": float(stats.get("acceptance_rate", 0.0)),
        "mean_acceptance_length": 1.0 + accepted / drafts if drafts else 0.0,
        "rounds": rounds, "target_only_rounds": target_only,
        "recovered_tokens": int(stats.get("recovered_tokens", 0)), "bonus_tokens": int(stats.get("bonus_tokens", 0)),
        "alpha": float(stats.get("alpha", 0.0)),
        "acceptance_by_position": [float(x) for x in stats.get("acceptance_by_position", [])],
        "tokens_per_s": float(stats.get("tokens_per_s", 0.0)), "wall_ms": float(stats.get("wall_ms", 0.0)),
    }


@dataclass
class Envelope:
    """What every object of one response shares: id, object type, creation time, model."""

    id: str
    object: str
    created: int
    model: str

    @classmethod
    def new(cls, chat: bool, streamed: bool, model: str) -> Envelope:
        if chat:
            return cls(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk" if streamed else "chat.completion",
                       int(time.time()), model)
        return cls(f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), model)

    def wrap(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def choice(chat: bool, text: str | None, finish_reason: str | None, streamed: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if streamed:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}
