"""Tests for ccproxy.py: real LiteLLM proxy processes against a fake upstream on 127.0.0.1.

Run: python -m pytest -q test_ccproxy.py      (add -m "not slow" to skip the end-to-end ones)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import ccproxy

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ccproxy.py"
FIXTURES = HERE.parent / "shared" / "fixtures" / "claude-code"
HAVE_FIXTURES = FIXTURES.is_dir()
CLIENT_KEY = "sk-ant-api03-client-secret-0123456789"
slow = pytest.mark.slow


# ---- Fixtures: fake upstream, Claude Code-shaped requests, proxy -----------------------------

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
                status, ctype, payload = upstream.answer(record)
                head = (f"HTTP/1.1 {status} OK\r\ncontent-type: {ctype}\r\n"
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
    def answer(self, record: dict) -> tuple[int, str, bytes]:
        path, body = record["path"], record["body"]
        for script in list(self.scripts):
            result = script(record)
            if result is not None:
                status, reply = result
                return status, "application/json", json.dumps(reply).encode()
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


def sse(events: list[tuple[str, dict]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def anthropic_sse(model: str, text: str, input_tokens: int) -> bytes:
    start = anthropic_message(model, "", input_tokens)
    start["content"], start["stop_reason"] = [], None
    start["usage"] = {"input_tokens": input_tokens, "output_tokens": 1}
    return sse([
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                              "stop_sequence": None},
                           "usage": {"output_tokens": 5}}),
        ("message_stop", {"type": "message_stop"}),
    ])


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


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if body is not None else None
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


def write_config(directory: Path, upstream: FakeUpstream, port: int, **overrides) -> Path:
    """A one-file ccproxy.yaml whose model_list points at the fake upstream."""
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
            ],
        },
        "model_list": [
            {"model_name": "background", "litellm_params": {"model": "anthropic/up-background", "api_base": base}},
            {"model_name": "web_search", "litellm_params": {"model": "anthropic/up-search", "api_base": base}},
            {"model_name": "long_context", "litellm_params": {"model": "openai/up-long", "api_base": base + "/v1", "api_key": "sk-upstream-openai"}},
            {"model_name": "think", "litellm_params": {"model": "anthropic/up-think", "api_base": base}},
            {"model_name": "cheap", "litellm_params": {"model": "openai/up-cheap", "api_base": base + "/v1", "api_key": "sk-upstream-openai"}},
            {"model_name": "claude-*", "litellm_params": {"model": "anthropic/claude-*", "api_base": base}},
        ],
        "litellm_settings": {"callbacks": ["ccproxy.handler"]},
    }
    for key, value in overrides.items():
        config[key] = value
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


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    directory = tmp_path_factory.mktemp("proxy")
    port = free_port()
    write_config(directory, upstream, port)
    run = Proxy(directory, port)
    run.start()
    yield run
    run.stop()


@pytest.fixture()
def clean_upstream(upstream):
    upstream.clear()
    return upstream
