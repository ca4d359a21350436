"""An OpenAI-compatible HTTP server over the continuous-batching engine (`batching.Engine`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streaming as server-sent
events ending with `data: [DONE]`), GET /v1/models, GET /health, GET / (a page to try it).
The standard library's ThreadingHTTPServer: one thread per connection, each waiting on its
requests' events while the engine's one thread runs the model (see docs/serving.md for why).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and never carry a
traceback; an unexpected exception in a handler is printed on the server's stderr and answered
with a 500, and the server goes on.
"""

import http.server
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid

from .batching import Engine, Finished, QueueFullError, Request
from .errors import GPT2Error
from .generate import Sampling

MAX_BODY = 1 << 20   # bytes of a request body
MAX_N = 16           # choices per prompt
MAX_PROMPTS = 16     # prompts per request
MAX_LOGPROBS = 5     # alternatives per token, as OpenAI allows
MAX_STOPS = 4
CLIENT_CHECK = 0.2   # seconds between looks at whether a waiting client is still connected
# Bytes of a client's unread answer the kernel may hold (Linux doubles it for its bookkeeping):
# a client that stops reading blocks the server's next write once this much waits, and the
# write timeout then drops it, instead of megabytes later (the default grows to 4 MiB).
SEND_BUFFER = 64 << 10
# The chat template: GPT-2 has none, so each message is a line "role: content", and the
# assistant's turn starts on the line after; generation also stops where a new user line begins.
CHAT_STOP = "\nuser:"


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- parameters ----------------------------------------------------------------------------

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user",
           "frequency_penalty", "presence_penalty"}
