"""The HTTP server, through the official `openai` client and raw sockets, on 127.0.0.1.

Every text is checked against `model.generate` run alone with the same settings (generate is
held to transformers in test_generate.py) on the bundled model, whose vocabulary is GPT-2's so
that any text is a valid prompt.
"""

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from numpy_gpt2.model import GPT2
from numpy_gpt2.serve import CHAT_STOP, Server, chat_prompt
from numpy_gpt2.tokenizer import Tokenizer
from numpy_gpt2.weights.resolve import resolve_model

openai = pytest.importorskip("openai")

KEY = "test-key"


@pytest.fixture(scope="module")
def model():
    return GPT2.from_pretrained(resolve_model("fortunes"))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    """A server on a free port with an API key, stopped after the module's tests."""
    srv = Server("127.0.0.1", 0, api_key=KEY, write_timeout=3.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.load(model, tokenizer, "fortunes", max_batch=4, max_queue=8)
    yield srv
    srv.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=KEY, max_retries=0,
                         timeout=60)


def _expected(model, tokenizer, prompt, max_tokens, temperature=1.0, top_p=1.0, seed=None, stop=None):
    """The text model.generate gives alone, cut before a stop string as OpenAI does; its finish reason."""
    ids = tokenizer.encode(prompt)
    sampling = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=top_p)
    out = model.generate(np.array(ids), max_new_tokens=max_tokens, seed=seed, stop_strings=stop, **sampling)
    new = [int(t) for t in out[0, len(ids):]]
    eos = new[-1] == model.config.eos_token_id
    text = tokenizer.decode(new[:-1] if eos else new)
    cut = [text.find(s) for s in stop or [] if s in text]
    if cut:
        text = text[:min(cut)]
    return text, "stop" if eos or cut else "length"


def test_completion_greedy_and_seeded(client, model, tokenizer):
    for temperature, seed in ((0, None), (0.9, 7), (1.0, 123)):
        result = client.completions.create(model="fortunes", prompt="The meaning of life is", max_tokens=20,
                                           temperature=temperature, seed=seed)
        text, reason = _expected(model, tokenizer, "The meaning of life is", 20, temperature, seed=seed)
        assert result.choices[0].text == text
        assert result.choices[0].finish_reason == reason
        assert result.usage.prompt_tokens == len(tokenizer.encode("The meaning of life is"))
        assert result.usage.completion_tokens <= 20


def test_n_choices_and_prompt_list(client, model, tokenizer):
    """n > 1: choice j of a prompt samples as generate(..., seed=seed + j); a list of prompts gives
    n choices for each, in order."""
    prompts = ["Never", "A friend is"]
    result = client.completions.create(model="fortunes", prompt=prompts, max_tokens=12, n=3, seed=5,
                                       temperature=1.0, top_p=0.9)
    assert len(result.choices) == 6
    for choice in result.choices:
        p, j = divmod(choice.index, 3)
        assert (choice.text, choice.finish_reason) == _expected(model, tokenizer, prompts[p], 12, 1.0, 0.9, 5 + j)


