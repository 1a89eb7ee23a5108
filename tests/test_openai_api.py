"""`specdec serve openai`: the OpenAI-compatible HTTP front, on a real stack of tiny models and a real uvicorn
server on a free localhost port, called with the official `openai` client (and raw HTTP where the wire
format itself is the point)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

import orchestrator.server as orchestrator_server
from openai_api.app import sse_events
from openai_api.chat_template import ChatTemplate
from openai_api.protocol import Envelope
from openai_api.server import OpenAISettings, start
from openai_api.tokenizer_files import TokenizerFiles
from specdec_client import Chunk, Unavailable
from tests.conftest import PROMPTS
from transport import free_port

# ChatML with a system default, block tags on their own lines (trim_blocks / lstrip_blocks matter), the BOS
# written by the template, and raise_exception for a role it does not know.
CHAT_TEMPLATE = """{{ bos_token }}
{% if messages[0]['role'] != 'system' %}
    {{ '<|im_start|>system\\nYou complete code.<|im_end|>\\n' }}
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\\n' }}
{% endif %}"""

MESSAGES = [{"role": "user", "content": "def fib(n):"}]
CONVERSATION = [{"role": "system", "content": "Python only."}, {"role": "user", "content": "import os\n"},
                {"role": "assistant", "content": "import sys"}, {"role": "user", "content": "class Foo:"}]


def tokenizer_copy(tiny, out, **config) -> str:
    """The tiny tokenizer in `out`, with `config` merged into its tokenizer_config.json."""
    AutoTokenizer.from_pretrained(tiny.tokenizer_dir).save_pretrained(out)
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return str(out)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny, tmp_path_factory) -> str:
    return tokenizer_copy(tiny, tmp_path_factory.mktemp("chat_tokenizer"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def stack(stacks):
    return stacks("different")


@pytest.fixture(scope="module")
def front(stack, chat_tokenizer):
    running = start(OpenAISettings(orchestrator=stack.address, port=0, tokenizer=chat_tokenizer))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_front(stack, tmp_path_factory):
    """Without --tokenizer (so the target's own, which has no chat template), with an API key file."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# the front's callers\nsk-right\n")
    running = start(OpenAISettings(orchestrator=stack.address, port=0, api_key_file=str(keys)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(front):
    with openai.OpenAI(base_url=front.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def sse_data(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_lists_the_target_the_orchestrator_reports(client, stack, tiny):
    (model,) = client.models.list().data
    assert model.id == stack.client().info().target_model == str(tiny.target)


def test_a_greedy_completion_equals_the_target_alone(client, model_name, stack, target_model, tokenizer):
    for prompt in PROMPTS[:3]:
        completion = client.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0)
        with stack.client() as sdk:
            expected = sdk.generate(prompt, max_new_tokens=24)  # the suite proves it equals the target alone
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            reference = target_model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=0)
        assert completion.choices[0].text == expected.text
        assert completion.choices[0].text == tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 24 and completion.usage.prompt_tokens == ids.shape[1]
        assert completion.usage.total_tokens == ids.shape[1] + 24


def test_streamed_chunks_concatenate_to_the_same_text_and_end_with_done(front, client, model_name):
    whole = client.completions.create(model=model_name, prompt=PROMPTS[3], max_tokens=40, temperature=0)
    body = {"model": model_name, "prompt": PROMPTS[3], "max_tokens": 40, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{front.base_url}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_data(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all(c["usage"] is None for c in chunks[:-1])

    streamed = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=30, temperature=0,
                                              stream=True)
    parts = list(streamed)
    assert parts[0].choices[0].delta.role == "assistant"
    assert all(p.object == "chat.completion.chunk" for p in parts)
    chat = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=30, temperature=0)
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason == "length"
    assert parts[-1].usage is None  # no usage chunk unless stream_options asks for it


def test_the_chat_template_renders_as_transformers_apply_chat_template(chat_tokenizer):
    hf = AutoTokenizer.from_pretrained(chat_tokenizer)
    files = TokenizerFiles.load(chat_tokenizer)
    template = ChatTemplate(files.chat_template, files.special_tokens)
    for messages in (MESSAGES, CONVERSATION):
        for add_generation_prompt in (True, False):
            assert template.render(messages, add_generation_prompt) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_a_chat_completion_generates_from_the_rendered_prompt(client, model_name, stack, chat_tokenizer):
    hf = AutoTokenizer.from_pretrained(chat_tokenizer)
    rendered = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    prompt_ids = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    chat = client.chat.completions.create(model=model_name, messages=CONVERSATION, max_completion_tokens=20,
                                          temperature=0)
    with stack.client() as sdk:
        expected = sdk.generate(rendered, max_new_tokens=20)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == len(prompt_ids) == expected.stats["prompt_tokens"]
    # Content given as text parts is the same conversation.
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    again = client.chat.completions.create(model=model_name, messages=parts, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == expected.text


def test_a_template_that_writes_the_bos_gets_one_as_in_apply_chat_template(tiny, tmp_path):
    # This tokenizer adds a BOS itself (as Llama's do) and the template writes one too.
    path = tokenizer_copy(tiny, tmp_path, chat_template=CHAT_TEMPLATE)
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(path)
    files = TokenizerFiles.load(path)
    rendered = ChatTemplate(files.chat_template, files.special_tokens).render(CONVERSATION)
    sent = files.prompt_text(rendered)
    expected = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert hf(rendered)["input_ids"] != expected  # sent as rendered, the BOS would be doubled
    assert hf(sent)["input_ids"] == expected  # what the orchestrator's tokenizer(text) makes of what is sent
    assert files.count(sent) == len(expected)
    plain = TokenizerFiles.load(str(tiny.tokenizer_dir))
    assert plain.prompt_text(rendered) == rendered  # a tokenizer that adds no BOS keeps the template's


def test_a_model_without_a_chat_template_is_a_bad_request(keyed_front):
    with openai.OpenAI(base_url=keyed_front.base_url, api_key="sk-right", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError, match="no chat template") as refused:
            c.chat.completions.create(model=c.models.list().data[0].id, messages=MESSAGES, max_tokens=4)
    assert refused.value.code == "no_chat_template"


def test_the_templates_own_refusal_is_a_bad_request_with_its_message(client, model_name):
    with pytest.raises(openai.BadRequestError, match="Unknown role: narrator"):
        client.chat.completions.create(model=model_name, max_tokens=4,
                                       messages=[{"role": "narrator", "content": "Once upon a time"}])


@pytest.mark.parametrize("endpoint, fields, param", [
    ("completions", {"n": 2}, "n"),
    ("chat", {"n": 2}, "n"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("completions", {"logprobs": 1}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
])
def test_parameters_the_server_cannot_honour_are_bad_requests(client, model_name, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        if endpoint == "chat":
            client.chat.completions.create(model=model_name, messages=MESSAGES, **{"max_tokens": 4, **fields})
        else:
            client.completions.create(model=model_name, prompt="x = 1", **{"max_tokens": 4, **fields})
    assert refused.value.param == param and refused.value.status_code == 400


def test_neutral_values_and_unknown_fields_are_accepted(client, model_name):
    completion = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=4, temperature=0, n=1, logprobs=False, frequency_penalty=0,
        user="someone", metadata={"team": "a"}, store=False, extra_body={"some_future_field": [1, 2]})
    assert completion.usage.completion_tokens == 4


def test_a_request_too_long_for_the_context_is_a_bad_request(front, client, model_name):
    with pytest.raises(openai.BadRequestError, match="max_tokens") as refused:
        client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=256)
    assert refused.value.code == "out_of_range"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):  # max_tokens defaulted
        client.completions.create(model=model_name, prompt="x = 1\n" * 200)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # refused before the stream starts
        client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=256, stream=True)
    malformed = httpx.post(f"{front.base_url}/completions", json={"model": model_name, "max_tokens": "many"})
    assert malformed.status_code == 400  # validation errors too: OpenAI's shape, not FastAPI's 422
    assert set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    assert "prompt" in malformed.json()["error"]["message"]


def test_without_max_tokens_a_completion_may_fill_the_context(client, model_name):
    completion = client.completions.create(model=model_name, prompt="x = 1\n" * 40, temperature=0)
    usage = completion.usage
    assert completion.choices[0].finish_reason == "length"
    assert usage.total_tokens == 256  # the tiny models' context


def test_a_missing_or_wrong_key_is_an_authentication_error_and_health_stays_open(keyed_front):
    with openai.OpenAI(base_url=keyed_front.base_url, api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError, match="not accepted"):
            c.models.list()
    missing = httpx.post(f"{keyed_front.base_url}/completions", json={"prompt": "x", "max_tokens": 2})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"http://127.0.0.1:{keyed_front.port}/health").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{keyed_front.port}/healthz").json() == {"status": "ok"}
    with openai.OpenAI(base_url=keyed_front.base_url, api_key="sk-right", max_retries=0) as c:
        assert c.completions.create(model=c.models.list().data[0].id, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_a_stopped_orchestrator_is_service_unavailable(stack):
    own = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{stack.verify.port}", draft=f"localhost:{stack.draft.port}", host="localhost"))
    running = start(OpenAISettings(orchestrator=f"localhost:{own.port}", port=0))
    try:
        own.stop(grace=None)
        with openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError, match="unavailable") as refused:
                c.completions.create(model=c.models.list().data[0].id, prompt="x", max_tokens=2)
        assert refused.value.status_code == 503
    finally:
        running.stop()


def test_closing_a_stream_after_its_first_chunk_frees_the_services_sessions(client, model_name, stacks):
    slow = stacks("disagreeing")  # one token per round: a generation that runs long enough to be interrupted
    running = start(OpenAISettings(orchestrator=slow.address, port=0))
    stores = (slow.verify.servicer.store, slow.draft.servicer.store)
    prompt_len = 4
    try:
        with openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=60) as c:
            stream = c.completions.create(model=c.models.list().data[0].id, prompt=[5, 6, 7, 8], max_tokens=240,
                                          temperature=0, stream=True)
            next(iter(stream))
            assert stores[0].stats().live_sessions == 1
            stream.close()
        longest = 0  # the verify session's length while it lived: the generation stopped short of its 244
        deadline = time.monotonic() + 10
        while any(s.stats().live_sessions for s in stores) and time.monotonic() < deadline:
            with stores[0]._lock:
                longest = max([longest, *(s.length for s in stores[0]._sessions.values())])
            time.sleep(0.002)
        assert [s.stats().live_sessions for s in stores] == [0, 0]
        assert longest < prompt_len + 120
    finally:
        running.stop()


def test_a_seed_makes_a_sampled_completion_reproducible(client, model_name, stack):
    def sample(seed):
        return client.completions.create(model=model_name, prompt=PROMPTS[4], max_tokens=24, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    with stack.client() as sdk:
        assert sdk.generate(PROMPTS[4], max_new_tokens=24, temperature=1.0, top_p=0.95, seed=7).text == first
    assert {sample(seed) for seed in (8, 9, 10)} != {first}


def test_stop_strings_cut_the_text_as_the_grpc_api_does(client, model_name, stack):
    greedy = client.completions.create(model=model_name, prompt=PROMPTS[5], max_tokens=32, temperature=0)
    text = greedy.choices[0].text
    stop = text[12:15]
    assert stop.strip()
    with stack.client() as sdk:
        expected = sdk.generate(PROMPTS[5], max_new_tokens=32, stop=[stop, "never there"])
    for given in ([stop, "never there"], stop):
        cut = client.completions.create(model=model_name, prompt=PROMPTS[5], max_tokens=32, temperature=0, stop=given)
        assert cut.choices[0].text == expected.text == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_speculative_decoding_statistics_are_present_and_consistent(stacks):
    agreeing = stacks("noisy")  # a draft the target accepts often, not always
    running = start(OpenAISettings(orchestrator=agreeing.address, port=0))
    try:
        with openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=60) as c:
            completion = c.completions.create(model=c.models.list().data[0].id, prompt=PROMPTS[6], max_tokens=48,
                                              temperature=0)
        stats = completion.model_extra["spec_decode"]
        assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"]
        assert stats["draft_acceptance_rate"] == pytest.approx(stats["num_accepted_tokens"] / stats["num_draft_tokens"])
        assert 0 < stats["num_drafts"] <= stats["rounds"]
        assert stats["mean_acceptance_length"] == pytest.approx(1 + stats["num_accepted_tokens"] / stats["num_drafts"])
        # Every committed token is an accepted draft, or a round's recovered or bonus token.
        assert stats["num_accepted_tokens"] + stats["recovered_tokens"] + stats["bonus_tokens"] + \
            stats["target_only_rounds"] == completion.usage.completion_tokens
        body = {"model": completion.model, "prompt": PROMPTS[6], "max_tokens": 48, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{running.base_url}/completions", json=body, timeout=60) as response:
            chunks = [json.loads(e) for e in sse_data(response)[:-1]]
    finally:
        running.stop()
    (last,) = [c for c in chunks if "spec_decode" in c]
    assert last is chunks[-1] and last["choices"][0]["finish_reason"] == "length"
    same = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "draft_acceptance_rate")
    assert {k: last["spec_decode"][k] for k in same} == {k: stats[k] for k in same}  # greedy: the same rounds


def test_a_failure_mid_stream_is_an_error_event_and_the_stream_ends():
    async def failing():
        yield Chunk([5], "b")
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, "verify service: connection reset")

    async def all_events():
        return [e async for e in sse_events(failing(), Chunk([4], "a"), Envelope.new(True, True, "m"), chat=True,
                                            include_usage=True, orchestrator="o:1")]

    body = "".join(asyncio.run(all_events()))
    assert body.endswith("\n\n")
    data = [json.loads(e.removeprefix("data: ")) for e in body.split("\n\n")[:-1]]
    assert [d["choices"][0]["delta"] for d in data[:3]] == [{"role": "assistant", "content": ""}, {"content": "a"},
                                                           {"content": "b"}]
    assert data[3] == {"error": {"message": "the orchestrator is unavailable; try again later",
                                 "type": "service_unavailable", "param": None, "code": "unavailable"}}
    assert len(data) == 4  # no usage chunk, no [DONE]


def test_the_front_loads_without_torch_or_transformers():
    code = ("import sys, openai_api.server; heavy = {'torch', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_openai_serves_from_the_cli_and_stops_on_sigterm(stack, chat_tokenizer):
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    refused = subprocess.run([sys.executable, "-m", "specdec_cli", "serve", "openai"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert refused.returncode == 2 and "openai refused to start: `serve openai` needs --orchestrator" in refused.stderr
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "specdec_cli", "serve", "openai", "--orchestrator", stack.address,
                                "--host", "127.0.0.1", "--port", str(port), "--tokenizer", chat_tokenizer,
                                "--model-name", "tiny-chat", "--max-request-mb", "0.05"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == ["tiny-chat"]
            chat = c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=5, temperature=0)
            assert chat.usage.completion_tokens == 5
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
            # --max-request-mb reaches the front: 0.05 MiB, so a 60 kB prompt is refused before it is read.
            with pytest.raises(openai.APIStatusError, match="max-request-mb") as refused_body:
                c.completions.create(model="tiny-chat", prompt="x" * 60_000, max_tokens=5)
            assert refused_body.value.status_code == 413
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