_COMPLETION = _COMMON | {"prompt", "logprobs", "echo"}
_CHAT = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def _number(body, name, default, low, high, integer=False, low_open=False):
    """body[name] (or default when absent or null) checked to lie in [low, high] ((low, high]
    with low_open); ApiError 400 naming the parameter otherwise."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds)
    if not bad:
        bad = not (low < value if low_open else low <= value) or (high is not None and value > high)
    if bad:
        what = "an integer" if integer else "a number"
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high if high is not None else 'inf'})"
        raise ApiError(400, f"{name} must be {what} in {interval}, found {value!r}", name, "invalid_value")
    return value


def _flag(body, name):
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, found {value!r}", name, "invalid_type")
    return value


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       "stop", "invalid_value")
    return stops


class _Settings:
    """The sampling parameters shared by both endpoints, checked."""

    def __init__(self, body, known, default_max_tokens):
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}", unknown[0], "unknown_parameter")
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) not in (None, 0):
                raise ApiError(400, f"{name} is not supported (only 0)", name, "unsupported_value")
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError(400, "model must be a string", "model", "invalid_type")
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        self.max_tokens = _number(body, max_name, default_max_tokens, 0, None, integer=True)
        self.max_name = max_name
        self.temperature = _number(body, "temperature", 1.0, 0, 2)
        self.top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
        self.n = _number(body, "n", 1, 1, MAX_N, integer=True)
        self.seed = _number(body, "seed", None, 0, 2 ** 63 - 1, integer=True)
        self.stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise ApiError(400, "stream_options takes only include_usage", "stream_options", "invalid_value")
        self.include_usage = bool((options or {}).get("include_usage"))
        self.stop = _stops(body)
        self.sampling = (Sampling() if self.temperature == 0
                         else Sampling(True, float(self.temperature), top_p=float(self.top_p)))

    def seed_of(self, choice: int):
        """Choice j of a prompt samples as generate(..., seed=seed + j) would."""
        return None if self.seed is None else self.seed + choice


# ---- the handler ---------------------------------------------------------------------------

class _Choice:
    """One prompt's continuation as it arrives: its text, held back where a stop string may
    be starting, and its tokens' log-probabilities."""

    def __init__(self, server, stops, eos):
        self.tokenizer = server.tokenizer
        self.decoder = self.tokenizer.stream_decoder()
        self.stops, self.eos = stops, eos
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0       # characters of text already given out
        self.tokens = []    # (id, logprob, top) of each token in the text
        self.count = 0      # tokens generated, eos included
        self.reason = None

    def push(self, token):
        self.count += 1
        if token.id in self.eos:
            return
        self.tokens.append(token)
        self.text += self.decoder.push(token.id)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]

    def finish(self, reason):
        if reason == "stop" and not any(s in self.text for s in self.stops):
            self.text += self.decoder.flush()
            for stop in self.stops:
                at = self.text.find(stop)
                if at >= 0:
                    self.text = self.text[:at]
        elif reason == "length":
            self.text += self.decoder.flush()
        self.reason = reason

    def new_text(self) -> str:
        """Text not given out yet, all of it once finished, else less what could begin a stop."""
        end = len(self.text) if self.reason else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "numpy-gpt2"

    def log_message(self, format, *args):
        """Quiet: the server's stderr is for its own messages."""

    def setup(self):
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        super().setup()

    # ---- plumbing

    def _send_json(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError):
        self.close_connection = True
        self._send_json(error.status, error.body())

    def _run(self, method):
        try:
            method()
        except ApiError as error:
            self._send_error(error)
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception:
            traceback.print_exc()
            self._send_error(ApiError(500, "internal error; see the server's log", kind="server_error"))

    def _authorized(self):
        key = self.server.api_key
        if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411 if length is None else 400, "a Content-Length header is needed")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the request body of {length} bytes is over the limit of {MAX_BODY}",
                           code="request_too_large")
        data = self.rfile.read(int(length))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"the body is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _ready(self):
        if self.server.engine is None:
            raise ApiError(503, "the model is still loading", code="model_loading", kind="server_error")

    def _client_gone(self) -> bool:
        """True once the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    # ---- routes

    def do_GET(self):
        self._run(self._get)

    def do_POST(self):
        self._run(self._post)

    def _get(self):
        path = self.path.split("?")[0]
        if path == "/":
            from .page import PAGE

            data = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/health":
            if self.server.engine is None:
                self._send_json(503, {"status": "loading"})
            else:
                self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._authorized()
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.started, "owned_by": "user"}]})
        else:
            raise ApiError(404, f"no route GET {path}", code="not_found")

    def _post(self):
        path = self.path.split("?")[0]
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        if path not in routes:
            raise ApiError(404, f"no route POST {path}", code="not_found")
        self._authorized()
        body = self._body()
        self._ready()
        routes[path](body)

    def _tokens(self, prompt, param):
        """A prompt as text or token ids -> ids."""
        tokenizer, V = self.server.tokenizer, self.server.engine.model.config.vocab_size
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise ApiError(400, f"{param} must be a string, or a list of token ids", param, "invalid_type")
        if not ids:
            raise ApiError(400, f"{param} is empty", param, "invalid_value")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ApiError(400, f"{param} has token {bad[0]}, outside the vocabulary 0..{V - 1}", param,
                           "invalid_value")
        return list(ids)

    def _completions(self, body):
        settings = _Settings(body, _COMPLETION, 16)
        prompts = body.get("prompt")
        if prompts is None:
            raise ApiError(400, "prompt is required", "prompt", "missing")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"prompt must be a string or a list of 1 to {MAX_PROMPTS}", "prompt", "invalid_value")
        ids = [self._tokens(p, "prompt") for p in prompts]
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        echo = _flag(body, "echo")
        if echo and logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (the prompt's log-probabilities)", "echo",
                           "unsupported_value")
        self._serve(settings, ids, logprobs, chat=False, echo=echo)

    def _chat(self, body):
        settings = _Settings(body, _CHAT, 256)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise ApiError(400, "messages must be a list of {\"role\": ..., \"content\": ...} objects with string "
                                "values", "messages", "invalid_value")
        prompt = chat_prompt(messages)
        logprobs = None
        if _flag(body, "logprobs"):
            logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        settings.stop = settings.stop + [CHAT_STOP]
        self._serve(settings, [self._tokens(prompt, "messages")], logprobs, chat=True, echo=False)

    # ---- generation

    def _serve(self, settings, prompts, logprobs, chat, echo):
        server = self.server
        engine, tokenizer = server.engine, server.tokenizer
        P = engine.cache.capacity
        for ids in prompts:
            if len(ids) + max(settings.max_tokens, 1) > P:
                raise ApiError(400, f"prompt of {len(ids)} tokens + {settings.max_name}={settings.max_tokens} exceeds "
                                    f"the model's context of {P} tokens", settings.max_name, "context_length_exceeded")
        events = queue.Queue()
        eos = server.eos
        requests, choices = [], []
        for p, ids in enumerate(prompts):
            for j in range(settings.n):
                choices.append(_Choice(server, settings.stop, eos))
                if settings.max_tokens == 0:  # nothing to generate (with echo: the prompt back)
                    choices[-1].finish("length")
                    continue
                requests.append(Request(ids, settings.max_tokens, settings.sampling, settings.seed_of(j), eos,
                                        settings.stop, tokenizer, logprobs, events, len(choices) - 1))
        try:
            for request in requests:
                engine.submit(request)
        except QueueFullError as exc:
            for request in requests:
                request.cancel()
            raise ApiError(429, f"{exc}; try again later", code="queue_full", kind="rate_limit_error") from None
        except GPT2Error as exc:
            for request in requests:
                request.cancel()
            raise ApiError(400, str(exc)) from None
        reply = _Reply(self, settings, chat, echo, prompts, choices, logprobs)
        server.working(+1)
        try:
            reply.start()
            running = len(requests)
            checked = time.monotonic()
            while running:
                # Tokens may come faster than this, so the client is looked at by the clock,
                # not only when none came.
                if time.monotonic() - checked > CLIENT_CHECK:
                    if self._client_gone():
                        raise ConnectionResetError("the client went away")
                    checked = time.monotonic()
                try:
                    event = events.get(timeout=CLIENT_CHECK)
                except queue.Empty:
                    continue
                choice = choices[event.index]
                if isinstance(event, Finished):
                    running -= 1
                    if event.reason in ("cancelled", "error"):
                        raise ApiError(503 if event.reason == "cancelled" else 500,
                                       "the server is shutting down" if event.reason == "cancelled"
                                       else f"generation failed: {event.message or 'see the server log'}",
                                       kind="server_error")
                    choice.finish(event.reason)
                else:
                    choice.push(event)
                reply.update(event.index)
            reply.end()
        except ApiError as error:
            if not reply.started:
                raise
            reply.fail(error)  # the status line is sent: the error goes in the stream
        finally:
            server.working(-1)
            for request in requests:
                request.cancel()


def chat_prompt(messages) -> str:
    """The plain chat template: "role: content" lines, then "assistant:" to answer."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


