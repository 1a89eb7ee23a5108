"""The OpenAI HTTP front attacked from outside: oversized and malformed bodies, parameter edges, template
injection, API-key tricks, and garbage from one caller while another streams. Every refusal is a 4xx in
OpenAI's error shape, never a 500, a hang or harm to another caller's output."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from openai_api.chat_template import ChatTemplate, ChatTemplateError
from openai_api.server import OpenAISettings, start
from tests.conftest import PROMPTS
from tests.test_openai_api import CHAT_TEMPLATE, tokenizer_copy


@pytest.fixture(scope="module")
def stack(stacks):
    return stacks("different")


@pytest.fixture(scope="module")
def front(stack, tiny, tmp_path_factory):
    tokenizer = tokenizer_copy(tiny, tmp_path_factory.mktemp("red_tokenizer"), chat_template=CHAT_TEMPLATE)
    running = start(OpenAISettings(orchestrator=stack.address, port=0, tokenizer=tokenizer, max_request_mb=1))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed(stack, tmp_path_factory):
    keys = tmp_path_factory.mktemp("red_keys") / "keys.txt"
    keys.write_text("sk-right\n")
    running = start(OpenAISettings(orchestrator=stack.address, port=0, api_key_file=str(keys)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(front):
    with httpx.Client(base_url=front.base_url, timeout=30) as c:
        yield c


def refused(response: httpx.Response, status: int, *words: str) -> dict:
    """A refusal in OpenAI's shape with the given status and message words."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    return error


def completion(http, **fields) -> httpx.Response:
    return http.post("/completions", json={"prompt": "def f():", "max_tokens": 4, "temperature": 0, **fields})


def chat(http, messages, **fields) -> httpx.Response:
    return http.post("/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0, **fields})


# ---- 1. body size ----

def test_a_body_over_the_limit_is_413_before_it_is_read(http):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'", "max_tokens": 1}'
    error = refused(http.post("/completions", content=big, headers={"content-type": "application/json"}), 413,
                    "1 MB", "--max-request-mb")
    assert error["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_is_413(http):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * (64 << 10)
        yield b'"}'
    refused(http.post("/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_a_content_length_claiming_huge_is_413_without_waiting_for_the_body(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 99999999999\r\n\r\n{}")
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    assert '"request_too_large"' in head


def test_a_body_under_the_limit_still_works(http):
    assert completion(http, user="x" * 500_000).status_code == 200  # an ignored field: only the size matters


# ---- 2. malformed bodies ----

@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00garbage", b"", b"[1, 2]", b"42", b"null",
                                  b'"a string"', b"[" * 100_000 + b"]" * 100_000,
                                  b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"])
def test_malformed_bodies_are_400(http, body):
    refused(http.post("/completions", content=body, headers={"content-type": "application/json"}), 400)
    refused(http.post("/chat/completions", content=body, headers={"content-type": "application/json"}), 400)


def test_wrong_content_type_is_400_not_500(http):
    refused(http.post("/completions", content=b"prompt=x", headers={"content-type": "text/plain"}), 400)
    refused(http.post("/completions", data={"prompt": "x"}), 400)


def test_duplicate_keys_take_the_last_as_json_does(http):
    body = b'{"prompt": "def f():", "max_tokens": 99999999, "max_tokens": 3, "temperature": 0}'
    response = http.post("/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3


# ---- 3. parameter edges ----

@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 10 ** 12}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"), ({"top_k": -3}, "top_k"),
    ({"top_k": 2 ** 40}, "top_k"),
    ({"seed": 2 ** 70}, "seed"), ({"stop": ["x"] * 1000}, "stop"), ({"stop": "s" * 100_000}, "stop"),
    ({"prompt": []}, "prompt"), ({"prompt": [-1, 5]}, "prompt"), ({"prompt": [2 ** 40]}, "prompt"),
    ({"prompt": [10 ** 7]}, "prompt"), ({"prompt": ""}, "prompt")])
def test_parameter_edges_are_400(http, fields, param):
    error = refused(completion(http, **fields), 400)
    assert error["param"] == param or param in error["message"], error


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_400(http, literal):
    for field in (b"temperature", b"top_p"):
        body = b'{"prompt": "x", "max_tokens": 2, "' + field + b'": ' + literal + b"}"
        error = refused(http.post("/completions", content=body, headers={"content-type": "application/json"}), 400)
        assert error["param"] == field.decode(), error


def test_negative_seed_and_sane_edges_work(http):
    for fields in ({"seed": -1, "temperature": 0.8}, {"top_p": 1.0, "top_k": 0}, {"top_p": 1e-6, "temperature": 1}):
        assert completion(http, **fields).status_code == 200, fields


@pytest.mark.parametrize("messages, words", [
    ([], ["messages"]), ([{"role": "user"}], ["content"]), ([{"content": "hi"}], ["role"]),
    ([{"role": "hacker", "content": "x"}], ["Unknown role"]), (["just a string"], ["messages.0"]),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ["text parts"]),
    ([{"role": "user", "content": 42}], ["content"]),
    ([{"role": "user", "content": "x"}] * 20_000, ["shorten the prompt"])])
def test_bad_messages_are_400(http, messages, words):
    refused(chat(http, messages), 400, *words)