def test_streaming_stop_and_echo(client, model, tokenizer):
    greedy, _ = _expected(model, tokenizer, "Love is", 30, 0)
    stop = greedy.split()[2]  # a word the greedy text holds
    pieces, reasons = [], []
    for chunk in client.completions.create(model="fortunes", prompt="Love is", max_tokens=30, temperature=0,
                                           stop=[stop], stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == _expected(model, tokenizer, "Love is", 30, 0, stop=[stop])[0]
    assert reasons[-1] == "stop" and stop not in "".join(pieces)
    echoed = client.completions.create(model="fortunes", prompt="Love is", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Love is" + _expected(model, tokenizer, "Love is", 5, 0)[0]


def test_logprobs(client, model, tokenizer):
    """The chosen token's and the top alternatives' log-probabilities: log-softmax of the model's
    logits for the whole sequence in one forward pass (a different path from the decode steps;
    1e-4 covers float32 rounding of logits of size ~10)."""
    result = client.completions.create(model="fortunes", prompt="Wisdom", max_tokens=6, temperature=0, logprobs=3)
    lp = result.choices[0].logprobs
    ids = tokenizer.encode("Wisdom") + tokenizer.encode(result.choices[0].text)
    logits = model(np.array(ids[:-1])).astype(np.float64)[0, len(tokenizer.encode("Wisdom")) - 1:]
    expected = logits - logits.max(-1, keepdims=True)
    expected -= np.log(np.exp(expected).sum(-1, keepdims=True))
    assert len(lp.token_logprobs) == len(expected)
    for got, top, row, token in zip(lp.token_logprobs, lp.top_logprobs, expected, ids[-len(expected):]):
        assert got == pytest.approx(row[token], abs=1e-4)
        best = np.argsort(-row)[:3]
        assert list(top.values()) == pytest.approx(list(row[best]), abs=1e-4)
        assert list(top) == tokenizer.pieces(best)


def test_chat_plain_and_streamed(client, model, tokenizer):
    messages = [{"role": "system", "content": "You tell fortunes."}, {"role": "user", "content": "What now?"}]
    prompt = chat_prompt(messages)
    assert prompt == "system: You tell fortunes.\nuser: What now?\nassistant:"
    text, reason = _expected(model, tokenizer, prompt, 25, 0.8, seed=3, stop=[CHAT_STOP])
    result = client.chat.completions.create(model="fortunes", messages=messages, max_tokens=25, temperature=0.8,
                                            seed=3)
    assert result.choices[0].message.content == text
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == reason
    streamed = client.chat.completions.create(model="fortunes", messages=messages, max_tokens=25, temperature=0.8,
                                              seed=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["fortunes"]
    status, body = _raw(server, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})


# ---- bad requests --------------------------------------------------------------------------

def _raw(server, method, path, body=b"", headers=None, auth=True):
    """One request on a fresh connection -> (status, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = f"Bearer {KEY}"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data)


def _post(server, body: dict, path="/v1/completions", **kwargs):
    return _raw(server, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}, **kwargs)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "n": 1000}, 400, "n"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "max_tokens": 256}, 400, "max_tokens"),     # past the context of 256
    ({"prompt": "x " * 300}, 400, "max_tokens"),
    ({"prompt": "x" * 1_000_000}, 400, "max_tokens"),              # just under the body's limit
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "stop": ""}, 400, "stop"),
])
def test_bad_parameters(server, body, status, param):
    got, error = _post(server, body)
    assert got == status
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["param"] == param
    assert "Traceback" not in error["error"]["message"]


def test_bad_bodies_auth_and_routes(server):
    headers = {"Content-Type": "application/json"}
    assert _raw(server, "POST", "/v1/completions", b"{not json", headers)[0] == 400
    status, error = _raw(server, "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', headers)
    assert status == 400 and "not UTF-8" in error["error"]["message"]
    assert _raw(server, "POST", "/v1/completions", b"[1, 2]", headers)[0] == 400
    assert _post(server, {"prompt": "x"}, auth=False)[0] == 401
    assert _raw(server, "GET", "/v1/models", auth=False)[0] == 401
    assert _raw(server, "GET", "/nowhere")[0] == 404
    assert _post(server, {"prompt": "x"}, path="/v1/nowhere")[0] == 404
    assert _post(server, {"messages": "hi"}, path="/v1/chat/completions")[0] == 400


def test_reset_connection_is_quiet(server, capfd):
    """A client that resets its kept-alive connection (unread data, SO_LINGER 0) while the
    server waits for its next request: no traceback on the server's stderr."""
    import struct

    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # its answer left unread
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(1)
    assert "Traceback" not in capfd.readouterr().err
    assert _raw(server, "GET", "/health")[0] == 200


def test_oversized_body(server):
    """A 10 MB prompt: 413 from its Content-Length, before the body is read."""
    body = json.dumps({"prompt": "x" * (10 << 20)}).encode()
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    sock.sendall(body[:1000])
    reply = b""
    while chunk := sock.recv(65536):  # the server closes after its answer
        reply += chunk
    reply = reply.decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 413") and '"request_too_large"' in reply


def test_full_queue_is_429(server, client):
    """More choices than rows + queue places: refused whole, with 429; the server answers after."""
    status, error = _post(server, {"prompt": ["a"] * 4, "n": 4, "max_tokens": 5})
    assert status == 429 and error["error"]["code"] == "queue_full"
    assert client.completions.create(model="fortunes", prompt="a", max_tokens=2).choices


def _stream_request(port, max_tokens, seed=None, stream=True):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"prompt": "The", "max_tokens": max_tokens, "stream": stream, "temperature": 0.7,
                       "seed": seed}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    return sock


def _wait_until(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_the_row(server, client, model, tokenizer):
    """A client that goes away, streaming or not, has its row freed; one that never reads does
    not hold up the others."""
    # A seed whose text runs the whole 200 tokens alone, so that only the disconnection ends it.
    seed = next(s for s in range(50) if model.config.eos_token_id not in model.generate(
        np.array(tokenizer.encode("The")), max_new_tokens=200, do_sample=True, temperature=0.7, seed=s)[0])
    for stream in (True, False):  # seen by a failed write, or while waiting to write
        sock = _stream_request(server.server_address[1], 200, seed, stream)
        assert _wait_until(lambda: server.engine.active == 1)
        request = server.engine.rows[0]
        sock.close()
        assert _wait_until(lambda: server.engine.active == 0, 10)
        assert request.cancelled.is_set() and request.generated < 200
    silent = [_stream_request(server.server_address[1], 200) for _ in range(2)]  # never read
    result = client.completions.create(model="fortunes", prompt="Hello", max_tokens=8, temperature=0)
    assert result.choices[0].finish_reason in ("stop", "length")
    for sock in silent:
        sock.close()
    assert _wait_until(lambda: server.engine.active == 0, 10)


def test_client_that_never_reads_is_dropped(model, tokenizer):
    """A client that sends its request and never reads its stream (3 choices of 250 tokens with
    5 alternatives each, over 300 KB, past what the kernel holds for it; "-" is continued with
    dashes to the end, greedily): another client is answered while its rows still decode; its
    connection is cut (no [DONE]) once a write has waited write_timeout, and its handler and
    rows are freed."""
    srv = Server("127.0.0.1", 0, write_timeout=1.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.load(model, tokenizer, "fortunes", max_batch=4, max_queue=8)
    try:
        silent = socket.socket()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        silent.connect(("127.0.0.1", srv.server_address[1]))
        body = json.dumps({"prompt": "-", "max_tokens": 250, "n": 3, "logprobs": 5, "stream": True,
                           "temperature": 0}).encode()
        silent.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait_until(lambda: srv.engine.active == 3)
        rows = list(srv.engine.rows)
        status, answer = _post(srv, {"prompt": "Hello", "max_tokens": 8, "temperature": 0}, auth=False)
        assert (status, answer["choices"][0]["text"]) == (200, _expected(model, tokenizer, "Hello", 8, 0)[0])
        assert not any(r.cancelled.is_set() for r in rows)  # its handler still holds them
        assert _wait_until(lambda: srv.engine.active == 0 and srv._working == 0, 30)
        silent.settimeout(30)
        received = b""
        try:
            while chunk := silent.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        silent.close()
        assert received.startswith(b"HTTP/1.1 200") and not received.endswith(b"data: [DONE]\n\n")
    finally:
        srv.stop()
        thread.join(10)


# Prompts of 1, 5, 6 and 140 tokens: a long one is prefilled while others are decoding.
LOAD_PROMPTS = ["Luck", "You will travel far and", "A wise person once said that",
                "Do not be afraid of the dark, for the night has its own songs, and the stars keep watch over "
                "those who sleep under them. " * 5]


def _load_plan(clients=16, requests=10):
    """Each client's requests: (prompt, max_tokens 1..40, temperature, seed, n, how), where how
    is "whole", "stream", or k > 0: read k chunks of the stream, then close the connection."""
    plan = []
    for c in range(clients):
        mine = []
        for r in range(requests):
            prompt = LOAD_PROMPTS[(c + 3 * r) % 4]
            max_tokens = 1 + (7 * c + 3 * r) % 40
            temperature = 0 if r % 4 == 3 else 0.9
            how = "whole" if (c + r) % 2 else ("stream" if (c * r) % 5 != 1 else 1 + r % 3)
            n = 2 if how == "whole" and r % 5 == 0 else 1
            mine.append((prompt, max_tokens, temperature, 10 * c + r, n, how))
        plan.append(mine)
    return plan


def _run_load(client, plan, expected):
    """Every client's requests in turn, the clients at once; each completed choice is compared
    with expected[(prompt, max_tokens, temperature, seed)]."""
    def work(requests):
        for prompt, max_tokens, temperature, seed, n, how in requests:
            args = dict(model="fortunes", prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                        n=n)
            if how == "whole":
                got = [(c.text, c.finish_reason) for c in client.completions.create(**args).choices]
            else:
                stream = client.completions.create(**args, stream=True)
                if how != "stream":
                    chunks = [chunk for chunk, _ in zip(stream, range(how))]
                    stream.close()  # mid-stream, when the answer is longer than `how` chunks
                    assert len(chunks) <= how
                    continue
                chunks = list(stream)
                got = [("".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason)]
            assert got == [expected[prompt, max_tokens, temperature, seed + j] for j in range(n)]

    with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
        for future in [pool.submit(work, requests) for requests in plan]:
            future.result()


def _expected_for(model, tokenizer, plan):
    """generate's text and finish reason alone for every choice the plan asks for."""
    expected = {}
    for prompt, max_tokens, temperature, seed, n, _ in (request for requests in plan for request in requests):
        for j in range(n):
            key = prompt, max_tokens, temperature, seed + j
            if key not in expected:
                expected[key] = _expected(model, tokenizer, prompt, max_tokens, temperature, seed=seed + j)
    return expected


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    """`numpy-gpt2 serve` in its own process, 4 rows, and room in its queue for every request
    16 clients may have in flight (n of 2, and a closed stream's request until the server has
    seen the close); -> (process, port). Its stderr is checked for tracebacks when the module ends."""
    log = tmp_path_factory.mktemp("serve") / "stderr"
    process, port = _start_cli(log, "--max-batch", "4", "--max-queue", "32", "--api-key", KEY)
    yield process, port
    process.terminate()
    assert process.wait(30) == 0
    assert "Traceback" not in log.read_text()


# MiB the server's resident memory may grow over two rounds of the load test after a first:
# 0.14-0.27 MiB measured in six runs (glibc's per-thread arenas; docs/serving.md), while keeping
# what one request holds (its Request, about 7 KB) adds 1.3 MiB a round.
MEMORY_SLACK = 1.0


def _resident_mib(pid) -> float:
    """The process's resident set (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_load(cli_server, model, tokenizer):
    """16 clients x 10 requests, three rounds: 1 to 40 new tokens, prompts of 1 to 140 tokens,
    sampled and greedy, n of 1 and 2, whole or streamed, some streams closed early: every
    completed response equals generate alone; no errors (the client raises on any); the
    server's memory after the last two rounds is back to its level after the first, within
    MEMORY_SLACK; the server answers after."""
    process, port = cli_server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    plan = _load_plan()
    expected = _expected_for(model, tokenizer, plan)
    resident = []
    for _ in range(3):
        _run_load(client, plan, expected)
        time.sleep(1)  # closed streams' requests are cancelled by then (CLIENT_CHECK and a step)
        resident.append(_resident_mib(process.pid))
    assert resident[-1] - resident[0] <= MEMORY_SLACK, resident
    assert client.completions.create(model="fortunes", prompt="Luck", max_tokens=3, temperature=0).choices[0].text \
        == _expected(model, tokenizer, "Luck", 3, 0)[0]
    assert _health(port) == 200


def test_burst_of_connections_is_queued():
    """32 clients connecting at once, before the server accepts any: the kernel completes every
    connection at once (a listen queue of 5 drops the 7th's request: its connect times out)."""
    srv = Server("127.0.0.1", 0)  # listening, not accepting
    sockets = []
    try:
        for _ in range(32):
            sockets.append(socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=2))
    finally:
        for sock in sockets:
            sock.close()
        srv.server_close()


def test_health_before_the_model_is_loaded():
    srv = Server("127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert _raw(srv, "GET", "/health", auth=False) == (503, {"status": "loading"})
        status, error = _post(srv, {"prompt": "x"}, auth=False)
        assert status == 503 and error["error"]["code"] == "model_loading"
    finally:
        srv.stop()


def _start_cli(log, *flags):
    """`numpy-gpt2 serve --model fortunes` with `flags` on a free port, its stderr to the file
    `log`, once it answers /health; -> (process, port)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "numpy_gpt2", "serve", "--model", "fortunes", "--port",
                                    str(port), *flags], env={**os.environ, "PYTHONPATH": str(root)}, stderr=stderr)
    if not _wait_until(lambda: _health(port) == 200 or process.poll() is not None, 60) or process.poll() is not None:
        process.kill()
        raise AssertionError(f"numpy-gpt2 serve did not start: {pathlib.Path(log).read_text()}")
    return process, port


def test_cli_serves_and_exits_0_on_sigterm(tmp_path):
    """`numpy-gpt2 serve` in its own process: it answers, and SIGTERM during a stream cuts the
    stream with an error event and [DONE], and the process exits 0."""
    import signal

    process, port = _start_cli(tmp_path / "stderr")
    try:
        sock = _stream_request(port, 200)
        sock.settimeout(30)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest.endswith(b"data: [DONE]\n\n")
        assert _health(port) is None  # no longer listening
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    finally:
        process.kill()


def _health(port):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None


# ---- the page in a real browser --------------------------------------------------------------

def _webdriver(port, method, path, body=None):
    """One call of the W3C WebDriver protocol to chromedriver -> its "value"."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, None if body is None else json.dumps(body),
                       {"Content-Type": "application/json"})
    answer = json.loads(connection.getresponse().read())
    connection.close()
    if isinstance(answer.get("value"), dict) and "error" in answer["value"]:
        raise AssertionError(f"webdriver {method} {path}: {answer['value']['error']}: {answer['value'].get('message')}")
    return answer["value"]


def test_page_streams_in_headless_chromium(server, model, tokenizer, tmp_path):
    """Debian's chromium through its chromedriver (the WebDriver protocol spoken directly, no
    selenium): type a prompt, press the button, see the streamed text appear, equal to greedy
    generate's."""
    import shutil
    import subprocess

    driver, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if driver is None or browser is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        driver_port = probe.getsockname()[1]
    process = subprocess.Popen([driver, f"--port={driver_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_until(lambda: _health_of(driver_port, "/status"), 30)
        session = _webdriver(driver_port, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {
                "binary": browser, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                            f"--user-data-dir={tmp_path / 'profile'}"]}}}})["sessionId"]
        base = f"/session/{session}"
        try:
            _webdriver(driver_port, "POST", f"{base}/url", {"url": f"http://127.0.0.1:{server.server_address[1]}/"})

            def element(css):
                found = _webdriver(driver_port, "POST", f"{base}/element", {"using": "css selector", "value": css})
                return f"{base}/element/{next(iter(found.values()))}"

            def set_value(css, text):
                _webdriver(driver_port, "POST", f"{element(css)}/clear", {})
                _webdriver(driver_port, "POST", f"{element(css)}/value", {"text": text})

            set_value("#prompt", "The sea")
            set_value("#temperature", "0")
            set_value("#max_tokens", "12")
            set_value("#key", KEY)
            _webdriver(driver_port, "POST", f"{element('#go')}/click", {})

            def status():
                return _webdriver(driver_port, "GET", f"{element('#status')}/text")

            assert _wait_until(lambda: status() in ("done", "finished: stop", "finished: length"), 60), status()
            shown = _webdriver(driver_port, "POST", f"{base}/execute/sync",
                               {"script": "return document.getElementById('completion').textContent", "args": []})
            assert shown == _expected(model, tokenizer, "The sea", 12, 0)[0]
        finally:
            _webdriver(driver_port, "DELETE", base)
    finally:
        process.terminate()
        process.wait(10)


def _health_of(port, path):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
