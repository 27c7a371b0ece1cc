"""`localgpt serve` through the official openai client, against a real server on 127.0.0.1 started by the tests
(the real CLI, in a subprocess): the API's shapes, greedy text equal to `localgpt generate`'s, beams equal to
localgpt's beam search (itself held to transformers'), concurrency, and every row of docs/errors.md's serve table,
each followed by a request that must still be answered correctly."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPT = "Tell me about the sea"


class Server:
    def __init__(self, folder: Path, tmp: Path, *args: str):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localgpt", "serve", "-m", str(folder), "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"), stdin=subprocess.DEVNULL,
            env={**os.environ, "LOCALGPT_HOME": str(tmp / "home")})
        deadline = time.monotonic() + 120
        while "serving" not in self.stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start: {self.stderr()}")
            time.sleep(0.1)
        self.port = int(self.stderr().split("http://127.0.0.1:")[1].split("/")[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text()

    def client(self, api_key: str = "unused", **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


REFERENCES = {}  # folder → the transformers model tiny_model saved there (the oracle for beams)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "served"  # the model's id on the server: its folder's name
    path.mkdir()
    REFERENCES[path] = tiny_model(path, "llama", tokenizer=True, eos_token_id=None)
    return path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    running = Server(folder, tmp_path_factory.mktemp("serve"), "--parallel", "4")
    yield running
    assert running.stop() == 0


def chat(client, content: str = PROMPT, **kwargs):
    return client.chat.completions.create(model=kwargs.pop("model", "served"), messages=[{"role": "user",
                                          "content": content}], **kwargs)


def cli_answer(folder: Path, prompt: str, tokens: int, *args: str) -> str:
    result = run_cli("generate", "-m", str(folder), prompt, "-t", "0", "-n", str(tokens), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


@pytest.fixture(scope="module")
def expected(folder) -> str:
    """What `localgpt generate` answers greedily: what the server must answer too."""
    return cli_answer(folder, PROMPT, 12)


class Reply:
    """A raw HTTP answer (http.client: bodies the openai client would refuse to send)."""

    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def request(server, method: str, path: str, content: bytes | str | None = None, **headers) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path, body=content, headers={"content-type": "application/json", **headers})
        response = connection.getresponse()
        return Reply(response.status, response.read().decode())
    finally:
        connection.close()


def assert_still_serving(server, expected: str) -> None:
    assert request(server, "GET", "/health").json() == {"status": "ok"}
    assert chat(server.client(), max_tokens=12, temperature=0).choices[0].message.content == expected


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["served"]
    assert request(server, "GET", "/health").status_code == 200
    missing = request(server, "GET", "/v1/nothing")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]


def test_chat_greedy_equals_generate_streamed_or_not(server, expected):
    client = server.client()
    answer = chat(client, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 0
    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_completions_with_logprobs(server, folder):
    client = server.client()
    raw = cli_answer(folder, "Once upon a time", 6, "--raw")
    answer = client.completions.create(model="served", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       logprobs=2)
    assert answer.choices[0].text == raw
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == 6 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    streamed = client.completions.create(model="served", prompt="Once upon a time", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == raw


def test_chat_logprobs_n_and_seed(server):
    client = server.client()
    answer = chat(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= 0
    sampled = [chat(client, max_tokens=8, temperature=1.0, n=2, seed=11) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1]  # seeded: repeatable
    assert texts[0][0] != texts[0][1]  # and the two choices are two draws


def test_stop_strings_and_sampling_extensions(server, expected):
    client = server.client()
    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]
    answer = chat(client, max_tokens=12, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == expected[: expected.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    penalized = chat(client, max_tokens=12, temperature=0, frequency_penalty=2.0, extra_body={"top_k": 5})
    assert penalized.choices[0].message.content != expected  # the penalty changes the greedy answer


def test_beam_search_equals_transformers_beams(server, folder):
    from localgpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    prompt = torch.tensor([ids])
    beams = REFERENCES[folder].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                        do_sample=False, num_beams=3, early_stopping="never", num_return_sequences=2,
                                        pad_token_id=0)
    texts = [tokenizer.decode(row[len(ids):].tolist()) for row in beams]
    extra = {"num_beams": 3, "early_stopping": "never"}
    best = chat(server.client(), max_tokens=10, extra_body=extra)
    assert best.choices[0].message.content == texts[0]
    streamed = chat(server.client(), max_tokens=10, extra_body=extra, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == texts[0]
    both = chat(server.client(), max_tokens=10, n=2, extra_body=extra)
    assert [c.message.content for c in both.choices] == texts


def test_json_schema_answers_always_parse_and_match(server):
    """Constrained decoding: even a random tiny model answers with JSON that parses and matches the schema."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}},
              "required": ["ok", "count"], "additionalProperties": False}
    answer = chat(server.client(), max_tokens=30, temperature=1.0, n=3, seed=1,
                  response_format={"type": "json_schema", "json_schema": {"name": "check", "schema": schema}})
    for choice in answer.choices:
        value = json.loads(choice.message.content)
        assert set(value) == {"ok", "count"} and isinstance(value["ok"], bool) and 0 <= value["count"] <= 9
        assert choice.finish_reason == "stop"
    streamed = chat(server.client(), max_tokens=30, temperature=0, stream=True,
                    response_format={"type": "json_schema", "json_schema": {"name": "check", "schema": schema}})
    assert set(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))) == {"ok",
                                                                                                          "count"}