def test_a_hundred_thousand_messages_are_413_under_the_size_limit(http):
    refused(chat(http, [{"role": "user", "content": "x"}] * 100_000), 413)


def test_content_as_text_parts_works(http):
    parts = [{"type": "text", "text": "def fib(n):"}]
    assert chat(http, [{"role": "user", "content": parts}]).status_code == 200


# ---- 4. template injection ----

def test_jinja_in_content_is_literal_text():
    template = ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<s>"})
    rendered = template.render([{"role": "user", "content": "{{ 7*7 }} {% for x in y %}z{% endfor %}"}])
    assert "{{ 7*7 }} {% for x in y %}z{% endfor %}" in rendered and "49" not in rendered


def test_jinja_in_content_is_not_evaluated_over_http(http):
    assert chat(http, [{"role": "user", "content": "{{ 7*7 }}{% raw %}"}]).status_code == 200


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append(1) }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}"])
def test_sandbox_escapes_are_clear_errors(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, {}).render([{"role": "user", "content": "x"}])


def test_attribute_lookups_through_filters_stay_in_the_sandbox():
    source = "{{ messages|map(attribute='__class__')|list }}{{ ''|attr('__class__') }}"
    rendered = ChatTemplate(source, {}).render([{"role": "user", "content": "x"}])
    assert "class" not in rendered


def test_a_template_that_recurses_or_loops_forever_is_an_error_not_a_crash():
    source = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, {}).render([{"role": "user", "content": "x"}])


# ---- 5. auth ----

@pytest.fixture(scope="module")
def keyed_url(keyed):
    return keyed.base_url


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Bearersk-right"}, {"authorization": "sk-right"},
    {"authorization": "Basic sk-right"}, {"authorization": "Bearer " + "k" * 60_000},
    {"x-api-key": "sk-right"}])
def test_wrong_or_malformed_keys_are_401(keyed_url, headers):
    response = httpx.get(f"{keyed_url}/models", headers=headers, timeout=10)
    if response.status_code == 431:  # the HTTP layer's own refusal of a huge header is fine too
        return
    refused(response, 401)


def test_key_in_the_query_string_is_refused(keyed_url):
    refused(httpx.get(f"{keyed_url}/models?api_key=sk-right", timeout=10), 401)
    refused(httpx.get(f"{keyed_url}/models?key=sk-right&authorization=Bearer%20sk-right", timeout=10), 401)


@pytest.mark.parametrize("value", ["bearer sk-right", "BEARER sk-right", "Bearer   sk-right"])
def test_scheme_case_and_spaces_are_tolerated(keyed_url, value):
    assert httpx.get(f"{keyed_url}/models", headers={"authorization": value}, timeout=10).status_code == 200


def test_two_authorization_headers_are_401(keyed_url):
    for pair in ([("authorization", "Bearer sk-right"), ("authorization", "Bearer sk-right")],[("authorization", "Bearer sk-wrong"), ("authorization", "Bearer sk-right")],
                 [("authorization", "Bearer sk-right"), ("authorization", "Bearer sk-wrong")]):
        refused(httpx.get(f"{keyed_url}/models", headers=pair, timeout=10), 401, "one Authorization header")


def test_nothing_leaks_without_a_key(keyed, keyed_url):
    root = f"http://127.0.0.1:{keyed.port}"
    for method, url in [("GET", f"{keyed_url}/models"), ("POST", f"{keyed_url}/completions"),
                        ("GET", f"{root}/nope"), ("GET", f"{root}/v1/nope"), ("DELETE", f"{keyed_url}/models"),
                        ("OPTIONS", f"{keyed_url}/models"), ("HEAD", f"{keyed_url}/models"), ("GET", f"{root}/docs"),
                        ("GET", f"{root}/openapi.json"), ("GET", f"{root}/health/../v1/models"),
                        ("GET", f"{root}//v1/models"), ("GET", f"{root}/health/")]:
        response = httpx.request(method, url, timeout=10)
        assert response.status_code == 401, (method, url, response.status_code)
    assert httpx.get(f"{root}/health", timeout=10).json() == {"status": "ok"}


# ---- 6. isolation ----

def test_garbage_from_one_caller_does_not_change_anothers_stream(front, http):
    body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream": True}

    def streamed() -> str:
        text = []
        with httpx.stream("POST", f"{front.base_url}/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    text += [c["text"] for c in json.loads(line[6:])["choices"]]
        return "".join(text)

    solo = streamed()
    stop = threading.Event()
    statuses = []

    def attack():
        with httpx.Client(base_url=front.base_url, timeout=30) as c:
            garbage = [b"{", b"[" * 20_000, b'{"prompt": [-1]}', b'{"prompt": "x", "max_tokens": 1e400}',
                       b'{"prompt": "x", "temperature": NaN, "max_tokens": 2}', b"\xff" * 1000]
            while not stop.is_set():
                for g in garbage:
                    statuses.append(c.post("/completions", content=g,
                                           headers={"content-type": "application/json"}).status_code)

    attackers = [threading.Thread(target=attack) for _ in range(2)]
    for t in attackers:
        t.start()
    try:
        results = [streamed() for _ in range(2)]
    finally:
        stop.set()
        for t in attackers:
            t.join(30)
    assert results == [solo, solo]
    assert statuses and all(400 <= s < 500 for s in statuses), sorted(set(statuses))
