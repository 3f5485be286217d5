"""Tests for ccproxy.py: real LiteLLM proxy processes against a fake upstream on 127.0.0.1.

Run everything with coverage: python test_ccproxy.py     (what CI runs; see README)
Quick: CCPROXY_QUICK=1 python -m pytest -q test_ccproxy.py   (skips the end-to-end tests)
Benchmarks: python test_ccproxy.py bench
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer as _ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import ccproxy


class ThreadingHTTPServer(_ThreadingHTTPServer):
    """The tests' HTTP servers: a listen backlog for the load test's 200 connections at once
    (the default 5 makes the kernel drop SYNs, and a client's retransmits can then take over a
    minute), threads that do not hold up the process's exit."""

    request_queue_size = 1024
    daemon_threads = True


HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ccproxy.py"
FIXTURES = HERE.parent / "shared" / "fixtures" / "claude-code"
HAVE_FIXTURES = FIXTURES.is_dir()
CLIENT_KEY = "sk-ant-api03-client-secret-0123456789"
QUICK = os.environ.get("CCPROXY_QUICK") == "1"
IN_CI = bool(os.environ.get("CI"))


def slow(test):
    """End-to-end tests that start real processes: marked `slow` (deselect them with
    -m "not slow"), and skipped under CCPROXY_QUICK=1 for a fast local run."""
    return pytest.mark.skipif(QUICK, reason="CCPROXY_QUICK=1")(pytest.mark.slow(test))


def missing_prerequisite(reason: str) -> None:
    """In CI a missing prerequisite fails the test; elsewhere it skips with the reason."""
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def need_fixtures() -> None:
    if not HAVE_FIXTURES:
        missing_prerequisite(f"{FIXTURES} is not present (the captured Claude Code requests)")


# ---- Fixtures: fake upstream, Claude Code-shaped requests, proxy -----------------------------

@dataclasses.dataclass
class Raw:
    """A faulty answer: `pieces` of body sent after their delays (seconds), then the
    connection closed; `declared` is the content-length announced (None: none, the body
    ends at the close), so a larger one cuts the body short."""
    pieces: list
    declared: int | None = None
    status: int = 200
    wait: float = 0.0               # before anything is sent

    def send(self, handler) -> None:
        time.sleep(self.wait)
        handler.close_connection = True
        if not self.status:                       # status 0: close without answering
            return
        head = f"HTTP/1.1 {self.status} OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
        if self.declared is not None:
            head += f"content-length: {self.declared}\r\n"
        handler.close_connection = True
        try:
            handler.wfile.write(head.encode() + b"\r\n")
            for delay, piece in self.pieces:
                if delay:
                    time.sleep(delay)
                handler.wfile.write(piece)
                handler.wfile.flush()
        except OSError:
            pass                      # the proxy gave up on us: that is what is tested


class FakeUpstream:
    """A stdlib HTTP server speaking Anthropic Messages (JSON/SSE), OpenAI chat completions
    (JSON/SSE), the Responses API and count_tokens; it records what it receives.

    Every response is sent in one write: split header/body sends make LiteLLM wait for
    delayed ACKs (see ../shared/STYLE.md).
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.scripts: list = []          # callables (request) -> (status, body dict) or None
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                record = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body}
                with upstream.lock:
                    upstream.requests.append(record)
                answer = upstream.answer(record)
                if isinstance(answer, Raw):
                    answer.send(self)
                    return
                status, ctype, payload, extra = answer
                more = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                head = (f"HTTP/1.1 {status} OK\r\ncontent-type: {ctype}\r\n{more}"
                        f"content-length: {len(payload)}\r\n\r\n").encode()
                self.wfile.write(head + payload)
                self.wfile.flush()

            def do_GET(self):
                payload = b'{"ok": true}'
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.scripts.clear()

    def received(self, path_part: str = "") -> list[dict]:
        with self.lock:
            return [r for r in self.requests if path_part in r["path"]]

    # -- answers -------------------------------------------------------------------------
    def answer(self, record: dict) -> tuple[int, str, bytes, dict] | Raw:
        """(status, content type, body, extra headers); a script may return (status, reply),
        (status, reply, headers) or a Raw answer (faults)."""
        extra: dict = {}
        path, body = record["path"], record["body"]
        for script in list(self.scripts):
            result = script(record)
            if isinstance(result, Raw):
                return result
            if result is not None:
                status, reply = result[:2]
                extra = result[2] if len(result) > 2 else {}
                if status == 200 and reply.get("type") == "message" and body.get("stream"):
                    return status, "text/event-stream", sse(message_events(reply)), extra
                return status, "application/json", json.dumps(reply).encode(), extra
        return self._default_answer(path, body) + (extra,)

    def _default_answer(self, path: str, body: dict) -> tuple[int, str, bytes]:
        model = body.get("model", "?")
        if path.startswith("/v1/messages/count_tokens"):
            return 200, "application/json", json.dumps({"input_tokens": 4242}).encode()
        if path.startswith("/v1/messages"):
            text = f"answer from {model}"
            if body.get("stream"):
                return 200, "text/event-stream", anthropic_sse(model, text, 100)
            return 200, "application/json", json.dumps(anthropic_message(model, text, 100)).encode()
        if path.startswith("/v1/chat/completions"):
            text = f"answer from {model}"
            if body.get("stream"):
                return 200, "text/event-stream", openai_sse(model, text, 321)
            return 200, "application/json", json.dumps(openai_message(model, text, 321)).encode()
        if path.startswith("/v1/responses"):
            return 200, "application/json", json.dumps(responses_message(model, f"answer from {model}")).encode()
        return 404, "application/json", b'{"error": "not found"}'


def anthropic_message(model: str, text: str, input_tokens: int) -> dict:
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 5}}


def message_events(message: dict) -> list[tuple[str, dict]]:
    """A complete Anthropic message as the SSE events that stream it."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None,
                 usage=dict(message["usage"], output_tokens=1))
    events = [("message_start", {"type": "message_start", "message": start})]
    for i, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "text":
            first, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": block["text"]}]
        elif kind == "tool_use":
            first = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        elif kind == "thinking":
            first = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block["thinking"]},
                      {"type": "signature_delta", "signature": block["signature"]}]
        else:
            first, deltas = block, []
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": first}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                     "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def sse(events: list[tuple[str, dict]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def anthropic_sse(model: str, text: str, input_tokens: int) -> bytes:
    return sse(message_events(anthropic_message(model, text, input_tokens)))


def openai_message(model: str, text: str, prompt_tokens: int) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                      "total_tokens": prompt_tokens + 5}}


def openai_sse(model: str, text: str, prompt_tokens: int) -> bytes:
    def chunk(delta, finish=None, usage=None):
        data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"
    return (chunk({"role": "assistant", "content": text}) + chunk({}, "stop")
            + chunk({}, None, {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                               "total_tokens": prompt_tokens + 5})
            + "data: [DONE]\n\n").encode()


def responses_message(model: str, text: str) -> dict:
    return {"id": "resp_fake", "object": "response", "created_at": 1, "status": "completed",
            "model": model, "error": None, "incomplete_details": None, "instructions": None,
            "output": [{"type": "message", "id": "msg_fake", "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 77, "output_tokens": 5, "total_tokens": 82,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}


# Claude Code-shaped requests, built here so a clone without ../shared tests the same cases.

CC_TOOLS_197 = ["Agent", "Bash", "Edit", "Read", "WebFetch", "WebSearch", "Write"]
CC_TOOLS_332 = ["Agent", "Bash", "Edit", "Read", "ToolSearch", "Write"]


def cc_tool(name: str, deferred: bool = False) -> dict:
    tool = {"name": name, "description": f"The {name} tool. " + "Use it well. " * 40,
            "input_schema": {"type": "object", "properties": {
                "command": {"type": "string", "description": "what to do"}},
                "required": ["command"], "additionalProperties": False}}
    if deferred:
        tool["defer_loading"] = True
    return tool


def cc_request(kind: str = "main", release: str = "2.1.332", session: str = "sess-1",
               extra_messages: list | None = None) -> tuple[dict, dict]:
    """(body, headers) shaped like Claude Code's (see ../shared/fixtures/claude-code/README.md)."""
    new = release != "2.1.197"
    opus = "claude-opus-5-5" if new else "claude-opus-4-8"
    haiku = "claude-haiku-5-5" if new else "claude-haiku-4-5-20251001"
    billing = f"x-anthropic-billing-header: cc_version={release}.abc; cc_entrypoint=sdk-cli;"
    if kind == "subagent":
        billing += " cc_is_subagent=true;"
    system = [{"type": "text", "text": billing},
              {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
               "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "You are an interactive agent. " * 400,
               "cache_control": {"type": "ephemeral"}}]
    tools = [cc_tool(n) for n in (CC_TOOLS_332 if new else CC_TOOLS_197)]
    if new:
        tools.append(cc_tool("DeferredToolPlaceholder", deferred=True))
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})
    messages = [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                             {"type": "text", "text": "List the files here."}]},
                {"role": "system", "content": [{"type": "text", "text": "# Environment\n" * 50,
                                                "cache_control": {"type": "ephemeral"}}] if new
                 else "Available agent types for the Agent tool: ..."}]
    thinking = {"type": "adaptive", "display": "omitted"} if new else {"type": "adaptive"}
    body = {"model": opus, "messages": messages, "system": system, "tools": tools,
            "metadata": {"user_id": user_id}, "max_tokens": 128000 if new else 64000,
            "thinking": thinking,
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "medium" if new else "high"}, "stream": True}
    if kind == "haiku":
        body["model"] = haiku
        if not new:
            body["thinking"] = {"type": "enabled", "budget_tokens": 31999}
            body.pop("output_config")
            body["max_tokens"] = 32000
    elif kind == "tool_result":
        messages += [{"role": "assistant", "content": [
                         {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                          "input": {"command": "ls"}}]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py\nb.py",
                          "cache_control": {"type": "ephemeral"}}]}]
    elif kind == "web_search":
        body = {"model": opus, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Perform a web search for the query: litellm"}]}],
                "system": system[:2] + [{"type": "text", "text": "You run a web search."}],
                "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                "tool_choice": {"type": "auto"} if new else {"type": "tool", "name": "web_search"},
                "metadata": {"user_id": user_id}, "max_tokens": body["max_tokens"],
                "output_config": body.get("output_config", {"effort": "high"}), "stream": True}
        if not new:
            body["thinking"] = {"type": "disabled"}
    elif kind == "long":
        messages += [{"role": "assistant", "content": [
                         {"type": "tool_use", "id": "toolu_2", "name": "Read",
                          "input": {"file_path": "/big.py"}}]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "toolu_2",
                          "content": [{"type": "text", "text": big_text(70000)}]}]}]
    elif kind == "think":
        body["output_config"] = {"effort": "max"}
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
               "user-agent": f"claude-cli/{release} (external, sdk-cli)", "x-app": "cli",
               "x-claude-code-session-id": session, "x-api-key": CLIENT_KEY}
    if kind == "subagent":
        headers["x-claude-code-agent-id"] = "a3a279f108e749d27"
    if extra_messages:
        messages += extra_messages
    return body, headers


def big_text(tokens: int) -> str:
    """Python-like source of roughly `tokens` cl100k tokens."""
    line = "def function_{i}(value: int) -> int:\n    return value * {i} + len(str(value))\n"
    out, i = [], 0
    while len(out) * 22 < tokens:
        out.append(line.format(i=i))
        i += 1
    return "".join(out)


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, lower-case headers, body) of one request; a dict body goes as JSON, bytes as
    they are (an empty body as none)."""
    data = (body or None) if isinstance(body, bytes) else \
        json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def sse_events(raw: bytes) -> list[dict]:
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                events.append(json.loads(payload))
    return events


def sse_text(raw: bytes) -> str:
    return "".join(e["delta"].get("text", "") for e in sse_events(raw)
                   if e.get("type") == "content_block_delta")


def run_cli(*args: str, env: dict | None = None, timeout: float = 240, input: str | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input, cwd=cwd)


def write_config(directory: Path, upstream: FakeUpstream, port: int, settings: dict | None = None,
                 **overrides) -> Path:
    """A one-file ccproxy.yaml whose model_list points at the fake upstream; `settings` go
    into its `ccproxy:` section, other keyword arguments replace top-level sections."""
    base = upstream.url
    config = {
        "litellm": {"host": "127.0.0.1", "port": port, "num_workers": 1},
        "ccproxy": {
            "debug": True,
            "hooks": ["rule_evaluator", "model_router", "forward_apikey", "extract_session_id",
                      "capture_headers"],
            "rules": [
                {"name": "background", "rule": "MatchModelRule", "params": {"model_name": "haiku"}},
                {"name": "web_search", "rule": "WebSearchRule"},
                {"name": "long_context", "rule": "TokenCountRule", "params": {"threshold": 60000}},
                {"name": "think", "rule": "ThinkingRule"},
                {"name": "cheap", "rule": "MatchModelRule", "params": {"model_name": "gpt-cheap"}},
                {"name": "small", "rule": "MatchModelRule", "params": {"model_name": "sonnet"}},
            ],
        },
        "model_list": [
            {"model_name": "background", "litellm_params": {"model": "anthropic/up-background", "api_base": base}},
            {"model_name": "web_search", "litellm_params": {"model": "anthropic/up-search", "api_base": base}},
            {"model_name": "long_context", "litellm_params": {"model": "openai/up-long", "api_base": base + "/v1", "api_key": "sk-upstream-openai"}},
            {"model_name": "think", "litellm_params": {"model": "anthropic/up-think", "api_base": base}},
            {"model_name": "cheap", "litellm_params": {"model": "openai/up-cheap", "api_base": base + "/v1", "api_key": "sk-upstream-openai"}},
            {"model_name": "small", "litellm_params": {"model": "anthropic/up-small", "api_base": base},
             "model_info": {"max_output_tokens": 8192}},
            {"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*", "api_base": base}},
        ],
        "litellm_settings": {"callbacks": ["ccproxy.handler"]},
    }
    for key, value in overrides.items():
        config[key] = value
    config["ccproxy"].update(settings or {})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ccproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Proxy:
    """A proxy started with `python ccproxy.py start --detach` in its own config dir."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> subprocess.CompletedProcess:
        done = run_cli("start", "--detach", "--config-dir", str(self.directory))
        if done.returncode != 0:
            raise AssertionError(f"start failed:\n{done.stdout}\n{done.stderr}\n{self.log()}")
        self.start_output = done.stdout + done.stderr
        return done

    def stop(self) -> subprocess.CompletedProcess:
        return run_cli("stop", "--config-dir", str(self.directory))

    def log(self) -> str:
        path = self.directory / "ccproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def messages(self, body: dict, headers: dict | None = None, path: str = "/v1/messages?beta=true"):
        return http("POST", self.url + path, body, headers or {"content-type": "application/json",
                                                              "x-api-key": CLIENT_KEY})


@pytest.fixture(scope="session")
def upstream():
    server = FakeUpstream()
    yield server
    server.close()


@contextlib.contextmanager
def started_proxy(tmp_path_factory, name: str, write):
    """A detached proxy in a fresh config dir that `write(directory, port)` fills."""
    directory = tmp_path_factory.mktemp(name)
    port = free_port()
    write(directory, port)
    run = Proxy(directory, port)
    run.start()
    try:
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    with started_proxy(tmp_path_factory, "proxy", lambda d, p: write_config(d, upstream, p)) as run:
        yield run


@pytest.fixture(autouse=True)
def ccproxy_log_propagates():
    """ccproxy's logger stops propagating once a handler is set up; let caplog see it."""
    before = ccproxy.log.propagate
    ccproxy.log.propagate = True
    yield
    ccproxy.log.propagate = before


@pytest.fixture()
def clean_upstream(upstream):
    upstream.clear()
    return upstream


# ---- LiteLLM adapter: contact points, doctor ------------------------------------------------

def test_every_litellm_contact_is_checked_and_holds_on_the_pinned_release():
    results = ccproxy.check_contacts()
    assert [c.name for c, _ok in results] == [c.name for c in ccproxy.CONTACTS]
    assert len({c.name for c in ccproxy.CONTACTS}) == len(ccproxy.CONTACTS) >= 15
    assert [c.name for c, ok in results if not ok] == []
    assert all(c.relies_on and c.breaks for c in ccproxy.CONTACTS)
    assert ccproxy.litellm_version() == ccproxy.LITELLM_CHECKED


def test_a_missing_contact_is_reported_by_start_health_and_doctor(tmp_path, monkeypatch, capsys):
    litellm = ccproxy.import_litellm()
    monkeypatch.delattr(litellm, "use_chat_completions_url_for_anthropic_messages")
    monkeypatch.setattr(litellm.integrations.custom_logger.CustomLogger, "async_pre_call_hook",
                        lambda self, data: data)         # a changed hook signature
    missing = [c.name for c, ok in ccproxy.check_contacts() if not ok]
    assert missing == ["callback hooks", "chat completions switch"]
    core = ccproxy.Handler(config=ccproxy.default_config(tmp_path))
    core.start()
    assert core.health()["status"] == "degraded" and core.health()["missing"] == missing
    errors = [ln for ln in capsys.readouterr().err.splitlines() if " ccproxy ERROR " in ln]
    assert len(errors) == 2 and "use_chat_completions_url_for_anthropic_messages not found" \
        in errors[1] and "use the Responses API" in errors[1], errors
    assert ccproxy.main(["doctor", "--json", "--config-dir", str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    assert failed == ["litellm: callback hooks", "litellm: chat completions switch"]


@slow
def test_start_stops_a_degraded_proxy_unless_allowed(tmp_path, upstream, monkeypatch, capsys):
    write_config(tmp_path, upstream, free_port())
    monkeypatch.setattr(ccproxy, "wait_until_live", lambda *a, **k: "degraded: this LiteLLM "
                        "lacks what ccproxy uses for: callback hooks")
    assert ccproxy.main(["start", "--detach", "--config-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "degraded" in err and "doctor" in err and "--allow-degraded" in err
    assert ccproxy.PidFile(tmp_path).read() == (None, None)
    assert ccproxy.main(["start", "--detach", "--allow-degraded", "--config-dir", str(tmp_path)]) == 0
    assert "kept running (--allow-degraded)" in capsys.readouterr().err
    assert ccproxy.main(["stop", "--config-dir", str(tmp_path)]) == 0


def test_wait_until_live_reads_the_nonce_and_the_missing_contacts():
    answers = {"body": {}}

    class Health(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            payload = json.dumps(answers["body"]).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class Running:
        def poll(self):
            return None
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        answers["body"] = {"instance": "n1", "missing": []}
        assert ccproxy.wait_until_live(Running(), url, 5, "n1", out=open(os.devnull, "w")) == "live"
        assert "another ccproxy proxy" in ccproxy.wait_until_live(Running(), url, 5, "n2",
                                                                 out=open(os.devnull, "w"))
        answers["body"] = {"instance": "n1", "missing": ["callback hooks"]}
        assert ccproxy.wait_until_live(Running(), url, 5, "n1", out=open(os.devnull, "w")) == (
            "degraded: this LiteLLM lacks what ccproxy uses for: callback hooks "
            "(the log says what stops working)")
    finally:
        server.shutdown()
        server.server_close()


@slow
def test_doctor_lists_every_check_and_fails_on_a_broken_config(tmp_path):
    done = run_cli("doctor", "--json", "--config-dir", str(tmp_path),
                   env={"PATH": "/usr/bin:/bin", "CLAUDE_CONFIG_DIR": str(tmp_path / "claude")})
    report = json.loads(done.stdout)
    names = [c["name"] for c in report["checks"]]
    for name in ("python", "litellm", "pyyaml", "tiktoken", "litellm line", "config", "port",
                 "proxy", "claude code", "status line"):
        assert name in names, names
    assert [n for n in names if n.startswith("litellm: ")] == [
        f"litellm: {c.name}" for c in ccproxy.CONTACTS]
    assert done.returncode == 0 and report["ok"], done.stdout
    line = next(c for c in report["checks"] if c["name"] == "status line")["detail"]
    assert f"--config-dir {tmp_path} install --statusline" in line, line        # hints keep the dir
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  rules: 3\n")
    broken = run_cli("doctor", "--config-dir", str(tmp_path))
    assert broken.returncode == 1 and "fail  config:" in broken.stdout and "`rules` must be a list" in broken.stdout
    assert "Traceback" not in broken.stdout + broken.stderr


def test_handler_init_has_no_side_effects_and_start_does_the_io(tmp_path, upstream):
    write_config(tmp_path, upstream, 4000, settings={"token_cache_max_chars": 12345,
                                                     "oat_sources": {"anthropic": "echo tok"}})
    core = ccproxy.Handler(config_dir=tmp_path)
    source = core.pipeline.oauth["anthropic"]
    assert source.token is None and ccproxy.TOKENS.max_chars != 12345      # nothing ran yet
    before = ccproxy.TOKENS.max_chars
    try:
        core.start()
        assert source.token == "tok" and ccproxy.TOKENS.max_chars == 12345
    finally:
        ccproxy.TOKENS.max_chars = before


def test_loading_the_tokenizer_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    before = dict(os.environ)
    encoding = ccproxy.load_cl100k()
    assert dict(os.environ) == before
    assert encoding.encode_ordinary("hello world") == [15339, 1917]


# ---- Config ----------------------------------------------------------------------------------

def test_no_config_file_gives_builtin_defaults(tmp_path):
    config = ccproxy.load_config(tmp_path / "missing")
    assert config.ccproxy_file is None and config.litellm_file is None
    assert [r.name for r in config.settings.rules] == ["background", "web_search", "long_context", "think"]
    assert "claude-*" in ccproxy.ModelTable(config.model_list).names()
    assert config.url == "http://127.0.0.1:4000"


def test_one_file_layout_carries_ccproxy_and_litellm_sections(tmp_path, upstream):
    write_config(tmp_path, upstream, 4123)
    config = ccproxy.load_config(tmp_path)
    assert config.ccproxy_file == config.litellm_file == tmp_path / "ccproxy.yaml"
    assert config.port == 4123
    assert "ccproxy" not in config.litellm and "litellm" not in config.litellm
    assert [r.rule for r in config.settings.rules][:2] == ["MatchModelRule", "WebSearchRule"]


LEGACY_CCPROXY_YAML = """\
litellm:
  host: 127.0.0.1
  port: {port}
  num_workers: 1
  debug: false
ccproxy:
  debug: true
  handler: "ccproxy.handler:CCProxyHandler"
  hooks:
    - ccproxy.hooks.rule_evaluator
    - ccproxy.hooks.model_router
    - hook: failing_hook.explode
      params: {{why: testing}}
    - ccproxy.hooks.forward_apikey
    - ccproxy.hooks.extract_session_id
  default_model_passthrough: true
  rules:
    - label: background
      rule: ccproxy.rules.MatchModelRule
      params:
        - model_name: haiku
    - name: web_search
      rule: ccproxy.rules.WebSearchRule
    - name: long_context
      rule: ccproxy.rules.TokenCountRule
      params:
        - threshold: 60000
    - name: think
      rule: ccproxy.rules.ThinkingRule
"""

LEGACY_CONFIG_YAML = """\
model_list:
  - model_name: background
    litellm_params: {{model: anthropic/up-background, api_base: "{base}"}}
  - model_name: web_search
    litellm_params: {{model: anthropic/up-search, api_base: "{base}"}}
  - model_name: long_context
    litellm_params: {{model: openai/up-long, api_base: "{base}/v1", api_key: sk-upstream-openai}}
  - model_name: think
    litellm_params: {{model: anthropic/up-think, api_base: "{base}"}}
  - model_name: "claude-*"
    litellm_params: {{model: "anthropic/claude-*", api_base: "{base}"}}
litellm_settings:
  callbacks:
    - ccproxy.handler
general_settings:
  forward_client_headers_to_llm_api: true
"""

FAILING_HOOK = '''
def explode(data, ctx, why="", **params):
    raise RuntimeError("hook exploded on purpose: " + why)
'''


LEGACY_GENERATED_HANDLER = """# Auto-generated by ccproxy 1.x
from ccproxy.handler import CCProxyHandler

handler = CCProxyHandler()
"""


def write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def write_legacy_config(directory: Path, upstream: FakeUpstream, port: int) -> None:
    # ccproxy 1.x generated the ccproxy.py handler beside the config; LiteLLM loads it first.
    write_files(directory, {"ccproxy.yaml": LEGACY_CCPROXY_YAML.format(port=port),
                            "config.yaml": LEGACY_CONFIG_YAML.format(base=upstream.url),
                            "failing_hook.py": FAILING_HOOK, "ccproxy.py": LEGACY_GENERATED_HANDLER})


def test_legacy_two_file_layout_loads_unchanged(tmp_path, upstream):
    write_legacy_config(tmp_path, upstream, 4555)
    config = ccproxy.load_config(tmp_path)
    assert config.ccproxy_file == tmp_path / "ccproxy.yaml"
    assert config.litellm_file == tmp_path / "config.yaml"
    assert config.port == 4555 and config.settings.debug is True
    pipeline = ccproxy.Pipeline(config)
    assert [type(r).__name__ for r in pipeline.rules] == [
        "MatchModelRule", "WebSearchRule", "TokenCountRule", "ThinkingRule"]
    assert pipeline.rules[2].threshold == 60000
    assert [n for n, _f, _p in pipeline.hooks] == [
        "rule_evaluator", "model_router", "explode", "forward_apikey", "extract_session_id"]
    assert pipeline.problems == []


def test_legacy_module_paths_resolve_to_this_module():
    import ccproxy.hooks
    import ccproxy.rules
    from ccproxy.handler import CCProxyHandler  # noqa: F401  (1.x generated handler import)
    assert ccproxy.rules.TokenCountRule is ccproxy.TokenCountRule
    assert ccproxy.rules.ClassificationRule is ccproxy.Rule
    assert ccproxy.hooks.model_router is ccproxy.model_router


V1_DOCS_RULE = """\
from typing import Any

from ccproxy.config import CCProxyConfig
from ccproxy.rules import ClassificationRule


class KeywordRule(ClassificationRule):
    \"\"\"The custom-rule template of ccproxy 1.2.0's docs, reading the config it is given.\"\"\"

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword

    def evaluate(self, request: dict[str, Any], config: CCProxyConfig) -> bool:
        if config.debug and not config.rules:
            raise AssertionError("1.x config attributes missing")
        return self.keyword in str(request.get("messages", ""))
"""

V1_HOOK = """\
from typing import Any


def cap_background(data: dict[str, Any], user_api_key_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    \"\"\"A ccproxy 1.x hook (its signature, its kwargs, its metadata keys).\"\"\"
    label = data.get("metadata", {}).get("ccproxy_model_name")
    entry = kwargs["router"].get_model_for_label(label)
    if label == "background" and entry and kwargs["classifier"].classify(data) == label:
        data["max_tokens"] = kwargs.get("max_tokens", 1000)
    return data
"""

V1_CCPROXY_YAML = """\
litellm:
  host: 127.0.0.1
  port: {port}
ccproxy:
  debug: true
  hooks:
    - ccproxy.hooks.rule_evaluator
    - ccproxy.hooks.model_router
    - hook: docs_hook.cap_background
      params:
        max_tokens: 777
    - ccproxy.hooks.forward_oauth
  rules:
    - name: think
      rule: docs_rule.KeywordRule
      params:
        - keyword: ultrathink
    - name: background
      rule: ccproxy.rules.MatchModelRule
      params:
        - model_name: haiku
    - name: long_context
      rule: ccproxy.rules.TokenCountRule
      params:
        - threshold: 60000
"""

V1_CONFIG_YAML = """\
model_list:
  # aliases, as ccproxy 1.2.0's README writes them
  - model_name: default
    litellm_params:
      model: claude-sonnet-4-5-20250929
  - model_name: think
    litellm_params:
      model: claude-opus-4-5-20251101
  - model_name: background
    litellm_params:
      model: claude-3-5-haiku-20241022
  - model_name: long_context              # an alias of an alias (1.2.0's README: web_search -> think)
    litellm_params:
      model: think
  # deployments
  - model_name: claude-sonnet-4-5-20250929
    litellm_params:
      model: anthropic/claude-sonnet-4-5-20250929
      api_base: {base}
  - model_name: claude-opus-4-5-20251101
    litellm_params:
      model: anthropic/claude-opus-4-5-20251101
      api_base: {base}
  - model_name: claude-3-5-haiku-20241022
    litellm_params:
      model: anthropic/claude-3-5-haiku-20241022
      api_base: {base}
litellm_settings:
  callbacks:
    - ccproxy.handler
"""


def write_v1_docs_config(directory: Path, upstream: FakeUpstream, port: int) -> None:
    write_files(directory, {"ccproxy.yaml": V1_CCPROXY_YAML.format(port=port),
                            "config.yaml": V1_CONFIG_YAML.format(base=upstream.url),
                            "docs_rule.py": V1_DOCS_RULE, "docs_hook.py": V1_HOOK})


V1_ROUTES = [  # (what the request is, what it changes, the deployment ccproxy 1.2.0 reaches)
    ("main", {"model": "claude-sonnet-4-5-20250929"}, "claude-sonnet-4-5-20250929"),        # passthrough
    ("main", {"messages": [{"role": "user", "content": "ultrathink about it"}]}, "claude-opus-4-5-20251101"),
    ("haiku", {}, "claude-3-5-haiku-20241022"),
    ("main", {"token_count": 90000}, "claude-opus-4-5-20251101"),       # long_context -> think -> opus
]


def test_a_1x_docs_config_routes_as_1x_did(tmp_path, upstream):
    write_v1_docs_config(tmp_path, upstream, 4556)
    config = ccproxy.load_config(tmp_path)
    report = ccproxy.validate_config(config, ccproxy.Pipeline(config))
    assert report.errors == [], report.errors
    from ccproxy.config import CCProxyConfig, RuleConfig
    legacy = ccproxy.Pipeline(config).legacy_config
    assert isinstance(legacy, CCProxyConfig) and legacy.debug is True and legacy.default_model_passthrough
    assert [(r.model_name, r.rule_path) for r in legacy.rules][0] == ("think", "docs_rule.KeywordRule")
    assert RuleConfig("bg", "ccproxy.rules.MatchModelRule", [{"model_name": "haiku"}]).create_instance().model_name == "haiku"
    for kind, change, deployment in V1_ROUTES:
        body, headers = cc_request(kind)
        body.update(change)
        data, ctx = ccproxy.run_pipeline(ccproxy.Pipeline(config), body, headers=headers)
        assert ctx.decision.model == deployment and ctx.hook_errors == [], (kind, change, ctx.decision)
        assert (data["max_tokens"] == 777) == (kind == "haiku")                  # the 1.x hook ran
    # the built-in hooks take 1.x's call form too
    data = {"model": "claude-3-5-haiku-20241022", "messages": [{"role": "user", "content": "hi"}]}
    pipeline = ccproxy.Pipeline(config)
    stand_ins = {"classifier": ccproxy.RequestClassifier(pipeline), "router": ccproxy.ModelRouter(pipeline)}
    data = ccproxy.hooks.rule_evaluator(data, {}, **stand_ins)
    assert data["metadata"]["ccproxy_model_name"] == "background"
    data = ccproxy.hooks.model_router(data, {}, **stand_ins)
    assert (data["model"], data["metadata"]["ccproxy_litellm_model"]) == ("claude-3-5-haiku-20241022",) * 2
    assert data["metadata"]["ccproxy_model_config"]["model_name"] == "background"       # 1.x: the label's entry
    data["proxy_server_request"] = {"method": "POST", "url": "http://127.0.0.1/v1/messages", "headers": {}}
    data["metadata"]["user_id"] = "user_abc123_account_acc-9_session_sess-v1"
    data = ccproxy.hooks.extract_session_id(ccproxy.hooks.capture_headers(data, {}), {})
    trace = ccproxy.litellm_metadata(data)["trace_metadata"]
    assert {k: trace[k] for k in ("http_method", "http_path", "claude_user_hash", "claude_account_id",
                                  "claude_session_id")} == {
        "http_method": "POST", "http_path": "/v1/messages", "claude_user_hash": "abc123",
        "claude_account_id": "acc-9", "claude_session_id": "sess-v1"}
    table = ccproxy.ModelTable([{"model_name": "a", "litellm_params": {"model": "b"}},
                                {"model_name": "b", "litellm_params": {"model": "a"}}])
    assert table.aliases("a") == ["a", "b", "a"]
    assert table.flattened() == table.deployments                                      # a circle stays
    written = ccproxy.ModelTable([{"model_name": "fast", "litellm_params": {"model": "quick"}},
                                  {"model_name": "quick", "litellm_params": {"model": "cheap"}},
                                  {"model_name": "cheap", "litellm_params": {"model": "openai/gpt-4o-mini"}}])
    assert [d["litellm_params"]["model"] for d in written.flattened()] == ["cheap", "cheap", "openai/gpt-4o-mini"]
    live = ccproxy.ModelTable(written.deployments[2:])           # LiteLLM made no deployment of the aliases
    assert live.with_aliases_of(written).resolve_route("fast")[1] == "openai/gpt-4o-mini"
    (tmp_path / "ccproxy.yaml").write_text(V1_CCPROXY_YAML.format(port=4556) + "  handler: my.Handler\n")
    assert "`handler: my.Handler` has no effect" in "\n".join(ccproxy.load_config(tmp_path).warnings)
    circular = yaml.safe_load((tmp_path / "config.yaml").read_text())
    circular["model_list"] += [{"model_name": "x", "litellm_params": {"model": "y"}},
                               {"model_name": "y", "litellm_params": {"model": "x"}}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(circular))
    config = ccproxy.load_config(tmp_path)
    errors = ccproxy.validate_config(config, ccproxy.Pipeline(config)).errors
    assert [e for e in errors if "in a circle (x -> y -> x)" in e], errors


# ccproxy 1.2.0's own test suite (its PyPI sdist, never copied here) against this file. The
# harness maps 1.x's import paths to ccproxy.py (which registers ccproxy.config, .rules,
# .classifier, .router, .hooks, .handler itself) and changes nothing else. Every test that
# does not pass is listed here with why; the test below fails if any other one fails.
V1_VERSION = "1.2.0"
V1_DIFFERENCES = {
    # deliberate, documented changes (README, "Migrating from ccproxy 1.x")
    "thinking": "ThinkingRule matches a request that asks for thinking, not a `thinking` key "
                "of any value (False, 0, disabled)",
    "abstract default": "DefaultRule routes (a catch-all); 1.x's was abstract and unusable",
    "model name": "model_router hands LiteLLM the route's model_list name, not its "
                  "litellm_params.model; the same deployment answers",
    "scoped credentials": "credentials are scoped to their provider: a header is not merged into "
                          "an unscoped provider_specific_header entry, a client x-api-key goes to "
                          "Anthropic only, an oat_sources user_agent only with that provider's token",
    "redaction": "capture_headers redacts secrets whole (<redacted>), with no prefix or last four",
    "litellm metadata": "session id and trace metadata go to LiteLLM's metadata, never into the "
                        "request body's metadata that Anthropic receives",
    "own log handler": "once a proxy handler has started, ccproxy's log lines go to its own "
                       "handler (pytest's caplog no longer sees them)",
    "no config": "a CCProxyHandler made with no config set reads the config dir as `start` does "
                 "(built-in defaults when there is no file), not an empty config",
    "params form": "rule params read from YAML are kept in one form (a mapping), not 1.x's list",
    "oauth source": "`oat_sources` entries are strings or {command, user_agent} mappings; "
                    "1.x's pydantic OAuthSource model is not offered",
    # internals of 1.x's module layout
    "1.x internals": "tests 1.x's private attributes or module globals (_ensure_models_loaded, "
                     "_get_tokenizer, _log_routing_decision, handler.logger, config.proxy_server, "
                     "tyro, the empty-name entry of the router's map)",
}
V1_FAILING = {
    "test_classifier.py::TestRequestClassifier::test_multiple_rules_priority": "thinking",
    "test_classifier.py::TestClassificationRuleProtocol::test_cannot_instantiate_abstract_rule": "abstract default",
    "test_classifier_integration.py::TestRequestClassifierIntegration::test_priority_3_thinking_overrides_web_search": "thinking",
    "test_classifier_integration.py::TestRequestClassifierIntegration::test_realistic_thinking_request": "thinking",
    "test_classifier_integration.py::TestRequestClassifierIntegration::test_custom_rules_after_reset": "thinking",
    "test_config.py::TestCCProxyConfig::test_yaml_config_values": "params form",
    "test_config.py::TestProxyRuntimeConfig::test_from_proxy_runtime_with_ccproxy_yaml": "1.x internals",
    "test_config.py::TestProxyRuntimeConfig::test_config_from_runtime": "1.x internals",
    "test_config.py::TestProxyRuntimeConfig::test_get_config_uses_runtime_when_available": "1.x internals",
    "test_edge_cases.py::TestEdgeCases::test_thinking_field_false": "thinking",
    "test_edge_cases.py::TestEdgeCases::test_thinking_field_zero": "thinking",
    "test_handler.py::TestCCProxyRouting::test_route_to_background": "model name",
    "test_handler.py::TestCCProxyHandler::test_async_pre_call_hook": "model name",
    "test_handler.py::TestCCProxyHandler::test_handler_uses_config_threshold": "model name",
    "test_handler.py::TestCCProxyHandler::test_log_routing_decision_fallback_scenario": "1.x internals",
    "test_handler.py::TestCCProxyHandler::test_log_routing_decision_passthrough_scenario": "1.x internals",
    "test_handler_logging.py::TestHandlerLoggingHookMethods::test_async_pre_call_hook_with_invalid_request": "no config",
    "test_handler_logging.py::TestHandlerLoggingHookMethods::test_handler_with_debug_hook_logging": "1.x internals",
    "test_handler_logging.py::TestHandlerLoggingHookMethods::test_hook_error_handling": "1.x internals",
    "test_handler_logging.py::TestHandlerLoggingHookMethods::test_log_routing_decision": "1.x internals",
    "test_hooks.py::TestRuleEvaluator::test_rule_evaluator_missing_classifier": "own log handler",
    "test_hooks.py::TestRuleEvaluator::test_rule_evaluator_invalid_classifier": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_missing_router": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_invalid_router": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_empty_model_name": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_no_litellm_params": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_no_model_in_litellm_params": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_no_config_with_reload_success": "own log handler",
    "test_hooks.py::TestModelRouter::test_model_router_passthrough_no_original_model": "own log handler",
    "test_hooks.py::TestForwardOAuth::test_forward_oauth_claude_cli_anthropic_api_base": "own log handler",
    "test_hooks.py::TestForwardOAuth::test_forward_oauth_preserves_existing_extra_headers": "scoped credentials",
    "test_hooks.py::TestForwardApiKey::test_apikey_forwards_header": "scoped credentials",
    "test_hooks.py::TestCaptureHeadersHook::test_authorization_header_redaction": "redaction",
    "test_hooks.py::TestCaptureHeadersHook::test_authorization_header_redaction_no_prefix": "redaction",
    "test_hooks.py::TestCaptureHeadersHook::test_x_api_key_redaction": "redaction",
    "test_hooks.py::TestCaptureHeadersHook::test_cookie_full_redaction": "redaction",
    "test_hooks.py::TestCaptureHeadersHook::test_missing_headers_handling": "litellm metadata",
    "test_hooks.py::TestCaptureHeadersHook::test_http_path_empty_url": "litellm metadata",
    "test_hooks.py::TestCaptureHeadersHook::test_no_proxy_server_request": "litellm metadata",
    "test_hooks.py::TestCaptureHeadersHook::test_long_header_value_truncation": "redaction",
    **{f"test_hooks.py::TestExtractSessionId::test_extract_session_id_{name}": "litellm metadata"
       for name in ("full_format", "preserves_existing_metadata", "no_session_in_user_id", "empty_user_id",
                    "no_metadata_in_body", "no_body", "no_proxy_request", "body_not_dict",
                    "no_account_in_prefix", "preserves_existing_trace_metadata")},
    "test_main.py::TestMain::test_main_entry_point": "1.x internals",
    **{f"test_oauth_forwarding.py::test_oauth_forwarding_{name}": "scoped credentials"
       for name in ("for_claude_cli", "preserves_existing_extra_headers", "with_claude_prefix_model",
                    "with_routed_model", "for_anthropic_direct_api")},
    "test_oauth_user_agent.py::TestOAuthSource::test_oauth_source_with_command_only": "oauth source",
    "test_oauth_user_agent.py::TestOAuthSource::test_oauth_source_with_user_agent": "oauth source",
    **{f"test_oauth_user_agent.py::TestOAuthUserAgentForwarding::test_{name}": "scoped credentials"
       for name in ("custom_user_agent_forwarded", "no_user_agent_when_not_configured",
                    "user_agent_overrides_original", "multiple_providers_with_different_user_agents")},
    "test_router.py::TestModelRouter::test_malformed_config_handling": "1.x internals",
    "test_router.py::TestModelRouter::test_config_update": "1.x internals",
    "test_router.py::TestModelRouter::test_double_check_pattern_early_return": "1.x internals",
    "test_router.py::TestModelRouter::test_double_check_pattern_in_ensure_models_loaded": "1.x internals",
    "test_router.py::TestModelRouter::test_double_check_return_statement_line_59": "1.x internals",
    "test_rules.py::TestTokenCountRule::test_token_encoding_exception_handling": "1.x internals",
    "test_rules.py::TestThinkingRule::test_with_thinking_field": "thinking",
    "test_rules.py::TestThinkingRule::test_thinking_field_any_value": "thinking",
}
# Whole files that test 1.x's CLI module (tyro command classes, start_litellm, templates),
# replaced by this file's own commands: they cannot be imported, so they are not run.
V1_NOT_RUN = {"test_cli.py": "1.x's CLI module (tyro classes, start_litellm, generate_handler_file)",
              "test_utils.py": "1.x's utils module (template dirs, debug printers)",
              "test_shell_integration.py": "1.2.0 itself does not run it (imports a removed function)"}


def v1_sdist() -> Path:
    """ccproxy 1.2.0's sdist from PyPI (.ci/run fetches it; downloaded here on first use)."""
    cache = Path(os.environ.get("CCPROXY_CLAUDE_CACHE") or Path.home() / ".cache" / "ccproxy-tests")
    found = sorted(cache.glob(f"claude_ccproxy-{V1_VERSION}.tar.gz"))
    if not found:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               f"claude-ccproxy=={V1_VERSION}", "-d", str(cache)],
                              capture_output=True, text=True, timeout=300)
        found = sorted(cache.glob(f"claude_ccproxy-{V1_VERSION}.tar.gz"))
        if not found:
            missing_prerequisite(f"could not download claude-ccproxy=={V1_VERSION}: {done.stderr[-300:]}")
    return found[0]


def run_v1_suite(tests: Path, report: Path) -> int:
    """Run 1.x's tests in `tests` against this checkout's ccproxy.py (called in a fresh
    process: `python test_ccproxy.py v1-suite DIR REPORT`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ccproxy as this      # registers 1.x's module names; nothing else is mapped
    assert Path(this.__file__).resolve().parent == Path(__file__).resolve().parent
    return pytest.main([str(tests), "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "asyncio_mode=auto",
                        "-W", "ignore", f"--junitxml={report}"]
                       + [f"--ignore={tests / name}" for name in V1_NOT_RUN])


def v1_outcomes(report: Path) -> dict[str, str]:
    """test id (file::class::name) -> passed / failed / skipped, from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET
    out = {}
    for case in ET.parse(report).iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition("tests.")[2].partition(".")
        test_id = "::".join([f"{module}.py"] + ([cls] if cls else []) + [case.get("name", "")])
        kinds = {child.tag for child in case}
        out[test_id] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return out


@slow
def test_ccproxy_1_2_0s_own_tests_pass_but_for_documented_changes(tmp_path):
    import tarfile
    with tarfile.open(v1_sdist()) as sdist:
        members = [m for m in sdist.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isfile()]
        sdist.extractall(tmp_path, members=members, filter="data")    # the tests only, never 1.x's code
    tests = tmp_path / f"claude_ccproxy-{V1_VERSION}" / "tests"
    home = tmp_path / "home"
    scratch = tmp_path / "tmp"              # 1.x's tests write configs (and so ledgers) in the temp dir
    home.mkdir()
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update(HOME=str(home), PYTHONPATH="", TMPDIR=str(scratch))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "v1-suite", str(tests),
                           str(tmp_path / "report.xml")], cwd=home, env=env, capture_output=True, text=True,
                          timeout=600)
    outcomes = v1_outcomes(tmp_path / "report.xml")
    failed = {t for t, o in outcomes.items() if o == "failed"}
    unexplained = failed - set(V1_FAILING)
    assert not unexplained, f"1.x tests failing with no documented reason: {sorted(unexplained)}\n{done.stdout[-3000:]}"
    now_passing = {t for t in V1_FAILING if outcomes.get(t) == "passed"}
    assert not now_passing, f"these pass now: take them out of V1_FAILING: {sorted(now_passing)}"
    assert set(V1_FAILING.values()) <= set(V1_DIFFERENCES)
    passed = sum(o == "passed" for o in outcomes.values())
    assert passed >= 160 and len(outcomes) >= 230, (passed, len(outcomes), done.stdout[-2000:])
    print(f"ccproxy {V1_VERSION}'s tests: {passed} of {len(outcomes)} run pass; {len(failed)} fail, each "
          f"for a documented change; {', '.join(V1_NOT_RUN)} not run")


@pytest.fixture(scope="module")
def v1_docs_proxy(upstream, tmp_path_factory):
    with started_proxy(tmp_path_factory, "v1docs", lambda d, p: write_v1_docs_config(d, upstream, p)) as run:
        yield run


@slow
@pytest.mark.parametrize("kind,change,deployment", V1_ROUTES)
def test_a_1x_docs_config_reaches_1x_deployments_with_the_clients_oauth_token(v1_docs_proxy, clean_upstream,
                                                                             kind, change, deployment):
    body, headers = cc_request(kind)
    body.update(change)
    headers.pop("x-api-key")
    headers["authorization"] = "Bearer sk-ant-oat01-subscriber-token"       # a Claude subscription
    status, _h, raw = v1_docs_proxy.messages(body, headers)
    assert status == 200, raw[:300]
    received = clean_upstream.received("/v1/messages")[0]
    assert received["body"]["model"] == deployment
    assert received["headers"]["authorization"] == "Bearer sk-ant-oat01-subscriber-token"
    assert (received["body"]["max_tokens"] == 777) == (kind == "haiku")                   # the 1.x hook
    assert received["body"]["metadata"] == body["metadata"]
    log = (v1_docs_proxy.directory / "ccproxy.log").read_text()
    assert "Error creating deployment" not in log and "has no entry named" not in log    # every alias loaded


def test_status_and_stop_see_a_proxy_that_ccproxy_1x_started(tmp_path):
    old = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(120)", "litellm", "--config",
                            str(tmp_path / "config.yaml")], start_new_session=True)
    try:
        (tmp_path / "litellm.lock").write_text(f"{old.pid}\n")
        status = run_cli("status", "--config-dir", str(tmp_path))
        assert status.returncode == 1 and f"ccproxy 1.x's proxy runs from this config dir (pid {old.pid}" in status.stdout
        assert json.loads(run_cli("status", "--json", "--config-dir", str(tmp_path)).stdout)["legacy_1x_pid"] == old.pid
        start = run_cli("start", "--detach", "--config-dir", str(tmp_path))
        assert start.returncode == 1 and f"1.x's proxy is running from this config dir (pid {old.pid}" \
            in start.stderr and "stop it first" in start.stderr and old.poll() is None, start.stderr
        assert not (tmp_path / "ccproxy.pid").exists()
        stop = run_cli("stop", "--config-dir", str(tmp_path))
        assert stop.returncode == 0 and f"ccproxy 1.x's proxy (pid {old.pid}, from litellm.lock)" in stop.stdout
        assert old.wait(timeout=30) is not None and not (tmp_path / "litellm.lock").exists()
    finally:
        if old.poll() is None:
            old.kill()
            old.wait(timeout=10)


def test_a_reader_that_closes_the_pipe_early_gets_no_error(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)                              # as `... | true` does before ccproxy writes
    try:
        for command in (["validate"], ["status"], ["usage"]):
            done = subprocess.run([sys.executable, str(SCRIPT), *command, "--config-dir", str(tmp_path)],
                                  stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
            assert done.stderr == "" and done.returncode == 1, (command, done.stderr)
    finally:
        os.close(write_end)


def test_config_dir_precedence(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CCPROXY_CONFIG_DIR", raising=False)
    fake_server = type(sys)("litellm.proxy.proxy_server")
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", fake_server)
    # 3. nothing else: ~/.ccproxy
    assert ccproxy.find_config_dir() == (home / ".ccproxy", "default")
    # 2. the directory of the config LiteLLM was started with
    fake_server.user_config_file_path = str(tmp_path / "litellm" / "config.yaml")
    assert ccproxy.find_config_dir() == ((tmp_path / "litellm").resolve(), "LiteLLM --config")
    # 1. the environment variable beats it, and --config-dir beats everything
    monkeypatch.setenv("CCPROXY_CONFIG_DIR", str(tmp_path / "env"))
    assert ccproxy.find_config_dir() == (tmp_path / "env", "CCPROXY_CONFIG_DIR")
    assert ccproxy.find_config_dir(tmp_path / "flag") == (tmp_path / "flag", "--config-dir")


def test_ccproxy_py_beside_a_plain_litellm_config_uses_it(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "model_list:\n  - model_name: think\n    litellm_params: {model: anthropic/x}\n")
    config = ccproxy.load_config(tmp_path)
    assert config.litellm_file == tmp_path / "config.yaml" and config.ccproxy_file is None
    assert config.settings.rules == ()          # no ccproxy section: everything passes through


def test_bad_values_name_file_and_line(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(
        "litellm:\n  port: 4000\nccproxy:\n  debug: yes-please\n  session_ttl: soon\n")
    with pytest.raises(ccproxy.ConfigError) as err:
        ccproxy.load_config(tmp_path)
    text = str(err.value)
    assert f"{tmp_path / 'ccproxy.yaml'}:4: `debug` must be true or false" in text
    assert ":5: `session_ttl` must be a non-negative number" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  rules:\n    - name: a\n   rule: [\n")
    with pytest.raises(ccproxy.ConfigError, match=r"ccproxy.yaml:\d+: invalid YAML"):
        ccproxy.load_config(tmp_path)


def test_unknown_keys_warn_with_suggestion(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  default_model_passtrough: true\n")
    config = ccproxy.load_config(tmp_path)
    assert any("did you mean `default_model_passthrough`" in w and ":2:" in w for w in config.warnings)


def test_rule_params_accept_list_and_mapping_forms():
    assert ccproxy.parse_params([{"threshold": 5}, {"x": 1}]) == ({"threshold": 5, "x": 1}, ())
    assert ccproxy.parse_params({"threshold": 5}) == ({"threshold": 5}, ())
    assert ccproxy.parse_params(["haiku"]) == ({}, ("haiku",))
    rule = ccproxy.build_rule(ccproxy.RuleSpec("bg", "MatchModelRule", {}, ("haiku",)))
    assert rule.evaluate({"model": "claude-haiku-5-5"}, None)


def test_bad_rule_params_name_the_parameter():
    with pytest.raises(ccproxy.RuleError, match="threshold"):
        ccproxy.build_rule(ccproxy.RuleSpec("long", "TokenCountRule", {"treshold": 10}))
    with pytest.raises(ccproxy.RuleError, match="not '60k'"):
        ccproxy.build_rule(ccproxy.RuleSpec("long", "TokenCountRule", {"threshold": "60k"}))
    with pytest.raises(ccproxy.RuleError, match="did you mean `TokenCountRule`"):
        ccproxy.build_rule(ccproxy.RuleSpec("long", "ccproxy.rules.TokenCoutRule", {}))


def test_validate_checks_callbacks_that_name_ccproxy(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "model_list: [{model_name: x, litellm_params: {model: anthropic/x}}]\n"
        "litellm_settings:\n  callbacks: [ccproxy.handlr, ccproxy.handler, ccproxy.handler, other.cb]\n")
    done = run_cli("validate", "--config-dir", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path / 'config.yaml'}:3: callback `ccproxy.handlr`: ccproxy's callback is " \
           "`ccproxy.handler` (did you mean `ccproxy.handler`?)" in done.stdout
    assert "`ccproxy.handler` is listed twice" in done.stdout and "other.cb" not in done.stdout


def test_validate_refuses_a_litellm_tracing_callback_whose_package_is_missing(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(          # ccproxy 1.x's template lists langfuse
        "model_list: [{model_name: x, litellm_params: {model: anthropic/x}}]\n"
        "litellm_settings:\n  callbacks: [ccproxy.handler, langfuse]\n  success_callback: [langfuse, otel]\n")
    monkeypatch.setitem(ccproxy.TRACING_PACKAGES, "langfuse", ("ccproxy_no_such_module",))
    config = ccproxy.load_config(tmp_path)
    errors = ccproxy.validate_config(config, ccproxy.Pipeline(config)).errors
    langfuse = [e for e in errors if "LiteLLM's `langfuse` callback needs ccproxy_no_such_module" in e]
    assert [e.split(": ")[0] for e in langfuse] == [f"{tmp_path / 'config.yaml'}:3", f"{tmp_path / 'config.yaml'}:4"]
    assert "pip install 'langfuse>=4.7,<5', or take it out" in langfuse[0]
    assert not [e for e in errors if "`otel` callback" in e]             # installed here (the test command)


class SlottedRule:
    """A 1.x-style rule object (evaluate, no Rule base) whose __slots__ leave no room."""
    __slots__ = ("x",)

    def evaluate(self, request, config):
        return True


def test_a_rule_with_slots_is_refused_loudly_not_nameless(tmp_path):
    spec = ccproxy.RuleSpec("slotted", "test_ccproxy.SlottedRule", {})
    sys.modules.setdefault("test_ccproxy", sys.modules[__name__])
    with pytest.raises(ccproxy.RuleError, match="cannot set its name") as err:
        ccproxy.build_rule(spec)
    assert "__slots__" in err.value.hint


def test_config_shape_errors_name_their_lines(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(
        "litellm:\n  host: 5\n  port: 70000\n  num_workers: 0\n  colour: blue\n"
        "ccproxy:\n  hooks: {a: b}\n  rules: [7, {rule: X}, {name: a}, {name: b, rule: DefaultRule, weight: 2}]\n"
        "  oat_sources: [x]\n")
    with pytest.raises(ccproxy.ConfigError) as err:
        ccproxy.load_config(tmp_path)
    f = str(tmp_path / "ccproxy.yaml")
    for expected in [f"{f}:2: host must be a string", f"{f}:3: port must be a number 1-65535",
                     f"{f}:4: num_workers must be >= 1", f"{f}:7: `hooks` must be a list",
                     f"{f}:8: a rule is a mapping", "rule without a `name`", "rule `a` has no `rule:` class",
                     f"{f}:9: `oat_sources` must map a provider to a command"]:
        assert expected in str(err.value), expected
    (tmp_path / "ccproxy.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ccproxy.ConfigError, match="expected a mapping at the top level"):
        ccproxy.load_config(tmp_path)
    (tmp_path / "ccproxy.yaml").write_text("ccproxy: [1]\nlitellm: x\n")
    with pytest.raises(ccproxy.ConfigError, match="must be a mapping"):
        ccproxy.load_config(tmp_path)
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  hooks: [5]\n  rules:\n    - {name: b, rule: DefaultRule, weight: 2}\nlitellm: {colour: blue}\n")
    with pytest.raises(ccproxy.ConfigError, match="a hook is a name/path"):
        ccproxy.load_config(tmp_path)
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  rules:\n    - {name: b, rule: DefaultRule, weight: 2}\nlitellm: {colour: blue}\n")
    warnings = ccproxy.load_config(tmp_path).warnings
    assert any("rule `b`: unknown key `weight`" in w for w in warnings)
    assert any("unknown key `litellm.colour`" in w for w in warnings)


def test_config_url_unreadable_file_started_config_and_shape_errors(tmp_path, monkeypatch):
    config = ccproxy.Config(settings=ccproxy.Settings(), litellm={}, host="0.0.0.0")
    assert config.url == "http://127.0.0.1:4000"
    assert ccproxy.Config(settings=ccproxy.Settings(), litellm={}, host="::1").url == "http://[::1]:4000"
    (tmp_path / "ccproxy.yaml").mkdir()
    with pytest.raises(ccproxy.ConfigError, match="cannot read"):
        ccproxy.read_yaml(tmp_path / "ccproxy.yaml")
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.yaml").write_text("ccproxy:\n  debug: true\nmodel_list: []\n")
    loaded = ccproxy.load_config(one)
    assert loaded.ccproxy_file == loaded.litellm_file == one / "config.yaml" and loaded.settings.debug
    monkeypatch.setattr(sys, "argv", ["litellm", "--config", str(one / "config.yaml")])
    monkeypatch.delitem(sys.modules, "litellm.proxy.proxy_server", raising=False)
    assert ccproxy.litellm_started_config() == (one / "config.yaml").resolve()
    monkeypatch.setattr(sys, "argv", ["litellm", f"--config={one}/x.yaml"])
    assert ccproxy.litellm_started_config() == (one / "x.yaml").resolve()
    assert ccproxy.parse_params("solo") == ({}, ("solo",))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ccproxy.yaml").write_text("ccproxy:\n  rules: 5\n  hooks: null\nmodel_list: {a: 1}\n")
    with pytest.raises(ccproxy.ConfigError, match="`rules` must be a list"):
        ccproxy.load_config(tmp_path / "r")
    (tmp_path / "r" / "ccproxy.yaml").write_text("ccproxy:\n  rules: [{name: t, rule: ThinkingRule, params: {effort: [high]}}]\nmodel_list: {a: 1}\n")
    config = ccproxy.load_config(tmp_path / "r")
    report = ccproxy.validate_config(config, ccproxy.Pipeline(config))
    assert any("model_list must be a list" in e for e in report.errors)
    assert any("effort high matches every Claude Code main turn" in w for w in report.warnings)


# ---- Tokens ----------------------------------------------------------------------------------

def test_tokenizer_is_cl100k_loaded_offline(tmp_path):
    """No network and an empty tiktoken cache: the copy LiteLLM ships is used."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import ccproxy, sys\n"
        "n = ccproxy.count_tokens('hello world, this is a tokenizer test')\n"
        "print(n, ccproxy.TOKENS.exact, 'litellm' in sys.modules)\n")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", PYTHONPATH=str(HERE))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8", "True", "False"]
    assert "ERROR" not in done.stderr
    assert list(tmp_path.iterdir()) == []          # nothing downloaded or cached there


def test_tokenizer_failure_is_loud_and_marked(monkeypatch, caplog):
    counter = ccproxy.TokenCounter()
    monkeypatch.setattr(ccproxy, "load_cl100k", lambda: (_ for _ in ()).throw(OSError("no file")))
    with caplog.at_level("ERROR", logger="ccproxy"):
        assert counter.count_text("x" * 40) == 10
        assert counter.count_text("y" * 40) == 10
    assert counter.exact is False and "no file" in counter.load_error
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "ESTIMATES" in errors[0].getMessage()
    rule = ccproxy.TokenCountRule(5)
    monkeypatch.setattr(ccproxy, "TOKENS", counter)
    assert "estimated" in rule.check({"messages": [{"role": "user", "content": "z" * 100}]}, None).fact


_CL100K: list = []


def _encode(text: str) -> int:
    if not _CL100K:
        _CL100K.append(ccproxy.load_cl100k())
    return len(_CL100K[0].encode_ordinary(text))


def test_the_offline_tokenizer_is_tiktokens_cl100k(monkeypatch):
    import tiktoken
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(ccproxy.bundled_tiktoken_dir()))
    theirs, ours = tiktoken.get_encoding("cl100k_base"), ccproxy.load_cl100k()
    text = SCRIPT.read_text() + (HERE / "README.md").read_text() + " \u00e9\u4e2d\U0001f600 <|endoftext|>"
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")


def test_request_count_covers_every_part():
    counter = ccproxy.TokenCounter()
    body, _ = cc_request("tool_result")
    body["messages"].append({"role": "assistant", "content": [
        {"type": "thinking", "thinking": "let me think about that " * 20, "signature": "sig"},
        {"type": "text", "text": "done"}]})
    total, complete = counter.count_request(body)
    assert complete
    parts = [counter.count_value(body["system"]), counter.count_tools(body["tools"])]
    parts += [counter.count_message(m) for m in body["messages"]]
    assert total == sum(parts)
    # tool_use, tool_result, thinking and system-role messages all count
    assert counter.count_message(body["messages"][1]) == _encode("# Environment\n" * 50)
    assert counter.count_block({"type": "tool_result", "content": "a.py\nb.py"}) == _encode("a.py\nb.py")
    assert counter.count_block({"type": "thinking", "thinking": "hmm " * 10}) == _encode("hmm " * 10)
    assert counter.count_block({"type": "tool_use", "name": "Bash", "input": {"command": "ls"}}) == \
        _encode("Bash") + _encode('{"command":"ls"}')
    assert counter.count_tools([cc_tool("Bash")]) > 100


def test_cached_count_equals_fresh_count_and_reuses_history():
    counter = ccproxy.TokenCounter()
    body, _ = cc_request("long")
    first = counter.count_request(body)[0]
    grown = copy.deepcopy(body)
    grown["messages"].append({"role": "assistant", "content": [{"type": "text", "text": "ok " * 50}]})
    misses = counter.misses
    second = counter.count_request(grown)[0]
    assert counter.misses - misses == 1               # only the new message was tokenized
    assert second == ccproxy.TokenCounter().count_request(grown)[0]
    assert second == first + _encode("ok " * 50)
    # an edit in the middle of the history is noticed
    edited = copy.deepcopy(grown)
    edited["messages"][0]["content"][1]["text"] = "List the files there, please."
    assert counter.count_request(edited)[0] == ccproxy.TokenCounter().count_request(edited)[0]


def test_count_stops_once_the_limit_is_crossed():
    counter = ccproxy.TokenCounter()
    body, _ = cc_request("long")
    body["messages"].append({"role": "user", "content": big_text(50000)})
    full = ccproxy.TokenCounter().count_request(body)[0]
    count, complete = counter.count_request(body, limit=10000)
    assert count > 10000 and not complete and count < full


def test_string_cache_is_bounded():
    counter = ccproxy.TokenCounter(max_chars=10000)
    for i in range(50):
        counter.count_text(f"{i} " + "word " * 400)
    assert counter._chars <= 10000


def test_token_counter_block_kinds_and_bounds():
    c = ccproxy.TokenCounter(max_conversations=1)
    assert c.count_block({"type": "redacted_thinking", "data": "x" * 500}) == 0
    assert c.count_block({"type": "tool_reference", "tool_name": "WebSearch"}) == _encode("WebSearch")
    assert c.count_block({"type": "document", "source": {"type": "text", "data": "abc def"}}) == _encode("abc def")
    assert c.count_block({"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "hi"}]}}) == _encode("hi")
    assert c.count_block({"type": "document", "source": {"type": "base64", "data": "QUJD"}}) == ccproxy.IMAGE_TOKENS
    assert c.count_block({"type": "search_result", "title": "T", "content": [{"type": "text", "text": "x"}]}) == 2
    openai = {"role": "assistant", "content": None,
              "tool_calls": [{"function": {"name": "lookup", "arguments": '{"q": 1}'}}, "junk"]}
    assert c.count_message(openai) == _encode("lookup") + _encode('{"q": 1}')
    assert ccproxy._json_text({1, 2}).startswith("{")            # not JSON: its str()
    body = {"system": "word " * 2000, "messages": [{"role": "user", "content": "hi"}]}
    assert c.count_request(body, limit=10) == (c.count_value(body["system"]), False)
    c.count_request({"messages": [{"role": "user", "content": "one"}]})
    c.count_request({"messages": [{"role": "user", "content": "two"}]})
    assert len(c._conversations) == 1
    assert ccproxy.count_request_tokens({"messages": [{"role": "user", "content": "hello"}]}) == _encode("hello")


# ---- Rules -----------------------------------------------------------------------------------

def verdict(rule, body):
    return ccproxy.rule_verdict(rule, body, None).matched


@pytest.mark.parametrize("release", ["2.1.197", "2.1.332"])
def test_thinking_rule_default_ignores_claude_code_defaults(release):
    rule = ccproxy.ThinkingRule()
    for kind in ("main", "tool_result", "haiku", "web_search", "subagent"):
        assert not verdict(rule, cc_request(kind, release)[0]), kind
    assert verdict(rule, cc_request("think", release)[0])


def test_thinking_rule_params():
    rule = ccproxy.ThinkingRule(min_budget_tokens=10000, effort=["high"], types=None)
    assert verdict(rule, {"thinking": {"type": "enabled", "budget_tokens": 16000}})
    assert not verdict(rule, {"thinking": {"type": "enabled", "budget_tokens": 8000}})
    assert verdict(rule, {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}})
    assert not verdict(rule, {"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}})
    assert not verdict(rule, {"output_config": {"effort": "high"}})          # no thinking at all
    assert verdict(ccproxy.ThinkingRule(types="adaptive"), {"thinking": {"type": "adaptive"}})
    with pytest.raises(ccproxy.RuleError):
        ccproxy.ThinkingRule(types=["disabled"])
    with pytest.raises(ccproxy.RuleError, match="effort"):
        ccproxy.ThinkingRule(effort=["extreme"])


@pytest.mark.parametrize("release", ["2.1.197", "2.1.332"])
def test_web_search_rule_matches_only_the_sub_request(release):
    rule = ccproxy.WebSearchRule()
    assert verdict(rule, cc_request("web_search", release)[0])
    for kind in ("main", "tool_result", "haiku", "subagent"):
        assert not verdict(rule, cc_request(kind, release)[0]), kind
    assert verdict(rule, {"tools": [{"type": "web_search_20990101", "name": "web_search"}]})


def test_match_tool_rule_matches_names_in_both_formats():
    rule = ccproxy.MatchToolRule("websearch")
    assert verdict(rule, cc_request("main", "2.1.197")[0])          # why it is the wrong tool for web search
    assert verdict(ccproxy.MatchToolRule("lookup"),
                   {"tools": [{"type": "function", "function": {"name": "doc_lookup"}}]})
    assert not verdict(ccproxy.MatchToolRule("lookup"), {"tools": [{"name": "Bash"}]})


def test_match_model_rule_matches_families():
    rule = ccproxy.MatchModelRule("haiku")
    assert verdict(rule, {"model": "claude-haiku-4-5-20251001"})
    assert verdict(rule, {"model": "claude-haiku-5-5"})
    assert not verdict(rule, {"model": "claude-opus-5-5"})
    assert verdict(ccproxy.MatchModelRule(["gpt", "o3"]), {"model": "o3-mini"})


def test_token_count_rule_counts_tool_results():
    rule = ccproxy.TokenCountRule(60000)
    assert verdict(rule, cc_request("long")[0])
    assert not verdict(rule, cc_request("main")[0])


def test_default_rule_is_a_working_catch_all():
    rule = ccproxy.DefaultRule()
    assert verdict(rule, {}) and verdict(rule, {"model": "x"})
    assert ccproxy.DefaultRule(passthrough=True).passthrough


GARBAGE = [{}, {"model": 5}, {"model": None, "messages": None}, {"messages": "hi"},
           {"messages": [None, 3, "x", {"role": "user"}, {"content": {"odd": True}}]},
           {"tools": {"name": "x"}}, {"tools": [None, 5, {"type": 3}, {"function": "f"}]},
           {"thinking": "yes"}, {"thinking": {"type": None}}, {"thinking": {"type": "enabled", "budget_tokens": "big"}},
           {"output_config": "max"}, {"system": 5}, {"system": [None, {"type": "text", "text": 5}]},
           {"messages": [{"role": "user", "content": [{"type": "image", "source": {}},
                                                       {"type": "document", "source": "x"},
                                                       {"type": "mystery", "payload": [1, 2]},
                                                       {"type": "tool_result", "content": [{"type": "text"}]}]}]}]


@pytest.mark.parametrize("body", GARBAGE)
def test_rules_never_raise_on_malformed_requests(body):
    rules = [ccproxy.MatchModelRule("haiku"), ccproxy.ThinkingRule(), ccproxy.TokenCountRule(10),
             ccproxy.MatchToolRule("web"), ccproxy.WebSearchRule(), ccproxy.DefaultRule()]
    for rule in rules:
        assert isinstance(ccproxy.rule_verdict(rule, body, None), ccproxy.Verdict)
    pipeline = ccproxy.Pipeline(ccproxy.default_config())
    data, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(body), headers={})
    assert ctx.hook_errors == [] and ctx.decision is not None


def test_rule_constructors_reject_bad_params_and_describe_themselves():
    for make in (lambda: ccproxy.MatchModelRule([]), lambda: ccproxy.ThinkingRule(min_budget_tokens="x"),
                 lambda: ccproxy.TokenCountRule(100, lower_ratio=2), lambda: ccproxy.MatchToolRule(""),
                 lambda: ccproxy.ThinkingRule(effort=[1])):
        with pytest.raises(ccproxy.RuleError):
            make()
    assert ccproxy.ThinkingRule(types=["enabled"]).describe().endswith("type in enabled)")
    assert ccproxy.MatchToolRule("Bash").describe() == "MatchToolRule(bash)"
    assert ccproxy.SubagentRule(system_contains="x").describe() == "SubagentRule(x)"
    assert ccproxy.DefaultRule(passthrough=True).describe() == "DefaultRule(passthrough=True)"
    assert list(ccproxy._tool_names(["Bash", {"name": "Read"}])) == ["Bash", "Read"]
    assert ccproxy._system_texts({"system": "plain"}) == ["plain"] and ccproxy._system_texts({}) == []


class OldStyleRule(ccproxy.ClassificationRule):
    """A ccproxy 1.x custom rule: evaluate(request, config) only."""

    def evaluate(self, request, config):
        return request.get("model") == "special"


def test_custom_rules_old_style_and_broken(tmp_path, caplog):
    assert ccproxy.rule_verdict(OldStyleRule(), {"model": "special"}, None).matched
    with pytest.raises(NotImplementedError):
        ccproxy.Rule().check({}, None)
    (tmp_path / "odd.py").write_text("NOT_A_CLASS = 5\nclass Plain:\n    pass\n")
    with pytest.raises(ccproxy.RuleError, match="has no `Missing`"):
        ccproxy.build_rule(ccproxy.RuleSpec("x", "odd.Missing", {}), tmp_path)
    with pytest.raises(ccproxy.RuleError, match="not a rule class"):
        ccproxy.build_rule(ccproxy.RuleSpec("x", "odd.NOT_A_CLASS", {}), tmp_path)
    with pytest.raises(ccproxy.RuleError, match="has no evaluate"):
        ccproxy.build_rule(ccproxy.RuleSpec("x", "odd.Plain", {}), tmp_path)
    pipeline = ccproxy.Pipeline(ccproxy.default_config())
    broken = ccproxy.Rule()
    broken.name = "broken"
    pipeline.rules.insert(0, broken)                 # a rule that raises is skipped; the others decide
    for _ in range(3):
        data, ctx = ccproxy.run_pipeline(pipeline, {"model": "claude-haiku-5-5", "messages": []}, headers={})
    assert ctx.hook_errors == ["rule broken failed: NotImplementedError: Rule implements neither evaluate nor check"]
    assert ctx.decision.label == "background"
    assert caplog.text.count("rule broken failed") == 1


# ---- Hooks -----------------------------------------------------------------------------------

def test_session_id_from_json_user_id_legacy_form_and_header():
    new = {"user_id": json.dumps({"device_id": "d", "account_uuid": "", "session_id": "s-json"})}
    old = {"user_id": "user_abc123_account_1111-2222_session_3333-4444"}
    assert ccproxy.parse_session(new, {}) == "s-json"
    assert ccproxy.parse_session(old, {}) == "3333-4444"
    assert ccproxy.parse_session({"user_id": "{broken"}, {"x-claude-code-session-id": "s-h"}) == "s-h"
    assert ccproxy.parse_session(None, {}) is None


def test_failing_hook_in_the_middle_is_logged_and_skipped(tmp_path, upstream, caplog):
    write_legacy_config(tmp_path, upstream, 4555)
    pipeline = ccproxy.Pipeline(ccproxy.load_config(tmp_path))
    body, headers = cc_request("haiku")
    with caplog.at_level("ERROR", logger="ccproxy"):
        data, ctx = ccproxy.run_pipeline(pipeline, body, headers=headers)
    assert ctx.hook_errors == ["hook explode failed: RuntimeError: hook exploded on purpose: testing"]
    assert data["model"] == "background"
    assert data["provider_specific_header"]["extra_headers"] == {"x-api-key": CLIENT_KEY}
    assert ctx.session_id == "sess-1"
    assert [r.getMessage() for r in caplog.records if "explode" in r.getMessage()] == [
        "hook explode failed: RuntimeError: hook exploded on purpose: testing (skipped; the request goes on)"]


def test_model_router_passthrough_and_missing_entry_fallback(caplog):
    config = ccproxy.default_config()
    pipeline = ccproxy.Pipeline(config)
    body, headers = cc_request("main")
    _d, ctx = ccproxy.run_pipeline(pipeline, body, headers=headers)
    assert (ctx.decision.label, ctx.decision.passthrough, ctx.decision.upstream) == \
        ("default", True, "anthropic/claude-opus-5-5")
    # a rule whose label has no model_list entry falls back to the default route, once warned
    settings = ccproxy.dataclasses.replace(config.settings, rules=(
        ccproxy.RuleSpec("nowhere", "DefaultRule", {}),))
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, settings=settings))
    with caplog.at_level("WARNING", logger="ccproxy"):
        for _ in range(3):
            _d, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(body), headers={})
    assert ctx.decision.label == "default" and ctx.decision.passthrough
    assert len([r for r in caplog.records if "nowhere" in r.getMessage()]) == 1


def test_model_list_load_failure_is_not_marked_loaded_and_reload_has_cooldown():
    calls = []
    live = [None]

    def source():
        calls.append(time.monotonic())
        return live[0]

    config = ccproxy.default_config()
    settings = ccproxy.dataclasses.replace(config.settings, model_reload_cooldown=3600)
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, settings=settings), model_source=source)
    assert "think" in pipeline.models()              # router not ready: config list, not "loaded"
    live[0] = [{"model_name": "live-only", "litellm_params": {"model": "anthropic/x"}}]
    assert "live-only" in pipeline.models()          # so the live list is picked up next time
    assert len(calls) == 2
    for _ in range(20):                              # a missing name reloads at most once per cooldown
        pipeline.models(missing="ghost")
    assert len(calls) == 2
    failing = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, settings=settings),
                               model_source=lambda: calls.append(1) / 0)
    for _ in range(20):                              # a source that raises: not on every request
        assert "think" in failing.models() and "think" in failing.models(missing="ghost")
    assert len(calls) == 3


def test_count_tokens_route_answers_anthropic_json_when_counting_fails(tmp_path, monkeypatch):
    import asyncio
    core = ccproxy.Handler(config=ccproxy.default_config(tmp_path))

    async def broken(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")
    monkeypatch.setattr(core, "count_tokens", broken)

    class Request:
        scope = {"parsed_body": ((), {"model": "m", "messages": []})}
        headers = {"content-type": "application/json"}

        class url:
            query = ""
    answer = asyncio.run(core._count_tokens_route(Request(), None, None))
    assert answer.status_code == 500
    assert json.loads(answer.body) == {"type": "error", "error": {
        "type": "api_error", "message": "ccproxy could not count: RuntimeError"}}


def test_background_thread_sweeps_idle_sessions():
    config = ccproxy.default_config()
    settings = ccproxy.dataclasses.replace(config.settings, session_ttl=0.1)
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, settings=settings))
    for i in range(50):
        body, headers = cc_request("main", session=f"idle-{i}")
        ccproxy.run_pipeline(pipeline, body, headers=headers)
    assert len(pipeline.sessions) == 50
    worker = ccproxy.Background()
    worker.start(pipeline)
    try:
        deadline = time.monotonic() + 5
        while worker.swept < 50 and time.monotonic() < deadline:     # counted after the sweep
            time.sleep(0.02)
        assert len(pipeline.sessions) == 0 and worker.running and worker.swept == 50
    finally:
        worker.stop()
    assert not worker.running


def test_forward_apikey_only_for_anthropic_deployments_without_a_key(upstream, tmp_path):
    write_config(tmp_path, upstream, 4000)
    pipeline = ccproxy.Pipeline(ccproxy.load_config(tmp_path))
    body, headers = cc_request("long")               # routed to an openai/ deployment
    data, ctx = ccproxy.run_pipeline(pipeline, body, headers=headers)
    assert "provider_specific_header" not in data and ctx.auth == []
    body, headers = cc_request("main")
    headers.pop("x-api-key")
    headers["authorization"] = "Bearer sk-ant-oat01-secret"
    data, ctx = ccproxy.run_pipeline(pipeline, body, headers=headers)
    assert data["provider_specific_header"] == {"custom_llm_provider": "anthropic",
                                                "extra_headers": {"authorization": "Bearer sk-ant-oat01-secret"}}


def test_on_chat_completions_the_client_credential_goes_as_api_key_unless_the_route_has_fallbacks(upstream, tmp_path):
    write_config(tmp_path, upstream, 4000)
    chat = {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": "hi"}]}
    pipeline = ccproxy.Pipeline(ccproxy.load_config(tmp_path))
    data, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(chat), call_type="acompletion",
                                     headers={"authorization": "Bearer sk-ant-oat01-secret"})
    assert data["api_key"] == "sk-ant-oat01-secret" and "provider_specific_header" not in data
    assert ctx.auth == ["client Authorization forwarded (as api_key)"]
    write_config(tmp_path, upstream, 4000, settings={"fallbacks": {"*": ["small"]}})
    pipeline = ccproxy.Pipeline(ccproxy.load_config(tmp_path))
    data, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(chat), call_type="acompletion",
                                     headers={"x-api-key": CLIENT_KEY})
    assert "api_key" not in data and "would reach this route's fallbacks too" in ctx.auth[0]


@slow
def test_client_credentials_reach_anthropic_from_chat_completions(proxy, clean_upstream):
    chat = {"model": "claude-opus-5-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    for headers, sent in (({"x-api-key": CLIENT_KEY}, ("x-api-key", CLIENT_KEY)),
                          ({"authorization": "Bearer sk-ant-oat01-chat-token"},
                           ("authorization", "Bearer sk-ant-oat01-chat-token"))):
        clean_upstream.clear()
        status, _h, raw = http("POST", proxy.url + "/v1/chat/completions", chat,
                               dict(headers, **{"content-type": "application/json"}))
        assert status == 200, raw[:300]
        assert clean_upstream.received("/v1/messages")[0]["headers"][sent[0]] == sent[1]
    assert "sk-ant-oat01-chat-token" not in proxy.log() and CLIENT_KEY not in proxy.log()


@slow
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_answer_headers_and_new_thinking_fields_pass_as_sent(proxy, clean_upstream, stream):
    """Claude Code 2.1.332 reads anthropic-thinking-prefix-mismatch and the unified rate-limit
    headers of an answer, and sends thinking.block_binding under a beta: both ways untouched."""
    sent_headers = {"anthropic-thinking-prefix-mismatch": "1", "anthropic-ratelimit-unified-status": "allowed_warning",
                    "anthropic-ratelimit-unified-5h-utilization": "0.91", "request-id": "req_pass_1"}
    clean_upstream.scripts.append(lambda record: upstream_message(
        record["body"], [{"type": "text", "text": "ok"}]) + (sent_headers,))
    body, headers = cc_request("main")
    body.update(stream=stream, thinking={"type": "adaptive", "display": "omitted", "block_binding": "bb_123"})
    headers["anthropic-beta"] += ",thinking-block-binding-2026-11-01"
    status, got, raw = proxy.messages(body, headers)
    assert status == 200, raw[:300]
    for name, value in sent_headers.items():
        assert got[name] == value, (name, sorted(got))
    received = clean_upstream.received("/v1/messages")[0]
    assert received["body"]["thinking"] == body["thinking"]
    assert "thinking-block-binding-2026-11-01" in received["headers"]["anthropic-beta"].split(",")


def test_redact_hides_secrets():
    assert ccproxy.redact("Authorization", "Bearer sk-ant-oat01-xyz") == "<redacted>"
    assert ccproxy.redact("x-api-key", CLIENT_KEY) == "<redacted>"
    assert ccproxy.redact("user-agent", "claude-cli/2.1.332") == "claude-cli/2.1.332"


def test_provider_detection():
    assert ccproxy.provider_of({"model": "anthropic/x"}) == "anthropic"
    assert ccproxy.provider_of({"model": "x", "custom_llm_provider": "bedrock"}) == "bedrock"
    assert ccproxy.provider_of({"model": "claude-3-5-haiku-20241022"}) == "anthropic"   # via LiteLLM
    assert ccproxy.provider_of({"model": "totally-unknown-model-xyz"}) is None
    assert ccproxy.provider_of({}) is None


def test_retired_and_malformed_hooks_and_sources(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy:\n  hooks: [rule_evaluator, ccproxy.hooks.add_beta_headers]\n"
        "  oat_sources: {anthropic: 5}\n  rules:\n    - {name: a, rule: DefaultRule, sticky: maybe}\n")
    with pytest.raises(ccproxy.ConfigError, match="`sticky` must be true or false"):
        ccproxy.load_config(tmp_path)
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy:\n  hooks: [rule_evaluator, ccproxy.hooks.add_beta_headers]\n  oat_sources: {anthropic: 5}\n")
    problems = ccproxy.Pipeline(ccproxy.load_config(tmp_path)).problems
    assert any("add_beta_headers skipped" in p for p in problems)
    assert any("oat_sources.anthropic: expected a command" in p for p in problems)
    report = run_cli("validate", "--json", "--config-dir", str(tmp_path))
    assert json.loads(report.stdout)["ok"] is False


def test_auth_hooks_with_deployment_keys_and_failed_sources():
    config = ccproxy.default_config()
    models = [dict(m, litellm_params=dict(m["litellm_params"], api_key="sk-deploy")) if m["model_name"] == "think" else m
              for m in config.model_list]
    config = ccproxy.dataclasses.replace(config, litellm=dict(config.litellm, model_list=models))
    pipeline = ccproxy.Pipeline(config)
    pipeline.hooks.append(("forward_oauth", ccproxy.forward_oauth, {}))
    pipeline.oauth["anthropic"] = ccproxy.OAuthSource("anthropic", "false")
    body, headers = cc_request("think")
    data, ctx = ccproxy.run_pipeline(pipeline, body, headers=headers)
    assert "deployment api_key (client credentials not forwarded)" in ctx.auth
    headers.pop("x-api-key")
    data, ctx = ccproxy.run_pipeline(pipeline, cc_request("main")[0], headers=headers)
    assert "no oauth token for anthropic (source failed); client auth kept" in ctx.auth
    headers["authorization"] = "Bearer client-own"
    data, ctx = ccproxy.run_pipeline(pipeline, cc_request("main")[0], headers=headers)
    assert ccproxy.provider_headers(data, "anthropic")["authorization"] == "Bearer client-own"
    assert ccproxy.provider_headers({"provider_specific_header": [{"custom_llm_provider": "openai,anthropic",
                                                                   "extra_headers": {"a": "b"}}]}, "anthropic") == {"a": "b"}
    assert ccproxy._secret("os.environ/NO_SUCH_VAR_XYZ") is None and ccproxy._secret("lit") == "lit"


# ---- Handler: its hooks called in-process --------------------------------------------------

def handler_data(body: dict, headers: dict, call_id: str = "call-1") -> dict:
    """`data` as LiteLLM hands it to async_pre_call_hook on /v1/messages (measured shape)."""
    data = copy.deepcopy(body)
    public = {k: v for k, v in headers.items() if k not in ("x-api-key", "authorization")}
    data.update(proxy_server_request={"url": "http://127.0.0.1:4000/v1/messages?beta=true",
                                      "method": "POST", "headers": public, "body": body},
                secret_fields={"raw_headers": dict(headers)},
                litellm_metadata={"headers": public}, litellm_call_id=call_id)
    return data


def test_handler_routes_in_process_and_tells_the_client(tmp_path, upstream, caplog):
    import asyncio
    write_config(tmp_path, upstream, 4000)
    handler = ccproxy.CCProxyHandler(config_dir=tmp_path)
    body, headers = cc_request("haiku")
    data = asyncio.run(handler.async_pre_call_hook(None, None, handler_data(body, headers), "anthropic_messages"))
    assert data["model"] == "background"
    assert data["litellm_metadata"]["ccproxy"]["upstream"] == "anthropic/up-background"
    assert data["metadata"] == body["metadata"]                 # the client's metadata untouched
    extra = asyncio.run(handler.async_post_call_response_headers_hook(data, None, None))
    assert extra == {"x-ccproxy-rule": "background", "x-ccproxy-model": "anthropic/up-background"}
    assert asyncio.run(handler.async_pre_call_hook(None, None, {"input": "x"}, "aembedding")) == {"input": "x"}
    asyncio.run(handler.async_post_call_failure_hook(data, RuntimeError("upstream down"), None))
    asyncio.run(handler.async_post_call_failure_hook({"litellm_params": {"metadata": {
        "user_api_key_alias": "litellm-internal-health-check"}}}, RuntimeError("x"), None))   # not counted
    health = handler.core.health()
    assert health["routes"] == {"background": 1} and health["failures"] == {"background": 1}
    assert ccproxy.BACKGROUND.running


def test_handler_with_a_broken_config_passes_everything_through(tmp_path, caplog):
    import asyncio
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  debug: maybe\n")
    with caplog.at_level("ERROR", logger="ccproxy"):
        handler = ccproxy.CCProxyHandler(config_dir=tmp_path)
    assert handler.core.config_error and "routing disabled" in caplog.text and ":2:" in caplog.text
    body, headers = cc_request("think")
    data = asyncio.run(handler.async_pre_call_hook(None, None, handler_data(body, headers), "anthropic_messages"))
    assert data["model"] == body["model"] and data["litellm_metadata"]["ccproxy"]["passthrough"]


def test_handler_refreshes_oauth_after_401_in_process(tmp_path):
    import asyncio
    token = tmp_path / "tok"
    token.write_text("tok-a\n")
    (tmp_path / "ccproxy.yaml").write_text(
        f"ccproxy:\n  hooks: [rule_evaluator, model_router, forward_oauth]\n"
        f"  oat_sources: {{anthropic: 'cat {token}'}}\n"
        "model_list: [{model_name: 'claude-*', litellm_params: {model: 'anthropic/claude-*'}}]\n")
    handler = ccproxy.CCProxyHandler(config_dir=tmp_path)
    body, headers = cc_request("main")
    headers.pop("x-api-key")
    data = asyncio.run(handler.async_pre_call_hook(None, None, handler_data(body, headers), "anthropic_messages"))
    assert data["provider_specific_header"]["extra_headers"]["authorization"] == "Bearer tok-a"
    token.write_text("tok-b\n")
    handler.core.pipeline.oauth["anthropic"].loaded_at = 0
    err = type("AuthError", (Exception,), {"status_code": 401})()
    asyncio.run(handler.async_post_call_failure_deployment_hook(data, err, "anthropic_messages"))
    assert handler.core.pipeline.oauth["anthropic"].token == "tok-b"
    other = type("Boom", (Exception,), {"status_code": 500})()
    asyncio.run(handler.async_post_call_failure_deployment_hook(data, other, "anthropic_messages"))


def test_response_hooks_in_process(tmp_path, upstream):
    import asyncio
    write_config(tmp_path, upstream, 4000)
    handler = ccproxy.CCProxyHandler(config_dir=tmp_path)
    body, headers = cc_request("main", session="sess-hooks")
    data = asyncio.run(handler.async_pre_call_hook(None, None, handler_data(body, headers), "anthropic_messages"))
    stream = sse(message_events(upstream_message({"model": "claude-opus-5-5"}, [
        {"type": "thinking", "thinking": "t", "signature": "sig.claude-opus-5-5.77"},
        {"type": "text", "text": "hi"}])[1]))

    async def chunks(raw, size):
        for i in range(0, len(raw), size):
            yield raw[i:i + size]

    async def collect(gen):
        return [c async for c in gen]

    out = asyncio.run(collect(handler.async_post_call_streaming_iterator_hook(None, chunks(stream, 7), data)))
    assert b"".join(out) == stream
    session = handler.core.pipeline.sessions._sessions[("sess-hooks", None)]
    assert handler.core.pipeline.sessions.producer(session, "sig.claude-opus-5-5.77") == "claude-opus-5-5"
    # a JSON answer records too, and a zero usage from a translated route is filled in
    long_body, long_headers = cc_request("long", session="sess-hooks")
    long_data = asyncio.run(handler.async_pre_call_hook(None, None, handler_data(long_body, long_headers, "c2"), "anthropic_messages"))
    answer = {"content": [{"type": "thinking", "thinking": "x", "signature": "sig.j"}], "usage": {"input_tokens": 0}}
    assert asyncio.run(handler.async_post_call_success_hook(long_data, None, answer))["usage"]["input_tokens"] > 60000
    zero = sse([("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 0}}}),
                ("message_stop", {"type": "message_stop"})])
    out = b"".join(asyncio.run(collect(handler.async_post_call_streaming_iterator_hook(None, chunks(zero, 5), long_data))))
    assert json.loads(out.split(b"data: ")[1].split(b"\n")[0])["message"]["usage"]["input_tokens"] > 60000
    plain = b"".join(asyncio.run(collect(handler.async_post_call_streaming_iterator_hook(None, chunks(zero, 5), {}))))
    assert plain == zero
    assert asyncio.run(handler.async_post_call_success_hook({}, None, "not a dict")) == "not a dict"


def test_count_tokens_in_process_with_deployment_key_and_dead_upstream(tmp_path, upstream, monkeypatch):
    import asyncio
    write_config(tmp_path, upstream, 4000)
    config = yaml.safe_load((tmp_path / "ccproxy.yaml").read_text())
    for m in config["model_list"]:
        if m["model_name"] == "think":
            m["litellm_params"]["api_key"] = "os.environ/CCPROXY_TEST_KEY"
        if m["model_name"] == "background":
            m["litellm_params"]["api_base"] = f"http://127.0.0.1:{free_port()}/v1"
    (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("CCPROXY_TEST_KEY", "sk-from-env")
    handler = ccproxy.CCProxyHandler(config_dir=tmp_path)
    upstream.clear()
    body, headers = cc_request("think")
    status, answer = asyncio.run(handler.core.count_tokens({"model": body["model"], "messages": body["messages"],
                                                       "output_config": {"effort": "max"},
                                                       "thinking": {"type": "adaptive"}}, headers))
    assert status == 200 and answer == {"input_tokens": 4242}
    assert upstream.received()[-1]["headers"]["x-api-key"] == "sk-from-env"
    status, answer = asyncio.run(handler.core.count_tokens({"model": "claude-haiku-5-5", "messages": []}, headers))
    assert status == 502 and "count_tokens upstream failed" in answer["error"]["message"]


# ---- Handler: end to end through a real LiteLLM proxy ---------------------------------------

EXPECTED_ROUTES = {   # request kind -> (route label, model the upstream must receive, upstream path)
    "main": ("default", None, "/v1/messages"),
    "tool_result": ("default", None, "/v1/messages"),
    "subagent": ("default", None, "/v1/messages"),
    "haiku": ("background", "up-background", "/v1/messages"),
    "web_search": ("web_search", "up-search", "/v1/messages"),
    "think": ("think", "up-think", "/v1/messages"),
    "long": ("long_context", "up-long", "/v1/chat/completions"),
}


def assert_same_body_except_model(sent: dict, received: dict) -> None:
    """Field by field: what the client sent arrives upstream, apart from `model`."""
    assert set(received) == set(sent), (set(received) ^ set(sent))
    for key in sent:
        if key != "model":
            assert received[key] == sent[key], key


@slow
@pytest.mark.parametrize("release", ["2.1.197", "2.1.332"])
@pytest.mark.parametrize("kind", list(EXPECTED_ROUTES))
@pytest.mark.parametrize("stream", [True, False])
def test_claude_code_requests_route_by_rules(proxy, clean_upstream, kind, release, stream):
    body, headers = cc_request(kind, release)
    body["stream"] = stream
    status, resp_headers, raw = proxy.messages(body, headers)
    assert status == 200, raw[:500]
    label, model, path = EXPECTED_ROUTES[kind]
    model = model or body["model"]
    got = clean_upstream.received()
    assert [(r["path"].split("?")[0], r["body"]["model"]) for r in got] == [(path, model)]
    assert resp_headers["x-ccproxy-rule"] == label
    text = sse_text(raw) if stream else json.loads(raw)["content"][0]["text"]
    assert text == f"answer from {model}"          # Anthropic format, also from an OpenAI route
    if path == "/v1/messages":
        assert_same_body_except_model(body, got[0]["body"])
        sent_betas = set(headers["anthropic-beta"].split(","))
        assert set(got[0]["headers"]["anthropic-beta"].split(",")) == sent_betas
        assert got[0]["headers"]["x-api-key"] == CLIENT_KEY       # forward_apikey
    else:
        assert got[0]["headers"]["authorization"] == "Bearer sk-upstream-openai"
        assert CLIENT_KEY not in json.dumps(got[0]["headers"])   # never leaves for another provider


def fixture_names():
    """The captured requests, or one placeholder whose test then reports them missing."""
    return sorted(p.name for p in FIXTURES.glob("*.json")) if HAVE_FIXTURES else ["(missing)"]


FIXTURE_ROUTES = {
    "main-turn.json": "default", "tool-result-turn.json": "default",
    "web-search.json": "web_search", "haiku-model.json": "background",
    "main-turn-2.1.332.json": "default", "tool-result-turn-2.1.332.json": "default",
    "web-search-2.1.332.json": "web_search", "haiku-model-2.1.332.json": "background",
    "subagent-general-2.1.332.json": "default", "count-tokens-2.1.332.json": None,
}
HOP_BY_HOP = {"connection", "accept-encoding", "content-length", "host", "transfer-encoding"}


@slow
@pytest.mark.parametrize("name", fixture_names())
def test_captured_claude_code_requests_replay(proxy, clean_upstream, name):
    need_fixtures()
    capture = load_fixture(name)
    headers = {k: v for k, v in capture["headers"].items() if k.lower() not in HOP_BY_HOP}
    headers["x-api-key"] = CLIENT_KEY
    body = capture["body"]
    status, resp_headers, raw = proxy.messages(body, headers, path=capture["path"])
    assert status == 200, raw[:500]
    got = clean_upstream.received()
    assert len(got) == 1
    label = FIXTURE_ROUTES[name]
    if label is None:                                  # count_tokens: LiteLLM routes by model
        assert got[0]["path"].startswith("/v1/messages/count_tokens")
        assert json.loads(raw)["input_tokens"] == 4242
        return
    assert resp_headers["x-ccproxy-rule"] == label
    expected_model = {"background": "up-background", "web_search": "up-search"}.get(label, body["model"])
    assert got[0]["body"]["model"] == expected_model
    assert_same_body_except_model(body, got[0]["body"])
    assert set(got[0]["headers"]["anthropic-beta"].split(",")) == set(headers["anthropic-beta"].split(","))
    # explain decides exactly what the proxy did
    decided = ccproxy.route_request(body, ccproxy.load_config(proxy.directory), headers=headers)
    assert decided.decision.label == label


@slow
def test_openai_route_translates_both_ways(proxy, clean_upstream):
    body = {"model": "gpt-cheap", "max_tokens": 100, "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}
    status, headers, raw = proxy.messages(body)
    assert status == 200, raw
    message = json.loads(raw)
    assert message["type"] == "message" and message["content"][0]["text"] == "answer from up-cheap"
    assert message["usage"]["input_tokens"] == 321
    assert clean_upstream.received()[0]["path"] == "/v1/chat/completions"
    body["stream"] = True
    status, headers, raw = proxy.messages(body)
    events = sse_events(raw)
    assert [e["type"] for e in events][0] == "message_start" and events[-1]["type"] == "message_stop"
    assert sse_text(raw) == "answer from up-cheap"



@slow
def test_openai_format_streams_on_chat_completions_pass_through_as_json(proxy, clean_upstream):
    body = {"model": "gpt-cheap", "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}
    status, _h, raw = http("POST", proxy.url + "/v1/chat/completions", body,
                           {"content-type": "application/json"})
    assert status == 200, raw[:300]
    lines = [ln[5:].strip() for ln in raw.decode().splitlines() if ln.startswith("data:")]
    assert lines and "ModelResponseStream" not in raw.decode()
    assert all(ln == "[DONE]" or isinstance(json.loads(ln), dict) for ln in lines)
    assert "answer from up-cheap" in "".join(
        (json.loads(ln)["choices"][0]["delta"].get("content") or "") for ln in lines
        if ln != "[DONE]" and json.loads(ln).get("choices"))



UPSTREAM_ERRORS = [
    (529, "overloaded_error", "Overloaded", {}),
    (429, "rate_limit_error", "This request would exceed your rate limit",
     {"retry-after": "1", "anthropic-ratelimit-unified-status": "rejected",
      "anthropic-ratelimit-unified-reset": "1795690000"}),
    (400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum", {}),
    (401, "authentication_error", "invalid x-api-key", {}),
]


@slow
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status,kind,message,extra", UPSTREAM_ERRORS)
def test_upstream_errors_reach_the_client_as_sent(proxy, clean_upstream, status, kind, message, extra, stream):
    error = {"type": "error", "error": {"type": kind, "message": message}}
    clean_upstream.scripts.append(lambda record: (status, error, dict(extra, **{"request-id": "req_up_1"})))
    body, headers = cc_request("main")
    body["stream"] = stream
    got_status, got_headers, raw = proxy.messages(body, headers)
    assert (got_status, json.loads(raw)) == (status, error)
    for name, value in extra.items():
        assert got_headers[name] == value
    assert got_headers["request-id"] == "req_up_1" and "litellm" not in raw.decode()
    assert len(clean_upstream.received()) == 1        # upstream_retries 0: Claude Code retries


@slow
def test_a_session_survives_a_fallback_and_its_return(opus_long_proxy, clean_upstream):
    """think fails and LiteLLM's fallback (small) answers: ccproxy records small as the
    producer of that answer's thinking, so when think is back those blocks are dropped for
    it instead of drawing Anthropic's invalid-signature 400."""
    down = {"think": True}
    clean_upstream.scripts.append(lambda record: (500, {"type": "error", "error": {
        "type": "api_error", "message": "think is down"}})
        if down["think"] and record["body"].get("model") == "up-think" else None)
    strict = StrictAnthropic()
    clean_upstream.scripts.append(strict)
    client = ScriptedClaudeCode(opus_long_proxy.url, "sess-fallback")
    client.effort = "max"
    client.turn("plan it, USE-TOOL first")                         # think down: small answers
    assert client.routes[0] == ("think", "anthropic/up-small")    # who really answered
    down["think"] = False
    client.turn("go on, USE-TOOL again", stream=True)              # think is back
    client.turn("and finish", stream=False)
    assert strict.rejected == [] and set(client.statuses) == {200}
    assert [model for _rule, model in client.routes[-3:]] == ["anthropic/up-think"] * 3
    answered = [r for r in clean_upstream.received("/v1/messages") if r["body"]["model"] == "up-think"]
    assert upstream_thinking_is_own(answered) == []


@slow
def test_upstream_retries_and_timeout_are_ccproxys_unless_litellms_settings_say(opus_long_proxy, clean_upstream, tmp_path):
    clean_upstream.scripts.append(lambda record: (529, {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}))
    body, headers = cc_request("main")
    assert opus_long_proxy.messages(body, headers)[0] == 529
    assert len(clean_upstream.received()) == 2         # upstream_retries: 1 in that config
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy: {upstream_timeout: 90}\nrouter_settings: {num_retries: 5}\n"
        "model_list: [{model_name: x, litellm_params: {model: anthropic/x}}]\n")
    generated = yaml.safe_load(ccproxy.litellm_config_for_start(ccproxy.load_config(tmp_path)).read_text())
    assert generated["router_settings"]["num_retries"] == 5            # LiteLLM's own setting wins
    assert generated["litellm_settings"]["request_timeout"] == 90.0
    assert generated["litellm_settings"]["callbacks"] == ["ccproxy.handler"]


FAULT_SETTINGS = {"upstream_retries": 2, "retry_on": ["unavailable"], "upstream_timeout": 2, "fallbacks": {"think": ["small"]},
                  "context_window_fallbacks": {"background": ["small"]}, "quota_fallback": "small"}


@pytest.fixture(scope="module")
def faults_proxy(upstream, tmp_path_factory):
    """Retries, fallbacks and the quota fallback written in ccproxy.yaml itself."""
    with started_proxy(tmp_path_factory, "faults",
                       lambda d, p: write_config(d, upstream, p, settings=FAULT_SETTINGS)) as run:
        yield run


def failing(status: int, kind: str, message: str, model: str | None = None, headers: dict | None = None):
    """A fake-upstream script: this Anthropic error for every request (or one model's)."""
    error = {"type": "error", "error": {"type": kind, "message": message}}
    return lambda record: (status, error, headers or {}) \
        if model is None or record["body"].get("model") == model else None


@slow
def test_retries_apply_to_the_failures_retry_on_names(faults_proxy, clean_upstream):
    before = metric_values(faults_proxy.url)
    clean_upstream.scripts.append(failing(503, "api_error", "unavailable"))
    body, headers = cc_request("main")
    assert faults_proxy.messages(body, headers)[0] == 503
    assert len(clean_upstream.received()) == 3             # retry_on: [unavailable], 2 retries
    clean_upstream.clear()
    clean_upstream.scripts.append(failing(529, "overloaded_error", "Overloaded"))
    assert faults_proxy.messages(body, headers)[0] == 529
    assert len(clean_upstream.received()) == 1             # not in retry_on: Claude Code retries
    clean_upstream.clear()
    once, seen = failing(503, "api_error", "unavailable"), []
    clean_upstream.scripts.append(lambda record: None if seen else (seen.append(1), once(record))[1])
    assert faults_proxy.messages(body, headers)[0] == 200  # answered by the retry
    errors = ("ccproxy_upstream_errors_total", (("label", "default"), ("status", "503")))
    wait_for_metric(faults_proxy.url, errors, lambda v: v == before.get(errors, 0) + 4)
    retries = ("ccproxy_retries_total", (("label", "default"),))
    wait_for_metric(faults_proxy.url, retries, lambda v: v == before.get(retries, 0) + 1)
    answers = ("ccproxy_answers_total", (("label", "default"), ("model", "anthropic/claude-opus-5-5"),
                                          ("status", "ok")))
    assert metric_values(faults_proxy.url)[answers] == before.get(answers, 0) + 1   # one row, not two


@slow
@pytest.mark.parametrize("stream", [False, True])
def test_fallbacks_written_in_ccproxy_yaml_answer_for_a_failed_label(faults_proxy, clean_upstream, stream):
    clean_upstream.scripts.append(failing(500, "api_error", "think is down", model="up-think"))
    clean_upstream.scripts.append(failing(400, "invalid_request_error",
                                          "prompt is too long: 250000 tokens > 200000 maximum", model="up-background"))
    for kind, failed in (("think", "up-think"), ("haiku", "up-background")):
        body, headers = cc_request(kind)
        body["stream"] = stream
        status, got, raw = faults_proxy.messages(body, headers)
        assert status == 200 and got["x-ccproxy-model"] == "anthropic/up-small", raw[:300]
        assert [r["body"]["model"] for r in clean_upstream.received("/v1/messages")][-2:] == [failed, "up-small"]
    for label in ("think", "background"):               # answered by another deployment: counted
        wait_for_metric(faults_proxy.url, ("ccproxy_fallbacks_total", (("label", label),)), lambda v: v >= 1)
    generated = yaml.safe_load((faults_proxy.directory / ccproxy.GENERATED_CONFIG).read_text())["router_settings"]
    assert generated["fallbacks"] == [{"think": ["small"]}]
    assert generated["context_window_fallbacks"] == [{"background": ["small"]}]
    assert generated["retry_policy"]["ServiceUnavailableErrorRetries"] == 2
    assert generated["retry_policy"]["RateLimitErrorRetries"] == 0


@slow
def test_a_session_whose_plan_limit_is_reached_moves_to_quota_fallback_and_back(faults_proxy, clean_upstream):
    """Claude plan exhausted: Anthropic's 429 with unified-status rejected. The request is
    answered by quota_fallback (small) at once, the session stays there until the reset the
    headers give, then returns; the thinking blocks small signed never reach Opus 4.8."""
    reset = int(time.time()) + 4
    limit = {"anthropic-ratelimit-unified-status": "rejected", "anthropic-ratelimit-unified-reset": str(reset),
             "retry-after": "4"}
    clean_upstream.scripts.append(lambda record: failing(
        429, "rate_limit_error", "usage limit reached", model="claude-opus-4-8", headers=limit)(record)
        if time.time() < reset else None)
    strict = StrictAnthropic()
    clean_upstream.scripts.append(strict)
    client = ScriptedClaudeCode(faults_proxy.url, "sess-quota", model="claude-opus-4-8")
    client.turn("start, USE-TOOL first", stream=True)
    client.turn("go on")
    assert set(client.statuses) == {200} and {m for _r, m in client.routes} == {"anthropic/up-small"}
    session_url = f"{faults_proxy.url}{ccproxy.SESSION_PATH}/sess-quota"
    state = json.loads(http("GET", session_url)[2])
    assert state["quota_until"] == reset and "plan limit reached until" in ccproxy.statusline_text(state, True)
    assert "plan limit reached: 1 session" in run_cli("status", "--config-dir", str(faults_proxy.directory)).stdout
    deadline = time.monotonic() + 30
    while json.loads(http("GET", session_url)[2]).get("quota_until") and time.monotonic() < deadline:
        time.sleep(0.2)
    client.turn("back on my plan, USE-TOOL again", stream=True)
    client.turn("done")
    assert strict.rejected == [] and set(client.statuses) == {200}
    assert client.routes[-1] == ("default", "anthropic/claude-opus-4-8")
    sent = [r["body"]["model"] for r in clean_upstream.received("/v1/messages")]
    assert sent.count("claude-opus-4-8") == 1 + 3            # the refused one, then the last two turns
    log = faults_proxy.log()
    assert log.count("the plan limit is reached (429") == 1 and "its plan limit has reset" in log


def stream_parts(model: str) -> tuple[bytes, bytes]:
    """An Anthropic SSE answer cut in two: message_start, a block's start and a delta; the rest."""
    frames = [f + b"\n\n" for f in anthropic_sse(model, "hello there", 100).split(b"\n\n") if f]
    return b"".join(frames[:3]), b"".join(frames[3:])


def booked_statuses(proxy, session: str, settle: float = 1.5) -> list[str]:
    """The statuses the usage ledger holds for a session, once nothing more arrives for
    `settle` seconds (a second row would arrive within that; every wait is bounded)."""
    import sqlite3
    path, found, since = proxy.directory / ccproxy.LEDGER_FILE, None, time.monotonic()
    deadline = since + 30
    while time.monotonic() < deadline:
        statuses = []
        if path.exists():
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                statuses = [r[0] for r in db.execute("SELECT status FROM usage WHERE session = ? ORDER BY ts",
                                                     (session,))]
        if statuses != found:
            found, since = statuses, time.monotonic()
        elif found and time.monotonic() - since >= settle:
            return found
        time.sleep(0.1)
    return found or []


def sse_event_types(raw: bytes) -> list[str]:
    return [ln[7:].strip() for ln in raw.decode().splitlines() if ln.startswith("event:")]


@slow
@pytest.mark.parametrize("fault", ["empty", "not_json", "no_message_stop", "cut_off", "cut_at_start", "no_answer",
                                   "stalled"])
def test_a_broken_upstream_stream_ends_with_one_error_event(faults_proxy, clean_upstream, fault):
    head, rest = stream_parts("claude-opus-4-8")
    raw = {"empty": Raw([], declared=0),
           "not_json": Raw([(0, head + b"event: content_block_delta\ndata: {not json\n\n" + rest)]),
           "no_message_stop": Raw([(0, head)]),                    # a clean close, no length
           "cut_off": Raw([(0, head), (0.3, b"")], declared=len(head) + 500),   # the connection drops
           "cut_at_start": Raw([(0, head)], declared=len(head) + 500),          # ... with the first read
           "no_answer": Raw([], status=0),                                       # closed, not a byte
           "stalled": Raw([(0, head), (5, rest)])}[fault]           # upstream_timeout: 2 (idle)
    clean_upstream.scripts.append(lambda record: raw if record["body"].get("model") == "claude-opus-4-8" else None)
    body, headers = cc_request("main", session=f"sess-fault-{fault}")
    body.update(model="claude-opus-4-8", stream=True)
    status, _headers, out = faults_proxy.messages(body, headers)
    assert booked_statuses(faults_proxy, f"sess-fault-{fault}") == ["failed"]     # one row, a failure
    if fault in ("cut_at_start", "no_answer"):    # nothing sent yet: an error answer Claude Code retries
        assert status == 500 and json.loads(out)["error"]["type"] == "api_error", out[:300]
        return
    events = sse_event_types(out)
    assert status == 200 and events.count("error") == 1 and events[-1] == "error", out[-400:]
    assert b"not json" not in out and json.loads(out.decode().rsplit("data:", 1)[1])["type"] == "error"
    assert events[:-1][:3] == ([] if fault == "empty" else ["message_start", "content_block_start", "content_block_delta"])
    clean_upstream.clear()
    assert faults_proxy.messages(*cc_request("main"))[0] == 200               # and it keeps serving


@slow
def test_upstream_timeout_limits_silence_not_a_long_answer(faults_proxy, clean_upstream):
    head, rest = stream_parts("claude-opus-4-8")
    frames = [f + b"\n\n" for f in (head + rest).split(b"\n\n") if f]
    steady = Raw([(1.2 if i % 2 else 0, f) for i, f in enumerate(frames)])    # 4 s in all, gaps < 2 s
    clean_upstream.scripts.append(lambda record: steady)
    body, headers = cc_request("main")
    body.update(model="claude-opus-4-8", stream=True)
    status, _headers, out = faults_proxy.messages(body, headers)
    assert status == 200 and sse_event_types(out)[-1] == "message_stop", out[-300:]
    clean_upstream.clear()
    clean_upstream.scripts.append(lambda record: Raw([], wait=5))            # no first byte
    body["stream"] = False
    status, _headers, out = faults_proxy.messages(body, headers)
    assert status == 408 and json.loads(out)["type"] == "error", out[:300]


@slow
def test_claude_codes_model_discovery_lists_the_routes_and_a_pick_routes_there(proxy, clean_upstream):
    _body, headers = gateway_capture("models-discovery-2.1.332")          # as Claude Code asks
    status, got, raw = http("GET", proxy.url + "/v1/models?limit=1000", None, headers)
    assert status == 200 and got["content-type"] == "application/json", raw[:300]
    models = {m["id"]: m for m in json.loads(raw)["data"]}
    assert [i for i in models if i.startswith("claude-route-")] == [
        "claude-route-background", "claude-route-web_search", "claude-route-long_context", "claude-route-think",
        "claude-route-cheap", "claude-route-small"]
    assert models["claude-route-think"]["description"] == "ccproxy's think route: anthropic/up-think"
    assert all(re.search("claude|anthropic", i, re.I) for i in models)   # what Claude Code keeps
    openai = json.loads(http("GET", proxy.url + "/v1/models", None, {})[2])          # other clients: LiteLLM's
    assert openai.get("object") == "list" and "claude-route-think" not in [m["id"] for m in openai["data"]]
    for kind, expected in (("main", "up-think"), ("web_search", "up-search"), ("haiku", "up-background")):
        body, headers = cc_request(kind)
        if kind != "haiku":
            body["model"] = "claude-route-think"          # picked in /model: the session's default route
        clean_upstream.clear()
        status, got, raw = proxy.messages(body, headers)
        assert status == 200 and clean_upstream.received("/v1/messages")[0]["body"]["model"] == expected, raw[:200]


@slow
def test_metrics_parse_and_health_tells_each_routes_state(proxy, clean_upstream):
    from prometheus_client.parser import text_string_to_metric_families
    body, headers = cc_request("think")
    assert proxy.messages(body, headers)[0] == 200
    body, headers = cc_request("haiku")
    body["stream"] = True
    assert proxy.messages(body, headers)[0] == 200
    health = json.loads(http("GET", proxy.url + ccproxy.HEALTH_PATH)[2])
    assert health["labels"]["think"] == {"deployment": "anthropic/up-think", "last_ok": True}
    assert health["rule_counts"]["background"]["matched"] >= 1 and health["rule_counts"]["think"]["evaluated"] >= 1
    clean_upstream.scripts.append(failing(500, "api_error", "think is down", model="up-think"))
    assert proxy.messages(*cc_request("think"))[0] == 500
    health = json.loads(http("GET", proxy.url + ccproxy.HEALTH_PATH)[2])
    assert health["labels"]["think"]["last_ok"] is False                 # availability flips
    status, got, raw = http("GET", proxy.url + ccproxy.METRICS_PATH)
    assert status == 200 and got["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    value = {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value["ccproxy_requests", "ccproxy_requests_total", (("label", "think"),)] >= 2
    assert value["ccproxy_failures", "ccproxy_failures_total", (("label", "think"),)] >= 1
    assert value["ccproxy_request_seconds", "ccproxy_request_seconds_count", (("label", "background"),)] >= 1
    assert value["ccproxy_rule_verdicts", "ccproxy_rule_verdicts_total",
                 (("rule", "background"), ("verdict", "matched"))] >= 1
    assert families["ccproxy_request_seconds"].type == "histogram" and families["ccproxy_sessions"].type == "gauge"


@slow
def test_the_usage_ledger_books_each_answer_with_tokens_cost_and_saving(proxy, clean_upstream):
    ledger = proxy.directory / ccproxy.LEDGER_FILE
    before = json.loads(run_cli("usage", "--by", "model", "--json", "--config-dir", str(proxy.directory)).stdout
                        or "[]") if ledger.exists() else []
    for kind, stream in (("main", False), ("think", True)):
        body, headers = cc_request(kind, session="sess-ledger")
        body.update(model="claude-opus-4-5", stream=stream)          # a model LiteLLM has prices for
        assert proxy.messages(body, headers)[0] == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:        # the proxy's writer thread books them shortly after
        rows = {r["model"]: r for r in json.loads(run_cli(
            "usage", "--by", "model", "--json", "--config-dir", str(proxy.directory)).stdout)}
        old = {r["model"]: r for r in before}
        if rows.get("anthropic/up-think", {}).get("requests", 0) > old.get("anthropic/up-think", {}).get("requests", 0) \
                and "anthropic/claude-opus-4-5" in rows:
            break
        time.sleep(0.2)
    assert oct(ledger.stat().st_mode & 0o777) == "0o600"
    import sqlite3
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    booked = db.execute("SELECT label, requested_model, answered_model, input_tokens, output_tokens, cost, "
                        "requested_cost, status, session FROM usage WHERE session = 'sess-ledger'").fetchall()
    db.close()
    opus = 100 * 5e-06 + 5 * 2.5e-05                     # LiteLLM's price of 100 in + 5 out tokens
    passthrough = next(r for r in booked if r[0] == "default")
    assert passthrough[1:5] == ("claude-opus-4-5", "anthropic/claude-opus-4-5", 100, 5), passthrough
    assert passthrough[5] == pytest.approx(opus) and passthrough[6] == pytest.approx(opus)
    think = next(r for r in booked if r[0] == "think")
    assert think[2] == "anthropic/up-think" and think[5] is None            # no price: NULL, never 0
    assert think[6] == pytest.approx(opus) and think[7] == "ok"              # what the request would have cost
    table = run_cli("usage", "--by", "label", "--config-dir", str(proxy.directory))
    assert table.returncode == 0 and re.search(r"^think\s+\d+", table.stdout, re.M) and "total" in table.stdout
    assert run_cli("usage", "--since", "soon", "--config-dir", str(proxy.directory)).returncode == 2
    health = json.loads(http("GET", proxy.url + ccproxy.HEALTH_PATH)[2])
    assert health["ledger"]["written"] >= 2 and health["ledger"]["dropped"] == 0


CACHED_USAGE = {"input_tokens": 100, "output_tokens": 5, "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 200}


def answers_with_cached_usage(record):
    """Anthropic answers that read 1,000 tokens from the prompt cache and wrote 200."""
    if record["path"].startswith("/v1/messages") and "count_tokens" not in record["path"]:
        return 200, dict(anthropic_message(record["body"].get("model", "?"), "ok", 100), usage=CACHED_USAGE)
    return None


HOUSE_PRICES = {"input_cost_per_token": 1e-4, "output_cost_per_token": 1e-3}   # a contract's, not the list's


def write_ledger_config(directory: Path, upstream: FakeUpstream, port: int) -> None:
    """Two workers; opus requests routed to (priced) Haiku, Sonnet 4.5 to a deployment with its
    own prices, the rest passed through."""
    write_config(directory, upstream, port,
                 settings={"unshared_workers": True, "rules": [
                     {"name": "background", "rule": "MatchModelRule", "params": {"model_name": "opus"}},
                     {"name": "house", "rule": "MatchModelRule", "params": {"model_name": "sonnet-4-5"}}]},
                 litellm={"host": "127.0.0.1", "port": port, "num_workers": 2},
                 model_list=[{"model_name": "background", "litellm_params": {
                     "model": "anthropic/claude-haiku-4-5", "api_base": upstream.url}},
                     {"model_name": "house", "litellm_params": {"model": "anthropic/claude-sonnet-4-5",
                                                                "api_base": upstream.url},
                      "model_info": HOUSE_PRICES},
                     {"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*",
                                                                   "api_base": upstream.url}}])


@pytest.fixture(scope="module")
def ledger_proxy(upstream, tmp_path_factory):
    with started_proxy(tmp_path_factory, "ledger", lambda d, p: write_ledger_config(d, upstream, p)) as run:
        yield run


def booked(directory: Path, session: str, count: int, columns: str = "cost, user, label, provider, answered_model",
           timeout: float = 30) -> list[tuple]:
    """The ledger's rows for a session, in order, once `count` of them are there (the proxy's
    writer thread books them shortly after the answer)."""
    import sqlite3
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        if (directory / ccproxy.LEDGER_FILE).exists():
            with contextlib.closing(sqlite3.connect(f"file:{directory / ccproxy.LEDGER_FILE}?mode=ro",
                                                    uri=True)) as db:
                rows = db.execute(f"SELECT {columns} FROM usage WHERE session = ? ORDER BY ts", (session,)).fetchall()
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def wait_for_metric(url: str, key: tuple, good, timeout: float = 30) -> float:
    """Poll /ccproxy/metrics until the series `key` satisfies `good` (counts reach the shared
    totals within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = metric_values(url).get(key)
        if value is not None and good(value):
            return value
        assert time.monotonic() < deadline, f"{key} is {value}"
        time.sleep(0.3)


def metric_values(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    raw = http("GET", url + ccproxy.METRICS_PATH)[2].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(raw) for s in f.samples}


@slow
def test_a_deployment_with_its_own_prices_is_costed_by_them_in_the_header_and_the_ledger(ledger_proxy, clean_upstream):
    import sqlite3
    body, headers = cc_request("main", session="sess-house")
    body.update(model="claude-sonnet-4-5", stream=False)
    status, got, raw = ledger_proxy.messages(body, headers)
    assert status == 200 and got["x-ccproxy-rule"] == "house", raw[:300]
    usage = json.loads(raw)["usage"]
    own = usage["input_tokens"] * HOUSE_PRICES["input_cost_per_token"] + \
        usage["output_tokens"] * HOUSE_PRICES["output_cost_per_token"]
    assert float(got["x-ccproxy-cost"]) == pytest.approx(own, rel=1e-4)              # not the list price
    assert float(got["x-litellm-response-cost"]) == pytest.approx(own, rel=1e-4)     # LiteLLM's own figure
    ledger, deadline = ledger_proxy.directory / ccproxy.LEDGER_FILE, time.monotonic() + 30
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT cost FROM usage WHERE session = 'sess-house'").fetchone()
        if row is not None:
            break
        assert time.monotonic() < deadline, "never booked"
        time.sleep(0.2)
    assert row[0] == pytest.approx(own, rel=1e-4)


@slow
def test_two_workers_book_cache_tokens_cost_and_saving_and_every_scrape_counts_both(ledger_proxy, clean_upstream):
    import litellm
    clean_upstream.scripts.append(answers_with_cached_usage)
    header_costs = []
    for i in range(12):
        body, headers = cc_request("main", session=f"sess-cache-{i % 3}")
        body.update(model="claude-opus-4-5", stream=bool(i % 2))
        status, got, raw = ledger_proxy.messages(body, headers)
        assert status == 200, raw[:300]
        assert ("x-ccproxy-cost" in got) == (not body["stream"])      # a stream's headers come before its usage
        header_costs += [float(got["x-ccproxy-cost"])] if "x-ccproxy-cost" in got else []
    tokens = {"prompt_tokens": 1300, "completion_tokens": 5, "cache_read_input_tokens": 1000,
              "cache_creation_input_tokens": 200}
    haiku, opus = (sum(litellm.cost_per_token(model=m, **tokens)) for m in ("claude-haiku-4-5", "claude-opus-4-5"))
    assert header_costs == [pytest.approx(haiku, rel=1e-4)] * 6
    ledger = ledger_proxy.directory / ccproxy.LEDGER_FILE
    query = ("SELECT count(*), sum(cache_read_tokens), sum(cache_write_tokens), min(input_tokens), max(input_tokens), "
             "sum(cost), sum(requested_cost), count(DISTINCT answered_model) FROM usage WHERE session LIKE 'sess-cache-%'")
    import sqlite3
    deadline, row = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        if ledger.exists():
            with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
                row = db.execute(query).fetchone()
            if row[0] >= 12:
                break
        time.sleep(0.2)
    assert row is not None and row[:5] == (12, 12000, 2400, 1300, 1300) and row[7] == 1, row
    assert row[5] == pytest.approx(12 * haiku) and row[6] == pytest.approx(12 * opus)
    key = (("label", "background"), ("model", "anthropic/claude-haiku-4-5"))
    deadline = time.monotonic() + 30
    while metric_values(ledger_proxy.url).get(("ccproxy_answers_total", key + (("status", "ok"),))) != 12:
        assert time.monotonic() < deadline, "the metrics never counted all 12 answers"
        time.sleep(0.3)
    for _ in range(6):               # whichever worker answers the scrape: every worker's answers
        values = metric_values(ledger_proxy.url)
        assert values[("ccproxy_answers_total", key + (("status", "ok"),))] == 12
        assert values[("ccproxy_tokens_total", (("kind", "cache_read"),) + key)] == 12000
        assert values[("ccproxy_cost_usd_total", key)] == pytest.approx(12 * haiku)
        assert values[("ccproxy_saved_usd_total", key)] == pytest.approx(12 * (opus - haiku))
        assert values[("ccproxy_request_seconds_count", (("label", "background"),))] == 12
        assert values[("ccproxy_ttfb_seconds_count", (("label", "background"),))] >= 6
        health = json.loads(http("GET", ledger_proxy.url + ccproxy.HEALTH_PATH)[2])    # the same counts
        assert health["routes"]["background"] == values[("ccproxy_requests_total", (("label", "background"),))]
        assert health["rule_counts"]["background"]["matched"] == \
            values[("ccproxy_rule_verdicts_total", (("rule", "background"), ("verdict", "matched")))]
    table = run_cli("usage", "--by", "session", "--config-dir", str(ledger_proxy.directory))
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("sess-cache-0"))
    assert line.split()[1:5] == ["4", "0", "5,200", "4,000"], table.stdout     # requests, failed, input, cached


LEDGER_WRITER = """
import sys, time
sys.path.insert(0, {here!r})
import ccproxy
stats = ccproxy.Stats()
ledger = ccproxy.Ledger(ccproxy.Path({path!r}), stats, lambda: {{"sessions": 1}})
ledger.start()
row = dict(ts=time.time(), session="s", label="think", requested_model="claude-opus-4-5",
           answered_model="anthropic/claude-haiku-4-5", input_tokens=10, output_tokens=1,
           cache_read_tokens=0, cache_write_tokens=0, cost=0.5,
           latency_s=0.2, ttfb_s=0.1, status="ok")
for _ in range({rows}):
    stats.finished(row, 0)
    ledger.add(row)
assert ledger.flush(60)
deadline = time.monotonic() + 30
while ledger._flushed != stats.copy() and time.monotonic() < deadline:
    time.sleep(0.05)
print(ledger.written, ledger.dropped, ledger._flushed == stats.copy())
"""


def test_a_model_without_a_price_costs_none_not_zero():
    assert ccproxy.model_cost("claude-opus-4-5", 100, 5) > 0
    assert ccproxy.model_cost("claude-unknown-9", 100, 5) is None         # LiteLLM says (0.0, 0.0)
    assert ccproxy.model_cost("anthropic/up-think", 100, 5) is None       # LiteLLM raises
    assert ccproxy.answer_cost("claude-unknown-9", {"usage": {"input_tokens": 100, "output_tokens": 5}}) is None


def test_two_processes_writing_one_ledger_lose_no_row_and_no_count(tmp_path):
    path = tmp_path / ccproxy.LEDGER_FILE
    script = LEDGER_WRITER.format(here=str(SCRIPT.parent), path=str(path), rows=3000)
    writers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=120)[0].split() for w in writers]
    assert outputs == [["3000", "0", "True"]] * 2
    import sqlite3
    opus = ccproxy.model_cost("claude-opus-4-5", 10, 1)          # what each writer's thread priced
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*), sum(cost) FROM usage").fetchone() == (6000, 3000.0)
        assert db.execute("SELECT sum(requested_cost) FROM usage").fetchone()[0] == pytest.approx(6000 * opus)
    series, gauges = ccproxy.Ledger(path, ccproxy.Stats()).read_series()
    labels = (("label", "think"), ("model", "anthropic/claude-haiku-4-5"))
    assert series["answers_total", labels + (("status", "ok"),)] == 6000
    assert series["saved_usd_total", labels] == pytest.approx(6000 * (opus - 0.5))
    assert series["request_seconds_count", (("label", "think"),)] == 6000
    assert gauges == {"sessions": 2}                  # both writers' gauges, fresh
    text = ccproxy.prometheus_text(series, gauges)
    assert 'ccproxy_request_seconds_bucket{label="think",le="0.5"} 6000.0' in text


def test_a_ledger_written_before_the_cache_columns_is_read_and_upgraded(tmp_path):
    import sqlite3
    path = tmp_path / ccproxy.LEDGER_FILE
    old = ccproxy.LEDGER_COLUMNS[:15]
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(f"CREATE TABLE usage ({', '.join(old)})")
        db.execute(f"INSERT INTO usage VALUES ({', '.join('?' * 15)})",
                   (time.time(), "s", None, None, "think", "m", "m", "anthropic", 10, 1, 0.1, 0.1, 1.0, 0.5, "ok"))
    (rows,) = ccproxy.usage_rows(path, 3600, "label")
    assert rows["requests"] == 1 and rows["cache_read_tokens"] == 0
    ccproxy.open_ledger(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert [r[1] for r in db.execute("PRAGMA table_info(usage)")] == list(ccproxy.LEDGER_COLUMNS)
    table = run_cli("usage", "--by", "user", "--config-dir", str(tmp_path)).stdout.splitlines()
    assert table[2].split()[:2] == ["(none)", "1"], table                 # a row with no user
    session = "0123456789abcdef-0123456789abcdef-0123"                   # longer than the column
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO usage (ts, session, label, status) VALUES (?, ?, 'x', 'ok')", (time.time(), session))
    table = run_cli("usage", "--by", "session", "--config-dir", str(tmp_path)).stdout
    assert re.search(rf"^{session} +1 ", table, re.M), table              # never cut
    empty = run_cli("usage", "--since", "0m", "--csv", "--config-dir", str(tmp_path)).stdout
    assert empty.strip() == ",".join(["label", *ccproxy.USAGE_FIELDS])     # the columns, with no rows


@pytest.mark.parametrize("gives_up", [False, True])
def test_a_ledger_locked_by_another_process_is_waited_out_for_a_while(tmp_path, caplog, monkeypatch,
                                                                       gives_up):
    import sqlite3

    monkeypatch.setattr(ccproxy, "LEDGER_BUSY_S", 0.1)         # SQLite's own wait, per statement
    if gives_up:
        monkeypatch.setattr(ccproxy, "LEDGER_LOCKED_S", 0.5)   # ccproxy's, per batch (else 30 s)
    path = tmp_path / ccproxy.LEDGER_FILE
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")                           # e.g. another worker creating it
    ledger = ccproxy.Ledger(path, ccproxy.Stats())
    ledger.start()
    for i in range(3):
        ledger.add({"ts": time.time(), "session": f"s{i}", "label": "x", "status": "ok"})
    deadline = time.monotonic() + (30 if gives_up else 1.0)    # the other process holds its lock
    while time.monotonic() < deadline and not ledger.dropped:
        time.sleep(0.05)
    other.rollback()
    other.close()
    assert ledger.flush(30)
    assert (ledger.written, ledger.dropped) == ((0, 3) if gives_up else (3, 0))
    warnings = [r.getMessage() for r in caplog.records if "usage ledger" in r.getMessage()]
    assert warnings == (["usage ledger: cannot write usage.db: database is locked; 3 row(s) dropped "
                         "(counted in health); requests are not affected"] if gives_up else [])


def test_a_corrupt_ledger_drops_rows_with_one_warning_and_counts_them(tmp_path, caplog):
    path = tmp_path / ccproxy.LEDGER_FILE
    path.write_bytes(b"this is not a database at all" * 100)
    stats = ccproxy.Stats()
    ledger = ccproxy.Ledger(path, stats)
    ledger.start()
    for i in range(3):
        ledger.add({"ts": time.time(), "session": f"s{i}", "label": "x", "requested_model": "m",
                    "answered_model": "m", "input_tokens": 1, "output_tokens": 1, "cost": None, "status": "ok"})
    assert ledger.flush(30)
    assert ledger.dropped == 3 and ledger.written == 0
    assert stats.copy()[("ledger_dropped_total", ())] == 3
    assert len([r for r in caplog.records if "usage ledger" in r.getMessage()]) == 1
    assert ledger.read_series() is None                       # metrics fall back to this process's own
    done = run_cli("usage", "--config-dir", str(tmp_path))
    assert done.returncode == 1 and "cannot be read" in done.stderr and "Traceback" not in done.stderr


def test_status_line_shows_the_sessions_cost_and_saving():
    session = {"requested_model": "claude-opus-5-5", "last_upstream": "anthropic/claude-haiku-4-5",
               "last_label": "background", "switches": 2, "cost_usd": 0.42, "saved_usd": 1.1}
    assert ccproxy.statusline_text(session, up=True) == \
        "ccproxy: opus\u2192claude-haiku-4-5 (background) \u00b7 2 switches \u00b7 $0.42 (saved $1.10)"
    assert ccproxy.statusline_text(dict(session, cost_usd=0.000625, saved_usd=0.0), up=True).endswith(
        "2 switches \u00b7 $0.0006")
    assert ccproxy.statusline_text(dict(session, cost_usd=None), up=True).endswith("2 switches")


class LoopbackServer:
    """An HTTP server of the tests on a free loopback port, served by a daemon thread."""

    def __init__(self, handler: type, path: str = "") -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Collector(LoopbackServer):
    """A stand-in OpenTelemetry collector on loopback: OTLP/HTTP POST /v1/traces (protobuf),
    keeping every span's name and attributes."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        self.spans: list[dict] = []
        collector = self

        def value(v):
            kind = v.WhichOneof("value")
            return getattr(v, kind) if kind and kind not in ("array_value", "kvlist_value") else str(v)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    import gzip
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                found = [{"name": span.name, "attributes": {a.key: value(a.value) for a in span.attributes}}
                         for resource in request.resource_spans for scope in resource.scope_spans
                         for span in scope.spans]
                collector.spans.extend(found)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        super().__init__(Handler)

    def decision_spans(self) -> list[dict]:
        return [s["attributes"] for s in self.spans if "litellm.metadata.ccproxy.label" in s["attributes"]]


@pytest.fixture(scope="module")
def collector():
    try:
        import opentelemetry.proto  # noqa: F401
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        missing_prerequisite("the OpenTelemetry packages are not installed (README's test command installs them)")
    found = Collector()
    yield found
    found.close()


@pytest.fixture(scope="module")
def traced_proxy(upstream, collector, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")       # export spans within 0.2 s
    with started_proxy(tmp_path_factory, "traced", lambda d, p: write_config(d, upstream, p, settings={
            "tracing": {"otel": {"endpoint": collector.url, "service_name": "ccproxy-test"}}})) as run:
        yield run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@slow
def test_otel_spans_carry_the_routing_decision_and_no_prompt(traced_proxy, collector, clean_upstream):
    body, headers = cc_request("haiku", session="sess-traced")
    assert traced_proxy.messages(body, headers)[0] == 200
    deadline = time.monotonic() + 30
    while not any(s.get("litellm.metadata.ccproxy.session") == "sess-traced" for s in collector.decision_spans()):
        assert time.monotonic() < deadline, f"no span with the decision: {collector.spans[:3]}"
        time.sleep(0.2)
    span = next(s for s in collector.decision_spans() if s["litellm.metadata.ccproxy.session"] == "sess-traced")
    assert {k.rsplit(".", 1)[1]: v for k, v in span.items() if k.startswith("litellm.metadata.ccproxy.")} == {
        "label": "background", "requested_model": "claude-haiku-5-5", "model": "anthropic/up-background",
        "reason": "model claude-haiku-5-5 contains 'haiku'", "session": "sess-traced",
        "switch": "False"}, span                       # (LiteLLM leaves out the empty agent and user)
    prompt = body["messages"][-1]["content"]
    prompt = prompt if isinstance(prompt, str) else prompt[-1]["text"]
    assert not any(prompt[:40] in str(v) for s in collector.spans for v in s["attributes"].values())
    # the collector goes away: requests keep their answers, the log gets one line
    collector.close()
    for i in range(3):
        assert traced_proxy.messages(*cc_request("main", session=f"sess-untraced-{i}"))[0] == 200
    deadline = time.monotonic() + 60
    while "tracing: the OpenTelemetry exporter reports" not in traced_proxy.log():
        assert time.monotonic() < deadline, traced_proxy.log()[-2000:]
        time.sleep(0.5)
    assert traced_proxy.messages(*cc_request("main", session="sess-untraced-9"))[0] == 200
    assert traced_proxy.log().count("tracing: the OpenTelemetry exporter reports") == 1


def test_tracing_config_becomes_litellm_callbacks_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLECTOR_TOKEN", "tok-3210")
    (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump({"ccproxy": {"tracing": {
        "otel": {"endpoint": "http://127.0.0.1:4318", "headers": {"authorization": "os.environ/COLLECTOR_TOKEN"}},
        "langfuse": {"host": "http://127.0.0.1:3000"}}}}))
    config = ccproxy.load_config(tmp_path)
    monkeypatch.setitem(ccproxy.TRACING_PACKAGES, "langfuse", ("no_such_langfuse_package",))
    generated = yaml.safe_load(ccproxy.litellm_config_for_start(config).read_text())
    assert generated["litellm_settings"]["callbacks"] == ["ccproxy.handler", "otel"]     # langfuse: missing
    assert generated["callback_settings"]["otel"]["turn_off_message_logging"] is True
    assert "requester_metadata.ccproxy.label" in generated["callback_settings"]["otel"]["baggage_metadata_keys"]
    assert "tok-3210" not in json.dumps(generated)
    env = ccproxy.proxy_environment(config)
    assert env["OTEL_ENDPOINT"] == "http://127.0.0.1:4318" and env["OTEL_HEADERS"] == "authorization=tok-3210"
    assert env["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] == "NO_CONTENT"
    warnings = ccproxy.validate_config(config, ccproxy.Pipeline(config)).warnings
    assert any("tracing.langfuse is off: no_such_langfuse_package not installed" in w for w in warnings)
    for bad, message in (({"zipkin": {}}, "unknown tracing backend `zipkin`"),
                         ({"otel": {}}, "tracing.otel needs `endpoint`"),
                         ({"otel": {"endpoint": "http://x", "port": 1}}, "unknown or mistyped port")):
        (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump({"ccproxy": {"tracing": bad}}))
        with pytest.raises(ccproxy.ConfigError, match=re.escape(message)):
            ccproxy.load_config(tmp_path)


def test_metrics_enabled_false_turns_the_metrics_route_off(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("ccproxy: {metrics_enabled: false}\n")
    off = ccproxy.Handler(config=ccproxy.load_config(tmp_path))
    on = ccproxy.Handler(config=ccproxy.default_config())
    assert ccproxy.METRICS_PATH not in [r[0] for r in off.routes()]
    assert ccproxy.METRICS_PATH in [r[0] for r in on.routes()]


@slow
def test_proxy_log_has_one_line_per_decision_and_no_secret(proxy, clean_upstream):
    body, headers = cc_request("haiku", session="sess-logline")
    proxy.messages(body, headers)
    log = proxy.log()
    lines = [ln for ln in log.splitlines() if "route background" in ln and "sess-log" in ln]
    assert len(lines) == 1 and "claude-haiku-5-5 -> background (anthropic/up-background)" in lines[0]
    assert CLIENT_KEY not in log and "sk-upstream-openai" not in log


@pytest.fixture(scope="module")
def legacy_proxy(upstream, tmp_path_factory):
    with started_proxy(tmp_path_factory, "legacy", lambda d, p: write_legacy_config(d, upstream, p)) as run:
        yield run


@slow
@pytest.mark.parametrize("kind", ["main", "haiku", "web_search", "think", "long"])
def test_legacy_two_file_config_routes_identically(legacy_proxy, clean_upstream, kind):
    body, headers = cc_request(kind)
    status, resp_headers, raw = legacy_proxy.messages(body, headers)
    assert status == 200, raw[:300]               # the failing hook in the chain did not matter
    label, model, path = EXPECTED_ROUTES[kind]
    got = clean_upstream.received()
    assert [(r["path"].split("?")[0], r["body"]["model"]) for r in got] == [(path, model or body["model"])]
    assert resp_headers["x-ccproxy-rule"] == label
    assert "hook explode failed: RuntimeError: hook exploded on purpose: testing" in legacy_proxy.log()
    assert "ccproxy 1.x's generated handler) is not needed any more" in legacy_proxy.start_output


@pytest.fixture(scope="module")
def responses_proxy(upstream, tmp_path_factory):
    """ccproxy.openai_chat_completions: false gives LiteLLM's Responses API back for openai/."""
    def write(directory, port):
        base = upstream.url
        write_config(directory, upstream, port, settings={"openai_chat_completions": False, "rules": []},
                     model_list=[
            {"model_name": "resp", "litellm_params": {"model": "openai/up-resp", "api_base": base + "/v1", "api_key": "sk-up"}},
            {"model_name": "chat", "litellm_params": {"model": "custom_openai/up-chat", "api_base": base + "/v1", "api_key": "sk-up"}},
        ])
    with started_proxy(tmp_path_factory, "responses", write) as run:
        yield run


@slow
def test_responses_api_can_be_turned_back_on(responses_proxy, clean_upstream):
    body = {"model": "resp", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    status, _h, raw = responses_proxy.messages(body)
    assert status == 200, raw
    assert json.loads(raw)["content"][0]["text"] == "answer from up-resp"
    body["model"] = "chat"
    status, _h, raw = responses_proxy.messages(body)
    assert status == 200, raw
    assert [r["path"] for r in clean_upstream.received()] == ["/v1/responses", "/v1/chat/completions"]


@slow
def test_count_tokens_goes_through_the_rules(proxy, clean_upstream):
    body, headers = cc_request("main")
    count_body = {"model": body["model"], "messages": body["messages"], "tools": []}
    status, _h, raw = proxy.messages(count_body, headers, path="/v1/messages/count_tokens?beta=true")
    assert status == 200 and json.loads(raw)["input_tokens"] == 4242     # the upstream's count
    got = clean_upstream.received()
    assert got[0]["path"] == "/v1/messages/count_tokens?beta=true"
    assert got[0]["headers"]["x-api-key"] == CLIENT_KEY and got[0]["body"]["model"] == body["model"]
    # routed to an OpenAI-compatible deployment: answered locally, whole request counted
    count_body["model"] = "gpt-cheap"
    clean_upstream.clear()
    status, _h, raw = proxy.messages(count_body, headers, path="/v1/messages/count_tokens")
    assert status == 200 and clean_upstream.received() == []
    assert json.loads(raw) == {"input_tokens": ccproxy.TokenCounter().count_request(count_body)[0]}


@slow
def test_health_route_reports_live_figures(proxy):
    proxy.messages(*cc_request("haiku"))
    status, _h, raw = http("GET", proxy.url + "/ccproxy/health")
    report = json.loads(raw)
    assert status == 200 and report["status"] == "ok" and report["tokenizer"] == "cl100k_base"
    assert report["rules"] == ["background", "web_search", "long_context", "think", "cheap", "small"]
    assert report["requests"] >= 1 and report["routes"]["background"] >= 1


# ---- The real Claude Code CLI against the proxy ---------------------------------------------

CLAUDE_CODE_VERSIONS = ("2.1.197", "2.1.332")    # pinned; .ci/run installs the same ones
CLAUDE_DEFAULT_MODEL = {"2.1.197": "claude-opus-4-8", "2.1.332": "claude-opus-5-5"}


def claude_code_dir(version: str) -> Path:
    base = Path(os.environ.get("CCPROXY_CLAUDE_CACHE") or Path.home() / ".cache" / "ccproxy-tests")
    return base / f"claude-code-{version}"


def claude_code_binary(version: str) -> Path:
    """The Claude Code CLI of this exact version, installed with npm on first use."""
    binary = claude_code_dir(version) / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            missing_prerequisite("npm is not installed, so the Claude Code CLI cannot be installed")
        done = subprocess.run([npm, "install", "--prefix", str(claude_code_dir(version)), "--no-audit",
                               "--no-fund", f"@anthropic-ai/claude-code@{version}"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not binary.exists():
            missing_prerequisite(f"could not install @anthropic-ai/claude-code@{version}: "
                                 f"{done.stderr[-300:]}")
    return binary


def upstream_message(body: dict, content: list, stop: str = "end_turn") -> tuple[int, dict]:
    return 200, {"id": "msg_cc", "type": "message", "role": "assistant", "model": body["model"],
                 "content": content, "stop_reason": stop, "stop_sequence": None,
                 "usage": {"input_tokens": 100, "output_tokens": 5}}


def claude_code_script(record: dict):
    """The fake upstream's part in a Claude Code session: tool calls on cue, then answers."""
    body = record["body"]
    if not record["path"].startswith("/v1/messages") or "count_tokens" in record["path"]:
        return None
    if any(str(t.get("type", "")).startswith("web_search") for t in body.get("tools") or []):
        return upstream_message(body, [{"type": "text", "text": "LiteLLM is an LLM proxy."}])
    last = next((m for m in reversed(body.get("messages") or []) if m.get("role") == "user"), {})
    blocks = last.get("content") if isinstance(last.get("content"), list) else \
        [{"type": "text", "text": str(last.get("content", ""))}]
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if results:
        return upstream_message(body, [{"type": "text", "text": "tool said: " + json.dumps(results[0].get("content"))[:300]}])
    text = json.dumps(blocks)
    if "RUN-TOOL" in text:
        return upstream_message(body, [{"type": "tool_use", "id": "toolu_cc1", "name": "Bash",
                                        "input": {"command": "echo ccproxy-tool-ok", "description": "Print a marker"}}],
                                "tool_use")
    if "SEARCH-WEB" in text:
        return upstream_message(body, [{"type": "tool_use", "id": "toolu_ws1", "name": "WebSearch",
                                        "input": {"query": "what is litellm"}}], "tool_use")
    return None


CLAUDE_SCENARIOS = {   # name -> (claude arguments, routes the upstream must see, text in the output)
    "plain": (["-p", "say hello"], ["default"], "answer from {default}"),
    "haiku": (["-p", "say hello", "--model", "haiku"], ["up-background"], "answer from up-background"),
    "effort": (["-p", "think hard", "--effort", "max"], ["up-think"], "answer from up-think"),
    "tool": (["-p", "RUN-TOOL now", "--allowedTools", "Bash"], ["default", "default"], "ccproxy-tool-ok"),
    "web_search": (["-p", "SEARCH-WEB now", "--allowedTools", "WebSearch"],
                   ["default", "up-search", "default"], "LiteLLM is an LLM proxy."),
    "picked": (["-p", "say hello", "--model", "claude-route-think"], ["up-think"], "answer from up-think"),
}


@slow
@pytest.mark.parametrize("scenario", list(CLAUDE_SCENARIOS))
@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
def test_real_claude_code_through_the_proxy(proxy, clean_upstream, tmp_path, version, scenario):
    binary = claude_code_binary(version)
    args, routes, expected = CLAUDE_SCENARIOS[scenario]
    default = CLAUDE_DEFAULT_MODEL[version]
    clean_upstream.scripts.append(claude_code_script)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(home), ANTHROPIC_BASE_URL=proxy.url, ANTHROPIC_API_KEY=CLIENT_KEY,
               DISABLE_TELEMETRY="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1")
    done = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True,
                          timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-1000:]
    assert expected.format(default=default) in done.stdout
    got = [r for r in clean_upstream.received("/v1/messages") if "count_tokens" not in r["path"]]
    assert [r["body"]["model"] for r in got] == [default if m == "default" else m for m in routes]
    assert all(r["headers"]["x-api-key"] == CLIENT_KEY for r in got if r["body"]["model"] != "up-long")
    if scenario == "tool":
        assert got[1]["body"]["messages"][-1]["content"][0]["type"] == "tool_result"
    assert "refused a request" not in proxy.log()        # Claude Code sends no Origin


@slow
@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
def test_real_claude_code_through_a_keyed_proxy_with_run(keyed_proxy, clean_upstream, tmp_path, version):
    """`ccproxy run claude` passes the proxy key; the guard lets Claude Code through."""
    binary = claude_code_binary(version)
    clean_upstream.scripts.append(claude_code_script)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(home), ANTHROPIC_API_KEY=CLIENT_KEY, DISABLE_TELEMETRY="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
               DISABLE_ERROR_REPORTING="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--config-dir", str(keyed_proxy.directory),
                           "--", str(binary), "-p", "say hello"], env=env, capture_output=True,
                          text=True, timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-1000:]
    default = CLAUDE_DEFAULT_MODEL[version]
    assert f"answer from {default}" in done.stdout
    got = clean_upstream.received("/v1/messages")
    assert got and all(r["headers"]["x-api-key"] == CLIENT_KEY for r in got)
    assert keyed_proxy.key not in json.dumps(got)


def tiny_png() -> bytes:
    """A valid 2x2 RGB PNG."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def gateway_script(image: Path):
    """claude_code_script, plus a Read of `image` on cue and summaries for compaction."""
    def script(record: dict):
        body = record["body"]
        if not record["path"].startswith("/v1/messages") or "count_tokens" in record["path"]:
            return None
        last = json.dumps(next((m for m in reversed(body.get("messages") or []) if m.get("role") == "user"), {}))
        if ccproxy.COMPACTION_PROMPT in last:
            return upstream_message(body, [{"type": "text", "text": "<analysis>a</analysis>\n<summary>we ran a tool"
                                                                     "</summary>"}])
        if "READ-IMAGE" in last:
            return upstream_message(body, [{"type": "tool_use", "id": "toolu_img", "name": "Read",
                                            "input": {"file_path": str(image)}}], "tool_use")
        return claude_code_script(record)
    return script


@pytest.fixture(scope="module")
def gateway_proxy(upstream, tmp_path_factory):
    """`proxy`'s config with two more rules: compaction -> compact, an image -> vision."""
    def write(directory, port):
        path = write_config(directory, upstream, port)
        config = yaml.safe_load(path.read_text())
        config["ccproxy"]["rules"][:0] = [
            {"name": "compact", "rule": "RequestClassRule", "params": {"classes": ["compaction"]}},
            {"name": "vision", "rule": "ImageRule"}]
        config["model_list"][:0] = [
            {"model_name": "compact", "litellm_params": {"model": "anthropic/up-compact", "api_base": upstream.url}},
            {"model_name": "vision", "litellm_params": {"model": "anthropic/up-vision", "api_base": upstream.url}}]
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    with started_proxy(tmp_path_factory, "gateway", write) as run:
        yield run


@slow
def test_real_claude_code_2_1_332_compaction_images_and_the_model_picker(gateway_proxy, clean_upstream, tmp_path):
    binary = claude_code_binary("2.1.332")
    image = tmp_path / "shot.png"
    image.write_bytes(tiny_png())
    clean_upstream.scripts.append(gateway_script(image))
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    base.update(HOME=str(home), ANTHROPIC_BASE_URL=gateway_proxy.url, ANTHROPIC_API_KEY=CLIENT_KEY,
                DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1",
                CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY="1")

    def claude(*args, hints: bool = True, cwd: Path = tmp_path) -> list[dict]:
        clean_upstream.clear()
        clean_upstream.scripts.append(gateway_script(image))
        env = dict(base, **({ccproxy.GATEWAY_HINTS_ENV: "1"} if hints else {}))
        cwd.mkdir(exist_ok=True)
        done = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=180,
                              cwd=cwd, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-1000:]
        return [r for r in clean_upstream.received("/v1/messages") if "count_tokens" not in r["path"]]

    for hints, how in ((True, "header"), (False, "its compaction prompt")):    # by the header, by the body
        project = tmp_path / how.replace(" ", "-")           # a session of its own, then its compaction
        sent = claude("-p", "RUN-TOOL now", "--allowedTools", "Bash", hints=hints, cwd=project)
        assert [r["body"]["model"] for r in sent] == ["claude-opus-5-5"] * 2
        start = len(gateway_proxy.log())
        sent = claude("-p", "/compact", "--continue", hints=hints, cwd=project)
        assert sent and {r["body"]["model"] for r in sent} == {"up-compact"}, [r["body"]["model"] for r in sent]
        assert f"RequestClassRule(compaction): match (compaction ({how}))" in gateway_proxy.log()[start:]
    sent = claude("-p", "READ-IMAGE now", "--allowedTools", "Read")
    assert [r["body"]["model"] for r in sent] == ["claude-opus-5-5", "up-vision"]     # the image went to vision
    cached = json.loads((home / ".claude" / "cache" / "gateway-models.json").read_text())
    assert "claude-route-think" in json.dumps(cached)             # the binary took ccproxy's model list


def test_ci_pins_the_tested_claude_code_versions():
    ci = (HERE / ".ci" / "run").read_text()
    for version in CLAUDE_CODE_VERSIONS:
        assert f"@anthropic-ai/claude-code@{version}" in ci or version in ci


# ---- Sessions: signature-safe switches, stickiness, subagents, status line -----------------

SIGNATURE_ERROR = "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"


class StrictAnthropic:
    """The fake upstream's Anthropic in what matters for model switches: it signs the
    thinking blocks it returns with its own model id, rejects a request carrying a thinking
    block another model signed (Anthropic's 400), and enforces that, with thinking on, the
    final assistant message of a tool loop starts with a thinking block."""

    def __init__(self, adaptive_only: tuple[str, ...] = ()) -> None:
        self.count = 0
        self.rejected: list[str] = []
        self.adaptive_only = adaptive_only     # model prefixes that refuse `disabled` (Opus 5)

    def __call__(self, record: dict):
        body = record["body"]
        if not record["path"].startswith("/v1/messages") or "count_tokens" in record["path"]:
            return None
        model = body["model"]
        if model.startswith(self.adaptive_only or ("\0",)):
            kind = (body.get("thinking") or {"type": "adaptive"}).get("type")   # omitted: adaptive
            if kind in ("disabled", "enabled"):
                return self.reject(f"thinking.type: {kind} is not supported for this model. Use "
                                   "thinking.type.adaptive and output_config.effort")
            body.setdefault("thinking", {"type": "adaptive"})
        messages = body.get("messages") or []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant" or not isinstance(message.get("content"), list):
                continue
            for j, block in enumerate(message["content"]):
                signature = ccproxy.thinking_signature(block)
                if signature is not None and not signature.startswith(f"sig.{model}."):
                    return self.reject(SIGNATURE_ERROR.format(i=i, j=j))
        thinking = body.get("thinking") or {}
        on = thinking.get("type") in ("adaptive", "enabled")
        last = messages[-1] if messages else {}
        tool_loop = isinstance(last.get("content"), list) and any(
            b.get("type") == "tool_result" for b in last["content"])
        assistants = [m for m in messages if m.get("role") == "assistant"]
        if on and tool_loop and assistants:
            first = (assistants[-1].get("content") or [{}])[0]
            if first.get("type") not in ("thinking", "redacted_thinking"):
                return self.reject(f"messages.{len(messages) - 2}.content.0.type: Expected `thinking` or "
                                   "`redacted_thinking`, but found `tool_use`. When `thinking` is enabled, "
                                   "a final `assistant` message must start with a thinking block.")
        self.count += 1
        content = [{"type": "thinking", "thinking": "considering...",
                    "signature": f"sig.{model}.{self.count}"}] if on else []
        prompt = json.dumps(last.get("content"))
        if "USE-TOOL" in prompt and not tool_loop:
            content.append({"type": "tool_use", "id": f"toolu_{self.count}", "name": "Bash",
                            "input": {"command": "ls"}})
            return upstream_message(body, content, "tool_use")
        content.append({"type": "text", "text": f"answer {self.count} from {model}"})
        return upstream_message(body, content)

    def reject(self, message: str):
        self.rejected.append(message)
        return 400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def assemble_sse(raw: bytes) -> dict:
    """The message an SSE stream carries, as Claude Code rebuilds it."""
    message, blocks = None, {}
    for event in sse_events(raw):
        kind = event.get("type")
        if kind == "message_start":
            message = dict(event["message"])
        elif kind == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"])
            if blocks[event["index"]].get("type") == "tool_use":
                blocks[event["index"]]["_json"] = ""
        elif kind == "message_delta":
            message["stop_reason"] = event["delta"].get("stop_reason")
        elif kind == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                block["_json"] += delta["partial_json"]
    for block in blocks.values():
        if "_json" in block:
            block["input"] = json.loads(block.pop("_json") or "{}")
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


class ScriptedClaudeCode:
    """A Claude Code-shaped client: the history grows from the proxy's own answers, and, as
    Claude Code does, an answer's thinking blocks are replayed only when the answer's `model`
    is the model it asked for."""

    def __init__(self, url: str | list[str], session: str, model: str = "claude-opus-5-5",
                 agent: str | None = None):
        self.urls = itertools.cycle([url] if isinstance(url, str) else url)    # several: round robin
        self.model = model
        body, headers = cc_request("main", session=session)
        self.system, self.tools = body["system"], body["tools"]
        self.metadata = body["metadata"]
        self.headers = headers
        if agent:
            self.headers["x-claude-code-agent-id"] = agent
        self.messages: list[dict] = []
        self.effort = "medium"
        self.routes: list[tuple[str, str]] = []     # (rule, routed model) per request
        self.statuses: list[int] = []

    def request(self, stream: bool) -> dict | None:
        body = {"model": self.model, "messages": copy.deepcopy(self.messages), "system": self.system,
                "tools": self.tools, "metadata": self.metadata, "max_tokens": 128000,
                "thinking": {"type": "adaptive", "display": "omitted"},
                "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
                "output_config": {"effort": self.effort}, "stream": stream}
        status, headers, raw = http("POST", next(self.urls) + "/v1/messages?beta=true", body, self.headers)
        self.statuses.append(status)
        if status != 200:
            return None
        self.routes.append((headers.get("x-ccproxy-rule"), headers.get("x-ccproxy-model")))
        message = assemble_sse(raw) if stream else json.loads(raw)
        assert message["model"] == self.model          # the client sees the model it asked for
        content = [b for b in message["content"]
                   if message["model"] == self.model or b.get("type") not in ("thinking", "redacted_thinking")]
        self.messages.append({"role": "assistant", "content": content})
        return message

    def turn(self, text: str, stream: bool = False) -> None:
        self.messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
        message = self.request(stream)
        while message is not None and message.get("stop_reason") == "tool_use":
            use = next(b for b in message["content"] if b["type"] == "tool_use")
            self.messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use["id"], "content": "a.py\nb.py"}]})
            message = self.request(stream)


def run_switching_session(url: str | list[str], session: str) -> tuple[ScriptedClaudeCode, ScriptedClaudeCode]:
    """default -> think -> (subagent) -> default -> long_context (stays) -> default, with
    tool loops inside turns."""
    main = ScriptedClaudeCode(url, session)
    main.turn("hello, USE-TOOL to look around")                         # default, tool loop
    main.effort = "max"
    main.turn("plan the refactor, USE-TOOL first", stream=True)          # think, tool loop
    agent = ScriptedClaudeCode(url, session, agent="agent-1")
    agent.turn("subagent: inspect files, USE-TOOL")                      # its own conversation
    main.effort = "medium"
    main.turn("now summarise, USE-TOOL once more")                      # default again
    main.turn("here is the whole module:\n" + big_text(64000))          # long_context
    main.turn("and what about function_7?")                             # stays: history is big
    big = main.messages[-4]
    big["content"] = [{"type": "text", "text": "[pasted module cleared from context]"}]
    main.turn("thanks, USE-TOOL to finish", stream=True)                 # default again
    return main, agent


def load_client(url: str, i: int, barrier) -> tuple[ScriptedClaudeCode, list]:
    """Client i of 200 (50 sessions x main + 3 subagents): a tool-loop turn at one effort,
    started with all the others, then a turn at the other effort (a switch)."""
    client = ScriptedClaudeCode(url, f"load-{i // 4}", agent=None if i % 4 == 0 else f"agent-{i % 4}")
    first, second = ("max", "medium") if i % 2 else ("medium", "max")
    expected = {"max": ("think", "anthropic/up-think"), "medium": ("default", "anthropic/claude-opus-5-5")}
    client.effort = first
    client.messages.append({"role": "user", "content": [{"type": "text", "text": f"client {i}: USE-TOOL"}]})
    barrier.wait(timeout=60)
    message = client.request(stream=True)
    if message is not None and message.get("stop_reason") == "tool_use":
        use = next(b for b in message["content"] if b["type"] == "tool_use")
        client.messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use["id"], "content": "ok"}]})
        client.request(stream=True)
    client.effort = second
    client.turn(f"client {i}: and now?")
    return client, [expected[first]] * 2 + [expected[second]]


@slow
def test_200_concurrent_streams_from_50_sessions_keep_their_routes_and_state(proxy, clean_upstream):
    from concurrent.futures import ThreadPoolExecutor
    strict = StrictAnthropic()
    clean_upstream.scripts.append(strict)
    barrier = threading.Barrier(200)
    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(lambda i: load_client(proxy.url, i, barrier), range(200)))
    assert [c.statuses for c, _e in results] == [[200] * 3] * 200
    assert [c.routes for c, _e in results] == [expected for _c, expected in results]     # no cross-talk
    assert strict.rejected == [] and len(clean_upstream.received("/v1/messages")) == 600
    state = json.loads(http("GET", proxy.url + "/ccproxy/session/load-7")[2])
    assert state["requests"] == 3 and state["switches"] == 1          # its main thread's own figures


def strict_session(url: str | list[str], upstream: FakeUpstream, session: str):
    """The switching session against an upstream that enforces Anthropic's thinking rules."""
    strict = StrictAnthropic()
    upstream.scripts.append(strict)
    main, agent = run_switching_session(url, session)
    return strict, main, agent


def upstream_thinking_is_own(records: list[dict]) -> list[str]:
    """Every thinking block that reached an upstream was signed by that upstream's model."""
    bad = []
    for record in records:
        model = record["body"].get("model")
        for message in record["body"].get("messages") or []:
            for block in message.get("content") if isinstance(message.get("content"), list) else []:
                signature = ccproxy.thinking_signature(block)
                if signature is not None and not signature.startswith(f"sig.{model}."):
                    bad.append(f"{model} got {signature}")
    return bad


@slow
def test_a_switching_session_never_breaks(proxy, clean_upstream):
    strict, main, agent = strict_session(proxy.url, clean_upstream, "sess-switching")
    assert strict.rejected == [] and set(main.statuses + agent.statuses) == {200}
    labels = [rule for rule, _m in main.routes]
    assert labels == ["default", "default", "think", "think", "default", "default",
                      "long_context", "long_context", "default", "default"]
    assert [r for r, _m in agent.routes] == ["default", "default"]
    records = clean_upstream.received("/v1/messages")
    assert upstream_thinking_is_own(records) == []
    # thinking from the same model is kept: turn 1's opus blocks reach opus again in turn 3
    opus = [r for r in records if r["body"]["model"] == "claude-opus-5-5"]
    assert any(ccproxy.thinking_signature(b) == "sig.claude-opus-5-5.1"
               for r in opus[2:] for m in r["body"]["messages"] if isinstance(m.get("content"), list)
               for b in m["content"])
    text = run_cli("status", "--config-dir", str(proxy.directory)).stdout
    assert re.search(r"sessions: \d+, model switches [1-9]", text), text
    state = json.loads(http("GET", proxy.url + "/ccproxy/session/sess-switching")[2])
    # default->think, think->default, default->long_context, long_context->default
    assert state["switches"] == 4 and state["uncached_tokens"] > 60000
    assert state["last_label"] == "default" and state["requested_model"] == "claude-opus-5-5"


class RedisServer:
    """A real redis-server (the Debian package) on a loopback port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing_prerequisite("redis-server is not installed (.ci/run installs the Debian package)")
        self.port = port or free_port()
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        self.client = redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.client.ping():
                    break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def write_redis_config(directory: Path, upstream: FakeUpstream, port: int, redis_port: int, workers: int = 1) -> None:
    write_config(directory, upstream, port, litellm={"host": "127.0.0.1", "port": port, "num_workers": workers},
                 router_settings={"redis_host": "127.0.0.1", "redis_port": redis_port})


@pytest.fixture(scope="module")
def redis_proxies(upstream, redis_server, tmp_path_factory):
    """Two proxies (two config dirs, as on two machines) sharing one Redis."""
    with started_proxy(tmp_path_factory, "redis-a", lambda d, p: write_redis_config(d, upstream, p, redis_server.port)) as a, \
            started_proxy(tmp_path_factory, "redis-b", lambda d, p: write_redis_config(d, upstream, p, redis_server.port)) as b:
        yield a, b


def check_switching_session(main, agent, strict, upstream) -> None:
    assert strict.rejected == [] and set(main.statuses + agent.statuses) == {200}
    assert [rule for rule, _m in main.routes] == ["default", "default", "think", "think", "default", "default",
                                                   "long_context", "long_context", "default", "default"]
    assert [r for r, _m in agent.routes] == ["default", "default"]
    assert upstream_thinking_is_own(upstream.received("/v1/messages")) == []


@slow
def test_two_proxies_on_one_redis_behind_round_robin_keep_a_switching_session_whole(redis_proxies, redis_server,
                                                                                   clean_upstream):
    a, b = redis_proxies
    strict, main, agent = strict_session([a.url, b.url], clean_upstream, "sess-two-proxies")
    check_switching_session(main, agent, strict, clean_upstream)
    for proxy in (a, b):                              # either proxy knows the whole session
        state = json.loads(http("GET", proxy.url + "/ccproxy/session/sess-two-proxies")[2])
        assert state["switches"] == 4 and state["requests"] == 10 and state["last_label"] == "default"
        health = json.loads(http("GET", proxy.url + ccproxy.HEALTH_PATH)[2])
        assert health["state"] == {"backend": "redis", "at": f"127.0.0.1:{redis_server.port}", "ok": True,
                                   "problem": None}


@slow
def test_two_workers_on_redis_keep_a_switching_session_whole(upstream, redis_server, clean_upstream, tmp_path_factory):
    with started_proxy(tmp_path_factory, "redis-workers",
                       lambda d, p: write_redis_config(d, upstream, p, redis_server.port, workers=2)) as proxy:
        assert ccproxy.validate_config(ccproxy.load_config(proxy.directory),
                                       ccproxy.Pipeline(ccproxy.load_config(proxy.directory))).errors == []
        strict, main, agent = strict_session(proxy.url, clean_upstream, "sess-two-workers")
        check_switching_session(main, agent, strict, clean_upstream)
        import sqlite3
        ledger, deadline = proxy.directory / ccproxy.LEDGER_FILE, time.monotonic() + 30
        while True:                                     # both workers have written their gauges
            with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
                workers = db.execute("SELECT count(DISTINCT process) FROM gauges WHERE updated >= ?",
                                     (time.time() - 5,)).fetchone()[0]
            if workers == 2:
                break
            assert time.monotonic() < deadline, workers
            time.sleep(0.2)
        on_redis = redis_server.client.zcount(f"{ccproxy.REDIS_PREFIX}seen", time.time() - 3600, "+inf")
        assert on_redis >= 1 and metric_values(proxy.url)[("ccproxy_sessions", ())] == on_redis   # not once a worker


@slow
def test_redis_going_away_mid_session_keeps_requests_answered_and_comes_back(upstream, clean_upstream, tmp_path_factory):
    server = RedisServer()
    try:
        with started_proxy(tmp_path_factory, "redis-down",
                           lambda d, p: write_redis_config(d, upstream, p, server.port)) as proxy:
            main = ScriptedClaudeCode(proxy.url, "sess-redis-down")
            main.turn("hello, USE-TOOL to look around")
            server.stop()
            main.effort = "max"
            main.turn("plan it, USE-TOOL first", stream=True)                # rules alone: still answered
            main.turn("and again")
            assert set(main.statuses) == {200}
            health = json.loads(http("GET", proxy.url + ccproxy.HEALTH_PATH)[2])
            assert health["status"] == "degraded" and health["state"]["ok"] is False
            said = f"degraded: redis at 127.0.0.1:{server.port} cannot be reached"
            assert said in run_cli("status", "--config-dir", str(proxy.directory)).stdout
            assert said in run_cli("doctor", "--config-dir", str(proxy.directory)).stdout
            log = proxy.log()
            assert log.count("cannot be reached") == 1 and "Traceback" not in log
            server = RedisServer(server.port)                               # back on the same port
            deadline = time.monotonic() + 30
            while json.loads(http("GET", proxy.url + ccproxy.HEALTH_PATH)[2])["state"]["ok"] is not True:
                main.turn("still there?")
                assert time.monotonic() < deadline, proxy.log()[-2000:]
                time.sleep(0.5)
            assert "answers again" in proxy.log()
            assert set(main.statuses) == {200}
    finally:
        server.stop()


def test_redis_settings_come_from_litellms_own_config(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "pw-7788")
    for litellm, expected in (
            ({"router_settings": {"redis_host": "10.0.0.5", "redis_port": 6380, "redis_password": "os.environ/REDIS_PASSWORD"}},
             {"host": "10.0.0.5", "port": 6380, "password": "pw-7788"}),
            ({"router_settings": {"redis_url": "redis://:pw@10.0.0.6:6379/0"}}, {"url": "redis://:pw@10.0.0.6:6379/0"}),
            ({"litellm_settings": {"cache": True, "cache_params": {"type": "redis", "host": "10.0.0.7"}}},
             {"host": "10.0.0.7", "port": 6379, "password": None}),
            ({"litellm_settings": {"cache": True, "cache_params": {"type": "local"}}}, None)):
        config = ccproxy.Config(settings=ccproxy.Settings(), litellm=litellm)
        assert ccproxy.redis_settings(config) == expected
    store = ccproxy.session_store_for(ccproxy.Config(settings=ccproxy.Settings(), litellm={
        "router_settings": {"redis_url": "redis://:secret-pw@10.0.0.6:6379/0"}}))
    assert isinstance(store, ccproxy.RedisSessionStore) and store.where() == "redis://10.0.0.6:6379/0"
    two = ccproxy.Config(settings=ccproxy.Settings(), litellm={"router_settings": {"redis_host": "h"}}, num_workers=2)
    assert not [e for e in ccproxy.validate_config(two, ccproxy.Pipeline(two)).errors if "num_workers" in e]
    alone = ccproxy.Config(settings=ccproxy.Settings(), litellm={}, num_workers=2)
    assert [e for e in ccproxy.validate_config(alone, ccproxy.Pipeline(alone)).errors if "Redis" in e]


def test_an_unreachable_redis_is_tried_once_then_left_alone_for_a_while():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted = []

    def refuse_all():                   # a "Redis" that hangs up on every connection
        while listener.fileno() != -1:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()
    thread = threading.Thread(target=refuse_all, daemon=True)
    thread.start()
    store = ccproxy.RedisSessionStore({"host": "127.0.0.1", "port": listener.getsockname()[1]})
    try:
        assert store.call(lambda r: r.ping()) is None and store.problem
        assert store.call(lambda r: r.ping()) is None          # within REDIS_RETRY_S: not tried
        assert len(accepted) == 1, accepted                     # redis-py's own retries are off
    finally:
        listener.close()
        thread.join(timeout=5)


def test_a_sessions_threads_on_redis_are_read_without_reading_every_session():
    server = RedisServer()
    try:
        store = ccproxy.RedisSessionStore({"host": "127.0.0.1", "port": server.port})
        pipeline = ccproxy.Pipeline(ccproxy.default_config(), sessions=store)
        for session, agent in (("mine", None), ("mine", "agent-b"), ("mine", "agent-a"), ("subs-only", "agent-c")):
            body, headers = cc_request("main" if agent is None else "subagent", session=session)
            if agent:
                headers["x-claude-code-agent-id"] = agent
            ccproxy.run_pipeline(pipeline, body, headers=headers)
        server.client.zadd("ccproxy:seen", {f"other-{i}\x1f": time.time() for i in range(5000)})
        sent_before = int(server.client.info("stats")["total_net_output_bytes"])
        states = store.export("mine")["states"]
        found = store.find("mine"), store.find("subs-only"), store.find("nobody")
        sent = int(server.client.info("stats")["total_net_output_bytes"]) - sent_before
        assert [s["agent_id"] for s in states] == [None, "agent-b", "agent-a"]     # last seen last
        assert [f and f["agent_id"] for f in found] == [None, "agent-c", None]
        assert sent < 20_000                     # 5,000 other sessions' index entries alone are ~100 KB
        assert 0 < server.client.pttl("ccproxy:a:mine\x1f") <= 3_600_000          # expires with the session
    finally:
        server.stop()


class Hook(LoopbackServer):
    """A webhook receiver on loopback: keeps each JSON body POSTed to it."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                hook.events.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

        super().__init__(Handler, "/budget")


TEAM_RULES = [{"name": "background", "rule": "MatchModelRule", "params": {"model_name": "haiku"}},
              {"name": "think", "rule": "ThinkingRule", "ab": {"think-a": 50, "think-b": 50}}]


def write_team_config(directory: Path, upstream: FakeUpstream, port: int, redis_port: int, hook_url: str) -> None:
    base = upstream.url
    write_config(directory, upstream, port, settings={
        "user_header": "x-team-user", "rules": TEAM_RULES, "cache": {"type": "local", "ttl": 600},
        "budgets": [{"name": "daily-usd", "per": "user", "period": "day", "usd": 0.002, "action": "block",
                     "alert_at": 0.5, "notify": {"webhook": hook_url}}],
        "users": {"intern-*": {"labels": ["background", "small"]},
                  "bob": {"rules": [{"name": "small", "rule": "MatchModelRule", "params": {"model_name": "claude"}}]},
                  "dave": {"budgets": [{"name": "dave-tokens", "tokens": 300, "action": "downgrade", "to": "small"}]}}},
        router_settings={"redis_host": "127.0.0.1", "redis_port": redis_port},
        model_list=[{"model_name": n, "litellm_params": {"model": f"anthropic/up-{n}", "api_base": base}}
                    for n in ("background", "think-a", "think-b", "small")]
        + [{"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*", "api_base": base}}])


@pytest.fixture(scope="module")
def team(upstream, redis_server, tmp_path_factory):
    hook = Hook()
    with started_proxy(tmp_path_factory, "team",
                       lambda d, p: write_team_config(d, upstream, p, redis_server.port, hook.url)) as proxy:
        yield proxy, hook
    hook.close()


def team_request(proxy, user: str, session: str, text: str, model: str = "claude-opus-5-5", effort: str = "medium",
                 stream: bool = True):
    body, headers = cc_request("main", session=session)
    body.update(model=model, output_config={"effort": effort}, stream=stream)
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    headers["x-team-user"] = user
    return proxy.messages(body, headers)


@slow
def test_ab_split_is_sticky_per_session_and_usage_reports_each_arm(team, clean_upstream):
    proxy, _hook = team
    arms = {}
    for i in range(12):
        for turn in range(2):
            status, got, raw = team_request(proxy, "ab-user", f"sess-ab-{i}", f"think hard {i}.{turn}", effort="max")
            assert status == 200, raw[:300]
            arms.setdefault(i, set()).add(got["x-ccproxy-rule"])
    assert all(len(seen) == 1 for seen in arms.values())                # sticky per session
    assert set().union(*arms.values()) == {"think-a", "think-b"}        # both arms used
    expected = {i: {ccproxy.ab_arm((("think-a", 50), ("think-b", 50)), "think", f"sess-ab-{i}")} for i in arms}
    assert arms == expected                                           # any worker or proxy would agree
    deadline = time.monotonic() + 30
    while True:
        rows = {r["arm"]: r for r in json.loads(run_cli("usage", "--by", "arm", "--json", "--config-dir",
                                                        str(proxy.directory)).stdout)}
        if sum(rows.get(a, {}).get("requests", 0) for a in ("think-a", "think-b")) >= 24:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.3)
    assert all(rows[a]["latency_p50_s"] is not None and rows[a]["latency_p95_s"] >= rows[a]["latency_p50_s"]
               for a in ("think-a", "think-b"))
    table = run_cli("usage", "--by", "arm", "--config-dir", str(proxy.directory)).stdout
    assert re.search(r"^think-a\s+\d+", table, re.M) and "p95 s" in table
    figures = json.loads(http("GET", proxy.url + ccproxy.DASHBOARD_DATA_PATH)[2])
    assert {a["arm"] for a in figures["arms"]} >= {"think-a", "think-b"}
    assert "ab-user" in {u["user"] for u in figures["users"]}                # booked under the header's user
    labels = figures["health"]["labels"]
    assert all(labels[a]["deployment"] and labels[a]["last_ok"] in (True, None) for a in ("think-a", "think-b"))


@slow
def test_users_get_their_own_labels_and_rules(team, clean_upstream):
    proxy, _hook = team
    status, got, _raw = team_request(proxy, "intern-7", "sess-intern", "think it through", effort="max")
    assert status == 200 and got["x-ccproxy-rule"] == "background"        # think is not theirs
    status, got, _raw = team_request(proxy, "bob", "sess-bob", "anything")
    assert status == 200 and got["x-ccproxy-rule"] == "small"             # bob's own rules
    status, got, _raw = team_request(proxy, "someone", "sess-someone", "anything")
    assert status == 200 and got["x-ccproxy-rule"] == "default"           # the global rules


@slow
def test_budgets_block_with_an_anthropic_error_downgrade_and_alert_once(team, clean_upstream):
    proxy, hook = team
    answered = 0
    deadline = time.monotonic() + 60
    while True:        # $0.000625 a request (Opus 4.5, 100 in + 5 out): blocked once $0.002 is booked
        status, got, raw = team_request(proxy, "carol", f"sess-carol-{answered}", f"question {answered}",
                                        model="claude-opus-4-5")
        if status != 200:
            break
        answered += 1
        assert time.monotonic() < deadline, "the budget never blocked"
        time.sleep(0.2)
    assert status == 429 and 4 <= answered <= 12, (answered, raw[:300])
    error = json.loads(raw)
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert "budget `daily-usd` for carol is used up for this day ($0.002)" in error["error"]["message"]
    assert int(got["retry-after"]) > 0
    assert [e["budget"] for e in hook.events] == ["daily-usd"] and hook.events[0]["subject"] == "carol"
    assert proxy.log().count("budget daily-usd: carol has used") == 1
    other = team_request(proxy, "erin", "sess-erin", "hello", model="claude-opus-4-5")
    assert other[0] == 200                                               # only carol's budget is used up
    routes = []
    deadline = time.monotonic() + 60
    while "small" not in routes:              # dave: 300 tokens a day, then `small` (105 tokens a request)
        status, got, _raw = team_request(proxy, "dave", "sess-dave", f"step {len(routes)}")
        assert status == 200 and time.monotonic() < deadline, routes
        routes.append(got["x-ccproxy-rule"])
        time.sleep(0.2)
    assert routes[0] == "default" and 3 <= len(routes) <= 10
    metrics = metric_values(proxy.url)
    assert metrics[("ccproxy_budget_blocks_total", ())] >= 1
    deadline = time.monotonic() + 30
    while True:                       # every routed request is answered, a refused one included
        metrics = metric_values(proxy.url)
        routed, answered = (sum(v for (name, _l), v in metrics.items() if name == family)
                            for family in ("ccproxy_requests_total", "ccproxy_answers_total"))
        if routed == answered:
            break
        assert time.monotonic() < deadline, (routed, answered)
        time.sleep(0.2)


@slow
def test_identical_requests_are_answered_from_litellms_cache(team, clean_upstream):
    proxy, _hook = team
    costs = []
    for _ in range(2):
        status, got, raw = team_request(proxy, "frank", "sess-cache", "the same question", model="claude-opus-4-5",
                                        stream=False)
        assert status == 200
        costs.append(float(got["x-ccproxy-cost"]))
    assert len(clean_upstream.received("/v1/messages")) == 1
    assert costs[0] > 0 and costs[1] == 0.0, costs                  # the header says so too
    rows = booked(proxy.directory, "sess-cache", 2)
    assert rows[0][0] > 0 and rows[1][0] == 0.0                      # the hit cost nothing
    assert rows[0][1:] == rows[1][1:] and rows[1][1] == "frank", rows   # booked to its user and route


def test_the_user_comes_from_the_header_the_litellm_key_or_claude_code(tmp_path):
    metadata = {"user_id": json.dumps({"device_id": "dev-1", "account_uuid": "acct-9", "session_id": "s"})}
    data = {"metadata": metadata}
    assert ccproxy.request_user(data, {"x-team-user": "alice"}, None, "x-team-user") == "alice"
    assert ccproxy.request_user(data, {}, {"user_id": "key-user"}, "x-team-user") == "key-user"
    assert ccproxy.request_user(data, {}, types.SimpleNamespace(user_id="obj-user")) == "obj-user"
    assert ccproxy.request_user(data, {}, {"user_id": "default_user_id"}) == "acct-9"  # the master key's
    assert ccproxy.request_user(data, {}, None) == "acct-9"
    assert ccproxy.request_user({"metadata": {"user_id": json.dumps({"device_id": "dev-1"})}}, {}, None) == "dev-1"
    assert ccproxy.request_user({}, {}, None) is None


def test_a_budget_alert_runs_its_command_with_the_figures(tmp_path):
    out = tmp_path / "alert.txt"
    budget = ccproxy.BudgetSpec(name="daily", per="user", usd=2.0,
                                notify={"command": "echo $CCPROXY_BUDGET_BUDGET $CCPROXY_BUDGET_SUBJECT "
                                                   f"$CCPROXY_BUDGET_USED > {out}"})
    ccproxy.notify_budget(budget, "carol", 0.8)
    assert out.read_text().split() == ["daily", "carol", "0.8"]


def test_budget_and_user_config_errors_name_the_line(tmp_path):
    for section, message in (
            ({"budgets": [{"name": "b", "usd": 5, "tokens": 9}]}, "give one positive limit"),
            ({"budgets": [{"name": "b", "usd": 5, "per": "team"}]}, "per: 'team' (one of user, label, model, all)"),
            ({"budgets": [{"name": "b", "usd": 5, "action": "downgrade"}]}, "needs `to:`"),
            ({"budgets": [{"name": "b", "usd": 5, "perid": "day"}]}, "perid (did you mean `period`?)"),
            ({"budgets": [{"name": "b", "usd": 5, "alert_at": 80}]}, "`alert_at` is a fraction"),
            ({"users": {"x": {"labels": "think"}}}, "`labels` lists the route labels"),
            ({"cache": {"type": "memcached"}}, "`cache` takes `type`"),
            ({"rules": [{"name": "t", "rule": "ThinkingRule", "ab": {"a": 0}}]}, "positive whole weights")):
        (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump({"ccproxy": section}))
        with pytest.raises(ccproxy.ConfigError, match=re.escape(message)) as raised:
            ccproxy.load_config(tmp_path)
        assert "ccproxy.yaml:" in str(raised.value)
    (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump({"ccproxy": {
        "usage_ledger": False, "cache": {"type": "redis"},
        "rules": [{"name": "t", "rule": "ThinkingRule", "ab": {"think-x": 1}}],
        "budgets": [{"name": "b", "usd": 5, "action": "downgrade", "to": "nowhere"}],
        "users": {"amy": {"labels": ["gone"]}}}, "model_list": [{"model_name": "default", "litellm_params": {
            "model": "anthropic/claude-x"}}]}))
    config = ccproxy.load_config(tmp_path)
    errors = "\n".join(ccproxy.validate_config(config, ccproxy.Pipeline(config)).errors)
    for message in ("A/B arm `think-x` has no model_list entry", "budgets count from the usage ledger",
                    "downgrades to `nowhere`", "user `amy` may use `gone`", "`cache: {type: redis}` uses LiteLLM's Redis"):
        assert message in errors, errors


def ledger_with_spend(directory: Path, user: str, cost: float, input_tokens: int, output_tokens: int):
    """A ledger holding one answered request of `user` (written by its thread, then flushed)."""
    ledger = ccproxy.Ledger(directory / ccproxy.LEDGER_FILE)
    ledger.start()
    ledger.add({"ts": time.time(), "user": user, "label": "x", "answered_model": "m", "requested_model": "m",
                "input_tokens": input_tokens, "output_tokens": output_tokens, "cost": cost, "status": "ok"})
    assert ledger.flush(30)
    return ledger


def test_ab_arms_follow_their_weights_and_budgets_count_from_the_ledger(tmp_path):
    split = (("a", 90), ("b", 10))
    picks = collections.Counter(ccproxy.ab_arm(split, "think", f"s{i}") for i in range(10_000))
    assert 8_700 < picks["a"] < 9_300 and picks["a"] + picks["b"] == 10_000
    assert {ccproxy.ab_arm(split, "think", "s1") for _ in range(5)} == {ccproxy.ab_arm(split, "think", "s1")}
    budget = ccproxy.BudgetSpec(name="b", per="user", usd=1.0)
    ledger = ledger_with_spend(tmp_path, "u1", 0.7, 10, 1)
    book = ccproxy.BudgetBook([budget], [], ccproxy.SessionStore())
    book.ledger_path = ledger.path                                  # a restart: counted from the ledger
    assert book.spent(budget, "u1") == (0.7, 11) and book.over(budget, "u2") == 0.0
    book.book({"user": "u1", "label": "x", "answered_model": "m", "cost": 0.4, "input_tokens": 5,
               "output_tokens": 0})
    assert book.over(budget, "u1") == pytest.approx(1.1)
    assert ccproxy.period_start("month", time.mktime((2026, 11, 26, 12, 0, 0, 0, 0, -1))) == \
        time.mktime((2026, 11, 1, 0, 0, 0, 0, 0, -1))


def test_budgets_on_redis_start_from_the_ledger_and_count_here_while_redis_is_away(tmp_path):
    budget = ccproxy.BudgetSpec(name="b", per="user", tokens=10_000)
    ledger = ledger_with_spend(tmp_path, "u1", 0.5, 900, 100)
    server = RedisServer()
    try:
        store = ccproxy.RedisSessionStore({"host": "127.0.0.1", "port": server.port})
        book = ccproxy.BudgetBook([budget], [], store)
        book.ledger_path = ledger.path
        assert book.spent(budget, "u1") == (0.5, 1000)          # a fresh (or restarted) Redis: from the ledger
        assert server.client.hget(book._key(budget, "u1", ccproxy.period_start("day")), "tokens") == "1000"
        row = {"user": "u1", "label": "x", "answered_model": "m", "cost": 0.25, "input_tokens": 400,
               "output_tokens": 100}
        book.book(row)
        book.book(dict(row, cost=0.0, cache_hit=True))           # from LiteLLM's cache: no tokens spent
        assert book.spent(budget, "u1") == (0.75, 1500)
        server.stop()                                            # Redis goes away: counted here
        book.book(row)
        assert book.spent(budget, "u1") == (0.75, 1500)          # the ledger's figure, and this row
    finally:
        if server.process.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def per_request_proxy(upstream, tmp_path_factory):
    """ccproxy 1.x-style routing: no stickiness and no signature handling."""
    def write(directory, port):
        write_config(directory, upstream, port,
                     settings={"sticky_turns": False, "strip_foreign_thinking": False})
    with started_proxy(tmp_path_factory, "per-request", write) as run:
        yield run


@slow
def test_the_same_session_breaks_without_signature_handling(per_request_proxy, clean_upstream):
    strict, main, agent = strict_session(per_request_proxy.url, clean_upstream, "sess-broken")
    # Anthropic rejects the foreign blocks with its 400. LiteLLM 1.108.7 then retries with
    # every thinking block stripped, so the client may still get an answer: one wasted round
    # trip per switch, and the reasoning of every earlier turn gone, same-model ones included.
    assert any("Invalid `signature` in `thinking` block" in r for r in strict.rejected)
    records = clean_upstream.received("/v1/messages")
    assert upstream_thinking_is_own(records) != []
    anthropic_requests = [m for _r, m in main.routes + agent.routes if m.startswith("anthropic/")]
    assert len(records) > len(anthropic_requests)          # the retries LiteLLM had to make


@slow
def test_sse_passes_through_byte_for_byte_but_the_model(proxy, clean_upstream):
    strict = StrictAnthropic()
    clean_upstream.scripts.append(strict)
    body, headers = cc_request("think")
    status, resp_headers, raw = proxy.messages(body, headers)
    assert status == 200
    assert (resp_headers["x-ccproxy-rule"], resp_headers["x-ccproxy-model"]) == ("think", "anthropic/up-think")
    sent = sse(message_events(upstream_message({"model": "up-think"}, [
        {"type": "thinking", "thinking": "considering...", "signature": "sig.up-think.1"},
        {"type": "text", "text": "answer 1 from up-think"}])[1]))
    got_frames, sent_frames = raw.split(b"\n\n"), sent.split(b"\n\n")
    assert len(got_frames) == len(sent_frames)
    for got, want in zip(got_frames, sent_frames):
        if b"message_start" in want:
            got_event, want_event = json.loads(got.split(b"data:", 1)[1]), json.loads(want.split(b"data:", 1)[1])
            assert got_event["message"].pop("model") == body["model"]
            want_event["message"].pop("model")
            assert got_event == want_event
        else:
            assert got == want


@slow
def test_translated_stream_reports_input_tokens_and_cache_key(proxy, clean_upstream):
    body, headers = cc_request("long")
    status, _h, raw = proxy.messages(body, headers)
    start = sse_events(raw)[0]
    assert status == 200 and start["type"] == "message_start"
    assert start["message"]["usage"]["input_tokens"] == ccproxy.TokenCounter().count_request(body)[0] > 60000
    assert start["message"]["model"] == body["model"]
    assert clean_upstream.received()[0]["body"]["prompt_cache_key"] == "sess-1"


@slow
def test_max_tokens_fits_the_routed_deployment(proxy, clean_upstream):
    body, headers = cc_request("main")
    body["model"] = "claude-sonnet-5-5"                                 # routed to `small` (8192)
    proxy.messages(body, headers)
    body["model"] = "claude-opus-5-5"                                   # passthrough
    proxy.messages(body, headers)
    got = clean_upstream.received()
    assert [(r["body"]["model"], r["body"]["max_tokens"]) for r in got] == [
        ("up-small", 8192), ("claude-opus-5-5", 128000)]


@slow
def test_statusline_shows_the_sessions_route(proxy, clean_upstream, tmp_path):
    client = ScriptedClaudeCode(proxy.url, "sess-status")
    client.effort = "max"
    client.turn("think about it")
    stdin = json.dumps({"session_id": "sess-status", "model": {"id": "claude-opus-5-5"}})
    done = run_cli("statusline", "--config-dir", str(proxy.directory), input=stdin)
    assert done.returncode == 0 and done.stdout.strip() == "ccproxy: opus\u2192up-think (think) \u00b7 0 switches"
    unknown = run_cli("statusline", "--config-dir", str(proxy.directory), input='{"session_id": "nope"}')
    assert unknown.stdout.strip().startswith("ccproxy: up")
    # Claude Code 2.1.332 adds the plan's usage (from the unified rate-limit headers passed on)
    limits = {"five_hour": {"used_percentage": 91.4, "resets_at": 1795700000}, "seven_day": {"used_percentage": 12},
              "spend_limit": {"used_percentage": "n/a"}}
    done = run_cli("statusline", "--config-dir", str(proxy.directory),
                   input=json.dumps({"session_id": "sess-status", "rate_limits": limits}))
    assert done.stdout.strip().endswith("0 switches \u00b7 5h 91% 7d 12%"), done.stdout


def test_statusline_when_down_or_fed_garbage(tmp_path):
    for stdin in ['{"session_id": "x"}', "not json at all", "", "[1, 2]"]:
        t = time.monotonic()
        done = run_cli("statusline", "--config-dir", str(tmp_path), input=stdin)
        assert done.returncode == 0 and done.stdout == "ccproxy: proxy down\n" and done.stderr == ""
        assert time.monotonic() - t < 5       # the in-process figure is in the benchmark


def test_statusline_answers_fast_when_the_proxy_is_down(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO('{"session_id": "abc"}'))
    t = time.perf_counter()
    assert ccproxy.main(["statusline", "--config-dir", str(tmp_path)]) == 0
    assert (time.perf_counter() - t) < 0.2 and capsys.readouterr().out == "ccproxy: proxy down\n"


def test_install_statusline_keeps_other_settings_and_uninstall_restores_bytes(tmp_path):
    claude_dir = tmp_path / "claude"
    claude_dir.mkdir()
    settings = claude_dir / "settings.json"
    original = '{\n    "model": "opus",\n    "permissions": {"allow": ["Bash(ls:*)"]}\n}'
    settings.write_text(original)
    env = {"CLAUDE_CONFIG_DIR": str(claude_dir), "CCPROXY_CONFIG_DIR": str(tmp_path / "cfg")}
    done = run_cli("install", "--statusline", env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(settings.read_text())
    assert data["model"] == "opus" and data["permissions"] == {"allow": ["Bash(ls:*)"]}
    assert data["statusLine"]["type"] == "command" and "-m ccproxy" in data["statusLine"]["command"]
    assert "already" in run_cli("install", "--statusline", env=env).stdout
    done = run_cli("install", "--statusline", "--uninstall", env=env)
    assert done.returncode == 0 and settings.read_text() == original
    assert not list(claude_dir.glob("*.ccproxy-backup"))
    # no settings file before: none after; an edited file keeps the edit
    settings.unlink()
    run_cli("install", "--statusline", env=env)
    run_cli("install", "--statusline", "--uninstall", env=env)
    assert not settings.exists()
    settings.write_text(original)
    run_cli("install", "--statusline", env=env)
    edited = json.loads(settings.read_text())
    edited["theme"] = "dark"
    settings.write_text(json.dumps(edited))
    run_cli("install", "--statusline", "--uninstall", env=env)
    assert json.loads(settings.read_text()) == {**json.loads(original), "theme": "dark"}
    assert run_cli("install", "--uninstall", env=env).returncode == 2
    fresh = dict(env, CLAUDE_CONFIG_DIR=str(tmp_path / "never-ran"))     # Claude Code has not run yet
    done = run_cli("install", "--statusline", env=fresh)
    assert done.returncode == 0 and "statusLine" in json.loads((tmp_path / "never-ran" / "settings.json").read_text())


def session_pipeline(**settings) -> ccproxy.Pipeline:
    config = ccproxy.default_config()
    rules = config.settings.rules + (ccproxy.RuleSpec("sub", "SubagentRule", {}),)
    models = [m for m in config.model_list if m["model_name"] != "think"]
    litellm = dict(config.litellm, model_list=models + [
        {"model_name": "sub", "litellm_params": {"model": "anthropic/up-sub"}},
        {"model_name": "think", "litellm_params": {"model": "anthropic/up-think"}}])
    return ccproxy.Pipeline(ccproxy.dataclasses.replace(
        config, litellm=litellm,
        settings=ccproxy.dataclasses.replace(config.settings, rules=rules, **settings)))


def route(pipeline, body, headers):
    data, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(body), headers=headers)
    return ctx.decision.label, data, ctx


def one_rule_pipeline(directory: Path, rule: dict, model: str):
    """A pipeline with one rule, an entry named like it, and every Claude model passed through."""
    (directory / "ccproxy.yaml").write_text(yaml.safe_dump({
        "ccproxy": {"rules": [rule]},
        "model_list": [{"model_name": rule["name"], "litellm_params": {"model": model}},
                       {"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*"}}]}))
    return ccproxy.Pipeline(ccproxy.load_config(directory))


def test_an_image_in_the_turn_goes_to_vision_and_the_turn_stays_there(tmp_path):
    pipeline = one_rule_pipeline(tmp_path, {"name": "vision", "rule": "ImageRule"}, "anthropic/claude-sonnet-4-5")
    body, headers = cc_request("main", session="sess-image")
    assert route(pipeline, body, headers)[0] == "default"
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    body["messages"] += [{"role": "assistant", "content": [{"type": "tool_use", "id": "r1", "name": "Read",
                                                            "input": {"file_path": "shot.png"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "r1", "content": [png]}]}]
    label, _data, ctx = route(pipeline, body, headers)                   # mid-turn: switches
    assert label == "vision" and ctx.verdicts[0][2].fact == "an image in a tool result"
    body["messages"] += [{"role": "assistant", "content": [{"type": "tool_use", "id": "r2", "name": "Bash",
                                                            "input": {"command": "ls"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "r2", "content": "a.py"}]}]
    label, _data, ctx = route(pipeline, body, headers)
    assert label == "vision" and "the turn continues" in ctx.decision.reason      # the turn stays
    body["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": "done"}]},
                         {"role": "user", "content": [png, {"type": "text", "text": "and this one?"}]}]
    assert route(pipeline, body, headers)[0] == "vision"
    body["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
                         {"role": "user", "content": [{"type": "text", "text": "thanks"}]}]
    assert route(pipeline, body, headers)[0] == "default"                 # a new turn without one
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy:\n  rules:\n    - {name: vision, rule: ImageRule}\n"
        "model_list:\n  - {model_name: vision, litellm_params: {model: azure/o3-mini}}\n")
    config = ccproxy.load_config(tmp_path)
    warnings = ccproxy.validate_config(config, ccproxy.Pipeline(config)).warnings
    assert any("ImageRule `vision` routes images to azure/o3-mini, which LiteLLM's model map says does not read "
               "images" in w for w in warnings), warnings


GATEWAY_CAPTURES = HERE / "fixtures" / "claude-code-gateway"     # in the repo (fixtures/README.md)
HOP_BY_HOP = ("connection", "accept-encoding", "content-length", "host")


def gateway_capture(name: str) -> tuple[dict, dict]:
    """(body, lower-case headers) of a request Claude Code sent with gateway features on."""
    record = json.loads((GATEWAY_CAPTURES / f"{name}.json").read_text())
    return record["body"], {k.lower(): v for k, v in record["headers"].items() if k.lower() not in HOP_BY_HOP}


CAPTURED_CLASSES = {"main-hints-2.1.332": ("main", "header"), "subagent-hints-2.1.332": ("subagent", "header"),
                    "compaction-auto-hints-2.1.332": ("compaction", "header"),
                    "compaction-manual-hints-2.1.332": ("compaction", "header"),
                    "compaction-auto-2.1.332": ("compaction", "its compaction prompt"),
                    "compaction-manual-2.1.197": ("compaction", "its compaction prompt")}


@pytest.mark.parametrize("name", list(CAPTURED_CLASSES))
def test_request_classes_from_claude_codes_header_or_else_from_the_body(name):
    body, headers = gateway_capture(name)
    assert ccproxy.request_class(body, headers) == CAPTURED_CLASSES[name]
    headers.pop(ccproxy.REQUEST_CLASS_HEADER, None)               # 2.1.197, or hints off: the body tells
    assert ccproxy.request_class(body, headers)[0] == CAPTURED_CLASSES[name][0]
    rule = ccproxy.RequestClassRule(["compaction", "auxiliary"])
    assert rule.check(body, types.SimpleNamespace(headers=headers)).matched == (CAPTURED_CLASSES[name][0] == "compaction")


def test_a_compaction_request_takes_its_own_route_and_never_moves_the_conversation(tmp_path):
    pipeline = one_rule_pipeline(tmp_path, {"name": "compact", "rule": "RequestClassRule",
                                            "params": {"classes": ["compaction"]}}, "anthropic/claude-haiku-5-5")
    compaction, headers = gateway_capture("compaction-auto-hints-2.1.332")
    main = copy.deepcopy(compaction)
    main["messages"][-1] = {"role": "user", "content": [{"type": "text", "text": "go on"}]}
    main_headers = dict(headers, **{ccproxy.REQUEST_CLASS_HEADER: "main"})
    main_headers.pop("x-claude-code-compaction")
    assert route(pipeline, main, main_headers)[0] == "default"
    label, data, ctx = route(pipeline, compaction, headers)
    assert (label, data["model"]) == ("compact", "compact") and ctx.verdicts[0][2].fact == "compaction (header)"
    assert ctx.conversation is None and ctx.session is not None       # the ledger applies, the turn is not its
    label, _data, ctx = route(pipeline, main, main_headers)
    assert label == "default" and ctx.session.switches == 0 and ctx.session.requests == 2
    with pytest.raises(ccproxy.RuleError, match="unknown class summary"):
        ccproxy.RequestClassRule(["summary"])


@slow
@pytest.mark.parametrize("name", list(CAPTURED_CLASSES))
def test_gateway_captures_through_explain_and_the_proxy(gateway_proxy, clean_upstream, name):
    body, headers = gateway_capture(name)
    expected = {"compaction": ("compact", "up-compact"), "main": ("default", body["model"]),
                "subagent": ("default", body["model"])}[CAPTURED_CLASSES[name][0]]
    explained = run_cli("explain", "--json", str(GATEWAY_CAPTURES / f"{name}.json"),
                        "--config-dir", str(gateway_proxy.directory))
    assert explained.returncode == 0 and json.loads(explained.stdout)["decision"]["label"] == expected[0], \
        explained.stdout[-500:] + explained.stderr[-500:]
    headers["x-api-key"] = CLIENT_KEY
    status, got, raw = gateway_proxy.messages(body, headers)
    assert status == 200 and got["x-ccproxy-rule"] == expected[0], raw[:300]
    assert clean_upstream.received("/v1/messages")[0]["body"]["model"] == expected[1]


def test_a_turn_stays_on_its_route_until_an_override_rule():
    pipeline = session_pipeline()
    body, headers = cc_request("think")
    assert route(pipeline, body, headers)[0] == "think"
    loop = copy.deepcopy(body)
    loop["output_config"] = {"effort": "medium"}           # a continuation no longer asks for max
    loop["messages"] += [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]
    label, _data, ctx = route(pipeline, loop, headers)
    assert label == "think" and ctx.decision.reason == "the turn continues on think"
    loop["messages"][-1]["content"][0]["content"] = big_text(130000)   # an override rule still wins
    assert route(pipeline, loop, headers)[0] == "long_context"
    fresh = copy.deepcopy(loop)
    fresh["messages"].append({"role": "user", "content": [{"type": "text", "text": "next"}]})
    assert route(pipeline, fresh, headers)[0] == "long_context"       # still above the lower mark
    fresh["messages"][-2]["content"][0]["content"] = big_text(100000)  # below 120k, above 96k
    assert route(pipeline, fresh, headers)[0] == "long_context"
    fresh["messages"][-2]["content"][0]["content"] = "short again"
    assert route(pipeline, fresh, headers)[0] == "default"
    off = session_pipeline(sticky_turns=False)
    route(off, body, headers)
    assert route(off, loop, headers)[0] == "long_context"     # rules alone: no turn to keep
    assert route(off, {**loop, "messages": loop["messages"][:-1] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]}, headers)[0] == "default"


def test_sticky_rules_hold_later_turns(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy:\n  rules:\n    - {name: think, rule: ThinkingRule, sticky: true}\n"
        "model_list: [{model_name: think, litellm_params: {model: anthropic/x}}]\n")
    pipeline = ccproxy.Pipeline(ccproxy.load_config(tmp_path))
    body, headers = cc_request("think")
    assert route(pipeline, body, headers)[0] == "think"
    body["output_config"] = {"effort": "medium"}
    body["messages"].append({"role": "user", "content": "another turn"})
    label, _d, ctx = route(pipeline, body, headers)
    assert label == "think" and ctx.decision.reason == "sticky rule on think"


def test_subagent_rule_header_billing_line_and_ccr_tag():
    rule = ccproxy.SubagentRule()
    ctx = type("Ctx", (), {"headers": {}, "pipeline": ccproxy.Pipeline(ccproxy.default_config())})()
    body, headers = cc_request("subagent")
    ctx.headers = headers
    assert ccproxy.rule_verdict(rule, body, ctx).matched                  # header
    ctx.headers = {}
    assert ccproxy.rule_verdict(rule, body, ctx).fact == "subagent (billing line)"
    main, _ = cc_request("main")
    assert not ccproxy.rule_verdict(rule, main, ctx).matched
    tagged = copy.deepcopy(main)
    tagged["system"][2]["text"] += "\n<CCR-SUBAGENT-MODEL>openrouter,think</CCR-SUBAGENT-MODEL>"
    verdict = ccproxy.rule_verdict(rule, tagged, ctx)
    assert verdict.matched and verdict.label == "think"
    narrow = ccproxy.SubagentRule(system_contains="security review")
    ctx.headers = headers
    assert not ccproxy.rule_verdict(narrow, body, ctx).matched
    if HAVE_FIXTURES:
        capture = load_fixture("subagent-general-2.1.332.json")
        ctx.headers = {}
        assert ccproxy.rule_verdict(rule, capture["body"], ctx).matched


def test_a_subagents_stickiness_is_its_own():
    pipeline = session_pipeline()
    parent, headers = cc_request("think")
    assert route(pipeline, parent, headers)[0] == "think"
    child, child_headers = cc_request("subagent")
    label, _d, ctx = route(pipeline, child, child_headers)
    assert label == "sub" and ctx.session.agent_id == "a3a279f108e749d27"
    assert ctx.session is not pipeline.sessions._sessions[("sess-1", None)]
    loop = copy.deepcopy(parent)
    loop["output_config"] = {"effort": "medium"}
    loop["messages"] += [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}]
    assert route(pipeline, loop, headers)[0] == "think"                   # the parent's turn held


def test_foreign_thinking_is_dropped_and_a_broken_tool_loop_stops_thinking():
    pipeline = session_pipeline()
    body, headers = cc_request("think")
    body["messages"] += [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "sig.claude-opus-5-5.1"},
                                          {"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]
    label, data, ctx = route(pipeline, body, headers)              # a new conversation on `think`
    assert label == "think"
    assistant = data["messages"][-2]
    assert [b["type"] for b in assistant["content"]] == ["tool_use"]
    assert data["thinking"] == {"type": "disabled"} and "context_management" not in data
    assert ctx.notes == ["dropped 1 thinking block(s) signed by another model",
                         "thinking off for this request: its tool loop began on another model"]
    # a block this session saw `think` produce is kept for `think`
    pipeline = session_pipeline()
    route(pipeline, cc_request("think")[0], headers)                   # this turn started on think
    pipeline.sessions.record_signature("sess-1", None, "sig.up-think.9", "up-think")
    body["messages"][-2]["content"][0]["signature"] = "sig.up-think.9"
    label, data, _ctx = route(pipeline, body, headers)
    assert label == "think" and data["messages"][-2]["content"][0]["type"] == "thinking"
    # a block of unknown origin counts as the requested model's: kept on passthrough
    body["messages"][-2]["content"][0]["signature"] = "sig.never-seen"
    body["output_config"] = {"effort": "medium"}
    label, data, _ctx = route(session_pipeline(), body, headers)
    assert label == "default" and data["messages"][-2]["content"][0]["type"] == "thinking"



def test_models_that_refuse_disabled_thinking_never_get_it():
    pipeline = session_pipeline()          # think -> anthropic/up-think; make it an Opus 5
    config = pipeline.config
    def with_think(entry="think", **info):
        models = [dict(m, litellm_params={"model": "anthropic/claude-opus-5-5"}, model_info=info)
                  if m["model_name"] == entry else m for m in config.model_list]
        return ccproxy.Pipeline(ccproxy.dataclasses.replace(config, litellm=dict(config.litellm, model_list=models)))
    body, headers = cc_request("think", "2.1.197")
    body["thinking"] = {"type": "enabled", "budget_tokens": 40000}
    label, data, ctx = route(with_think(), body, headers)
    assert label == "think" and data["thinking"] == {"type": "adaptive"}       # no budget, no disabled
    assert "thinking budget -> adaptive: claude-opus-5-5 takes no `enabled` budget" in ctx.notes
    label, data, ctx = route(with_think(max_output_tokens=900), body, headers)  # clamping would disable it
    assert data["max_tokens"] == 900 and "thinking" not in data
    web, web_headers = cc_request("web_search", "2.1.197")                     # the client's own disabled
    assert web["thinking"] == {"type": "disabled"}
    label, data, ctx = route(with_think("web_search"), web, web_headers)
    assert label == "web_search" and "thinking" not in data
    passthrough, plain_headers = cc_request("main")
    passthrough["thinking"] = {"type": "disabled"}
    label, data, _ctx = route(session_pipeline(), passthrough, plain_headers)
    assert label == "default" and data["thinking"] == {"type": "disabled"}    # the client's choice
    custom = ccproxy.dataclasses.replace(config.settings, adaptive_only_models=("up-think",))
    assert ccproxy.adaptive_only("anthropic/up-think", custom)
    assert not ccproxy.adaptive_only("anthropic/claude-sonnet-5-5", config.settings)


def test_a_switch_that_would_need_thinking_off_waits_for_the_turns_end():
    config = ccproxy.default_config()
    pipeline = ccproxy.Pipeline(config)          # long_context: Sonnet 5.5 in the default; make it Opus 5.5
    models = [dict(m, litellm_params={"model": "anthropic/claude-opus-5-5"})
              if m["model_name"] == "long_context" else m for m in config.model_list]
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, litellm=dict(config.litellm, model_list=models)))
    body, headers = cc_request("main")
    body["model"] = "claude-sonnet-5-5"
    assert route(pipeline, body, headers)[0] == "default"
    pipeline.sessions.record_signature("sess-1", None, "sig.sonnet.1", "claude-sonnet-5-5")
    body["messages"] += [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "sig.sonnet.1"},
                                          {"type": "tool_use", "id": "r1", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "r1",
                                      "content": [{"type": "text", "text": big_text(130000)}]}]}]
    label, data, ctx = route(pipeline, body, headers)
    assert label == "default" and "switch waits for the turn's end" in ctx.decision.reason
    assert data["model"] == "claude-sonnet-5-5" and data["messages"][-2]["content"][0]["type"] == "thinking"
    body["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": "read it"}]},
                         {"role": "user", "content": [{"type": "text", "text": "now explain it"}]}]
    label, data, _ctx = route(pipeline, body, headers)                 # the next turn switches
    assert label == "long_context" and data["thinking"]["type"] == "adaptive"


@pytest.fixture(scope="module")
def opus_long_proxy(upstream, tmp_path_factory):
    """long_context on an Opus 5.5 deployment (1M context), one LiteLLM retry and LiteLLM's
    fallback from think to small; the rest as in `proxy`."""
    def write(directory, port):
        path = write_config(directory, upstream, port, settings={"upstream_retries": 1},
                            router_settings={"fallbacks": [{"think": ["small"]}]})
        config = yaml.safe_load(path.read_text())
        for entry in config["model_list"]:
            if entry["model_name"] == "long_context":
                entry["litellm_params"] = {"model": "anthropic/claude-opus-5-5", "api_base": upstream.url}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    with started_proxy(tmp_path_factory, "opus-long", write) as run:
        yield run


@slow
def test_a_sonnet_tool_loop_crossing_into_an_opus_long_context_is_answered(opus_long_proxy, clean_upstream):
    strict = StrictAnthropic(adaptive_only=("claude-opus-5",))
    clean_upstream.scripts.append(strict)
    client = ScriptedClaudeCode(opus_long_proxy.url, "sess-opus-long", model="claude-sonnet-5-5")
    client.messages.append({"role": "user", "content": [{"type": "text", "text": "USE-TOOL to read the module"}]})
    first = client.request(stream=True)
    use = next(b for b in first["content"] if b["type"] == "tool_use")
    client.messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use["id"], "content": [{"type": "text", "text": big_text(64000)}]}]})
    client.request(stream=False)                                   # the Read result crosses 60k
    client.turn("what does function_7 do?")                        # the next turn
    assert strict.rejected == [] and set(client.statuses) == {200}
    assert [route for route, _model in client.routes] == ["small", "small", "long_context"]
    assert [r["body"]["model"] for r in clean_upstream.received("/v1/messages")] == [
        "up-small", "up-small", "claude-opus-5-5"]


def test_session_store_bounds_sweeps_and_logs(caplog):
    caplog.set_level("INFO", logger="ccproxy")
    store = ccproxy.SessionStore(ttl=0.0, max_sessions=1)
    pipeline = ccproxy.Pipeline(ccproxy.default_config())
    for session in ("s1", "s2"):
        ctx = pipeline.context({"messages": [{"role": "user", "content": "x"}], "metadata": {}},
                               headers={"x-claude-code-session-id": session})
        store.attach(ctx, {"messages": [{"role": "user", "content": "x"}]})
    assert len(store) == 1 and "session s1 evicted: 0 requests" in caplog.text
    store.record_signature("s2", None, "sig", "m")
    store.record_signature("nope", None, "sig", "m")
    assert store.find("s2")["session_id"] == "s2" and store.find("nope") is None
    time.sleep(0.01)
    assert store.sweep() == 1 and "session s2 ended" in caplog.text
    assert store.producer(None, "sig") is None and store.totals()["sessions"] == 0


def test_fixes_fit_max_tokens_and_budget_and_a_failing_fix_is_skipped(monkeypatch):
    config = ccproxy.default_config()
    sonnet = {"model": "anthropic/claude-sonnet-5-5"}          # takes budgets and `disabled`
    models = [dict(m, model_info={"max_output_tokens": 2000}, litellm_params=sonnet)
              if m["model_name"] == "think" else m for m in config.model_list]
    settings = ccproxy.dataclasses.replace(config.settings, show_requested_model=False)
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, settings=settings,
                                                            litellm=dict(config.litellm, model_list=models)))
    body, headers = cc_request("think", "2.1.197")
    body["thinking"] = {"type": "enabled", "budget_tokens": 40000}
    data, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(body), headers=headers)
    assert data["max_tokens"] == 2000 and data["thinking"]["budget_tokens"] == 1999
    assert data["litellm_metadata"]["_complexity_router_return_raw_model_name"] is True
    models = [dict(m, model_info={"max_output_tokens": 1000}, litellm_params=sonnet)
              if m["model_name"] == "think" else m for m in config.model_list]
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, litellm=dict(config.litellm, model_list=models)))
    data, ctx = ccproxy.run_pipeline(pipeline, copy.deepcopy(body), headers=headers)
    assert data["thinking"] == {"type": "disabled"}
    monkeypatch.setattr(ccproxy, "clamp_max_tokens", lambda d, c: 1 / 0)
    broken = ccproxy.Pipeline(ccproxy.default_config())
    data, ctx = ccproxy.run_pipeline(broken, copy.deepcopy(body), headers=headers)
    assert any("ZeroDivisionError" in e for e in ctx.hook_errors) and ctx.decision is not None


def test_sse_watcher_reads_split_frames_and_fills_input_tokens():
    watcher = ccproxy.SSEWatcher()
    stream = sse([("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "redacted_thinking", "data": "enc"}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                           "delta": {"type": "signature_delta", "signature": "s1"}})])
    frames = watcher.feed(stream[:10]) + watcher.feed(stream[10:])
    assert b"".join(frames) == stream and watcher.signatures == ["enc", "s1"]
    assert b"before message_stop" in watcher.close()              # it did not end
    whole = ccproxy.SSEWatcher()
    assert whole.feed(b"event: ping\ndata: {\"type\": \"ping\"}\n\n: keepalive\n\n") != []
    assert whole.feed(b'event: message_stop\ndata: {"type": "message_stop"}\n\n') and whole.close() == b""
    cut = ccproxy.SSEWatcher()
    assert cut.feed(b'event: message_start\ndata: {"type": "message_start"}\n\nevent: content_block_delta\ndata: {"ty')
    assert b"in the middle of an event" in cut.close()
    bad = ccproxy.SSEWatcher()
    assert bad.feed(b"event: a\ndata: {bad\n\nevent: message_stop\ndata: {}\n\n") == [] and bad.problem
    assert ccproxy.sse_data(b"event: x\ndata: {bad\n\n") is None and ccproxy.sse_data(b"event: x\n\n") is None
    start = sse([("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 7}}})])
    assert ccproxy.with_input_tokens(start, 99) == start
    zero = sse([("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 0}}})])
    assert b'"input_tokens":99' in ccproxy.with_input_tokens(zero, 99)


# ---- Validation and explain ------------------------------------------------------------------

BROKEN_CONFIG = """\
litellm:
  host: 0.0.0.0
ccproxy:
  default_model_passthrough: false
  oat_sources:
    anthropic: "jq -r '.token' ~/creds.json | ("
    anthropik: "echo token"
  hooks:
    - rule_evaluator
    - model_router
    - ccproxy.hooks.no_such_hook
  rules:
    - name: web_search
      rule: ccproxy.rules.MatchToolRule
      params:
        - tool_name: WebSearch
    - name: think
      rule: ThinkingRule
      params: {types: [adaptive]}
    - name: long
      rule: TokenCountRule
      params: {threshold: 10000}
    - name: long
      rule: TokenCountRule
      params: {threshold: "60k"}
    - name: custom
      rule: my_rules.NoSuchRule
    - name: bg
      rule: MatchModelRule
      params: {model: haiku}
  retries: 3
model_list:
  - model_name: web_search
    litellm_params: {model: anthropic/x}
  - model_name: think
    litellm_params: {}
"""


@slow
def test_validate_reports_every_problem_with_its_line(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(BROKEN_CONFIG)
    done = run_cli("validate", "--json", "--config-dir", str(tmp_path))
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    f = str(tmp_path / "ccproxy.yaml")
    errors, warnings = "\n".join(report["errors"]), "\n".join(report["warnings"])
    expected_errors = [
        f"{f}:11: unknown hook `ccproxy.hooks.no_such_hook`",
        f"{f}:23: rule `long` (TokenCountRule): TokenCountRule: threshold must be a whole number of tokens, got '60k'",
        f"{f}:26: cannot import rule `my_rules.NoSuchRule`",
        f"{f}:28: rule `bg` (MatchModelRule): bad params: missing a required argument: 'model_name'",
        f"{f}:23: rule name `long` is used twice (first at {f}:20)",
        f"{f}:4: default_model_passthrough is false but model_list has no `default` entry",
        f"{f}:6: oat_sources.anthropic: the command is not valid shell",
        f"{f}:7: oat_sources.anthropik: LiteLLM knows no provider `anthropik` (did you mean `anthropic`?)",
        f"{f}:2: host 0.0.0.0 is reachable from other machines but no proxy key is set",
        f"{f}:35: a model_list entry needs model_name and litellm_params.model",
    ]
    for e in expected_errors:
        assert e in errors, e
    expected_warnings = [
        f"{f}:31: unknown key `ccproxy.retries`",
        f"{f}:13: MatchToolRule(websearch) matches every Claude Code main turn",
        "(for web search use WebSearchRule)",
        f"{f}:17: ThinkingRule with types [adaptive] matches every Claude Code main turn",
        f"{f}:20: TokenCountRule threshold 10,000 is below Claude Code's baseline",
        f"{f}:20: rule `long` has no model_list entry named `long`; its requests fall back to the default route",
    ]
    for w in expected_warnings:
        assert w in warnings, w
    text = run_cli("validate", "--config-dir", str(tmp_path))
    assert text.returncode == 1 and "error(s): fix them" in text.stdout


def test_validate_checks_retries_fallbacks_quota_and_workers(tmp_path):
    f = tmp_path / "ccproxy.yaml"
    f.write_text("ccproxy:\n  retry_on: [rate_limit, flaky]\n")
    with pytest.raises(ccproxy.ConfigError, match=f"{f}:2: `retry_on` must list some of: rate_limit, server_error"):
        ccproxy.load_config(tmp_path)
    f.write_text(
        "litellm: {num_workers: 2}\n"
        "ccproxy:\n  retry_on: [rate_limit]\n  fallbacks: {think: [defualt], nowhere: [think]}\n"
        "  context_window_fallbacks: {think: long}\n  quota_fallback: api\n"
        "model_list:\n  - {model_name: think, litellm_params: {model: anthropic/x}}\n"
        "  - {model_name: default, litellm_params: {model: anthropic/y}}\n")
    config = ccproxy.load_config(tmp_path)
    errors = "\n".join(ccproxy.validate_config(config, ccproxy.Pipeline(config)).errors)
    assert f"{f}:4: fallbacks: model_list has no entry named `defualt` (did you mean `default`?)" in errors
    assert f"{f}:4: fallbacks: model_list has no entry named `nowhere`" in errors
    assert f"{f}:5: context_window_fallbacks: model_list has no entry named `long`" in errors
    assert f"{f}:6: quota_fallback: model_list has no entry named `api`" in errors
    assert f"{f}:1: num_workers is 2, but each worker would keep its own session state" in errors
    (tmp_path / "ccproxy.yaml").write_text("litellm: {num_workers: 2}\nccproxy: {unshared_workers: true, "
                                          "fallbacks: {'*': [think]}}\n"
                                          "model_list: [{model_name: think, litellm_params: {model: anthropic/x}}]\n")
    config = ccproxy.load_config(tmp_path)
    assert ccproxy.validate_config(config, ccproxy.Pipeline(config)).errors == []
    assert ccproxy.router_settings_for(config.settings, {}) == {"num_retries": 0, "fallbacks": [{"*": ["think"]}]}
    f.write_text("ccproxy: {fallbacks: {think: [claude-sonnet-5-5]}}\nmodel_list:\n"
                 "  - {model_name: think, litellm_params: {model: anthropic/x}}\n"
                 "  - {model_name: 'claude-*', litellm_params: {model: 'anthropic/claude-*'}}\n")
    config = ccproxy.load_config(tmp_path)
    report = ccproxy.validate_config(config, ccproxy.Pipeline(config))
    assert report.errors == [] and report.warnings == [
        f"{f}:1: fallbacks: `claude-sonnet-5-5` is a wildcard entry's model: its answers would count as the "
        "failed route's in the signature ledger; name an exact model_list entry"]


def test_a_plan_limit_429_is_told_by_the_unified_headers():
    now = time.time()
    reset = ccproxy.plan_limit_reset
    assert reset({"anthropic-ratelimit-unified-status": "allowed_warning", "retry-after": "30"}) is None
    assert reset({}) is None                                      # an ordinary rate limit
    assert reset({"anthropic-ratelimit-unified-status": "rejected",
                  "anthropic-ratelimit-unified-reset": str(int(now) + 600)}) == int(now) + 600
    assert now + 29 < reset({"anthropic-ratelimit-unified-status": "rejected", "retry-after": "30",
                             "anthropic-ratelimit-unified-reset": "soon"}) < now + 32
    assert now + 3500 < reset({"anthropic-ratelimit-unified-status": "Rejected",
                               "anthropic-ratelimit-unified-reset": str(int(now) - 5)}) < now + 3700
    assert reset({"anthropic-ratelimit-unified-status": "rejected",
                  "anthropic-ratelimit-unified-reset": "1e300"}) <= time.time() + 7 * 86400
    store = ccproxy.SessionStore(max_sessions=2)
    assert store.limit_reached("s1", now + 60) and not store.limit_reached("s1", now + 90)
    assert store.quota_until("s1") == now + 90 and store.quota_until(None) is None
    store.limit_reached("s2", now - 1)
    assert store.quota_until("s2") is None and store.totals()["plan_limited"] == 1


def test_validate_passes_with_warnings_only(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy:\n  rules:\n    - {name: nowhere, rule: DefaultRule}\n    - {name: big, rule: TokenCountRule, params: {threshold: 5000}}\n")
    done = run_cli("validate", "--config-dir", str(tmp_path))
    assert done.returncode == 0 and "config OK (4 warning(s))" in done.stdout
    assert "DefaultRule matches every request that reaches it and routes it to its name (in ccproxy 1.x it never" \
        in done.stdout
    assert "model_list is empty" in done.stdout


@slow
def test_start_refuses_an_invalid_config_before_spawning(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(BROKEN_CONFIG.replace("0.0.0.0", "127.0.0.1"))
    t = time.monotonic()
    done = run_cli("start", "--detach", "--config-dir", str(tmp_path))
    assert done.returncode == 1 and "the config has problems" in done.stderr
    assert time.monotonic() - t < 30 and not (tmp_path / "ccproxy.log").exists()


def test_unreadable_config_is_a_clear_error(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("ccproxy: [unclosed\n")
    done = run_cli("validate", "--config-dir", str(tmp_path))
    assert done.returncode == 1 and "invalid YAML" in done.stdout


@pytest.mark.parametrize("release", ["2.1.197", "2.1.332"])
def test_explain_shows_verdicts_label_route_and_auth(tmp_path, release):
    body, headers = cc_request("long", release)
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"path": "/v1/messages", "headers": headers, "body": body}))
    cfg = tmp_path / "cfg"
    done = run_cli("explain", str(request), "--config-dir", str(cfg))
    assert done.returncode == 0, done.stderr
    count = ccproxy.TokenCounter().count_request(body)[0]
    assert f"TokenCountRule(120000) [long_context]: {count:,} tokens <= 120,000 -> no match" in done.stdout
    assert "label: default" in done.stdout and "passthrough of the requested model" in done.stdout
    assert "auth: client x-api-key forwarded" in done.stdout
    assert CLIENT_KEY not in done.stdout
    as_json = json.loads(run_cli("explain", "--json", "--config-dir", str(cfg), input=json.dumps(body)).stdout)
    assert as_json["decision"]["label"] == "default"
    assert [r["name"] for r in as_json["rules"]] == ["background", "web_search", "long_context", "think"]
    think, _ = cc_request("think", release)
    out = run_cli("explain", "--config-dir", str(cfg), input=json.dumps(think)).stdout
    assert "effort max -> match" in out and "route: model_list entry `think` -> anthropic/claude-opus-5-5" in out
    plain, _ = cc_request("main", release)
    (cfg / "ccproxy.yaml").parent.mkdir(exist_ok=True)
    (cfg / "ccproxy.yaml").write_text(ccproxy.DEFAULT_CONFIG_YAML.replace(
        "      model: anthropic/claude-opus-5-5\n", "      model: anthropic/claude-opus-5-5\n    model_info: {max_output_tokens: 32000}\n"))
    out = run_cli("explain", "--config-dir", str(cfg), input=json.dumps(think)).stdout
    assert f"fix: max_tokens {think['max_tokens']} -> 32000 (think's maximum)" in out
    assert "fix:" not in run_cli("explain", "--config-dir", str(cfg), input=json.dumps(plain)).stdout


@pytest.mark.parametrize("name", [n for n in fixture_names() if n == "(missing)" or FIXTURE_ROUTES.get(n)])
def test_explain_on_captured_requests(name, capsys):
    need_fixtures()
    assert ccproxy.main(["explain", "--json", str(FIXTURES / name), "--config-dir", "/nonexistent-ccproxy"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"]["label"] == FIXTURE_ROUTES[name]


def test_explain_rejects_bad_input(tmp_path):
    done = run_cli("explain", "--config-dir", str(tmp_path), input="not json")
    assert done.returncode == 2 and "is not JSON" in done.stderr
    done = run_cli("explain", str(tmp_path / "missing.json"), "--config-dir", str(tmp_path))
    assert done.returncode == 2 and "cannot read" in done.stderr


@slow
def test_explain_session_agrees_with_the_live_proxy_on_a_tool_result_continuation(proxy, clean_upstream, tmp_path):
    session = "sess-explain-live"
    body, headers = cc_request("think", session=session)
    body["stream"] = False
    assert proxy.messages(body, headers)[0] == 200
    loop = copy.deepcopy(body)
    loop["output_config"] = {"effort": "medium"}        # the continuation no longer asks for max
    loop["messages"] += [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]
    request = tmp_path / "loop.json"
    request.write_text(json.dumps({"headers": headers, "body": loop}))
    alone = json.loads(run_cli("explain", "--json", str(request), "--config-dir", str(proxy.directory)).stdout)
    live = run_cli("explain", "--json", "--session", session, str(request), "--config-dir", str(proxy.directory))
    assert live.returncode == 0, live.stderr
    explained = json.loads(live.stdout)["decision"]
    assert alone["decision"]["label"] == "default"                      # no state: rules alone
    assert (explained["label"], explained["reason"]) == ("think", "the turn continues on think")
    clean_upstream.clear()
    status, answered, _raw = proxy.messages(loop, headers)
    assert status == 200 and answered["x-ccproxy-rule"] == explained["label"]
    assert clean_upstream.received()[0]["body"]["model"] == "up-think"
    unknown = run_cli("explain", "--session", "no-such-session", str(request), "--config-dir", str(proxy.directory))
    assert unknown.returncode == 2 and "knows no session 'no-such-session'" in unknown.stderr


@slow
def test_ccproxy_py_dropped_beside_a_litellm_config_routes_with_litellms_own_cli(tmp_path, upstream):
    """No ccproxy command, no PYTHONPATH from us: LiteLLM's CLI finds ccproxy.py beside its
    config.yaml, and the ccproxy section in that config.yaml routes."""
    shutil.copy(SCRIPT, tmp_path / "ccproxy.py")
    config = {
        "ccproxy": {"rules": [{"name": "background", "rule": "MatchModelRule", "params": {"model_name": "haiku"}}]},
        "model_list": [
            {"model_name": "background", "litellm_params": {"model": "anthropic/up-dropped", "api_base": upstream.url}},
            {"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*", "api_base": upstream.url}}],
        "litellm_settings": {"callbacks": ["ccproxy.handler"]}}
    with litellm_proxy(tmp_path, config) as url:
        upstream.clear()
        body, headers = cc_request("haiku")
        status, answered, raw = http("POST", url + "/v1/messages", body, headers)
        assert status == 200, raw[:300]
        assert answered["x-ccproxy-rule"] == "background"
        assert upstream.received()[0]["body"]["model"] == "up-dropped"
        assert json.loads(http("GET", url + "/ccproxy/health")[2])["guarded"] is True


@contextlib.contextmanager
def litellm_proxy(directory: Path, config: dict):
    """LiteLLM's own CLI on `config` written as config.yaml in `directory` (no ccproxy
    command, no PYTHONPATH from us); yields its URL once live."""
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CCPROXY_CONFIG_DIR")}
    env.update({ccproxy.WEAK_KEY_PERMIT_ENV: "True", "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(directory / "litellm.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "litellm.proxy.proxy_cli", "--config",
                                 str(directory / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
                                cwd=directory, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while ccproxy.http_get(url + "/health/liveliness")[0] != 200:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (directory / "litellm.log").read_text()[-2000:]
                time.sleep(0.25)
            yield url
        finally:
            ccproxy.stop_process(proc.pid, 10)


# ---- Bad input: odd requests and config files never break anything -------------------------

ODD_VALUES = [None, 0, -1, 1.5, float("nan"), float("inf"), True, "", "x" * 300, [], {}, [1, "a"],
              {"a": [1]}, "\udcff", [[[]]], {"type": ["x"]}, {"type": {"a": 1}}, {"role": {"x": 1}}]


def deeply_nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_odd_requests_never_break_a_rule_a_hook_or_a_session(capsys):
    import random
    rng = random.Random(15)
    pipeline = ccproxy.Pipeline(ccproxy.default_config())
    kinds = ["main", "tool_result", "haiku", "web_search", "think", "subagent", "long"]
    for n in range(600):
        body, headers = cc_request(rng.choice(kinds), session=f"odd-{n % 5}")
        put_odd_values(body, rng, [deeply_nested(1500) if rng.random() < 0.05 else copy.deepcopy(rng.choice(ODD_VALUES))
                                   for _ in range(rng.randint(1, 3))])
        _data, ctx = ccproxy.run_pipeline(pipeline, body, headers=headers)
        assert ctx.hook_errors == [], (n, ctx.hook_errors)
        assert ctx.decision is not None
    assert " ERROR " not in capsys.readouterr().err


def put_odd_values(value, rng, odd: list):
    """`value` with each of `odd` put in place of one of its parts, at a depth `rng` picks
    (never inside an odd value put before: the same object twice would make a cycle)."""
    placed: set[int] = set()
    for item in odd:
        placed.add(id(item))
        place = value
        while isinstance(place, (dict, list)) and place and rng.random() < 0.7:
            key = rng.choice(sorted(place, key=str)) if isinstance(place, dict) else rng.randrange(len(place))
            if not isinstance(place[key], (dict, list)) or not place[key] or id(place[key]) in placed:
                break
            place = place[key]
        if isinstance(place, dict) and place:
            place[rng.choice(sorted(place, key=str))] = item
        elif isinstance(place, list) and place:
            place[rng.randrange(len(place))] = item
    return value


class Deep:
    """A value nested `depth` lists deep, built only when a body or file is written:
    Hypothesis prints the examples it tries, and printing 1,500 levels exceeds Python's
    recursion limit."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"


def materialized(value):
    """`value` with every Deep built."""
    if isinstance(value, Deep):
        return deeply_nested(value.depth)
    if isinstance(value, dict):
        return {k: materialized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialized(v) for v in value]
    return value


def odd_values():
    """Hypothesis: wrong types, NaN, huge integers, odd text, deep nesting, odd structures."""
    from hypothesis import strategies as st
    return st.one_of(st.sampled_from(ODD_VALUES).map(copy.deepcopy), st.integers(min_value=-2**70, max_value=2**70),
                     st.text(max_size=30), st.builds(Deep, st.integers(1, 1500)),
                     st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5),
                                  nested_in, max_leaves=8))


def odd_body(kind: str, pick: int, odd: list, encoding: str) -> bytes:
    """A Claude Code-shaped request (or an OpenAI chat one) with the odd values put at places
    `pick` chooses, encoded as `encoding` says (NaN, invalid UTF-8, huge strings...)."""
    import random
    rng = random.Random(pick)
    if kind == "chat":
        body = {"model": rng.choice(["gpt-cheap", "claude-opus-5-5", "claude-haiku-5-5"]), "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi"}], "stream": rng.random() < 0.5}
    else:
        body = cc_request(kind, session=f"fuzz-{pick % 7}")[0]
        body["stream"] = rng.random() < 0.5
    body = materialized(put_odd_values(body, rng, odd))
    if encoding == "huge":
        huge = {"role": "user", "content": "y" * 600_000}
        body["messages"] = body["messages"] + [huge] if isinstance(body.get("messages"), list) else [huge]
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    if encoding == "bad_utf8":
        raw = raw.replace(b'"hi"', b'"h\xff\xfei"', 1).replace(b"You are", b"You \xc3\x28are", 1)
    return raw


def bare_litellm_config(directory: Path) -> dict:
    """A LiteLLM config without ccproxy doing what a ccproxy config in `directory` does to
    requests that are not routed: its model_list (with the key ccproxy forwards from the
    client given directly), chat completions for openai/ (openai_chat_completions: true, as
    LiteLLM spells it) and no LiteLLM retries (upstream_retries: 0)."""
    models = yaml.safe_load((directory / "ccproxy.yaml").read_text())["model_list"]
    for entry in models:
        entry["litellm_params"].setdefault("api_key", CLIENT_KEY)
    return {"model_list": models,
            "litellm_settings": {"use_chat_completions_url_for_anthropic_messages": True},
            "router_settings": {"num_retries": 0}}


def nested_in(inner):
    """Lists and objects (with Claude Code's key names) of what `inner` makes."""
    from hypothesis import strategies as st
    keys = st.sampled_from(["type", "role", "text", "content"])
    return st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)


@slow
def test_a_deeply_nested_body_gets_a_json_400_not_a_crash(proxy, clean_upstream):
    """A `model` nested ~1,000 lists deep: LiteLLM's auth walks it recursively, and at
    Python's default recursion limit its error handler crashed (a plain-text 500)."""
    body, headers = cc_request("main")
    deep = json.dumps(body).replace(f'"model": "{body["model"]}"', '"model": ' + "[" * 990 + "]" * 990, 1)
    status, got, raw = proxy.messages(deep.encode(), headers)
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error", raw[:300]
    assert clean_upstream.received() == []


def routed_as_ccproxy_would(raw: bytes, config, headers: dict) -> bytes:
    """The body with the model ccproxy's rules pick (what `explain` says), for a proxy
    without ccproxy: both proxies then send the same request to the same deployment."""
    try:
        body = json.loads(raw)
        decision = ccproxy.route_request(body, config, headers).decision if isinstance(body, dict) else None
    except (ValueError, RecursionError):        # not JSON, or too deep to copy
        return raw
    if decision is None:
        return raw
    return json.dumps(dict(body, model=decision.model)).encode("utf-8", "surrogatepass")


@slow
def test_generated_bodies_through_the_proxy_get_no_5xx_that_litellm_alone_does_not(proxy, clean_upstream, tmp_path):
    """Hypothesis mutates Claude Code-shaped bodies (wrong types, NaN, deep nesting, invalid
    UTF-8, huge strings) and sends each to the ccproxy proxy and to a bare LiteLLM proxy with
    the same model_list: ccproxy answers no 5xx where LiteLLM alone does not, and every error
    it answers is JSON."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    bare = bare_litellm_config(proxy.directory)
    config = ccproxy.load_config(proxy.directory)
    found: list = []
    log_start = len(proxy.log())
    with litellm_proxy(tmp_path, bare) as bare_url:
        @settings(max_examples=int(os.environ.get("CCPROXY_FUZZ_EXAMPLES", "300")), deadline=None,
                  derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(kind=st.sampled_from(["main", "tool_result", "haiku", "web_search", "think", "subagent", "chat"]),
               pick=st.integers(0, 2**32), odd=st.lists(odd_values(), min_size=1, max_size=3),
               encoding=st.sampled_from(["json", "json", "bad_utf8", "huge"]))
        def one(kind, pick, odd, encoding):
            raw = odd_body(kind, pick, odd, encoding)
            path = "/v1/chat/completions" if kind == "chat" else "/v1/messages"
            headers = {"content-type": "application/json", "x-api-key": CLIENT_KEY,
                       "anthropic-version": "2023-06-01"}
            ours, _h, answer = http("POST", proxy.url + path, raw, headers)
            theirs = http("POST", bare_url + path, routed_as_ccproxy_would(raw, config, headers), headers)[0]
            found.append((ours, theirs))
            # Beyond ~800 levels LiteLLM's own parsing limits decide (orjson's 1,024 levels,
            # Python's recursion limit, which ccproxy raises in its process): each proxy gives
            # up at a different stage, with an error either way.
            deepest = max((o.depth for o in odd if isinstance(o, Deep)), default=0)
            assert ours < 500 or theirs >= 500 or deepest > 800, (kind, encoding, ours, theirs, answer[:300])
            if ours >= 400:
                assert isinstance(json.loads(answer), dict), answer[:300]
        one()
    assert len(found) >= 50 and {s for s, _t in found if s < 500} >= {200, 400}, sorted(set(found))
    errors = [ln for ln in proxy.log()[log_start:].splitlines() if " ccproxy ERROR " in ln]
    assert errors == [], errors[:5]


def test_odd_config_files_give_clear_errors_never_an_internal_one(tmp_path, capsys):
    """validate and explain on broken files (hand-written, and Hypothesis-mutated default
    configs and requests): exit 0 or 1 with clear lines, never an internal error."""
    import random
    from hypothesis import HealthCheck, given, settings, strategies as st
    texts = ["", ":", "- a\n- b\n", "ccproxy: [\n", "ccproxy:\n  rules:\n    - 3\n", "\t\x00\x01",
             "ccproxy:\n  hooks: {a: 1}\n", "model_list: 7\n", "litellm: {port: .inf}\n",
             "ccproxy: {session_ttl: .nan}\n", "ccproxy: {debug: true, debug: false}\n"]
    request = tmp_path / "req.json"

    def check(text: str, request_bytes: bytes) -> None:
        (tmp_path / "ccproxy.yaml").write_text(text, errors="surrogateescape")
        request.write_bytes(request_bytes)
        for argv in (["validate"], ["explain", str(request)]):
            code = ccproxy.main([*argv, "--config-dir", str(tmp_path)])
            captured = capsys.readouterr()
            assert code in (0, 1), (text, captured.err)
            assert "internal error" not in captured.err and "Traceback" not in captured.err, (text, captured.err)

    for text in texts:
        check(text, json.dumps(cc_request("main")[0]).encode())

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(pick=st.integers(0, 2**32), odd=st.lists(odd_values(), min_size=1, max_size=3))
    def generated(pick, odd):
        config = materialized(put_odd_values(yaml.safe_load(ccproxy.DEFAULT_CONFIG_YAML), random.Random(pick), odd))
        try:
            text = yaml.safe_dump(config)
        except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
            text = "ccproxy: {debug: [\n"
        check(text, odd_body("main", pick, odd, "json"))
        checked.append(text)
    checked: list = []
    generated()
    assert len(checked) >= 100 and len(set(checked)) >= 50
    (tmp_path / "dir" / "ccproxy.yaml").mkdir(parents=True)
    assert ccproxy.main(["validate", "--config-dir", str(tmp_path / "dir")]) == 1
    assert "ccproxy.yaml is not a file" in capsys.readouterr().out


# ---- OAuth ------------------------------------------------------------------------------------

OAUTH_TOKEN_1 = "sk-ant-oat01-first-secret-token"
OAUTH_TOKEN_2 = "sk-ant-oat01-second-secret-token"
STDERR_TOKEN = "sk-ant-oat01-printed-on-stderr-0123456789"


@pytest.fixture(scope="module")
def oauth_proxy(upstream, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("oauth-token") / "token"
    token_file.write_text(OAUTH_TOKEN_1 + "\n")

    def write(directory, port):
        write_config(directory, upstream, port, settings={
            "hooks": ["rule_evaluator", "model_router", "forward_apikey", "forward_oauth"],
            "oauth_timeout": 1, "oauth_refresh_interval": 3600,
            "oat_sources": {
                "anthropic": {"command": f"cat {token_file}", "user_agent": "ccproxy-test/1.0"},
                "openai": f"echo 'token store locked: {STDERR_TOKEN}' >&2; exit 3",
                "gemini": "sleep 30",
                "deepseek": "true",
            }})
    with started_proxy(tmp_path_factory, "oauth", write) as run:
        run.token_file = token_file
        yield run


@slow
def test_failing_oauth_sources_warn_once_each_and_the_proxy_still_serves(oauth_proxy):
    log = oauth_proxy.log()
    assert "oauth source for openai failed (exit code 3: token store locked: <redacted>)" in log
    assert STDERR_TOKEN not in log
    assert "oauth source for gemini failed (timed out after 1s)" in log
    assert "oauth source for deepseek failed (printed nothing)" in log
    assert log.count("oauth source for openai failed") == 1
    assert "oauth token for anthropic loaded" in log
    raw = http("GET", oauth_proxy.url + "/ccproxy/health")[2]
    assert json.loads(raw)["oauth"] == {"anthropic": "ok", "openai": "exit code 3",
                                        "gemini": "timed out after 1s", "deepseek": "printed nothing"}
    assert b"token store locked" not in raw and STDERR_TOKEN.encode() not in raw


@slow
def test_oauth_token_goes_to_its_provider_and_the_client_header_wins(oauth_proxy, clean_upstream):
    body, headers = cc_request("main")
    headers.pop("x-api-key")
    status, _h, raw = oauth_proxy.messages(body, headers)
    assert status == 200, raw[:300]
    got = clean_upstream.received()[0]["headers"]
    assert got["authorization"] == f"Bearer {OAUTH_TOKEN_1}" and got["user-agent"] == "ccproxy-test/1.0"
    # the client's own Authorization wins over the cached token
    headers["authorization"] = "Bearer sk-ant-oat01-client-own"
    clean_upstream.clear()
    oauth_proxy.messages(body, headers)
    assert clean_upstream.received()[0]["headers"]["authorization"] == "Bearer sk-ant-oat01-client-own"
    # an OpenAI-compatible route never sees the Anthropic token
    long_body, long_headers = cc_request("long")
    long_headers.pop("x-api-key")
    clean_upstream.clear()
    oauth_proxy.messages(long_body, long_headers)
    assert OAUTH_TOKEN_1 not in json.dumps(clean_upstream.received()[0]["headers"])


@slow
def test_upstream_401_refreshes_the_oauth_token(oauth_proxy, clean_upstream):
    def reject_old_token(record):
        if record["headers"].get("authorization") == f"Bearer {OAUTH_TOKEN_1}":
            return 401, {"type": "error", "error": {"type": "authentication_error",
                                                     "message": "OAuth token has expired"}}
        return None
    clean_upstream.scripts.append(reject_old_token)
    oauth_proxy.token_file.write_text(OAUTH_TOKEN_2 + "\n")      # the CLI renewed it meanwhile
    body, headers = cc_request("main")
    headers.pop("x-api-key")
    status, _h, raw = oauth_proxy.messages(body, headers)          # streaming, as Claude Code
    assert status == 200, raw[:300]                    # retried once with the fresh token
    assert [r["headers"]["authorization"] for r in clean_upstream.received()] == [
        f"Bearer {OAUTH_TOKEN_1}", f"Bearer {OAUTH_TOKEN_2}"]
    body["stream"] = False
    status, _h, raw = oauth_proxy.messages(body, headers)
    assert status == 200 and clean_upstream.received()[-1]["headers"]["authorization"] == f"Bearer {OAUTH_TOKEN_2}"
    log = oauth_proxy.log()
    assert "upstream answered 401 for the oauth token of anthropic; fetched a fresh one" in log
    assert "sending the request once more (with the fresh oauth token)" in log
    # a token that stays bad is not retried forever: one retry, then the client gets the 401
    clean_upstream.clear()
    clean_upstream.scripts.append(lambda r: (401, {"type": "error", "error": {
        "type": "authentication_error", "message": "revoked"}}))
    oauth_proxy.token_file.write_text("sk-ant-oat01-third\n")
    status, _h, _raw = oauth_proxy.messages(body, headers)
    assert status == 401 and len(clean_upstream.received()) == 2
    for secret in (OAUTH_TOKEN_1, OAUTH_TOKEN_2, CLIENT_KEY):
        assert secret not in log
    status = run_cli("status", "--json", "--config-dir", str(oauth_proxy.directory))
    assert OAUTH_TOKEN_2 not in status.stdout and '"anthropic": "ok"' in status.stdout


@slow
def test_oauth_required_makes_a_failing_source_fatal_at_start(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text(
        "ccproxy:\n  oauth_required: true\n  oat_sources:\n    anthropic: \"echo nope >&2; exit 4\"\n")
    done = run_cli("start", "--detach", "--config-dir", str(tmp_path))
    assert done.returncode == 1
    assert "oauth source for anthropic failed (exit code 4: nope)" in done.stderr
    assert not (tmp_path / "ccproxy.log").exists()


def test_oauth_source_keeps_the_last_good_token(tmp_path):
    token = tmp_path / "t"
    token.write_text("tok-good\n")
    source = ccproxy.OAuthSource("anthropic", f"cat {token}")
    assert source.load(5) and source.token == "tok-good"
    token.unlink()
    assert not source.load(5) and source.token == "tok-good" and source.failures == 1
    assert "exit code 1" in source.error


def test_background_refresh_backs_off_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(ccproxy, "OAUTH_RETRY_BASE", 0.05)
    config = ccproxy.default_config()
    settings = ccproxy.dataclasses.replace(config.settings, session_ttl=0.08,
                                           oauth_refresh_interval=3600)
    pipeline = ccproxy.Pipeline(ccproxy.dataclasses.replace(config, settings=settings))
    counter = tmp_path / "count"
    source = ccproxy.OAuthSource("anthropic", f"echo x >> {counter}; exit 1")
    assert not source.load(5)                       # failed at start-up
    pipeline.oauth["anthropic"] = source
    worker = ccproxy.Background()
    worker.start(pipeline)
    try:
        time.sleep(1.0)
    finally:
        worker.stop()
    runs = counter.read_text().count("x")
    # 0.05, 0.1, 0.2, 0.4 s...: a handful of retries in a second, not one every sweep (50)
    assert 2 <= runs <= 8, runs
    assert ccproxy.Background.retry_delay(source, 300) == min(300, 0.05 * 2 ** (source.failures - 1))
    source.failures = 0
    assert ccproxy.Background.retry_delay(source, 300) == 300


# ---- Security: browsers, keys, credentials, files, processes ---------------------------------

EVIL_ORIGIN = "http://evil.example"
GOOD_ORIGIN = "http://localhost:5173"
DEPLOYMENT_KEY = "sk-ant-api03-deployment-own-key-0123"
OPENAI_DEPLOYMENT_KEY = "sk-upstream-openai"


def anthropic_error(raw: bytes) -> tuple[str, str]:
    body = json.loads(raw)
    assert body["type"] == "error" and "\n" not in body["error"]["message"]
    return body["error"]["type"], body["error"]["message"]


@slow
def test_bodies_litellm_cannot_parse_get_anthropics_error_json(proxy, clean_upstream):
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": CLIENT_KEY}
    for raw in (b"[1, 2, 3]", b"null", b"this is not json", b'{"model": "claude-opus-4-5", "messages": ['):
        status, got, answer = http("POST", proxy.url + "/v1/messages", raw, headers)
        assert 400 <= status < 600 and got["content-type"] == "application/json", (raw, status, answer[:200])
        body = json.loads(answer)
        assert body["type"] == "error" and body["error"]["type"] in ccproxy.ANTHROPIC_ERROR_STATUS, body
        assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    assert clean_upstream.received("/v1/messages") == []
    assert "LiteLLM failed on /v1/messages before answering: " in proxy.log()             # one line each
    status, _got, answer = proxy.messages(*cc_request("main"))             # and it keeps serving
    assert status == 200, answer[:300]


@slow
def test_browser_requests_are_refused_before_the_upstream(proxy, clean_upstream):
    body, headers = cc_request("main")
    payload = json.dumps(body).encode()
    for extra in ({"origin": EVIL_ORIGIN, "content-type": "text/plain"},
                  {"origin": "null", "content-type": "text/plain"},
                  {"sec-fetch-site": "cross-site", "content-type": "text/plain"},
                  {"origin": "http://127.0.0.1:9", "sec-fetch-site": "same-site"}):
        status, got_headers, raw = http("POST", proxy.url + "/v1/messages", payload, dict(headers, **extra))
        assert status == 403 and anthropic_error(raw)[0] == "permission_error", (extra, raw)
        assert "access-control-allow-origin" not in got_headers
    status, got_headers, _raw = http("OPTIONS", proxy.url + "/v1/messages", b"", {
        "origin": EVIL_ORIGIN, "access-control-request-method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in got_headers
    for path in ("/ccproxy/health", "/ccproxy/session/sess-1", "/v1/models"):
        status, got_headers, _raw = http("GET", proxy.url + path, b"", {"origin": EVIL_ORIGIN})
        assert status == 403 and "access-control-allow-origin" not in got_headers
    assert clean_upstream.received() == []
    status, got_headers, raw = http("POST", proxy.url + "/v1/messages", payload, headers)   # no Origin
    assert status == 200 and "access-control-allow-origin" not in got_headers, raw[:300]
    assert len(clean_upstream.received()) == 1
    assert "refused a request (403 permission_error) from http://evil.example" in proxy.log()


@slow
def test_a_page_on_a_rebound_name_or_another_host_is_refused(proxy, clean_upstream):
    body, headers = cc_request("main")
    for host in ("evil.example:%d" % proxy.port, "attacker.test:%d" % proxy.port):
        status, _h, raw = http("POST", proxy.url + "/v1/messages", json.dumps(body).encode(),
                                   dict(headers, host=host))
        assert status == 403 and anthropic_error(raw)[0] == "permission_error"
    status, _h, _raw = http("GET", proxy.url + "/ccproxy/health", b"", {"host": "evil.example"})
    assert status == 403 and clean_upstream.received() == []
    policy = ccproxy.AccessPolicy()
    assert policy.refusal("/v1/messages", {"host": "localhost:4000"}, "10.0.0.7")[0] == 403
    assert policy.refusal("/v1/messages", {"host": "[::1]:4000"}, "::1") is None
    assert policy.refusal("/ccproxy/health", {"host": "127.0.0.1:4000"}, "127.0.0.1") is None


BROWSER_PAGE = """<!doctype html><title>evil</title><pre id=out>running</pre><script>
const proxy = %(proxy)s, body = JSON.stringify(%(body)s);
async function attempt(mode) {
  try {
    const r = await fetch(proxy + "/v1/messages", {method: "POST", mode, body,
                                                    headers: {"content-type": "text/plain"}});
    return mode + ":" + r.type + ":" + r.status + ":" + (mode === "cors" ? await r.text() : "");
  } catch (e) { return mode + ":error:" + e.name; }
}
(async () => {
  const results = [await attempt("no-cors"), await attempt("cors")];
  await fetch("/report", {method: "POST", body: JSON.stringify(results)});
  document.getElementById("out").textContent = "done";
})();
</script>"""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    missing_prerequisite("chromium is not installed (.ci/run installs the Debian package)")


@slow
def test_a_web_page_in_chromium_cannot_use_the_proxy(proxy, clean_upstream, tmp_path):
    browser = chromium_binary()
    body, _headers = cc_request("main")
    reports: list = []

    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            page = (BROWSER_PAGE % {"proxy": json.dumps(proxy.url), "body": json.dumps(body)}).encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self):
            reports.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                               "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                               "--virtual-time-budget=10000", "--dump-dom",
                               f"http://127.0.0.1:{server.server_address[1]}/"],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert "done" in done.stdout, done.stderr[-2000:]
    assert reports == [["no-cors:opaque:0:", "cors:error:TypeError"]]
    assert clean_upstream.received() == []          # nothing reached the upstream
    assert "refused a request (403 permission_error) from http://127.0.0.1:" in proxy.log()


def artifact(name: str, tmp_path: Path) -> Path:
    """Where a test writes a file worth looking at (CCPROXY_ARTIFACTS, else its tmp dir)."""
    directory = Path(os.environ.get("CCPROXY_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


@contextlib.contextmanager
def chromium_page():
    """A page in headless Chromium (the Debian package) driven through Playwright; yields
    (page, problems): console errors and uncaught page errors."""
    browser_path = chromium_binary()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_prerequisite("playwright is not installed (README's test command installs it)")
    with sync_playwright() as driver:          # (as the page's own CSP leaves it: no bypass)
        browser = driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"], timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            yield page, problems
        finally:
            browser.close()


@slow
def test_dashboard_in_chromium_shows_the_session_just_sent(proxy, clean_upstream, tmp_path):
    from playwright.sync_api import expect
    body, headers = cc_request("haiku", session="dash-haiku")
    assert proxy.messages(body, headers)[0] == 200
    body, headers = cc_request("main", session="dash-opus")
    body["model"] = "claude-opus-4-5"                      # passed through to a model LiteLLM prices
    assert proxy.messages(body, headers)[0] == 200
    clean_upstream.scripts.append(failing(500, "api_error", "think is down", model="up-think"))
    assert proxy.messages(*cc_request("think", session="dash-think"))[0] == 500
    status, got, raw = http("GET", proxy.url + ccproxy.DASHBOARD_PATH)
    assert status == 200 and got["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in got["content-security-policy"] and got["x-frame-options"] == "DENY"
    assert http("GET", proxy.url + ccproxy.DASHBOARD_PATH, headers={"origin": "http://evil.example"})[0] == 403
    with chromium_page() as (page, problems):
        page.goto(proxy.url + ccproxy.DASHBOARD_PATH, timeout=30_000)
        expect(page.locator("#sessions")).to_contain_text("dash-haiku", timeout=30_000)    # locators, not
        expect(page.locator("#errors")).to_contain_text("think is down", timeout=30_000)   # eval: the CSP holds
        row = page.locator("#sessions tr", has_text="dash-haiku").first.inner_text()
        assert "background" in row and "anthropic/up-background" in row
        expect(page.locator("#sessions")).to_contain_text("$0.0006", timeout=30_000)   # 100 in + 5 out, Opus
        assert page.locator("#chart rect").count() == 30
        assert "background" in page.locator("#rules").inner_text()
        assert page.locator("#labels").inner_text().count("failed") >= 1          # think's last request
        page.screenshot(path=str(artifact("dashboard.png", tmp_path)), full_page=True)
    assert problems == []


@slow
def test_dashboard_with_a_proxy_key_takes_it_from_the_fragment_only(keyed_proxy, tmp_path):
    from playwright.sync_api import expect
    assert http("GET", keyed_proxy.url + ccproxy.DASHBOARD_PATH)[0] == 200           # the page: no data
    assert http("GET", keyed_proxy.url + ccproxy.DASHBOARD_DATA_PATH)[0] == 401       # its data: the key
    with chromium_page() as (page, problems):
        page.goto(keyed_proxy.url + ccproxy.DASHBOARD_PATH, timeout=30_000)
        expect(page.locator("#keyform")).to_be_visible(timeout=30_000)
        assert "needs its key" in page.locator("#state").inner_text()
        page.goto("about:blank")            # (a new load: only the fragment differs)
        page.goto(keyed_proxy.url + ccproxy.DASHBOARD_PATH + "#key=" + keyed_proxy.key, timeout=30_000)
        expect(page.locator("#state")).to_contain_text("requests", timeout=30_000)
        assert keyed_proxy.key not in page.url and page.locator("#keyform").is_hidden()
    assert [p for p in problems if "401" not in p] == []        # the keyless load's 401 is the only one
    recorder = tmp_path / "browser"
    recorder.write_text(f"#!/bin/sh\necho \"$1\" > {tmp_path / 'opened'}\n")
    recorder.chmod(0o755)
    done = run_cli("dashboard", "--config-dir", str(keyed_proxy.directory), env={"BROWSER": str(recorder)})
    assert done.returncode == 0 and keyed_proxy.key not in done.stdout + done.stderr
    assert (tmp_path / "opened").read_text().strip() == \
        f"{keyed_proxy.url}{ccproxy.DASHBOARD_PATH}#key={keyed_proxy.key}"
    printed = run_cli("dashboard", "--print", "--config-dir", str(keyed_proxy.directory))
    assert printed.stdout.strip() == keyed_proxy.url + ccproxy.DASHBOARD_PATH


def test_dashboard_tables_over_the_ledger_are_summed_at_most_every_30_s(tmp_path, monkeypatch):
    core = ccproxy.Handler(config=ccproxy.load_config(tmp_path))
    fill_ledger(core.ledger.path, 40)
    first = core.dashboard_figures()
    assert sum(u["requests"] for u in first["users"]) == 40 == sum(d["requests"] for d in first["days"])
    fill_ledger(core.ledger.path, 40)
    assert core.dashboard_figures()["users"] == first["users"]           # read 0 s ago: as they were
    monkeypatch.setattr(ccproxy, "DASHBOARD_TABLES_S", 0.0)
    again = core.dashboard_figures()
    assert sum(u["requests"] for u in again["users"]) == 80 == sum(d["requests"] for d in again["days"])


def test_dashboard_command_without_a_running_proxy_says_how_to_start_it(tmp_path):
    done = run_cli("dashboard", "--config-dir", str(tmp_path))
    assert done.returncode != 0 and "not running" in done.stderr and "start" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2


OWNKEY_RULE = {"name": "ownkey", "rule": "MatchModelRule", "params": {"model_name": "ownkey"}}


@pytest.fixture(scope="module")
def keyed_proxy(upstream, tmp_path_factory):
    """A proxy with the proxy key, an allowed origin, an OAuth source and a deployment that
    has its own api_key: the security cases."""
    token_file = tmp_path_factory.mktemp("keyed-token") / "token"
    token_file.write_text(OAUTH_TOKEN_1 + "\n")

    def write(directory, port):
        path = write_config(directory, upstream, port, settings={
            "proxy_key": True, "allowed_origins": [GOOD_ORIGIN],
            "hooks": ["rule_evaluator", "model_router", "forward_apikey", "forward_oauth"],
            "oat_sources": {"anthropic": f"cat {token_file}"}})
        config = yaml.safe_load(path.read_text())
        config["ccproxy"]["rules"].insert(0, OWNKEY_RULE)
        config["model_list"].insert(0, {"model_name": "ownkey", "litellm_params": {
            "model": "anthropic/up-ownkey", "api_base": upstream.url, "api_key": DEPLOYMENT_KEY}})
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        (directory / "ccproxy.log").write_text("an older log, readable by others\n")
        (directory / "ccproxy.log").chmod(0o644)
    with started_proxy(tmp_path_factory, "keyed", write) as run:
        run.key = (run.directory / "proxy.key").read_text().strip()
        yield run


def with_key(headers: dict, key: str) -> dict:
    return dict(headers, **{ccproxy.PROXY_KEY_HEADER: key})


@slow
def test_proxy_key_missing_or_wrong_is_401_and_bare_or_bearer_works(keyed_proxy, clean_upstream):
    body, headers = cc_request("main")
    for sent in (headers, with_key(headers, "sk-ccproxy-wrong"), with_key(headers, "Bearer nope")):
        status, _h, raw = keyed_proxy.messages(body, sent)
        kind, message = anthropic_error(raw)
        assert status == 401 and kind == "authentication_error" and "x-ccproxy-key" in message
    for path in ("/ccproxy/health", "/ccproxy/session/sess-1"):
        assert http("GET", keyed_proxy.url + path)[0] == 401
    assert http("GET", keyed_proxy.url + "/ccproxy/health",
                headers={ccproxy.PROXY_KEY_HEADER: keyed_proxy.key})[0] == 200
    assert clean_upstream.received() == []
    for value in (keyed_proxy.key, f"Bearer {keyed_proxy.key}"):
        status, _h, raw = keyed_proxy.messages(body, with_key(headers, value))
        assert status == 200, raw[:300]
    sent_up = json.dumps(clean_upstream.received())
    assert keyed_proxy.key not in sent_up and ccproxy.PROXY_KEY_HEADER not in sent_up
    body, headers = cc_request("main", session="sess-keyed-user")
    body["metadata"]["user_id"] = json.dumps({"device_id": "d" * 64, "account_uuid": "acct-keyed",
                                              "session_id": "sess-keyed-user"})
    assert keyed_proxy.messages(body, with_key(headers, keyed_proxy.key))[0] == 200
    assert booked(keyed_proxy.directory, "sess-keyed-user", 1, "user") == [("acct-keyed",)]  # not the key's admin


@slow
def test_an_allowed_origin_is_answered_with_that_origin_only(keyed_proxy, clean_upstream):
    body, headers = cc_request("main")
    headers = with_key(headers, keyed_proxy.key)
    status, got, raw = keyed_proxy.messages(body, dict(headers, origin=GOOD_ORIGIN))
    assert status == 200, raw[:300]
    assert got["access-control-allow-origin"] == GOOD_ORIGIN
    status, got, raw = keyed_proxy.messages(body, dict(headers, origin=EVIL_ORIGIN))
    assert status == 403 and "access-control-allow-origin" not in got


# (request model, client credential) -> (upstream model, the credential headers it must get)
CREDENTIAL_TABLE = [
    ("claude-opus-5-5", {}, "claude-opus-5-5", {"authorization": f"Bearer {OAUTH_TOKEN_1}"}),
    ("claude-opus-5-5", {"x-api-key": CLIENT_KEY}, "claude-opus-5-5", {"x-api-key": CLIENT_KEY}),
    ("claude-opus-5-5", {"authorization": "Bearer sk-ant-oat01-client-own"}, "claude-opus-5-5",
     {"authorization": "Bearer sk-ant-oat01-client-own"}),
    ("claude-ownkey-5", {}, "up-ownkey", {"x-api-key": DEPLOYMENT_KEY}),
    ("claude-ownkey-5", {"x-api-key": CLIENT_KEY}, "up-ownkey", {"x-api-key": DEPLOYMENT_KEY}),
    ("gpt-cheap", {}, "up-cheap", {"authorization": f"Bearer {OPENAI_DEPLOYMENT_KEY}"}),
    ("gpt-cheap", {"x-api-key": CLIENT_KEY}, "up-cheap", {"authorization": f"Bearer {OPENAI_DEPLOYMENT_KEY}"}),
]


@slow
@pytest.mark.parametrize("model,client,upstream_model,expected", CREDENTIAL_TABLE)
def test_credentials_go_exactly_where_they_belong(keyed_proxy, clean_upstream, model, client,
                                                  upstream_model, expected):
    body, headers = cc_request("main")
    body.update(model=model, stream=False)
    headers.pop("x-api-key")
    headers = with_key(dict(headers, **client), keyed_proxy.key)
    status, _h, raw = keyed_proxy.messages(body, headers)
    assert status == 200, raw[:300]
    got = clean_upstream.received()[-1]
    assert got["body"]["model"] == upstream_model
    credentials = {k: v for k, v in got["headers"].items()
                   if k in ("authorization", "x-api-key") and v}
    assert credentials == expected
    others = {OAUTH_TOKEN_1, CLIENT_KEY, DEPLOYMENT_KEY, "sk-ant-oat01-client-own"} - set(
        v.removeprefix("Bearer ") for v in expected.values())
    assert not any(secret in json.dumps(got) for secret in others)


@slow
@pytest.mark.parametrize("client,expected", [
    ({}, {"authorization": f"Bearer {OAUTH_TOKEN_1}"}),
    ({"x-api-key": CLIENT_KEY}, {"x-api-key": CLIENT_KEY}),
])
def test_count_tokens_sends_one_credential(keyed_proxy, clean_upstream, client, expected):
    body, headers = cc_request("main")
    headers.pop("x-api-key")
    status, _h, raw = keyed_proxy.messages(body, with_key(dict(headers, **client), keyed_proxy.key),
                                           path="/v1/messages/count_tokens")
    assert status == 200, raw[:300]
    got = clean_upstream.received("count_tokens")[-1]["headers"]
    assert {k: v for k, v in got.items() if k in ("authorization", "x-api-key") and v} == expected


@slow
def test_files_that_may_hold_secrets_are_private_and_outputs_hold_no_secret(keyed_proxy, clean_upstream):
    directory = keyed_proxy.directory
    body, headers = cc_request("main")
    keyed_proxy.messages(body, with_key(headers, keyed_proxy.key))
    for name in (".ccproxy-litellm.yaml", "proxy.key", "ccproxy.log", "ccproxy.pid", "ccproxy.lock"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600, name
    assert "an older log" in keyed_proxy.log()             # kept, but made private
    # the user's own file holds a literal key and is 0644: validate says so
    assert "holds a literal api_key but others can read it (mode 644)" in keyed_proxy.start_output
    generated = (directory / ".ccproxy-litellm.yaml").read_text()
    assert DEPLOYMENT_KEY in generated          # why it must be private
    outputs = [keyed_proxy.start_output, keyed_proxy.log(), (directory / "ccproxy.pid").read_text(),
               run_cli("status", "--json", "--config-dir", str(directory)).stdout,
               run_cli("status", "--config-dir", str(directory)).stdout,
               http("GET", keyed_proxy.url + "/ccproxy/health",
                    headers={ccproxy.PROXY_KEY_HEADER: keyed_proxy.key})[2].decode(),
               http("GET", keyed_proxy.url + "/ccproxy/session/sess-1",
                    headers={ccproxy.PROXY_KEY_HEADER: keyed_proxy.key})[2].decode()]
    for secret in (keyed_proxy.key, OAUTH_TOKEN_1, CLIENT_KEY, DEPLOYMENT_KEY):
        for text in outputs:
            assert secret not in text


def test_written_files_are_created_private(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        ccproxy.write_private(tmp_path / "secret", "x")
        fd = ccproxy.open_private_append(tmp_path / "log")
        os.close(fd)
        assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "log").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".*.tmp"))
        directory = tmp_path / "cfg"
        assert run_cli("install", "--config-dir", str(directory)).returncode == 0
        assert run_cli("install", "--force", "--config-dir", str(directory)).returncode == 0
        for path in directory.iterdir():
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert directory.stat().st_mode & 0o777 == 0o700
        settings = tmp_path / "claude" / "settings.json"
        settings.parent.mkdir()
        settings.write_text('{"env": {"ANTHROPIC_API_KEY": "sk-ant-in-settings"}}')
        ccproxy.install_statusline(settings, "true")
        backup = settings.with_name(settings.name + ccproxy.STATUSLINE_BACKUP)
        assert backup.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_the_effective_bind_address_is_checked(tmp_path, monkeypatch):
    directory = tmp_path / "cfg"
    directory.mkdir()
    (directory / "ccproxy.yaml").write_text("litellm: {host: 127.0.0.1}\n")
    for extra in (["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "4001", "--host", "::"]):
        done = run_cli("start", "--detach", "--config-dir", str(directory), "--", *extra)
        assert done.returncode == 1 and "refusing to listen on" in done.stderr, (extra, done.stderr)
        assert not (directory / "ccproxy.pid").exists()
    config = ccproxy.load_config(directory)
    moved, rest = ccproxy.apply_server_args(config, ["--port=4011", "--debug", "--num_workers", "1"])
    assert (moved.host, moved.port, rest) == ("127.0.0.1", 4011, ["--debug"])
    for bad in (["--config", "x.yaml"], ["-c", "x.yaml"], ["--port", "many"], ["--port", "0"]):
        with pytest.raises(ccproxy.UsageError):
            ccproxy.apply_server_args(config, bad)
    monkeypatch.setenv(ccproxy.WEAK_KEY_PERMIT_ENV, "True")
    wide = dataclasses.replace(config, host="0.0.0.0", settings=dataclasses.replace(
        config.settings, proxy_key=True))
    assert ccproxy.WEAK_KEY_PERMIT_ENV not in ccproxy.proxy_environment(wide)
    assert ccproxy.proxy_environment(config)[ccproxy.WEAK_KEY_PERMIT_ENV] == "True"


def test_allowed_origins_are_validated(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  allowed_origins: ['*']\n")
    done = run_cli("validate", "--config-dir", str(tmp_path))
    assert done.returncode == 1 and "not an origin: '*'" in done.stdout
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  allowed_origins: [HTTP://LocalHost:3000/]\n")
    assert ccproxy.load_config(tmp_path).settings.allowed_origins == ("http://localhost:3000",)


def test_credentials_in_free_text_are_redacted():
    for secret in ("sk-ant-oat01-abcdef123456", "Bearer abc.def", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
                   "A" * 40, "xoxb-1234567890"):
        assert secret not in ccproxy.redact_secrets(f"failed: {secret} (locked)")
    assert ccproxy.redact_secrets("exit code 3: keychain locked") == "exit code 3: keychain locked"


@slow
def test_stop_never_signals_another_config_dirs_proxy(proxy, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    state = ccproxy.PidFile(proxy.directory).read()[0]
    for content in (str(state.pid), json.dumps({"pid": state.pid, "url": proxy.url}),
                    json.dumps(dict(state.as_dict(), config_dir=str(other)))):
        (other / "ccproxy.pid").write_text(content)
        stop = run_cli("stop", "--config-dir", str(other))
        assert stop.returncode == 0 and "not this config dir's ccproxy proxy" in stop.stdout, stop.stdout
        assert ccproxy.pid_alive(state.pid)
    assert http("GET", proxy.url + "/health/liveliness")[0] == 200


@slow
def test_workers_left_by_a_killed_main_process_are_seen_and_stopped(tmp_path, upstream):
    directory = tmp_path / "cfg"
    port = free_port()
    write_config(directory, upstream, port)
    config = yaml.safe_load((directory / "ccproxy.yaml").read_text())
    config["litellm"]["num_workers"] = 2
    config["ccproxy"]["unshared_workers"] = True
    (directory / "ccproxy.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("start", "--detach", "--config-dir", str(directory)).returncode == 0
    try:
        state = ccproxy.PidFile(directory).read()[0]
        workers = [p for p in ccproxy.group_members(state.pgid) if p != state.pid]
        assert workers, "LiteLLM started no worker processes"
        os.kill(state.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while ccproxy.pid_alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        status = run_cli("status", "--config-dir", str(directory))
        assert status.returncode == 1 and "worker processes" in status.stdout, status.stdout
        again = run_cli("start", "--detach", "--config-dir", str(directory))
        assert again.returncode == 1 and "stop them first" in again.stderr
        stop = run_cli("stop", "--config-dir", str(directory))
        assert stop.returncode == 0 and "workers left by ccproxy" in stop.stdout, stop.stdout
        assert ccproxy.group_members(state.pgid) == []
        assert ccproxy.http_get(f"http://127.0.0.1:{port}/health/liveliness")[0] == 0
    finally:
        state = ccproxy.PidFile(directory).read()[0]
        if state is not None:
            ccproxy.stop_process(state.pid, 5, group=state.pgid)


@slow
def test_concurrent_starts_on_one_port_in_two_dirs_report_one_success(tmp_path, upstream):
    port = free_port()
    dirs = [tmp_path / "a", tmp_path / "b"]
    for directory in dirs:
        write_config(directory, upstream, port)
    racers = [subprocess.Popen([sys.executable, str(SCRIPT), "start", "--detach", "--config-dir", str(d)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dirs]
    try:
        results = [(p.wait(timeout=240), *p.communicate()) for p in racers]
        assert sorted(r[0] for r in results) == [0, 1], results
        winner = dirs[[r[0] for r in results].index(0)]
        state = ccproxy.PidFile(winner).read()[0]
        health = json.loads(http("GET", f"http://127.0.0.1:{port}/ccproxy/health")[2])
        assert health["instance"] == state.instance and health["guarded"] is True
    finally:
        for directory in dirs:
            run_cli("stop", "--config-dir", str(directory))
    assert [ccproxy.PidFile(d).read()[0] for d in dirs] == [None, None]


# ---- Process and CLI ------------------------------------------------------------------------

def cli_env(directory: Path, **extra) -> dict:
    return {"CCPROXY_CONFIG_DIR": str(directory), "HOME": str(directory.parent), **extra}


def test_install_is_idempotent_and_force_keeps_a_backup(tmp_path):
    env = cli_env(tmp_path / "cfg")
    first = run_cli("install", env=env)
    assert first.returncode == 0 and "wrote" in first.stdout
    target = tmp_path / "cfg" / "ccproxy.yaml"
    assert target.read_text() == ccproxy.DEFAULT_CONFIG_YAML
    target.write_text(target.read_text() + "# my edit\n")
    again = run_cli("install", env=env)
    assert again.returncode == 0 and "left unchanged" in again.stdout
    assert target.read_text().endswith("# my edit\n")
    forced = run_cli("install", "--force", env=env)
    assert forced.returncode == 0
    backups = list((tmp_path / "cfg").glob("ccproxy.yaml.*.bak"))
    assert len(backups) == 1 and backups[0].read_text().endswith("# my edit\n")
    assert target.read_text() == ccproxy.DEFAULT_CONFIG_YAML


FAST_COMMANDS = [["--help"], ["status"], ["status", "--json"], ["logs", "-n", "5"],
                 ["run", "true"], ["install"], ["shell", "zsh"], ["shell", "bash"], ["usage"], ["dashboard", "--print"]]


@pytest.mark.parametrize("argv", FAST_COMMANDS, ids=" ".join)
def test_fast_commands_never_import_litellm(tmp_path, argv):
    code = ("import runpy, sys\n"
            f"sys.argv = ['ccproxy.py'] + {argv!r}\n"
            "try:\n"
            f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = sorted(m for m in ('litellm', 'tiktoken', 'fastapi', 'httpx') if m in sys.modules)\n"
            "print('HEAVY:', heavy, file=sys.stderr)\n")
    env = dict(os.environ, **cli_env(tmp_path / "cfg"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "HEAVY: []" in done.stderr, done.stderr[-500:]


def test_usage_errors_exit_2(tmp_path):
    done = run_cli("frobnicate", env=cli_env(tmp_path))
    assert done.returncode == 2
    done = run_cli("run", env=cli_env(tmp_path))
    assert done.returncode == 2 and "run needs a command" in done.stderr


def test_run_sets_the_proxy_urls_and_passes_the_exit_code(tmp_path):
    env = cli_env(tmp_path / "cfg")
    env.pop(ccproxy.GATEWAY_HINTS_ENV, None)
    show = 'echo "$ANTHROPIC_BASE_URL $OPENAI_BASE_URL hints=$CLAUDE_CODE_GATEWAY_HINT_HEADERS"; exit 7'
    done = run_cli("run", "sh", "-c", show, env=env)
    assert done.returncode == 7
    assert done.stdout.strip() == "http://127.0.0.1:4000 http://127.0.0.1:4000/v1 hints=1"
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "ccproxy.yaml").write_text("ccproxy: {gateway_hints: false}\n")
    assert run_cli("run", "sh", "-c", show, env=env).stdout.strip().endswith("hints=")
    missing = run_cli("run", "no-such-command-xyz", env=env)
    assert missing.returncode == 1 and "command not found: no-such-command-xyz" in missing.stderr


def test_status_json_when_not_running(tmp_path):
    done = run_cli("status", "--json", env=cli_env(tmp_path / "cfg"))
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["running"] is False
    assert report["url"] == "http://127.0.0.1:4000" and report["pid"] is None
    assert report["config_files"] == ["<built-in defaults>"]
    assert [r["name"] for r in report["rules"]] == ["background", "web_search", "long_context", "think"]
    assert set(report) >= {"running", "pid", "url", "uptime_s", "config_dir", "rules", "hooks", "models"}


@pytest.mark.parametrize("content", ["garbage\n", "", "{\"pid\": \"x\"}", "999999999"])
def test_corrupt_or_stale_pid_file_is_cleaned_with_a_message(tmp_path, content):
    directory = tmp_path / "cfg"
    directory.mkdir()
    pid_file = directory / "ccproxy.pid"
    pid_file.write_text(content)
    status = run_cli("status", env=cli_env(directory))
    assert status.returncode == 1 and "not running" in status.stdout and "PID file" in status.stdout
    stop = run_cli("stop", env=cli_env(directory))
    assert stop.returncode == 0 and "removed it" in stop.stdout
    assert not pid_file.exists()


def test_pid_of_an_unrelated_live_process_is_never_signalled(tmp_path):
    directory = tmp_path / "cfg"
    directory.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (directory / "ccproxy.pid").write_text(json.dumps({"pid": sleeper.pid, "url": "http://x"}))
        stop = run_cli("stop", env=cli_env(directory))
        assert stop.returncode == 0 and "not this config dir's ccproxy proxy" in stop.stdout
        assert sleeper.poll() is None                     # still alive: not ours, not touched
        assert not (directory / "ccproxy.pid").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_port_in_use_names_the_owner_and_starts_nothing(tmp_path):
    directory = tmp_path / "cfg"
    port = free_port()
    (directory).mkdir()
    (directory / "ccproxy.yaml").write_text(f"litellm: {{port: {port}}}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        done = run_cli("start", "--detach", env=cli_env(directory))
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in done.stderr
    assert not (directory / "ccproxy.pid").exists() and not (directory / "ccproxy.log").exists()


def test_non_loopback_bind_without_a_key_is_refused(tmp_path):
    directory = tmp_path / "cfg"
    directory.mkdir()
    (directory / "ccproxy.yaml").write_text("litellm: {host: 0.0.0.0}\n")
    done = run_cli("start", "--detach", env=cli_env(directory))
    assert done.returncode == 1 and "without a proxy key" in done.stderr
    assert "proxy_key: true" in done.stderr


@slow
def test_start_failure_prints_the_log_tail(tmp_path):
    directory = tmp_path / "cfg"
    directory.mkdir()
    (directory / "ccproxy.yaml").write_text(f"litellm: {{port: {free_port()}}}\n")
    done = run_cli("start", "--detach", "--", "--no-such-litellm-flag", env=cli_env(directory))
    assert done.returncode == 1
    assert "exited with code" in done.stderr and "no-such-litellm-flag" in done.stderr
    assert not (directory / "ccproxy.pid").exists()
    (directory / "ccproxy.log").write_text("an earlier run's last line\n")
    done = run_cli("start", "--detach", "--timeout", "0.5", env=cli_env(directory))   # LiteLLM loads slower
    assert done.returncode == 1 and "did not answer within 0.5 s" in done.stderr, done.stderr
    assert "longer --timeout" in done.stderr and "earlier run" not in done.stderr, done.stderr
    assert not (directory / "ccproxy.pid").exists()


@slow
def test_detached_lifecycle_race_status_logs_restart_stop(tmp_path, upstream):
    directory = tmp_path / "cfg"
    port = free_port()
    write_config(directory, upstream, port)
    (directory / "ccproxy.pid").write_text("garbage")            # cleaned by start
    env = cli_env(directory)
    cmd = [sys.executable, str(SCRIPT), "start", "--detach"]
    full_env = dict(os.environ, **env)
    racers = [subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in racers]
    try:
        codes = sorted(r[0] for r in results)
        assert codes == [0, 1], results
        loser = next(r for r in results if r[0] == 1)
        assert "another `ccproxy start` is running" in loser[2] or "already running" in loser[2]
        status = run_cli("status", "--json", env=env)
        report = json.loads(status.stdout)
        assert status.returncode == 0 and report["running"] and report["url"] == f"http://127.0.0.1:{port}"
        pid = report["pid"]
        assert ccproxy.PidFile(directory).read()[0].pid == pid
        assert "live" in report and report["live"]["status"] == "ok"
        again = run_cli("start", "--detach", env=env)
        assert again.returncode == 1 and "already running" in again.stderr
        logs = run_cli("logs", "-n", "200", env=env)
        assert logs.returncode == 0 and "ccproxy 2" in logs.stdout and "loaded" in logs.stdout
        restart = run_cli("restart", env=env)                       # detached again, as the stopped one was
        assert restart.returncode == 0, restart.stderr
        new_pid = json.loads(run_cli("status", "--json", env=env).stdout)["pid"]
        assert new_pid != pid and not ccproxy.pid_alive(pid)
        config_file = directory / "ccproxy.yaml"
        good = config_file.read_text()
        config_file.write_text(good + "\nccproxy: [unclosed\n")
        broken = run_cli("restart", "--detach", env=env)             # a broken config stops nothing
        config_file.write_text(good)
        assert broken.returncode == 1 and "ccproxy.yaml" in broken.stderr, broken.stderr
        assert json.loads(run_cli("status", "--json", env=env).stdout)["pid"] == new_pid
    finally:
        stop = run_cli("stop", env=env)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert json.loads(run_cli("status", "--json", env=env).stdout)["running"] is False
    assert CLIENT_KEY not in (directory / "ccproxy.log").read_text()


@slow
def test_foreground_start_with_proxy_key(tmp_path, upstream):
    directory = tmp_path / "cfg"
    port = free_port()
    write_config(directory, upstream, port, settings={"proxy_key": True})
    env = dict(os.environ, **cli_env(directory))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "start"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while ccproxy.http_get(url + "/health/liveliness")[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.25)
        key_file = directory / "proxy.key"
        key = key_file.read_text().strip()
        assert key.startswith("sk-ccproxy-") and (key_file.stat().st_mode & 0o777) == 0o600
        status = run_cli("status", "--json", env=cli_env(directory))
        assert json.loads(status.stdout)["running"] and key not in status.stdout
        body, headers = cc_request("main")
        upstream.clear()
        denied = http("POST", url + "/v1/messages", body, headers)
        assert denied[0] != 200 and upstream.received() == []
        headers[ccproxy.PROXY_KEY_HEADER] = f"Bearer {key}"
        status_code, _h, raw = http("POST", url + "/v1/messages", body, headers)
        assert status_code == 200, raw[:300]
        assert upstream.received()[0]["headers"]["x-api-key"] == CLIENT_KEY   # client creds still go up
        shown = run_cli("run", "sh", "-c", "echo \"$ANTHROPIC_CUSTOM_HEADERS\"", env=cli_env(directory))
        assert shown.stdout.strip() == f"x-ccproxy-key: Bearer {key}"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert not (directory / "ccproxy.pid").exists()
    assert key not in out and CLIENT_KEY not in out


def test_stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm():
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                                 "print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stubborn.stdout.readline().strip() == "ready"
    assert ccproxy.stop_process(stubborn.pid, deadline=0.3).startswith("killed")
    stubborn.wait(timeout=5)
    assert ccproxy.stop_process(stubborn.pid) == "already gone"
    assert ccproxy.process_cmdline(999999999) is None


def test_logs_follow_prints_new_lines_until_interrupted(tmp_path):
    directory = tmp_path / "cfg"
    directory.mkdir()
    log_file = directory / "ccproxy.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = run_cli("logs", "-n", "3", env=cli_env(directory))
    assert tail.stdout.splitlines() == ["line 97", "line 98", "line 99"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "logs", "-f", "-n", "1"],
                            env=dict(os.environ, **cli_env(directory)), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "line 99"
        with open(log_file, "a") as f:
            f.write("fresh line\n")
        assert proc.stdout.readline().strip() == "fresh line"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    missing = run_cli("logs", env=cli_env(tmp_path / "none"))
    assert missing.returncode == 1 and "no log at" in missing.stderr


def test_run_reports_a_command_that_cannot_execute(tmp_path):
    script = tmp_path / "notexec"
    script.write_text("echo hi\n")
    done = run_cli("run", str(script), env=cli_env(tmp_path / "cfg"))
    assert done.returncode == 1 and "cannot run" in done.stderr


@slow
def test_status_text_while_running_and_bad_count_request(proxy):
    done = run_cli("status", "--config-dir", str(proxy.directory))
    assert done.returncode == 0 and f"ccproxy is running: {proxy.url}" in done.stdout
    assert "rules: background (MatchModelRule)" in done.stdout and "requests:" in done.stdout
    status, _h, raw = proxy.messages({"model": "x"}, path="/v1/messages/count_tokens")
    assert status == 400 and b"model and messages" in raw


# ---- Shell integration (real bash, zsh and fish) -------------------------------------------

FAKE_CLAUDE = """#!/bin/sh
for a in "$@"; do printf 'ARG[%s]\\n' "$a"; done
printf 'URL[%s]\\n' "$ANTHROPIC_BASE_URL"
printf 'HINTS[%s]\\n' "$CLAUDE_CODE_GATEWAY_HINT_HEADERS"
exit "${FAKE_EXIT:-0}"
"""
QUOTED_ARGS = ["a b", "it's", "$HOME", 'x"y', ""]


def need_shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_prerequisite(f"{name} is not installed (.ci/run installs it: apt-get install zsh fish)")
    return path


@pytest.fixture()
def fake_claude(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text(FAKE_CLAUDE)
    (bin_dir / "claude").chmod(0o755)
    return bin_dir


def shell_run(shell: str, script: str, bin_dir: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_BASE_URL", ccproxy.GATEWAY_HINTS_ENV)}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    return subprocess.run([need_shell(shell), "-c", script], capture_output=True, text=True,
                          env=full, timeout=60)


def source_line(shell: str, directory: Path) -> str:
    cmd = f"{sys.executable} {SCRIPT} shell {shell} --config-dir {directory}"
    return f"{cmd} | source" if shell == "fish" else f"source <({cmd})"


def call_line(shell: str, args: list[str]) -> str:
    if shell == "fish":
        quoted = " ".join("'" + a.replace("\\", "\\\\").replace("'", "\\'") + "'" for a in args)
    else:
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    status = "$status" if shell == "fish" else "$?"
    return f"claude {quoted}; echo RC=" + status


def parse_fake(out: str) -> tuple[list[str], str, str]:
    args = re.findall(r"^ARG\[(.*)\]$", out, re.M)
    url = re.findall(r"^URL\[(.*)\]$", out, re.M)
    rc = re.findall(r"^RC=(\d+)$", out, re.M)
    return args, url[-1] if url else None, rc[-1] if rc else None


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_claude_runs_plain_when_proxy_is_down(shell, tmp_path, fake_claude):
    directory = tmp_path / "cfg"
    done = shell_run(shell, source_line(shell, directory) + "\n" + call_line(shell, QUOTED_ARGS),
                     fake_claude)
    args, url, rc = parse_fake(done.stdout)
    assert (args, url, rc) == (QUOTED_ARGS, "", "0"), done.stderr
    assert "proxy not running" in done.stderr
    failing = shell_run(shell, source_line(shell, directory) + "\n" + call_line(shell, ["x"]),
                        fake_claude, FAKE_EXIT="3")
    assert parse_fake(failing.stdout)[2] == "3"


@slow
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_claude_uses_the_running_proxy(shell, proxy, fake_claude):
    script = source_line(shell, proxy.directory) + "\n" + call_line(shell, QUOTED_ARGS) + \
        "\ncommand claude direct\n"
    done = shell_run(shell, script, fake_claude)
    urls = re.findall(r"^URL\[(.*)\]$", done.stdout, re.M)
    assert parse_fake(done.stdout)[0][:len(QUOTED_ARGS)] == QUOTED_ARGS
    assert urls == [proxy.url, ""], done.stderr                 # `command claude` is the real one
    assert "RC=0" in done.stdout and "proxy not running" not in done.stderr
    assert re.findall(r"^HINTS\[(.*)\]$", done.stdout, re.M) == ["1", ""]      # request classes asked for
    mine = shell_run(shell, script, fake_claude, **{ccproxy.GATEWAY_HINTS_ENV: "0"})
    assert re.findall(r"^HINTS\[(.*)\]$", mine.stdout, re.M) == ["0", "0"]     # the user's own value wins


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_wraps_an_existing_claude_function_and_resourcing_is_safe(shell, tmp_path, fake_claude):
    directory = tmp_path / "cfg"
    define = ("function claude; command claude --from-func $argv; end" if shell == "fish"
              else 'claude() { command claude --from-func "$@"; }')
    script = "\n".join([define, source_line(shell, directory), source_line(shell, directory),
                        call_line(shell, ["q"])])
    done = shell_run(shell, script, fake_claude)
    assert parse_fake(done.stdout)[:2] == (["--from-func", "q"], ""), done.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_wraps_an_existing_alias(shell, tmp_path, fake_claude):
    directory = tmp_path / "cfg"
    script = "\n".join(["alias claude='claude --from-alias'",
                        "setopt aliases 2>/dev/null; shopt -s expand_aliases 2>/dev/null",
                        source_line(shell, directory), call_line(shell, ["q"])])
    done = shell_run(shell, script, fake_claude)
    assert parse_fake(done.stdout)[:2] == (["--from-alias", "q"], ""), done.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_adds_no_prompt_hook(shell, tmp_path, fake_claude):
    probe = "echo PC=${PROMPT_COMMAND:-}" if shell == "bash" else "echo PC=${precmd_functions:-}"
    done = shell_run(shell, source_line(shell, tmp_path / "cfg") + "\n" + probe, fake_claude)
    assert done.stdout.strip().endswith("PC="), done.stdout
    snippet = run_cli("shell", shell, "--config-dir", str(tmp_path)).stdout
    assert "PROMPT_COMMAND" not in snippet and "precmd" not in snippet


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_install_is_idempotent_and_uninstall_restores_the_file(shell, tmp_path, fake_claude):
    home = tmp_path / "home"
    env = {"HOME": str(home), "CCPROXY_CONFIG_DIR": str(tmp_path / "cfg")}
    rc = {"bash": home / ".bashrc", "zsh": home / ".zshrc",
          "fish": home / ".config" / "fish" / "config.fish"}[shell]
    rc.parent.mkdir(parents=True)
    original = "# my settings\nexport EDITOR=vi\nset x 'no newline at end'"
    rc.write_text(original)
    for _ in range(2):
        done = run_cli("shell", "--install", "--shell", shell, env=dict(env, ZDOTDIR="", XDG_CONFIG_HOME=""))
        assert done.returncode == 0, done.stderr
    text = rc.read_text()
    assert text.count(ccproxy.RC_MARK_START) == 1 and text.startswith(original)
    assert sys.executable not in text and "python" not in text     # no process at shell start
    # the installed line works: sourcing the rc file gives the wrapped claude
    script = (f"source {rc}\n" if shell != "fish" else f"source {rc}\n") + call_line(shell, ["z"])
    ran = shell_run(shell, script.replace("export EDITOR=vi", ""), fake_claude, HOME=str(home))
    assert parse_fake(ran.stdout)[0] == ["z"] and "proxy not running" in ran.stderr
    done = run_cli("shell", "--uninstall", "--shell", shell, env=dict(env, ZDOTDIR="", XDG_CONFIG_HOME=""))
    assert done.returncode == 0 and rc.read_text() == original


def test_shell_detects_the_shell_from_env_and_rejects_unknown(tmp_path):
    done = run_cli("shell", env={"SHELL": "/usr/bin/zsh", "CCPROXY_CONFIG_DIR": str(tmp_path)})
    assert done.returncode == 0 and "ccproxy shell integration for zsh" in done.stdout
    done = run_cli("shell", env={"SHELL": "/bin/tcsh", "CCPROXY_CONFIG_DIR": str(tmp_path)})
    assert done.returncode == 2 and "unknown shell 'tcsh'" in done.stderr


def test_shell_snippet_uses_the_configured_url(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("litellm: {port: 4999}\nccproxy: {shell_notice: false}\n")
    snippet = run_cli("shell", "bash", "--config-dir", str(tmp_path)).stdout
    assert "__ccproxy_url='http://127.0.0.1:4999'" in snippet and "__ccproxy_notice=0" in snippet
    assert f"__ccproxy_pidfile='{tmp_path}/ccproxy.pid'" in snippet
    assert (tmp_path / ccproxy.SHELL_CACHE_FILE).exists()           # later shells skip the YAML
    assert "4999" in run_cli("shell", "bash", "--config-dir", str(tmp_path)).stdout
    (tmp_path / "ccproxy.yaml").write_text("litellm: {port: 4998}\n")
    os.utime(tmp_path / "ccproxy.yaml", ns=(1, 1))                 # a different mtime for sure
    snippet = run_cli("shell", "bash", "--config-dir", str(tmp_path)).stdout
    assert "__ccproxy_url='http://127.0.0.1:4998'" in snippet and "__ccproxy_notice=1" in snippet


def test_rc_block_is_replaced_not_duplicated_when_the_command_changes(tmp_path):
    rc = tmp_path / ".bashrc"
    rc.write_text("x=1\n")
    assert ccproxy.rc_install(rc, ccproxy.rc_block("bash", tmp_path / "shell.bash"))
    assert ccproxy.rc_install(rc, ccproxy.rc_block("bash", tmp_path / "other" / "shell.bash"))
    assert rc.read_text().count(ccproxy.RC_MARK_START) == 1 and "/other/shell.bash" in rc.read_text()
    assert ccproxy.rc_uninstall(rc) and rc.read_text() == "x=1\n"
    assert not ccproxy.rc_uninstall(rc) and not ccproxy.rc_uninstall(tmp_path / "missing")


# ---- Docs and example config ---------------------------------------------------------------

def test_example_config_is_the_builtin_default_and_validates(tmp_path):
    example = (HERE / "ccproxy.yaml.example").read_text()
    assert example == ccproxy.DEFAULT_CONFIG_YAML
    shutil.copy(HERE / "ccproxy.yaml.example", tmp_path / "ccproxy.yaml")
    config = ccproxy.load_config(tmp_path)
    assert config.warnings == () and ccproxy.Pipeline(config).problems == []
    done = run_cli("validate", "--config-dir", str(tmp_path))
    assert done.returncode == 0 and "config OK" in done.stdout


def readme_blocks() -> dict[str, str]:
    """Fenced blocks of README.md tagged `<!-- test: NAME -->`."""
    readme = (HERE / "README.md").read_text()
    return {m.group(1): m.group(2) for m in
            re.finditer(r"<!-- test: ([\w.-]+) -->\n```\w*\n(.*?)\n```", readme, re.S)}


def test_readme_commands_parse():
    readme = (HERE / "README.md").read_text()
    lines = [ln.split("#")[0].strip() for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
             for ln in block.splitlines()]
    commands = [ln for ln in lines if re.match(r"(python|uv run|pipx run) ccproxy\.py ", ln)]
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line.split("ccproxy.py", 1)[1].split("|")[0].split(")")[0])
        ccproxy.build_parser().parse_args(argv)            # raises SystemExit on a bad command


def test_readme_custom_rule_and_hook_work(tmp_path):
    blocks = readme_blocks()
    (tmp_path / "my_rules.py").write_text(blocks["my_rules.py"])
    (tmp_path / "ccproxy.yaml").write_text(blocks["my_rules-config"])
    done = run_cli("validate", "--config-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout
    config = ccproxy.load_config(tmp_path)
    long_prompt = {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": "x" * 4000}]}
    ctx = ccproxy.route_request(long_prompt, config)
    assert ctx.decision.label == "think" and ctx.verdicts[0][2].fact == "last message 4000 chars"
    data, ctx = ccproxy.run_pipeline(ccproxy.Pipeline(config), {"model": "claude-opus-5-5", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "short"}]}], "litellm_metadata": {}}, headers={})
    assert ctx.decision.label == "default" and data["litellm_metadata"]["tags"] == ["team:platform"]


@pytest.mark.parametrize("name", ["callback", "providers", "oauth", "fallbacks"])
def test_readme_yaml_snippets_validate(tmp_path, name, capsys):
    snippet = yaml.safe_load(readme_blocks()[name])
    config = yaml.safe_load(ccproxy.DEFAULT_CONFIG_YAML)
    for key, value in snippet.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump(config))
    assert ccproxy.main(["validate", "--json", "--config-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == []


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_readme_rc_line_defines_claude(shell, tmp_path):
    line = readme_blocks()["shell-rc"].split("#")[0].strip().replace("zsh", shell)
    line = line.replace("python ccproxy.py", f"{sys.executable} {SCRIPT}")
    done = subprocess.run([need_shell(shell), "-c", line + "\ntype claude"], capture_output=True,
                          text=True, env=dict(os.environ, CCPROXY_CONFIG_DIR=str(tmp_path)), timeout=60)
    assert "function" in done.stdout, done.stderr


def test_legacy_credentials_key_becomes_the_anthropic_token_source(tmp_path):
    (tmp_path / "ccproxy.yaml").write_text("ccproxy:\n  credentials: \"echo tok\"\n")
    assert ccproxy.load_config(tmp_path).settings.oat_sources == {"anthropic": "echo tok"}


def test_a_renamed_file_is_still_importable_as_ccproxy(tmp_path, monkeypatch):
    renamed = tmp_path / "dotfiles" / "cc-router.py"
    renamed.parent.mkdir()
    shutil.copy(SCRIPT, renamed)
    config = ccproxy.Config(settings=ccproxy.Settings(), litellm={}, directory=tmp_path / "cfg")
    monkeypatch.setattr(ccproxy, "__file__", str(renamed))
    folder = ccproxy.importable_dir(config)
    assert (folder / "ccproxy.py").resolve() == renamed.resolve()
    monkeypatch.setattr(ccproxy, "__file__", str(SCRIPT))
    assert ccproxy.importable_dir(config) == HERE


@slow
@pytest.mark.parametrize("runner", ["uv", "pipx"])
def test_the_pep723_header_runs_with_uv_and_pipx(runner, tmp_path):
    """`uv run ccproxy.py` / `pipx run ccproxy.py` build an environment from the header: the
    provider of a bare `gpt-4o` is only known through LiteLLM, so `explain` proves it is there."""
    if shutil.which(runner) is None:
        missing_prerequisite(f"{runner} is not installed (.ci/run installs it)")
    shutil.copy(SCRIPT, tmp_path / "ccproxy.py")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ccproxy.yaml").write_text(
        "ccproxy:\n  rules: [{name: x, rule: DefaultRule}]\n"
        "model_list: [{model_name: x, litellm_params: {model: gpt-4o}}]\n")
    argv = [runner, "run"] + (["--quiet"] if runner == "uv" else []) + [
        str(tmp_path / "ccproxy.py"), "explain", "--config-dir", str(tmp_path / "cfg")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          input=json.dumps({"model": "claude-opus-5-5", "messages": []}))
    assert done.returncode == 0, done.stderr[-800:]
    assert "-> gpt-4o (provider openai)" in done.stdout


def test_ci_runs_the_readme_test_command():
    readme = (HERE / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```sh\n(.+?)\n```\n<!-- /test-command -->", readme, re.S)
    assert block and "python test_ccproxy.py" in block.group(1)
    assert "README.md" in (HERE / ".ci" / "run").read_text()


# ---- Benchmarks and the suite runner (python test_ccproxy.py [bench]) -----------------------

def bench_request(chars: int, seed: str = "") -> dict:
    """A Claude Code-shaped request of about `chars` characters of JSON: its system prompt and
    tools, then Read/Bash round trips with code-like tool results."""
    body, _ = cc_request("main")
    if chars < 20000:
        body["tools"], body["system"], body["messages"] = [], body["system"][:2], body["messages"][:1]
    i = 0
    while len(json.dumps(body)) < chars:
        chunk = min(12000, max(500, chars // 40))
        text = f"# {seed} file {i}\n" + big_text(chunk // 4)[:chunk]
        body["messages"] += [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": f"I should read module {i} next.",
                 "signature": f"sig.claude-opus-5-5.{seed}{i}" + "x" * 300},
                {"type": "tool_use", "id": f"toolu_{i}", "name": "Read",
                 "input": {"file_path": f"/src/{seed}mod{i}.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}",
                                          "content": [{"type": "text", "text": text}]}]}]
        i += 1
    return body


def naive_count(encoding, request: dict) -> int:
    """ccproxy 1.x's way: join the request's text and encode all of it, every time."""
    counter = ccproxy.TokenCounter()
    counter.count_text = lambda text: 0
    parts = [json.dumps(request.get("system")), json.dumps(request.get("tools"))]
    for m in request["messages"]:
        parts.append(json.dumps(m.get("content")))
    return len(encoding.encode_ordinary("\n".join(parts)))


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


def bench_hooks(sizes=(4_000, 100_000, 500_000, 2_000_000), rounds: int = 25) -> list[dict]:
    """Hook pipeline latency, cold and steady, beside the naive whole-request count."""
    encoding = ccproxy.load_cl100k()
    rows = []
    for size in sizes:
        config = ccproxy.default_config()
        cold, steady, exact, naive = [], [], [], []
        n = max(3, rounds // (4 if size >= 1_000_000 else 1))
        for r in range(n):
            ccproxy.TOKENS.clear()
            pipeline = ccproxy.Pipeline(config)
            body = bench_request(size, seed=f"r{r}s{size}")
            t = time.perf_counter()
            ccproxy.run_pipeline(pipeline, copy.deepcopy(body), headers={})
            cold.append((time.perf_counter() - t) * 1000)
        base = bench_request(size, seed="steady")
        chars = len(json.dumps(base))
        pipeline = ccproxy.Pipeline(config)
        ccproxy.run_pipeline(pipeline, copy.deepcopy(base), headers={})
        counter = ccproxy.TokenCounter()          # its own caches: the pipeline's cannot help it
        counter.count_request(base)
        for r in range(n):
            grown = copy.deepcopy(base)
            grown["messages"].append({"role": "assistant", "content": [
                {"type": "text", "text": f"step {r}: " + "the next thing to do is " * 8}]})
            data = copy.deepcopy(grown)
            t = time.perf_counter()
            ccproxy.run_pipeline(pipeline, data, headers={})
            steady.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            counter.count_request(grown)
            exact.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            naive_count(encoding, grown)
            naive.append((time.perf_counter() - t) * 1000)
            base = grown
        rows.append({"chars": chars, "cold": percentiles(cold),
                     "steady": percentiles(steady), "exact": percentiles(exact),
                     "naive": percentiles(naive)})
    return rows


def print_hook_bench(rows: list[dict]) -> None:
    print("hook pipeline (default rules) and whole-request token count, ms: p50 / p95")
    print(f"{'chars':>10} {'cold':>15} {'steady':>15} {'exact count':>15} {'naive count':>15} {'naive/exact':>12}")
    for row in rows:
        cells = [f"{row[k][0]:7.3f} /{row[k][1]:7.3f}" for k in ("cold", "steady", "exact", "naive")]
        ratio = row["naive"][0] / max(row["exact"][0], 1e-6)
        print(f"{row['chars']:>10,} " + " ".join(f"{c:>15}" for c in cells) + f" {ratio:>11.0f}x")


def rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_memory(counts=(2_000, 20_000)) -> list[tuple[int, float, int]]:
    """(sessions seen, RSS MB, sessions remembered) while a pipeline with the default config
    routes one request and records one thinking signature for each of `counts[-1]` sessions."""
    import gc
    pipeline = ccproxy.Pipeline(ccproxy.default_config())
    template, headers = cc_request("main", session="mem-session")
    rows, seen = [], 0
    for target in counts:
        while seen < target:
            body = copy.deepcopy(template)
            body["metadata"]["user_id"] = body["metadata"]["user_id"].replace("mem-session", f"mem-{seen}")
            ccproxy.run_pipeline(pipeline, body, headers=headers)
            pipeline.sessions.record_signature(f"mem-{seen}", None, f"sig.{seen}" + "x" * 300, "claude-opus-5-5")
            seen += 1
        gc.collect()
        rows.append((seen, rss_mb(), len(pipeline.sessions)))
    return rows


def print_memory_bench(rows) -> None:
    print("memory: RSS after N sessions (one routed request and one thinking signature each)")
    for seen, rss, kept in rows:
        print(f"  {seen:>7,} sessions  {rss:7.1f} MB  (+{rss - rows[0][1]:5.1f} MB; {kept:,} remembered, "
              f"max_sessions {ccproxy.Settings().max_sessions:,})")


def bench_proxy(requests: int = 200, concurrent: int = 200) -> dict:
    """Added latency: the same Claude Code main turn (JSON) sent alternately to a ccproxy
    proxy and to a bare LiteLLM proxy with the same model_list, one fake upstream; then
    `concurrent` streaming requests at once to each (wall time, per-request p50/p95)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    upstream = FakeUpstream()
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, bare_dir = Path(tmp) / "ccproxy", Path(tmp) / "bare"
        bare_dir.mkdir()
        port = free_port()
        write_config(ours_dir, upstream, port, settings={"debug": False})
        bare_config = bare_litellm_config(ours_dir)
        ours = Proxy(ours_dir, port)
        ours.start()
        try:
            with litellm_proxy(bare_dir, bare_config) as bare_url:
                urls = {"bare LiteLLM": bare_url, "ccproxy": ours.url}
                body, headers = cc_request("main", session="bench-proxy")
                samples: dict[str, list[float]] = {name: [] for name in urls}
                for round_ in range(requests + 10):        # interleaved; 10 rounds warm up
                    for name, url in urls.items():
                        t = time.perf_counter()
                        status = http("POST", url + "/v1/messages", body, headers)[0]
                        assert status == 200, (name, status)
                        if round_ >= 10:
                            samples[name].append((time.perf_counter() - t) * 1000)
                stream = dict(body, stream=True)
                burst: dict[str, tuple] = {}
                for name, url in urls.items():
                    def one(_i, url=url):
                        t = time.perf_counter()
                        status = http("POST", url + "/v1/messages", stream, headers)[0]
                        return status, (time.perf_counter() - t) * 1000
                    t = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=concurrent) as pool:
                        done = list(pool.map(one, range(concurrent)))
                    wall = time.perf_counter() - t
                    burst[name] = (wall, *percentiles([ms for _s, ms in done]),
                                   sum(1 for status, _ms in done if status != 200))
        finally:
            ours.stop()
            upstream.close()
    return {"sequential": {name: percentiles(v) for name, v in samples.items()}, "burst": burst,
            "requests": requests, "concurrent": concurrent}


def print_proxy_bench(result: dict) -> None:
    base = result["sequential"]["bare LiteLLM"]
    print(f"a Claude Code main turn through the proxy, {result['requests']} JSON requests each, "
          "ms: p50 / p95 (added to bare LiteLLM)")
    for name, (p50, p95) in result["sequential"].items():
        print(f"  {name:<14} {p50:7.1f} / {p95:7.1f}   +{p50 - base[0]:5.1f}")
    print(f"{result['concurrent']} streaming requests at once: wall s, per request ms p50 / p95, failures")
    for name, (wall, p50, p95, failed) in result["burst"].items():
        print(f"  {name:<14} {wall:6.2f} s  {p50:7.1f} / {p95:7.1f}   {failed} failed")


def finished_call(requested: str, answered: str, session: str) -> dict:
    """The kwargs LiteLLM hands a success callback for one /v1/messages answer (the fields
    ccproxy reads), with ccproxy's decision in its metadata."""
    now = time.time()
    return {"model": answered, "litellm_params": {
        "metadata": {"ccproxy": {"label": "background", "requested_model": requested, "model": "background",
                                 "upstream": answered, "provider": "anthropic"}},
        "proxy_server_request": {"headers": {"user-agent": "claude-cli/2.1.332"},
                                 "body": {"metadata": {"user_id": json.dumps({"session_id": session})}}}},
        "standard_logging_object": {
            "prompt_tokens": 1300, "completion_tokens": 5, "response_cost": 0.00046,
            "model_map_information": {"model_map_value": {"input_cost_per_token": 1e-6}},
            "startTime": now - 1.2, "endTime": now, "completionStartTime": now - 1.0,
            "metadata": {"usage_object": {"cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}}}}


def bench_ledger(calls: int = 5_000) -> dict:
    """What booking a finished request costs on the request path (LiteLLM's success callback,
    on the event loop): usage row, counts, queueing for the writer thread. Ledger on (the
    requested model's price looked up too, or not needed) against ledger off (counts only)."""
    import tempfile
    import litellm  # noqa: F401  (loaded first, as in the proxy)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ledger, requested in (("ledger off (counts only)", False, "anthropic/claude-haiku-4-5"),
                                        ("ledger on, same model", True, "anthropic/claude-haiku-4-5"),
                                        ("ledger on, routed (saving priced)", True, "claude-opus-4-5")):
            (Path(tmp) / "ccproxy.yaml").write_text(yaml.safe_dump({"ccproxy": {"usage_ledger": ledger}}))
            core = ccproxy.Handler(config=ccproxy.load_config(tmp))
            if ledger:
                core.ledger.start()
            samples = []
            for i in range(calls):
                kwargs = finished_call(requested, "anthropic/claude-haiku-4-5", f"s{i % 50}")
                t = time.perf_counter()
                core.record_finished(kwargs, "ok")
                samples.append((time.perf_counter() - t) * 1000)
            assert not ledger or core.ledger.flush(60)
            out[name] = percentiles(samples)
    return out


def fill_ledger(path: Path, rows: int, days: float = 6.0) -> None:
    """`rows` booked requests over the last `days` days: 40 users, two A/B arms and none."""
    import random
    rng = random.Random(7)
    now = time.time()
    booked = [dict(ts=now - rng.random() * days * 86400, session=f"s{i % 3000}", user=f"user-{i % 40}",
                   label="think", arm=rng.choice(("think-a", "think-b", None)), requested_model="claude-opus-4-5",
                   answered_model="anthropic/claude-haiku-4-5", input_tokens=100, output_tokens=10, cost=0.001,
                   requested_cost=0.003, latency_s=rng.random() * 5, status="ok") for i in range(rows)]
    with contextlib.closing(ccproxy.open_ledger(path)) as db, db:
        db.executemany(f"INSERT INTO usage ({', '.join(ccproxy.LEDGER_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(ccproxy.LEDGER_COLUMNS))})",
                       [tuple(r.get(c) for c in ccproxy.LEDGER_COLUMNS) for r in booked])


def bench_dashboard(rows: int = 100_000, calls: int = 10) -> dict:
    """One /ccproxy/dashboard.json answer over a ledger of `rows` requests in a week: with
    its per-day, per-user and per-arm tables summed anew (as on the first call and every
    DASHBOARD_TABLES_S) against the calls in between, ms."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        core = ccproxy.Handler(config=ccproxy.load_config(tmp))
        fill_ledger(core.ledger.path, rows)
        samples: dict[str, list[float]] = {"tables read again": [], "in between": []}
        for _ in range(calls):
            for name in samples:
                if name == "tables read again":
                    core._ledger_tables = None
                t = time.perf_counter()
                figures = core.dashboard_figures()
                samples[name].append((time.perf_counter() - t) * 1000)
                assert len(figures["users"]) == 40 and len(figures["arms"]) == 2
    return {name: percentiles(values) for name, values in samples.items()}


def print_dashboard_bench(rows: dict) -> None:
    base = rows["in between"][0]
    print("dashboard: one dashboard.json over a ledger of 100,000 requests in a week, ms")
    for name, (p50, p95) in rows.items():
        print(f"  {name:<18} p50 {p50:8.2f}  p95 {p95:8.2f}  (x{p50 / base:.0f} of in between)")


def print_ledger_bench(rows: dict) -> None:
    base = rows["ledger off (counts only)"][0]
    print("usage ledger: booking one finished request (success callback, on the event loop), ms")
    for name, (p50, p95) in rows.items():
        print(f"  {name:<36} p50 {p50:.4f}  p95 {p95:.4f}  (x{p50 / base:.2f} of counts only)")


def bench_redis(requests: int = 400) -> dict:
    """Session state on Redis (loopback) against in the process: one request's routing
    (attach, rules, route recorded, thinking blocks' producers looked up) plus the answer's
    signature recorded, ms per request, the two stores interleaved."""
    server = RedisServer()
    try:
        config = ccproxy.default_config()
        stores = {"in the process": ccproxy.SessionStore(),
                  "on Redis": ccproxy.RedisSessionStore({"host": "127.0.0.1", "port": server.port})}
        pipelines = {name: ccproxy.Pipeline(config, sessions=store) for name, store in stores.items()}
        samples: dict[str, list[float]] = {name: [] for name in stores}
        for i in range(requests + 20):
            body, headers = cc_request("main", session=f"bench-{i % 20}")
            body["messages"].append({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t", "signature": f"sig.claude-opus-5-5.{i}"},
                {"type": "text", "text": "ok"}]})
            body["messages"].append({"role": "user", "content": [{"type": "text", "text": f"go on {i}"}]})
            for name, pipeline in pipelines.items():
                data = copy.deepcopy(body)
                t = time.perf_counter()
                _data, ctx = ccproxy.run_pipeline(pipeline, data, headers=headers)
                pipeline.sessions.record_signature(ctx.session_id, ctx.agent_id, f"sig.x.{i}", "claude-opus-5-5")
                if i >= 20:                       # the first rounds warm up
                    samples[name].append((time.perf_counter() - t) * 1000)
        return {name: percentiles(values) for name, values in samples.items()}
    finally:
        server.stop()


def print_redis_bench(rows: dict) -> None:
    base = rows["in the process"][0]
    print("session state: one request routed and its answer's signature recorded, ms: p50 / p95")
    for name, (p50, p95) in rows.items():
        print(f"  {name:<16} {p50:6.3f} / {p95:6.3f}   {p50 - base:+.3f}")


def bench_stream(frames: int = 2_000, rounds: int = 15) -> dict:
    """The streaming hook on an Anthropic SSE answer of `frames` text deltas (the watcher
    parses each frame's JSON to end a broken stream with an error event), against a plain
    pass-through of the same chunks: ms per answer and µs per frame."""
    import asyncio
    message = anthropic_message("claude-opus-5-5", "x", 100)
    events = message_events(message)
    deltas = [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": f"word {i} "}}) for i in range(frames)]
    payload = sse(events[:3] + deltas + events[3:])
    chunks = [payload[i:i + 4096] for i in range(0, len(payload), 4096)]      # as the network hands them
    core = ccproxy.Handler(config=ccproxy.default_config())
    request = {"proxy_server_request": {"url": "http://127.0.0.1:4000/v1/messages"},
               "litellm_metadata": {"ccproxy": {"label": "default", "provider": "anthropic"}}}

    async def source():
        for chunk in chunks:
            yield chunk

    async def through_hook():
        return sum([len(c) async for c in core.stream(source(), request)])

    async def plain():
        return sum([len(c) async for c in source()])

    samples: dict[str, list[float]] = {"pass-through": [], "ccproxy's stream hook": []}
    for _ in range(rounds):
        for name, run in (("pass-through", plain), ("ccproxy's stream hook", through_hook)):
            t = time.perf_counter()
            size = asyncio.run(run())
            samples[name].append((time.perf_counter() - t) * 1000)
    assert size >= len(payload)
    return {"frames": frames + len(events), "rows": {k: percentiles(v) for k, v in samples.items()}}


def print_stream_bench(result: dict) -> None:
    print(f"an SSE answer of {result['frames']:,} frames through the streaming hook, ms: p50 / p95")
    base = result["rows"]["pass-through"][0]
    for name, (p50, p95) in result["rows"].items():
        print(f"  {name:<24} {p50:7.2f} / {p95:7.2f}   +{(p50 - base) * 1000 / result['frames']:.1f} µs a frame")


def bench_cli(runs: int = 15) -> list[tuple[str, float, float]]:
    """Wall time of CLI commands that must stay fast, beside bare `python -c pass`."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CCPROXY_CONFIG_DIR=tmp, HOME=tmp)
        run_cli("install", env=env)
        # The rc line `shell --install` writes runs `python -m ccproxy` (cached bytecode).
        module_env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        module_env["PYTHONPATH"] = str(HERE)
        commands = [("python -c pass", [sys.executable, "-c", "pass"], env),
                    ("ccproxy.py --help", [sys.executable, str(SCRIPT), "--help"], env),
                    ("ccproxy.py status", [sys.executable, str(SCRIPT), "status"], env),
                    ("ccproxy.py shell zsh", [sys.executable, str(SCRIPT), "shell", "zsh"], env),
                    ("-m ccproxy shell zsh", [sys.executable, "-m", "ccproxy", "shell", "zsh"], module_env)]
        rows = []
        for name, cmd, cmd_env in commands:
            subprocess.run(cmd, env=cmd_env, capture_output=True)      # warm: caches, bytecode
            samples = []
            for _ in range(runs):
                t = time.perf_counter()
                subprocess.run(cmd, env=cmd_env, capture_output=True)
                samples.append((time.perf_counter() - t) * 1000)
            rows.append((name, *percentiles(samples)))
    return rows


def bench_count_tokens(tokens: int = 100_000, rounds: int = 15) -> dict:
    """A count_tokens request answered locally (route not Anthropic): whole-request count."""
    cold, warm = [], []
    for r in range(rounds):
        body = {"model": "x", "messages": [{"role": "user", "content": f"# {r}\n" + big_text(tokens)}]}
        counter = ccproxy.TokenCounter()
        t = time.perf_counter()
        n = counter.count_request(body)[0]
        cold.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        counter.count_request(copy.deepcopy(body))
        warm.append((time.perf_counter() - t) * 1000)
    return {"tokens": n, "cold": percentiles(cold), "warm": percentiles(warm)}


def bench_statusline(runs: int = 15) -> list[tuple[str, float, float]]:
    """`statusline` as Claude Code runs it (-m, cached bytecode): proxy down, and up."""
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        upstream = FakeUpstream()
        directory = Path(tmp) / "cfg"
        write_config(directory, upstream, free_port())
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(PYTHONPATH=str(HERE), CCPROXY_CONFIG_DIR=str(directory))
        cmd = [sys.executable, "-m", "ccproxy", "statusline"]
        stdin = json.dumps({"session_id": "sess-1"})
        for state in ("down", "up"):
            proxy = None
            if state == "up":
                proxy = Proxy(directory, ccproxy.load_config(directory).port)
                proxy.start()
                proxy.messages(*cc_request("haiku"))
            try:
                subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True)
                samples = []
                for _ in range(runs):
                    t = time.perf_counter()
                    subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True)
                    samples.append((time.perf_counter() - t) * 1000)
                rows.append((f"statusline, proxy {state}", *percentiles(samples)))
            finally:
                if proxy is not None:
                    proxy.stop()
        upstream.close()
    return rows


SHELL_VARIANTS = {"zsh -i, no integration": None,
                  "zsh -i, installed (snippet file)": "installed",
                  "zsh -i, python at each start": "python"}


def bench_shell(runs: int = 20) -> list[tuple[str, float, float]]:
    """A new interactive zsh: without ccproxy, with the integration `shell --install` writes
    (the rc line sources a static file), and with a line that runs python at each start."""
    import tempfile
    zsh = need_shell("zsh")
    with tempfile.TemporaryDirectory() as tmp:
        base, config_dir = Path(tmp), Path(tmp) / "cfg"
        homes = {}
        for name, kind in SHELL_VARIANTS.items():
            home = base / (kind or "plain")
            home.mkdir()
            (home / ".zshrc").write_text("")
            homes[name] = home
            if kind == "installed":
                run_cli("shell", "--install", "--shell", "zsh", env={
                    "HOME": str(home), "ZDOTDIR": str(home), "CCPROXY_CONFIG_DIR": str(config_dir)})
            elif kind == "python":
                (home / ".zshrc").write_text(f"source <(PYTHONPATH={HERE} {sys.executable} -m ccproxy "
                                             f"--config-dir {config_dir} shell zsh)\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        samples: dict[str, list[float]] = {name: [] for name in SHELL_VARIANTS}
        for round_ in range(runs + 1):             # interleaved, so load affects all alike
            for name, home in homes.items():
                t = time.perf_counter()
                subprocess.run([zsh, "-i", "-c", "exit"], env=dict(env, HOME=str(home), ZDOTDIR=str(home)),
                               capture_output=True, timeout=30)
                if round_:                          # the first round warms caches
                    samples[name].append((time.perf_counter() - t) * 1000)
    return [(name, *percentiles(samples[name])) for name in SHELL_VARIANTS]


def print_shell_bench(rows) -> None:
    base = rows[0][1]
    print("new interactive zsh, ms: p50 / p95 (added to a zsh without ccproxy)")
    for name, p50, p95 in rows:
        print(f"  {name:<34} {p50:7.1f} / {p95:7.1f}   +{p50 - base:5.1f}")


def print_cli_bench(rows) -> None:
    base = rows[0][1]
    print("command wall time, ms: p50 / p95 (ratio to bare python)")
    for name, p50, p95 in rows:
        print(f"  {name:<24} {p50:7.1f} / {p95:7.1f}   {p50 / base:4.1f}x")


def test_benchmark_runs_and_its_incremental_count_is_exact():
    rows = bench_hooks(sizes=(4_000, 100_000), rounds=3)
    assert [r["chars"] >= s for r, s in zip(rows, (4_000, 100_000))] == [True, True]
    body = bench_request(100_000, seed="check")
    counter = ccproxy.TokenCounter()
    counter.count_request({**body, "messages": body["messages"][:-2]})     # the turn before
    incremental = counter.count_request(body)[0]                          # what the bench times
    assert incremental == ccproxy.TokenCounter().count_request(copy.deepcopy(body))[0] > 0
    assert naive_count(ccproxy.load_cl100k(), body) > 0
    shell_rows = bench_shell(runs=2)
    assert [r[0] for r in shell_rows] == list(SHELL_VARIANTS)
    memory = bench_memory(counts=(500, 2_500))
    assert [(seen, kept) for seen, _rss, kept in memory] == [(500, 500), (2_500, 2_000)]   # max_sessions holds


STATIC_CHECKS = (
    ["ruff", "check", "--isolated", "--select", "E,F,W,B", "--line-length", "120", str(SCRIPT)],
    ["mypy", "--ignore-missing-imports", "--no-error-summary", str(SCRIPT)],
)


def run_suite() -> int:
    """Static checks, then the whole suite under coverage (this file's subprocesses
    included); fails under 90%."""
    import tempfile
    for check in STATIC_CHECKS:
        done = subprocess.run([sys.executable, "-m", *check], cwd=HERE)
        if done.returncode != 0:
            print(f"static check failed: {' '.join(check[:2])}")
            return done.returncode
    with tempfile.TemporaryDirectory() as tmp:
        rc = Path(tmp) / "coveragerc"
        rc.write_text(f"[run]\nbranch = true\nparallel = true\ndata_file = {tmp}/.coverage\n"
                      f"include = {SCRIPT}\npatch = subprocess\nsigterm = true\n"
                      "[report]\nshow_missing = true\nskip_covered = false\n")
        env = dict(os.environ, COVERAGE_RCFILE=str(rc))
        done = subprocess.run([sys.executable, "-m", "coverage", "run", "-m", "pytest", "-q",
                               "-rs", "--timeout=600", "-p", "no:cacheprovider",
                               "-o", "markers=slow: end-to-end tests with real processes",
                               str(Path(__file__).resolve())],
                              env=env, cwd=HERE)
        if done.returncode not in (0,):
            print(f"tests failed (pytest exit code {done.returncode}"
                  + (": no tests collected" if done.returncode == 5 else "") + ")")
            return done.returncode or 1
        subprocess.run([sys.executable, "-m", "coverage", "combine", "-q"], env=env, cwd=tmp)
        report = subprocess.run([sys.executable, "-m", "coverage", "report",
                                 "--fail-under=90"], env=env, cwd=tmp)
        return report.returncode


def print_count_bench(row: dict) -> None:
    print(f"count_tokens answered locally, {row['tokens']:,} tokens, ms p50 / p95: "
          f"cold {row['cold'][0]:.2f} / {row['cold'][1]:.2f}, "
          f"same request again {row['warm'][0]:.3f} / {row['warm'][1]:.3f}")


# `python test_ccproxy.py bench [NAME]`: each benchmark, measured then printed.
BENCHMARKS = {
    "hooks": lambda: print_hook_bench(bench_hooks()),
    "count": lambda: print_count_bench(bench_count_tokens()),
    "cli": lambda: print_cli_bench(bench_cli() + bench_statusline()),
    "shell": lambda: print_shell_bench(bench_shell()),
    "memory": lambda: print_memory_bench(bench_memory()),
    "proxy": lambda: print_proxy_bench(bench_proxy()),
    "ledger": lambda: print_ledger_bench(bench_ledger()),
    "redis": lambda: print_redis_bench(bench_redis()),
    "stream": lambda: print_stream_bench(bench_stream()),
    "dashboard": lambda: print_dashboard_bench(bench_dashboard()),
}

if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        which = sys.argv[2] if len(sys.argv) > 2 else "all"
        for name, run in BENCHMARKS.items():
            if which in ("all", name):
                run()
        sys.exit(0)
    if sys.argv[1:2] == ["v1-suite"]:
        sys.exit(run_v1_suite(Path(sys.argv[2]), Path(sys.argv[3])))
    sys.exit(run_suite())