def test_sixteen_concurrent_streams_each_get_their_own_answer(server, folder):
    prompts = [f"Story number {i}" for i in range(16)]
    expected = {p: cli_answer(folder, p, 10) for p in prompts[:3]}  # three checked against the CLI
    results: dict[str, str] = {}

    def stream(prompt: str) -> None:
        chunks = chat(server.client(), prompt, max_tokens=10, temperature=0, stream=True)
        results[prompt] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 16
    for prompt, answer in expected.items():
        assert results[prompt] == answer
    alone = {p: chat(server.client(), p, max_tokens=10, temperature=0).choices[0].message.content for p in prompts}
    assert results == alone  # batched with 3 others (4 rows) or alone: the same greedy text


def post(server, body: bytes | str, path: str = "/v1/chat/completions", **headers) -> Reply:
    return request(server, "POST", path, body, **headers)


def body(**fields) -> str:
    return json.dumps({"messages": [{"role": "user", "content": PROMPT}], **fields})


@pytest.mark.parametrize("row, request_body, status, message", [
    ("malformed JSON", '{"messages": [', 400, "the body is not valid JSON"),
    ("negative max_tokens", body(max_tokens=-1), 400, "max_tokens must be >= 1, not -1"),
    ("unknown field", body(frobnicate=True), 400, "unknown field 'frobnicate'"),
    ("unsupported response_format", body(response_format={"type": "grammar"}), 400,
     "response_format 'grammar' is not one of text, json_object, json_schema"),
    ("invalid JSON schema", body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema":
                                                                                       {"type": "nonsense"}}}),
     400, "the JSON schema cannot be used: Invalid type: nonsense"),
    ("tools, template without", body(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "the chat template of 'served' does not take tools"),
    ("wrong type", body(temperature="hot"), 400, "'temperature'"),
    ("over-context prompt", body(messages=[{"role": "user", "content": "word " * 400}]), 400,
     "tokens but the model's context is 256 tokens"),
    ("over-context max_tokens", body(max_tokens=5000), 400, "exceed the model's context of 256 tokens"),
    ("unknown model", body(model="gpt-4"), 404, "model 'gpt-4' is not served here"),
    ("n out of range", body(n=99), 400, "n must be between 1 and 16"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, expected, row, request_body, status,
                                                                 message):
    response = post(server, request_body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"], row
    assert_still_serving(server, expected)


def test_a_body_over_the_limit_is_refused_unread(server, expected):
    response = post(server, body(padding="x" * (10 * 1024 * 1024)))  # 10 MB
    assert response.status_code == 413 and "bytes" in response.json()["error"]["message"]
    assert_still_serving(server, expected)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, expected):
    """Four streams of 200 tokens are dropped after their first chunk: if their rows stayed busy, the next
    request would wait for them (4 rows); it is answered at once instead."""
    for _ in range(4):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", body=body(max_tokens=200, temperature=0, stream=True),
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connection.close()  # gone mid-stream
    started = time.monotonic()
    assert_still_serving(server, expected)
    assert time.monotonic() - started < 30
    assert "200 tokens" not in server.stderr()  # none of the dropped streams ran to its end


def test_a_hundred_requests_while_one_is_decoding(server, expected):
    """A long stream decodes while 100 short requests arrive from 10 threads: every one is answered correctly,
    and the long one finishes."""
    long_answer: list[str] = []

    def long_stream() -> None:
        chunks = chat(server.client(), max_tokens=120, temperature=0, stream=True)
        long_answer.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    answers: list[str] = []

    def short_requests() -> None:
        client = server.client()
        for _ in range(10):
            answers.append(chat(client, max_tokens=12, temperature=0).choices[0].message.content)

    threads = [threading.Thread(target=long_stream)] + [threading.Thread(target=short_requests) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert answers == [expected] * 100
    assert len(long_answer) == 1 and long_answer[0].startswith(expected)


def test_ctrl_c_stops_the_server_cleanly(folder, tmp_path):
    running = Server(folder, tmp_path)
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(timeout=30) == 0
    assert running.stderr().rstrip().endswith("localgpt: stopped") and "Traceback" not in running.stderr()


def test_api_key_and_sigterm(folder, tmp_path, expected):
    keyed = Server(folder, tmp_path, "--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            chat(keyed.client("wrong"), max_tokens=2)
        assert chat(keyed.client("sesame"), max_tokens=12, temperature=0).choices[0].message.content == expected
        assert request(keyed, "GET", "/health").status_code == 200  # health needs no key
    finally:
        assert keyed.stop() == 0
    log = keyed.stderr()
    assert "POST /v1/chat/completions 401 0 tokens" in log and "POST /v1/chat/completions 200 12 tokens" in log
    assert log.rstrip().endswith("localgpt: stopped")
    assert "Traceback" not in log


def test_the_port_is_busy(folder, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "-m", str(folder), "--port", str(port), env={"LOCALGPT_HOME": str(tmp_path)})
    assert result.returncode == 1 and result.stderr.strip().endswith(f"cannot listen on 127.0.0.1:{port} "
                                                                     "(Address already in use)"), result.stderr


def test_serving_is_one_worker_thread_batching(server):
    """The figures for docs/benchmarks.md come from benchmarks/bench_serve.py; here only that the batch engine
    is what serves: several streams produce tokens at once rather than queueing one by one (with --parallel 1
    this fails).

    The clients are made beforehand and the requests leave together (building an openai client takes ~100 ms,
    which once let a 40-token answer finish before the last request had arrived), and each answer is 200 tokens,
    so that arrival jitter is small next to a stream's length. The first chunk, the role, is sent before the
    job reaches the engine, so a stream starts at its first chunk with text."""
    torch.manual_seed(0)
    clients = [server.client() for _ in range(4)]
    together = threading.Barrier(4)
    started: dict[int, float] = {}
    finished: dict[int, float] = {}

    def stream(index: int) -> None:
        together.wait(timeout=60)
        for chunk in chat(clients[index], f"Overlap {index}", max_tokens=200, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                started.setdefault(index, time.monotonic())
        finished[index] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(finished) == 4 and len(started) == 4
    assert max(started.values()) < min(finished.values())  # all four were streaming at once


@pytest.mark.slow
def test_smollm2_answers_through_the_server_as_through_generate(tmp_path):
    """The real model: the openai client gets `localgpt generate`'s greedy answer, Paris included."""
    import smollm2

    folder = smollm2.hf_folder()
    question = "What is the capital of France?"
    expected = cli_answer(folder, question, 20)
    assert "Paris" in expected
    real = Server(folder, tmp_path, "--parallel", "2")
    try:
        client = real.client()
        (model,) = [m.id for m in client.models.list().data]
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=20, temperature=0)
        assert answer.choices[0].message.content == expected
        as_json = client.chat.completions.create(
            model=model, max_tokens=40, temperature=0, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": question + " Answer in JSON with the key \"capital\"."}])
        assert "Paris" in json.dumps(json.loads(as_json.choices[0].message.content))  # any JSON object
        schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
                  "additionalProperties": False}
        shaped = client.chat.completions.create(
            model=model, max_tokens=40, temperature=0, messages=[{"role": "user", "content": question}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert json.loads(shaped.choices[0].message.content)["capital"] == "Paris"
    finally:
        assert real.stop() == 0


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call:{% for tool in tools %} {{ tool.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Rome"]}},
                                                "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {},
                                                                        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from helpers import write_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tooled"
    folder.mkdir()
    tiny_model(folder, "llama", tokenizer=True, eos_token_id=None)
    write_tokenizer(folder, chat_template=TOOLS_TEMPLATE)
    running = Server(folder, tmp_path_factory.mktemp("tools"))
    yield running
    assert running.stop() == 0


def test_a_required_tool_call_is_a_valid_call(tool_server):
    """tool_choice required: the answer is constrained to one call of a given tool with arguments that match its
    schema, returned as OpenAI's tool_calls (even from a random tiny model)."""
    client = tool_server.client()
    for seed in range(3):
        answer = client.chat.completions.create(model="tooled", messages=[{"role": "user", "content": "Weather?"}],
                                                tools=[WEATHER, TIME], tool_choice="required", max_tokens=40,
                                                temperature=1.0, seed=seed)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert (call.function.name, arguments in ({"city": "Paris"}, {"city": "Rome"})) == ("weather", True) or \
            (call.function.name, arguments) == ("time", {})
    named = client.chat.completions.create(model="tooled", messages=[{"role": "user", "content": "Time?"}],
                                           tools=[WEATHER, TIME], max_tokens=40,
                                           tool_choice={"type": "function", "function": {"name": "time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "time"
    chunks = list(client.chat.completions.create(model="tooled", messages=[{"role": "user", "content": "Rome?"}],
                                                 tools=[WEATHER], tool_choice="required", max_tokens=40,
                                                 stream=True))
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function":
                                                                    {"name": "weather",
                                                                     "arguments": '{"city": "Rome"}'}}]},
               {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    follow = client.chat.completions.create(model="tooled", messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=5, temperature=0)
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].finish_reason == "length"


def test_auto_tool_calls_are_read_from_the_tool_call_form():
    from localgpt.serve import tool_calls_in

    text = 'Let me look. <tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>'
    calls, rest = tool_calls_in(text, ["weather"], forced=False)
    assert rest == "Let me look." and calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Rome"}'}
    assert tool_calls_in('<tool_call>{"name": "other", "arguments": {}}</tool_call>', ["weather"], False)[0] == []
    assert tool_calls_in("just text", ["weather"], False) == ([], "just text")