class _Reply:
    """Writes a completion or chat completion, whole at the end or streamed as events."""

    def __init__(self, handler, settings, chat, echo, prompts, choices, logprobs):
        self.handler, self.settings, self.chat, self.echo = handler, settings, chat, echo
        self.prompts, self.choices, self.logprobs = prompts, choices, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tokenizer = handler.server.tokenizer
        self.sent_tokens = [0] * len(choices)
        self.started = False

    def _head(self, object_name):
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.handler.server.model_name}

    def _usage(self):
        prompt = sum(len(ids) for ids in self.prompts) * self.settings.n
        completion = sum(c.count for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _prompt_text(self, index):
        return self.tokenizer.decode(self.prompts[index // self.settings.n])

    def _logprobs(self, tokens, offset):
        if self.logprobs is None:
            return None
        piece = self.tokenizer.pieces
        if self.chat:
            return {"content": [
                {"token": piece([t.id])[0], "logprob": t.logprob, "bytes": list(self.tokenizer.token_bytes(t.id)),
                 "top_logprobs": [{"token": piece([i])[0], "logprob": lp, "bytes": list(self.tokenizer.token_bytes(i))}
                                  for i, lp in t.top]} for t in tokens]}
        names = piece([t.id for t in tokens])
        offsets, at = [], offset
        for name in names:
            offsets.append(at)
            at += len(name)
        return {"tokens": names, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{piece([i])[0]: lp for i, lp in t.top} for t in tokens], "text_offset": offsets}

    # ---- streaming

    def _event(self, body):
        self.handler.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.handler.wfile.flush()

    def start(self):
        if not self.settings.stream:
            return
        handler = self.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        self.started = True
        for index, choice in enumerate(self.choices):
            if self.chat:
                self._chunk(index, {"role": "assistant", "content": ""}, None, None)
            elif self.echo:
                self._chunk(index, self._prompt_text(index), None, None)
            if choice.reason:
                self._chunk(index, "", None, choice.reason)

    def _chunk(self, index, text, logprobs, reason):
        if self.chat:
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            body = {**self._head("chat.completion.chunk"),
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        else:
            body = {**self._head("text_completion"),
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
        self._event(body)

    def update(self, index):
        if not self.settings.stream:
            return
        choice = self.choices[index]
        tokens = choice.tokens[self.sent_tokens[index]:]
        offset = choice.sent
        text = choice.new_text()
        # A chunk for text, for the end, or for tokens whose log-probabilities were asked for;
        # none for a token whose text is held back (it may begin a stop string).
        if text or choice.reason or (tokens and self.logprobs is not None):
            self.sent_tokens[index] = len(choice.tokens)
            self._chunk(index, text, self._logprobs(tokens, offset), choice.reason)

    def fail(self, error: ApiError):
        self._event(error.body())
        self.handler.wfile.write(b"data: [DONE]\n\n")
        self.handler.wfile.flush()

    def end(self):
        if self.settings.stream:
            if self.settings.include_usage:
                self._event({**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                             "choices": [], "usage": self._usage()})
            self.handler.wfile.write(b"data: [DONE]\n\n")
            self.handler.wfile.flush()
            return
        out = []
        for index, choice in enumerate(self.choices):
            if self.chat:
                out.append({"index": index, "message": {"role": "assistant", "content": choice.text},
                            "logprobs": self._logprobs(choice.tokens, 0), "finish_reason": choice.reason})
            else:
                prefix = self._prompt_text(index) if self.echo else ""
                out.append({"index": index, "text": prefix + choice.text,
                            "logprobs": self._logprobs(choice.tokens, len(prefix)), "finish_reason": choice.reason})
        self.handler._send_json(200, {**self._head("chat.completion" if self.chat else "text_completion"),
                                      "choices": out, "usage": self._usage()})


# ---- the server ----------------------------------------------------------------------------

class Server(http.server.ThreadingHTTPServer):
    """The HTTP server; `engine` is None until `load` has built the model.

    write_timeout: seconds a write to a client may block (a client that never reads its
    stream); past it the connection is dropped and its requests' rows freed.
    """

    daemon_threads = True
    allow_reuse_address = True
    # Connections the kernel completes before the server accepts them. socketserver's 5 is
    # overrun by a burst of clients (their connection requests are dropped and retried a
    # second later, or answered with SYN cookies).
    request_queue_size = 128

    def __init__(self, host="127.0.0.1", port=8000, api_key=None, write_timeout=30.0):
        self.api_key, self.write_timeout = api_key, write_timeout
        self.engine = self.tokenizer = None
        self.model_name = ""
        self.eos = ()
        self.started = int(time.time())
        self._working, self._idle = 0, threading.Condition()

        class _Handler(Handler):
            timeout = write_timeout

        super().__init__((host, port), _Handler)

    def load(self, model, tokenizer, model_name: str, max_batch: int = 4, max_queue: int = 16):
        """Serve `model` from now on (GET /health turns ready)."""
        eos = model.config.eos_token_id
        self.eos = (eos,) if eos is not None and 0 <= eos < model.config.vocab_size else ()
        self.tokenizer, self.model_name = tokenizer, model_name
        self.engine = Engine(model, max_batch=max_batch, max_queue=max_queue).start()

    def handle_error(self, request, client_address):
        """A client that resets its connection is not the server's error: no traceback for it."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def working(self, change: int):
        """Count the handlers generating (+1 as one starts, -1 as it ends)."""
        with self._idle:
            self._working += change
            self._idle.notify_all()

    def stop(self, grace: float = 5.0):
        """Stop accepting, cut the requests in flight (each ends with a 503 or an error event),
        give their handlers up to `grace` seconds to write that, and close. Call from a thread
        other than the one in serve_forever."""
        self.shutdown()
        if self.engine is not None:
            self.engine.stop(timeout=30)
        with self._idle:
            self._idle.wait_for(lambda: self._working == 0, grace)
        self.server_close()


def serve(load_model, host="127.0.0.1", port=8000, api_key=None, max_batch=4, max_queue=16,
          announce=lambda message: print(message, file=sys.stderr, flush=True)):
    """Listen on host:port, load the model (`load_model()` -> (model, tokenizer, name)) while
    already answering /health, and serve until SIGTERM or Ctrl-C; returns after closing."""
    import signal

    server = Server(host, port, api_key)
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.stop, name="numpy-gpt2 shutdown").start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    serving = threading.Thread(target=server.serve_forever, name="numpy-gpt2 http", daemon=True)
    serving.start()
    try:
        model, tokenizer, name = load_model()
        server.load(model, tokenizer, name, max_batch, max_queue)
        announce(f"numpy-gpt2: serving {name} on http://{host}:{server.server_address[1]}/")
        while serving.is_alive():
            serving.join(0.5)
    finally:
        if not stopping.is_set():
            stopping.set()
            server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
