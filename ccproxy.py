#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "litellm[proxy]>=1.108.7,<1.109",
#     "pyyaml>=6.0",
#     "tiktoken>=0.7",
# ]
# ///
"""ccproxy: route Claude Code's requests through LiteLLM's proxy by rules.

One file that is at once a command, a LiteLLM callback and a library::

    python ccproxy.py start              # run LiteLLM's proxy with ccproxy's rules
    uv run ccproxy.py start              # the same, dependencies from the header above
    ccproxy.handler                      # LiteLLM `callbacks:` entry, file beside config.yaml
    source <(python ccproxy.py shell zsh)

A config (``~/.ccproxy/ccproxy.yaml``) names rules; the first that matches a request picks the
``model_list`` entry of the same name, and no match keeps the model Claude Code asked for::

    ccproxy:
      rules:
        - {name: background, rule: MatchModelRule, params: {model_name: haiku}}
        - {name: think, rule: ThinkingRule}
    model_list: [{model_name: think, litellm_params: {model: anthropic/claude-opus-5-5}}]
"""

from __future__ import annotations

__version__ = "2.0.0.dev0"
__all__ = [
    "CCProxyError", "ConfigError", "RuleError", "OAuthError", "ProcessError",
    "Config", "load_config", "count_tokens", "count_request_tokens", "Handler",
    "Rule", "Verdict", "ClassificationRule", "DefaultRule", "MatchModelRule", "ThinkingRule",
    "TokenCountRule", "MatchToolRule", "WebSearchRule", "SubagentRule", "ImageRule",
    "RequestClassRule",
    "RequestContext", "RoutingDecision", "Pipeline", "run_pipeline", "route_request",
    "validate_config", "SessionStore",
    "rule_evaluator", "model_router", "forward_oauth", "forward_apikey", "extract_session_id",
    "capture_headers", "main",
]

# ---- Imports -------------------------------------------------------------------------------
# Standard library only. litellm, tiktoken and yaml load inside the functions that need them, so
# `python ccproxy.py --help` and `shell zsh` stay fast.

import argparse
import bisect
import collections
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import functools
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import types


class _ModuleAlias(types.ModuleType):
    """A module name that reads and writes this module's globals (see
    _register_module_names): `mock.patch("ccproxy.hooks.get_config")` patches the one
    every 1.x path sees."""

    def __getattr__(self, name: str) -> Any:
        if name in _GLOBALS:
            return _GLOBALS[name]
        return _GLOBALS["__getattr__"](name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):
            super().__setattr__(name, value)
        else:
            _GLOBALS[name] = value

    def __delattr__(self, name: str) -> None:
        if name.startswith("__"):
            super().__delattr__(name)
        else:
            del _GLOBALS[name]


def _register_module_names() -> None:
    """Make `import ccproxy` and ccproxy 1.x's `ccproxy.rules`, `ccproxy.hooks`,
    `ccproxy.handler` resolve to this very module, however it was loaded.

    Run as a script it is `__main__`; LiteLLM loads a `ccproxy.py` beside its config with
    `spec_from_file_location` without registering it. Either way custom rules that
    `from ccproxy import Rule` must get these classes, not a second copy of the file.
    """
    if __name__ not in ("__main__", "ccproxy"):
        return
    this = sys.modules.get(__name__)
    if this is None or (__name__ == "__main__" and this.__dict__ is not _GLOBALS):
        this = _ModuleAlias("ccproxy")
    sys.modules.setdefault("ccproxy", this)
    for sub in ("rules", "hooks", "handler", "config", "classifier", "router"):
        sys.modules.setdefault(f"ccproxy.{sub}", _ModuleAlias(f"ccproxy.{sub}"))


_GLOBALS = globals()
_register_module_names()

# ---- Constants and defaults ----------------------------------------------------------------
# Names, limits and the default configuration that `install` writes and that applies when no
# config file exists. Nothing here computes anything.

log = logging.getLogger("ccproxy")

CONFIG_FILE = "ccproxy.yaml"
LITELLM_CONFIG_FILE = "config.yaml"
ENV_CONFIG_DIR = "CCPROXY_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "~/.ccproxy"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4000
METADATA_KEY = "ccproxy"                    # our key inside LiteLLM's litellm_metadata
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "set-cookie",
                            "proxy-authorization", "x-goog-api-key", "api-key"})
# Claude Code's thinking budget default (MAX_THINKING_TOKENS); a request above it asked for more.
CLAUDE_CODE_DEFAULT_BUDGET = 31999
# Models that answer 400 to `thinking: {type: disabled}` ("Use thinking.type.adaptive and
# output_config.effort") and to `enabled` budgets: Claude Code 2.1.332's default among them.
ADAPTIVE_ONLY_MODELS = ("claude-opus-5*", "claude-fable-5*")
# `retry_on` kinds and the fields of LiteLLM's router_settings.retry_policy each one sets.
RETRY_KINDS = {"rate_limit": ("RateLimitErrorRetries",),           # 429
               "server_error": ("InternalServerErrorRetries",),    # 500, 529 overloaded
               "unavailable": ("ServiceUnavailableErrorRetries",),  # 503
               "timeout": ("TimeoutErrorRetries",),
               "connection": ("DefaultRetries",)}                  # refused, reset, other
# Failures retrying cannot fix: never retried by LiteLLM when ccproxy writes the policy.
NEVER_RETRIED = ("BadRequestErrorRetries", "AuthenticationErrorRetries",
                 "NotFoundErrorRetries", "ContentPolicyViolationErrorRetries")
# Claude Code's baseline context (system prompt + tool definitions) is about this many tokens.
CLAUDE_CODE_BASELINE_TOKENS = 19000
WEB_SEARCH_TOOL_PREFIX = "web_search"
INSTALL_HINT = ("run it with `uv run ccproxy.py ...` (reads the dependencies from the file), or "
                "install them: python -m pip install 'litellm[proxy]>=1.108.7,<1.109' pyyaml "
                "tiktoken")
PROXY_KEY_FILE = "proxy.key"            # the proxy key, in the config dir (mode 0600)
START_LOG_HEADER = "==== ccproxy start"  # the log line that begins each detached start
LEDGER_FILE = "usage.db"                # the usage ledger (SQLite), in the config dir (0600)
PROXY_KEY_HEADER = "x-ccproxy-key"      # where clients send it
PROXY_KEY_ENV = "CCPROXY_PROXY_KEY"     # how `start` hands it to the LiteLLM process
INSTANCE_ENV = "CCPROXY_INSTANCE"       # a per-start nonce every proxy process inherits
HEALTH_PATH = "/ccproxy/health"
METRICS_PATH = "/ccproxy/metrics"
MODELS_PATH = "/v1/models"
ROUTE_MODEL_PREFIX = "claude-route-"   # a route as a model Claude Code's /model can pick
SESSION_PATH = "/ccproxy/session"
DASHBOARD_PATH = "/ccproxy/"
DASHBOARD_DATA_PATH = "/ccproxy/dashboard.json"
DASHBOARD_TABLES_S = 30.0       # how stale the dashboard's per-day, per-user and per-arm tables may be

DEFAULT_HOOKS = ("rule_evaluator", "model_router", "forward_apikey", "extract_session_id")

# GET /ccproxy/: one page, no build step and nothing from elsewhere (works offline). It holds
# no data: its script reads /ccproxy/dashboard.json every few seconds, sending the proxy key
# that `dashboard` puts in the URL's #fragment (never sent to a server, dropped from the
# address bar on load). Everything a client may have chosen (session ids, model names) goes
# in as text, never as HTML.
# The page may run its own inline script and fetch from this origin, nothing else; no frame may hold it.
DASHBOARD_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src "
                               "'unsafe-inline'; connect-src 'self'; img-src data:; "
                               "frame-ancestors 'none'",
    "x-frame-options": "DENY", "referrer-policy": "no-referrer", "cache-control": "no-store"}
DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ccproxy</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}
td,th{padding:.25em .7em;border-bottom:1px solid #e4e4e4;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums} #state{color:#666} .bad{color:#b00020}
svg{background:#fff;border:1px solid #e4e4e4} .empty{color:#888;font-style:italic}
</style></head><body>
<h1>ccproxy</h1><div id="state">loading...</div>
<form id="keyform" hidden><input id="key" type="password" placeholder="proxy key (proxy.key)" autocomplete="off">
<button>use</button></form>
<h2>Sessions</h2><table id="sessions"></table>
<h2>Cost per day (last 30 days)</h2>
<svg id="chart" width="640" height="160" role="img"></svg><div id="totals"></div>
<h2>Users (last 7 days)</h2><table id="users"></table>
<h2>A/B arms (last 7 days)</h2><table id="arms"></table>
<h2>Rules</h2><table id="rules"></table>
<h2>Routes</h2><table id="labels"></table>
<h2>Recent errors</h2><table id="errors"></table>
<script>
"use strict";
const KEY = "ccproxy-key", SVG = "http://www.w3.org/2000/svg";
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("key")) {
  sessionStorage.setItem(KEY, fragment.get("key"));
  history.replaceState(null, "", location.pathname);
}
const usd = v => v == null ? "-" : "$" + v.toFixed(Math.abs(v) >= 0.1 ? 2 : 4);
const num = v => v == null ? "-" : Number(v).toLocaleString("en-US");
const $ = id => document.getElementById(id);

function fill(id, head, rows, empty) {
  const table = $(id), top = table.insertRow();
  table.replaceChildren(top);
  for (const [title, numeric] of head) {
    const th = document.createElement("th");
    th.textContent = title;
    th.className = numeric ? "n" : "";
    top.appendChild(th);
  }
  if (!rows.length) {
    const cell = table.insertRow().insertCell();
    cell.colSpan = head.length;
    cell.className = "empty";
    cell.textContent = empty;
  }
  for (const row of rows) {
    const tr = table.insertRow();
    row.forEach((value, i) => {
      const cell = tr.insertCell();
      cell.textContent = value;
      cell.className = head[i][1] ? "n" : "";
    });
  }
}

function svg(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function chart(days) {
  const box = $("chart"), width = 640 / Math.max(days.length, 1);
  const max = Math.max(0.0001, ...days.map(d => d.cost_usd));
  box.replaceChildren();
  days.forEach((d, i) => {
    const h = Math.round(130 * d.cost_usd / max);
    const bar = svg("rect", {x: i * width + 2, y: 140 - h, width: Math.max(width - 4, 1),
                             height: h, fill: "#4a6fa5"});
    bar.appendChild(svg("title", {}, `${d.day}: ${usd(d.cost_usd)}, saved ${usd(d.saved_usd)}`));
    box.appendChild(bar);
  });
  const span = days.length ? `${days[0].day} .. ${days[days.length - 1].day}, highest ${usd(max)}` : "";
  box.appendChild(svg("text", {x: 4, y: 155, "font-size": 11}, span));
}

function show(d) {
  const h = d.health;
  $("state").className = h.status === "ok" ? "" : "bad";
  $("state").textContent = [`ccproxy ${h.version} on LiteLLM ${h.litellm}`, h.status,
    `${num(h.requests)} requests`, `up ${Math.round(h.uptime_s)} s`,
    `updated ${new Date().toLocaleTimeString()}`].join(" \\u00b7 ");
  fill("sessions", [["session"], ["agent"], ["requested"], ["route"], ["answering model"],
                    ["requests", 1], ["switches", 1], ["tokens re-sent", 1], ["cost", 1],
                    ["saved", 1], ["idle", 1]],
       d.sessions.map(s => [s.session_id.slice(0, 12), s.agent_id || "", s.requested_model,
                            s.last_label, s.last_upstream, num(s.requests), num(s.switches),
                            num(s.uncached_tokens), usd(s.cost_usd), usd(s.saved_usd),
                            `${Math.round(s.idle_s)} s`]),
       "no session seen yet");
  chart(d.days);
  const sum = key => d.days.reduce((total, day) => total + day[key], 0);
  $("totals").textContent = `30 days: ${usd(sum("cost_usd"))} spent, ` +
    `${usd(sum("saved_usd"))} saved by routing, ${num(sum("requests"))} requests`;
  const secs = v => v == null ? "-" : v.toFixed(2) + " s";
  fill("users", [["user"], ["requests", 1], ["failed", 1], ["tokens", 1], ["cost", 1], ["saved", 1]],
       d.users.map(u => [u.user.length > 24 ? u.user.slice(0, 24) + "..." : u.user,
                         num(u.requests), num(u.failed),
                         num(u.input_tokens + u.output_tokens), usd(u.cost_usd), usd(u.saved_usd)]),
       "no user booked yet");
  fill("arms", [["arm"], ["requests", 1], ["failed", 1], ["p50", 1], ["p95", 1], ["tokens", 1],
                ["cost", 1]],
       d.arms.map(a => [a.arm, num(a.requests), num(a.failed), secs(a.latency_p50_s),
                        secs(a.latency_p95_s), num(a.input_tokens + a.output_tokens),
                        usd(a.cost_usd)]),
       "no rule with an `ab` split has matched");
  fill("rules", [["rule"], ["evaluated", 1], ["matched", 1], ["failed", 1]],
       Object.entries(h.rule_counts).map(([r, c]) => [r, num(c.evaluated), num(c.matched),
                                                     num(c.failed)]),
       "no rule evaluated yet");
  fill("labels", [["label"], ["deployment"], ["last request"]],
       Object.entries(h.labels).map(([l, v]) => [l, v.deployment ||
         (l === "default" ? "(the requested model)" : "(no entry)"),
         v.last_ok == null ? "-" : v.last_ok ? "ok" : "failed"]),
       "no routes");
  fill("errors", [["time"], ["label"], ["model"], ["error"]],
       d.errors.map(e => [new Date(e.ts * 1000).toLocaleString(), e.label || "",
                          e.answered_model || "", e.error || ""]),
       "none");
}

async function refresh() {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? {"x-ccproxy-key": key, "authorization": "Bearer " + key} : {};
  try {
    const answer = await fetch("dashboard.json", {headers, cache: "no-store"});
    $("keyform").hidden = answer.status !== 401;
    if (answer.status === 401) {
      $("state").textContent = "this proxy needs its key (`python ccproxy.py dashboard` brings it along)";
      $("state").className = "bad";
      return;
    }
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    show(await answer.json());
  } catch (err) {
    $("state").textContent = `cannot reach the proxy (${err.message}); retrying`;
    $("state").className = "bad";
  }
}
$("keyform").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  refresh();
});
refresh();
setInterval(refresh, 3000);
</script></body></html>
"""

DEFAULT_CONFIG_YAML = """\
# ccproxy configuration: one file holds ccproxy's rules and LiteLLM's own sections.
# Reference: README.md, "Configuration". Check it with: python ccproxy.py validate
# See why a request went where it did with: python ccproxy.py explain request.json

# How `python ccproxy.py start` runs LiteLLM's proxy.
litellm:
  host: 127.0.0.1          # loopback only; another address needs a proxy key (README, "Security")
  port: 4000
  num_workers: 1

ccproxy:
  debug: false
  # No rule matched: keep the model Claude Code asked for (false: use the `default` entry).
  default_model_passthrough: true
  hooks:
    - rule_evaluator         # label the request with the first rule that matches
    - model_router           # send it to the model_list entry named like the label
    - forward_apikey         # forward the client's own credentials to Anthropic deployments
    - extract_session_id     # session id for logs and callbacks
    # - forward_oauth        # inject a token from oat_sources (README, "OAuth")
  # oat_sources:
  #   anthropic: "jq -r '.claudeAiOauth.accessToken' ~/.claude/.credentials.json"
  # What it did and cost: `python ccproxy.py usage`, GET /ccproxy/metrics, `... dashboard`.
  # Spans with each routing decision to an OpenTelemetry collector (README, "Tracing"):
  # tracing: {otel: {endpoint: "http://127.0.0.1:4318"}}
  # For a team (README, "Running for a team"; state is shared on router_settings' Redis):
  # budgets:
  #   - {name: daily, per: user, period: day, usd: 20, action: block, alert_at: 0.8}
  # users: {"intern-*": {labels: [background, default]}}
  # cache: {type: local, ttl: 600}     # LiteLLM's response cache for identical requests
  # Rules run top to bottom; the first match names the model_list entry to use.
  rules:
    - name: background       # Claude Code's haiku traffic (any haiku release)
      rule: MatchModelRule
      params: {model_name: haiku}
    - name: web_search       # the web-search sub-request (server tool web_search_*)
      rule: WebSearchRule
    - name: long_context     # whole request above the threshold, counted with tiktoken
      rule: TokenCountRule
      params: {threshold: 120000}
    - name: think            # a raised thinking budget or effort level (not every turn)
      rule: ThinkingRule
      params: {min_budget_tokens: 32000, effort: [xhigh, max]}

# LiteLLM's sections (https://docs.litellm.ai/docs/proxy/configs). Deployments without an
# api_key use the credentials Claude Code sends (forward_apikey above).
model_list:
  - model_name: background
    litellm_params:
      model: anthropic/claude-haiku-5-5
  - model_name: web_search
    litellm_params:
      model: anthropic/claude-sonnet-5-5
  - model_name: long_context
    litellm_params:
      model: anthropic/claude-sonnet-5-5
      # Or a long-context model elsewhere, e.g. Gemini (key from the environment):
      # model: gemini/gemini-2.5-pro
      # api_key: os.environ/GEMINI_API_KEY
  - model_name: think
    litellm_params:
      model: anthropic/claude-opus-5-5
  # Every other Claude model passes through unchanged.
  - model_name: "claude-*"
    litellm_params:
      model: "anthropic/claude-*"
  # An OpenAI-compatible server (chat completions) works as a plain entry:
  # - model_name: cheap
  #   litellm_params:
  #     model: openai/deepseek-chat
  #     api_base: https://api.deepseek.com/v1
  #     api_key: os.environ/DEEPSEEK_API_KEY

litellm_settings:
  callbacks: [ccproxy.handler]
  drop_params: true

general_settings: {}
"""

# ---- Errors --------------------------------------------------------------------------------
# Each error carries what the user should do next; the CLI maps them to exit codes.


class CCProxyError(Exception):
    """Base of ccproxy's errors: a message plus what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  -> {self.hint}" if self.hint else base


class ConfigError(CCProxyError):
    """The configuration cannot be read or is invalid; `problems` lists each one."""

    def __init__(self, message: str, hint: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = problems or [message]


class RuleError(CCProxyError):
    """A rule or hook cannot be loaded or built from its config entry."""


class OAuthError(CCProxyError):
    """An OAuth token source failed."""


class ProcessError(CCProxyError):
    """Starting, stopping or finding the proxy process failed."""


class UsageError(CCProxyError):
    """The command line is wrong."""

    exit_code = 2


# ---- LiteLLM adapter -----------------------------------------------------------------------
# Every contact with LiteLLM beyond its documented config, each with what it relies on, the
# version it was checked on (LITELLM_CHECKED) and a check run at start. Only this section
# imports litellm (lazily) or touches its internals; the sections below talk to these functions.

LITELLM_CHECKED = "1.108.7"
PROXY_MODULE = "litellm.proxy.proxy_cli"
# LiteLLM refuses to start without a master key unless this is set (auth/master_key_boot_check.py)
WEAK_KEY_PERMIT_ENV = "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"
# The proxy's own health checks run under this key alias (constants.py, the health account).
HEALTH_CHECK_KEY = "litellm-internal-health-check"
# The user LiteLLM gives a request made with its master key (constants.py): nobody's own.
PROXY_ADMIN_USER = "default_user_id"
# A metadata flag: answer with the upstream model name, not the requested one (constants.py).
RAW_MODEL_NAME_FLAG = "_complexity_router_return_raw_model_name"
# Capabilities that make LiteLLM pass `thinking` and `output_config` to a model unchanged.
THINKING_PASSTHROUGH = {"supports_adaptive_thinking": True, "supports_legacy_thinking": True,
                        "thinking_always_on": False, "litellm_provider": "anthropic"}
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
# The hooks ccproxy defines on its CustomLogger, with the parameters it takes, in order.
LITELLM_HOOKS = {
    "async_pre_call_hook": ("user_api_key_dict", "cache", "data", "call_type"),
    "async_post_call_response_headers_hook": ("data", "user_api_key_dict", "response"),
    "async_post_call_success_hook": ("data", "user_api_key_dict", "response"),
    "async_post_call_streaming_iterator_hook": ("user_api_key_dict", "response",
                                                "request_data"),
    "async_post_call_failure_deployment_hook": ("request_data", "exception", "call_type"),
    "async_post_call_failure_hook": ("request_data", "original_exception", "user_api_key_dict"),
    "async_log_success_event": ("kwargs", "response_obj", "start_time", "end_time"),
}


def import_litellm() -> Any:
    """Import litellm (seconds) without letting it fetch its cost map from the internet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def _loaded(module: str) -> Any:
    """An already imported module, or None (never imports: outside a proxy there is none)."""
    return sys.modules.get(module)


def _import(module: str) -> Any:
    import_litellm()
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def litellm_error() -> type[BaseException]:
    """LiteLLM's BadRequestError class (what get_llm_provider raises), or a stand-in."""
    err = getattr(_loaded("litellm"), "BadRequestError", None)
    return err if isinstance(err, type) and issubclass(err, BaseException) else LookupError


def started_config_path() -> str | None:
    """The config file of the LiteLLM proxy running in this process (proxy_server's
    `user_config_file_path`), else its CONFIG_FILE_PATH; None outside a proxy."""
    path = getattr(_loaded("litellm.proxy.proxy_server"), "user_config_file_path", None)
    return path or os.environ.get("CONFIG_FILE_PATH") or None


def bundled_tiktoken_dir() -> Path | None:
    """LiteLLM's bundled tiktoken cache directory, found without importing litellm."""
    import hashlib
    import importlib.util

    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
    cache_key = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    return folder if (folder / cache_key).is_file() else None


def client_headers(data: Mapping[str, Any]) -> dict[str, str]:
    """The client's headers (lower-case names), secrets included: LiteLLM puts the public
    ones in `proxy_server_request.headers` and the raw ones in `secret_fields.raw_headers`."""
    out: dict[str, str] = {}
    psr = data.get("proxy_server_request")
    if isinstance(psr, dict) and isinstance(psr.get("headers"), dict):
        out.update({str(k).lower(): str(v) for k, v in psr["headers"].items()})
    secret = data.get("secret_fields")
    raw = secret.get("raw_headers") if isinstance(secret, Mapping) else \
        getattr(secret, "raw_headers", None)
    if isinstance(raw, Mapping):
        out.update({str(k).lower(): str(v) for k, v in raw.items()})
    return out


def request_path(data: Mapping[str, Any]) -> str:
    """The path the client called (from `proxy_server_request.url`), else /v1/messages."""
    psr = data.get("proxy_server_request")
    url = psr.get("url") if isinstance(psr, dict) else None
    if not isinstance(url, str):
        return "/v1/messages"
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


def litellm_metadata(data: dict) -> dict:
    """LiteLLM's own metadata dict for this request (created if missing).

    On /v1/messages `metadata` is the client's Anthropic metadata (user_id) and must reach
    the upstream untouched; LiteLLM keeps its own in `litellm_metadata`, whose keys reach the
    callbacks as `litellm_params.metadata`. On /chat/completions LiteLLM's is `metadata`.
    """
    key = "litellm_metadata" if "litellm_metadata" in data or \
        isinstance(data.get("metadata"), dict) and "user_id" in data["metadata"] \
        else "metadata"
    meta = data.get(key)
    if not isinstance(meta, dict):
        meta = {}
        data[key] = meta
    return meta


def routing_metadata(data: Mapping[str, Any]) -> dict:
    """ccproxy's entry in a request's LiteLLM metadata, or in a callback's kwargs
    (`litellm_params.metadata`; for an answer from LiteLLM's cache, whose logging puts the
    client's own metadata there, `litellm_params.litellm_metadata`); {} when there is none."""
    params = data.get("litellm_params")
    candidates = [data.get("litellm_metadata"), data.get("metadata")]
    if isinstance(params, Mapping):
        candidates[:0] = [params.get("metadata"), params.get("litellm_metadata")]
    for meta in candidates:
        ours = meta.get(METADATA_KEY) if isinstance(meta, Mapping) else None
        if isinstance(ours, dict):
            return ours
    return {}


def add_provider_headers(data: dict, provider: str, headers: Mapping[str, str]) -> None:
    """Add headers that LiteLLM sends only when the call goes to `provider`.

    LiteLLM scopes `provider_specific_header` entries by its own provider detection at call
    time (ProviderSpecificHeaderUtils), so a header meant for Anthropic never reaches another
    provider (e.g. a fallback).
    """
    entry = {"custom_llm_provider": provider, "extra_headers": dict(headers)}
    current = data.get("provider_specific_header")
    if isinstance(current, dict):
        data["provider_specific_header"] = [current, entry]
    elif isinstance(current, list):
        data["provider_specific_header"] = current + [entry]
    else:
        data["provider_specific_header"] = entry


def provider_headers(data: Mapping[str, Any], provider: str) -> dict[str, str]:
    """The extra headers scoped to `provider` (see add_provider_headers)."""
    current = data.get("provider_specific_header")
    entries = [current] if isinstance(current, dict) else \
        list(current) if isinstance(current, list) else []
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("extra_headers"), dict):
            continue
        providers = str(entry.get("custom_llm_provider", "")).split(",")
        if provider in (p.strip() for p in providers):
            out.update(entry["extra_headers"])
    return out


def model_name(upstream: str) -> str:
    """`anthropic/claude-opus-5-5` -> `claude-opus-5-5`: the name an upstream knows."""
    return upstream.split("/", 1)[1] if "/" in upstream else upstream


def answer_with_upstream_model_name(data: dict) -> None:
    """Make LiteLLM answer with the upstream's model name instead of the requested one."""
    litellm_metadata(data)[RAW_MODEL_NAME_FLAG] = True


def is_health_check(kwargs: Mapping[str, Any]) -> bool:
    """True for LiteLLM's own background health-check calls (not client requests)."""
    params = kwargs.get("litellm_params")
    meta = params.get("metadata") if isinstance(params, Mapping) else None
    if not isinstance(meta, Mapping):
        return False
    tags = meta.get("tags")
    return meta.get("user_api_key_alias") == HEALTH_CHECK_KEY or \
        (isinstance(tags, list) and HEALTH_CHECK_KEY in tags)


def live_model_list() -> list | None:
    """The running LiteLLM router's model_list, or None before the router exists."""
    # through the package, as ccproxy 1.x read it (`from litellm.proxy import proxy_server`)
    server = getattr(_loaded("litellm.proxy"), "proxy_server", None)
    router = getattr(server, "llm_router", None)
    models = getattr(router, "model_list", None) if router is not None else None
    return list(models) if isinstance(models, list) and models else None


def deployment_model(model_id: Any) -> str | None:
    """The upstream model of the live deployment with this id (LiteLLM's `model_info.id`,
    which it reports as the answer's `model_id` after retries and fallbacks)."""
    if not model_id:
        return None
    for dep in live_model_list() or ():
        info = dep.get("model_info") if isinstance(dep, Mapping) else None
        if isinstance(info, Mapping) and info.get("id") == model_id:
            params = dep.get("litellm_params")
            model = params.get("model") if isinstance(params, Mapping) else None
            # A wildcard entry (`anthropic/claude-*`) names no model: the routed one stands.
            return model if isinstance(model, str) and "*" not in model else None
    return None


def answer_model_id(response: Any, call_info: Any = None) -> Any:
    """The id of the deployment that answered: from the response-headers hook's call info,
    else the response's hidden params."""
    if isinstance(call_info, Mapping) and call_info.get("model_id"):
        return call_info["model_id"]
    hidden = response.get("_hidden_params") if isinstance(response, Mapping) \
        else getattr(response, "_hidden_params", None)     # a dict answer keeps them as a key
    return hidden.get("model_id") if isinstance(hidden, Mapping) else None


def call_model_id(data: Mapping[str, Any]) -> str | None:
    """The model_info id of the deployment the request's call went to, from its logging
    object's litellm_params metadata (what Logging.get_router_model_id reads; a JSON answer
    from /v1/messages has lost its _hidden_params by the time its headers are made)."""
    params = getattr(data.get("litellm_logging_obj"), "litellm_params", None)
    for key in ("litellm_metadata", "metadata"):
        meta = params.get(key) if isinstance(params, Mapping) else None
        info = meta.get("model_info") if isinstance(meta, Mapping) else None
        if isinstance(info, Mapping) and info.get("id"):
            return str(info["id"])
    return None


PROVIDER_HEADER_PREFIX = "llm_provider-"


def upstream_answer_headers(data: Mapping[str, Any], response: Any) -> dict[str, str]:
    """The upstream's answer headers as it sent them (lower-case names). LiteLLM keeps those
    of a /v1/messages call in the logging object's model_call_details["response_headers"]
    (llm_http_handler) and drops them from a JSON answer; it hands the others on renamed
    `llm_provider-NAME` in the answer's _hidden_params["additional_headers"]
    (core_helpers.process_response_headers)."""
    details = getattr(data.get("litellm_logging_obj"), "model_call_details", None)
    raw = details.get("response_headers") if isinstance(details, Mapping) else None
    if isinstance(raw, Mapping):            # httpx.Headers and aiohttp's are Mappings
        return {str(k).lower(): str(v) for k, v in raw.items()}
    hidden = getattr(response, "_hidden_params", None)
    extra = hidden.get("additional_headers") if isinstance(hidden, Mapping) else None
    if not isinstance(extra, Mapping):
        return {}
    size = len(PROVIDER_HEADER_PREFIX)
    return {str(k)[size:].lower(): str(v) for k, v in extra.items()
            if str(k).lower().startswith(PROVIDER_HEADER_PREFIX)}


def answered_from_cache(data: Mapping[str, Any]) -> bool:
    """Whether LiteLLM answered this request from its response cache (no upstream call): its
    caching handler marks the request's logging object with caching_details.cache_hit."""
    details = getattr(data.get("litellm_logging_obj"), "caching_details", None)
    return isinstance(details, Mapping) and details.get("cache_hit") is True


def set_request_api_key(data: dict, key: str) -> None:
    """Give this request an api_key of its own. LiteLLM's chat-completions call to Anthropic
    takes a credential only as api_key (a header alone: "Missing Anthropic API Key"); the
    router merges the request's api_key over the deployment's, for every deployment the
    request reaches, fallbacks included (router: {**litellm_params, **kwargs})."""
    data["api_key"] = key


def known_max_output(model: str) -> int | None:
    """A model's maximum output tokens from LiteLLM's model map (None when unknown or when
    litellm is not loaded)."""
    costs = getattr(_loaded("litellm"), "model_cost", None) or {}
    found = costs.get(model) or costs.get(model_name(model))
    value = found.get("max_output_tokens") if isinstance(found, Mapping) else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and value > 0 else None


def answer_usage(kwargs: Mapping[str, Any]) -> dict:
    """Tokens, cost and timing of a finished call, from LiteLLM's standard logging payload
    (kwargs["standard_logging_object"], types.utils.StandardLoggingPayload): its
    response_cost is for the deployment that answered, and 0.0 when the model has no price
    (its model_map_information has no per-token price then), which is None here."""
    payload = kwargs.get("standard_logging_object")
    if not isinstance(payload, Mapping):
        return {}
    cost = 0.0 if payload.get("cache_hit") else payload.get("response_cost")  # a hit: no call
    info = payload.get("model_map_information")
    prices = info.get("model_map_value") if isinstance(info, Mapping) else None
    priced = isinstance(cost, (int, float)) and isinstance(prices, Mapping) \
        and bool(prices.get("input_cost_per_token") or prices.get("output_cost_per_token"))
    start, end, first = (_seconds(payload.get(k))
                         for k in ("startTime", "endTime", "completionStartTime"))
    meta = payload.get("metadata")
    usage = meta.get("usage_object") if isinstance(meta, Mapping) else None
    usage = usage if isinstance(usage, Mapping) else {}
    details = usage.get("prompt_tokens_details")
    cache_read = usage.get("cache_read_input_tokens") or \
        (details.get("cached_tokens") if isinstance(details, Mapping) else 0)
    return {"cache_hit": payload.get("cache_hit") is True,           # LiteLLM's response cache
            "input_tokens": int(payload.get("prompt_tokens") or 0),   # cache reads/writes too
            "output_tokens": int(payload.get("completion_tokens") or 0),
            "cache_read_tokens": _count(cache_read),
            "cache_write_tokens": _count(usage.get("cache_creation_input_tokens")),
            "cost": float(cost) if priced and cost is not None else None,
            "latency_s": round(end - start, 4) if start is not None and end is not None else None,
            "ttfb_s": round(first - start, 4) if start is not None and first is not None
            and first >= start else None}


def failure_text(kwargs: Mapping[str, Any], exception: BaseException | None = None) -> str:
    """A failed call's error in one short line, credentials redacted (the exception, else
    LiteLLM's standard_logging_object error_str)."""
    payload = kwargs.get("standard_logging_object")
    text = f"{type(exception).__name__}: {exception}" if exception is not None else \
        payload.get("error_str") if isinstance(payload, Mapping) else None
    return redact_secrets(" ".join(str(text or "unknown error").split()))[:200]


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and value > 0 else 0


def attempted_retries(kwargs: Mapping[str, Any]) -> int:
    """How often LiteLLM's router retried the call (its metadata's `attempted_retries`)."""
    params = kwargs.get("litellm_params")
    found = 0
    for key in ("metadata", "litellm_metadata"):
        meta = params.get(key) if isinstance(params, Mapping) else None
        if isinstance(meta, Mapping):
            found = max(found, _count(meta.get("attempted_retries")))
    return found


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def model_cost(model: str, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0,
               cache_write_tokens: int = 0, *, model_id: str | None = None) -> float | None:
    """What `model` would charge for these tokens by LiteLLM's cost map (None: no price);
    input_tokens includes the cache reads and writes, priced as such. The router puts every
    deployment in the map under its model_info id, with the prices its model_info sets: given
    `model_id`, those prices when it has any."""
    litellm = import_litellm()
    priced_as: dict[str, Any] = {"model": model}
    own = litellm.model_cost.get(model_id) if model_id else None    # (every deployment is there)
    if isinstance(own, Mapping) and (own.get("input_cost_per_token")
                                     or own.get("output_cost_per_token")):
        priced_as = {"model": model_id, "custom_llm_provider": provider_of({"model": model})}
    try:
        prompt, completion = litellm.cost_per_token(
            **priced_as, prompt_tokens=input_tokens, completion_tokens=output_tokens,
            cache_read_input_tokens=cache_read_tokens,
            cache_creation_input_tokens=cache_write_tokens)
    except Exception:  # LiteLLM raises a bare Exception for a model it has no price for
        return None
    cost = float(prompt) + float(completion)
    # (and prices some names it does not know at 0: no price, as for the ledger, not free)
    return None if cost == 0 and (input_tokens or output_tokens) else cost


def answer_cost(model: str, response: Any, model_id: str | None = None) -> float | None:
    """The cost of a complete answer (an Anthropic message or a chat completion, with its
    usage) by LiteLLM's price of `model` (deployment `model_id`'s own prices if it has
    them); None for a stream, no usage or no price."""
    usage = response.get("usage") if isinstance(response, Mapping) else \
        getattr(response, "usage", None)
    if usage is None or not model:
        return None
    def read(key: str) -> int:
        return _count(usage.get(key) if isinstance(usage, Mapping) else getattr(usage, key, None))

    cache_read, cache_write = read("cache_read_input_tokens"), read("cache_creation_input_tokens")
    if read("prompt_tokens") or read("completion_tokens"):     # chat completions: cache included
        prompt, output = read("prompt_tokens"), read("completion_tokens")
    else:                           # Anthropic: input_tokens leaves the cache tokens out
        prompt, output = read("input_tokens") + cache_read + cache_write, read("output_tokens")
    return model_cost(model, prompt, output, cache_read, cache_write, model_id=model_id)


def supports_vision(model: str) -> bool | None:
    """Whether LiteLLM's model map says the model reads images (None: it does not say)."""
    try:
        costs = import_litellm().model_cost
    except ImportError:
        return None
    found = costs.get(model) or costs.get(model_name(model))
    value = found.get("supports_vision") if isinstance(found, Mapping) else None
    return value if isinstance(value, bool) else None


def keep_thinking_as_sent(model: str) -> bool:
    """Register an Anthropic model so LiteLLM passes `thinking` and `output_config` unchanged.

    LiteLLM rewrites or drops them from the model's capabilities in its cost map, after every
    hook (llms/anthropic/messages/native/transformation.py); a model it does not know loses
    adaptive thinking and effort. True when it registered something.
    """
    litellm = import_litellm()
    current = litellm.model_cost.get(model) or {}
    if all(current.get(k) == v for k, v in THINKING_PASSTHROUGH.items()):
        return False
    litellm.register_model({model: dict(THINKING_PASSTHROUGH)})
    return True


def use_chat_completions_for_openai() -> None:
    """An `openai/` deployment reached from /v1/messages is otherwise called on the Responses
    API, which OpenAI-compatible servers rarely serve (_should_route_to_responses_api)."""
    litellm = import_litellm()
    if hasattr(litellm, "use_chat_completions_url_for_anthropic_messages"):  # else: no effect
        litellm.use_chat_completions_url_for_anthropic_messages = True


def llm_provider(model: str, custom: Any, api_base: Any) -> str | None:
    """LiteLLM's own provider detection for a deployment (None when it cannot tell)."""
    try:
        get_llm_provider = import_litellm().get_llm_provider
    except ImportError:
        return None
    try:
        return get_llm_provider(model=model, custom_llm_provider=custom, api_base=api_base)[1]
    except (ValueError, TypeError, AttributeError, litellm_error()):
        return None


def provider_names() -> list[str]:
    """Every provider name LiteLLM knows ([] when litellm is not installed)."""
    try:
        return [str(getattr(p, "value", p)) for p in import_litellm().provider_list]
    except ImportError:
        return []


def custom_logger_base() -> type:
    """LiteLLM's CustomLogger, the base class of callbacks (imported here: seconds)."""
    import_litellm()
    from litellm.integrations.custom_logger import CustomLogger

    return CustomLogger


def proxy_app() -> Any:
    """The FastAPI app of the LiteLLM proxy running in this process, or None."""
    return getattr(_loaded("litellm.proxy.proxy_server"), "app", None)


def wrap_app(app: Any, middleware: type, **options: Any) -> bool:
    """Put an ASGI middleware class in front of the app, outside LiteLLM's own (CORS too).

    Starlette builds `app.middleware_stack` on the app's first ASGI call, which is the
    lifespan start-up that loads this callback (LiteLLM 1.108.7, Starlette 1.x): wrap the
    built stack then; before it is built, register it as the outermost middleware.
    """
    if not hasattr(app, "middleware_stack"):
        return False
    if app.middleware_stack is None:
        app.add_middleware(middleware, **options)
    else:
        app.middleware_stack = middleware(app.middleware_stack, **options)
    return True


def add_routes(app: Any, routes: list[tuple[str, Callable[..., Any], str, bool]]) -> None:
    """Add routes ahead of LiteLLM's (the first match wins): (path, endpoint, method,
    authenticated). Authenticated endpoints get LiteLLM's key check as their
    `user_api_key_dict` parameter; endpoints take the request as `request`."""
    from fastapi import Depends, Request, Response
    from fastapi.routing import APIRoute
    from litellm.proxy.auth.user_api_key_auth import user_api_key_auth

    for path, endpoint, method, authenticated in routes:
        params = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=Request),
                  inspect.Parameter("fastapi_response", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=Response)]
        if authenticated:
            params.append(inspect.Parameter("user_api_key_dict",
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=Depends(user_api_key_auth)))
        wrapper = _route_function(endpoint)
        wrapper.__signature__ = inspect.Signature(params)   # what FastAPI reads
        app.router.routes.insert(0, APIRoute(path, wrapper, methods=[method]))


def _route_function(endpoint: Callable[..., Any]) -> Any:
    async def route(request: Any, fastapi_response: Any, user_api_key_dict: Any = None) -> Any:
        return await endpoint(request, fastapi_response, user_api_key_dict)
    return route


async def parsed_json_body(request: Any) -> Any:
    """The request's JSON body: the copy LiteLLM's auth already parsed into
    `scope["parsed_body"]` (accepted keys, body), else parsed here; None if not JSON."""
    parsed = request.scope.get("parsed_body")
    if isinstance(parsed, tuple) and len(parsed) == 2 and isinstance(parsed[1], dict):
        return dict(parsed[1])
    try:
        return json.loads(await request.body() or b"{}")
    except ValueError:
        return None


def refuse(slot: dict | None, status: int, kind: str, message: str,
           headers: Mapping[str, str]) -> None:
    """Refuse the request from a pre-call hook: LiteLLM answers an HTTPException raised there
    with its status; on /v1/messages the request's error slot (see UpstreamErrors) gets this
    Anthropic error and `headers`, which replace LiteLLM's body."""
    from fastapi import HTTPException

    if slot is not None:
        slot.clear()
        slot.update(status=status, headers=dict(headers),
                    body={"type": "error", "error": {"type": kind, "message": message}})
    raise HTTPException(status_code=status, detail=message, headers=dict(headers))


def json_response(body: Any, status: int = 200) -> Any:
    """A JSON answer for a route added with add_routes."""
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def text_response(body: str, media_type: str, headers: Mapping[str, str] | None = None) -> Any:
    """A text answer (plain, HTML) for a route added with add_routes."""
    from fastapi.responses import Response

    return Response(body, media_type=media_type, headers=dict(headers or {}))


async def litellm_messages_endpoint(request: Any, fastapi_response: Any,
                                    user_api_key_dict: Any) -> Any:
    """LiteLLM's own POST /v1/messages endpoint, called as FastAPI would."""
    from litellm.proxy.anthropic_endpoints import endpoints

    return await endpoints.anthropic_response(fastapi_response, request, user_api_key_dict)


# -- checks -----------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True, frozen=True)
class Contact:
    """One thing ccproxy relies on inside LiteLLM, and what stops working without it."""

    name: str
    relies_on: str
    breaks: str
    check: Callable[[], bool]


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _has_source(obj: Any, text: str) -> bool:
    try:
        return obj is not None and text in inspect.getsource(obj)
    except (OSError, TypeError):
        return False


def _check_hooks() -> bool:
    base = custom_logger_base()
    for name, wanted in LITELLM_HOOKS.items():
        params = _params(getattr(base, name, None))[1:]
        if params[:len(wanted)] != list(wanted):
            return False
    return True


def _check_cli_flags() -> bool:
    command = getattr(_import(PROXY_MODULE), "run_server", None)
    names = {getattr(p, "name", "") for p in getattr(command, "params", ())}
    return {"config", "host", "port", "num_workers", "debug", "detailed_debug"} <= names


def _check_constant(module: str, name: str, value: str) -> Callable[[], bool]:
    return lambda: getattr(_import(module), name, None) == value


def _check_app() -> bool:
    app = getattr(_import("litellm.proxy.proxy_server"), "app", None)
    return app is not None and hasattr(app, "middleware_stack") \
        and isinstance(getattr(getattr(app, "router", None), "routes", None), list)


def _check_messages_endpoint() -> bool:
    endpoints = _import("litellm.proxy.anthropic_endpoints.endpoints")
    return _params(getattr(endpoints, "anthropic_response", None))[:3] == [
        "fastapi_response", "request", "user_api_key_dict"]


CONTACTS: tuple[Contact, ...] = (
    Contact("callback hooks", "CustomLogger's async_pre_call_hook, response-headers, success, "
            "streaming-iterator, failure-deployment, failure and log hooks with these parameters "
            "(the failure hook: once per client request LiteLLM answers with an error, where the "
            "log failure event also comes for attempts it then retried); a hook runs only when "
            "defined on the callback's own class",
            "routing, x-ccproxy-* headers, thinking signatures, the OAuth retry", _check_hooks),
    Contact("proxy app", "proxy_server.app: a Starlette app with middleware_stack and "
            "router.routes", "the browser/key guard and ccproxy's routes (health, count_tokens, "
            "sessions, the OAuth retry)", _check_app),
    Contact("messages endpoint", "anthropic_endpoints.endpoints.anthropic_response(fastapi_"
            "response, request, user_api_key_dict)", "the OAuth retry after an upstream 401",
            _check_messages_endpoint),
    Contact("key check", "auth.user_api_key_auth.user_api_key_auth, a FastAPI dependency that "
            "honours litellm_key_header_name",
            "count_tokens and the OAuth retry route (no key check)",
            lambda: _has_source(getattr(_import("litellm.proxy.auth.user_api_key_auth"),
                                        "user_api_key_auth", None), "litellm_key_header_name")
            or _has_source(_import("litellm.proxy.auth.user_api_key_auth"),
                           "litellm_key_header_name")),
    Contact("parsed body", "the auth step caches the JSON body in request.scope['parsed_body'] "
            "as (keys, body)", "count_tokens re-reads the body (slower, still works)",
            lambda: _has_source(getattr(_import("litellm.proxy.common_utils.http_parsing_utils"),
                                        "_safe_get_request_parsed_body", None), "parsed_body")),
    Contact("client headers", "request data carries proxy_server_request.headers and "
            "secret_fields.raw_headers", "forwarding the client's credentials; session ids "
            "from headers", lambda: _has_source(_import("litellm.proxy.litellm_pre_call_utils"),
                                               "raw_headers")),
    Contact("litellm_metadata", "on /v1/messages LiteLLM keeps its metadata in "
            "litellm_metadata and hands it to callbacks as litellm_params.metadata",
            "x-ccproxy-* headers, failure counts, the OAuth retry",
            lambda: _has_source(_import("litellm.proxy.litellm_pre_call_utils"),
                                '"litellm_metadata"')),
    Contact("provider headers", "provider_specific_header entries are sent only to their "
            "provider (ProviderSpecificHeaderUtils)", "forwarding credentials (none is sent)",
            lambda: hasattr(getattr(_import(
                "litellm.litellm_core_utils.get_provider_specific_headers"),
                "ProviderSpecificHeaderUtils", None), "get_provider_specific_headers")),
    Contact("thinking capabilities", "litellm.model_cost and litellm.register_model with "
            "supports_adaptive_thinking / supports_legacy_thinking",
            "thinking and effort reach new Anthropic models as sent",
            lambda: isinstance(getattr(import_litellm(), "model_cost", None), dict)
            and callable(getattr(import_litellm(), "register_model", None))),
    Contact("chat completions switch", "litellm.use_chat_completions_url_for_anthropic_"
            "messages", "openai/ deployments from /v1/messages use the Responses API",
            lambda: hasattr(import_litellm(), "use_chat_completions_url_for_anthropic_messages")),
    Contact("provider detection", "litellm.get_llm_provider and litellm.provider_list",
            "provider of deployments without a provider/ prefix; validate's provider names",
            lambda: callable(getattr(import_litellm(), "get_llm_provider", None))
            and bool(getattr(import_litellm(), "provider_list", None))),
    Contact("master key user", f"a request with the master key gets user_id {PROXY_ADMIN_USER} "
            "(constants.LITELLM_PROXY_ADMIN_NAME)", "with proxy_key, every request is booked "
            "to LiteLLM's admin instead of its sender (budgets per user count them as one)",
            _check_constant("litellm.constants", "LITELLM_PROXY_ADMIN_NAME", PROXY_ADMIN_USER)),
    Contact("raw model name flag", f"metadata key {RAW_MODEL_NAME_FLAG} "
            "(constants.RETURN_RAW_MODEL_NAME_METADATA_KEY)",
            "show_requested_model: false has no effect",
            _check_constant("litellm.constants", "RETURN_RAW_MODEL_NAME_METADATA_KEY",
                            RAW_MODEL_NAME_FLAG)),
    Contact("health-check account", f"LiteLLM's own health checks run as {HEALTH_CHECK_KEY}",
            "health checks count as client requests",
            _check_constant("litellm.constants", "LITTELM_INTERNAL_HEALTH_SERVICE_ACCOUNT_NAME",
                            HEALTH_CHECK_KEY)),
    Contact("answering deployment", "an answer's _hidden_params carry the model_id of the "
            "deployment that answered (a dict answer as a key), and the response-headers hook "
            "gets it as litellm_call_info", "after a fallback, thinking blocks and x-ccproxy-model "
            "name the routed deployment instead of the one that answered",
            lambda: _has_source(_import("litellm.proxy.utils"), "litellm_call_info")
            and _has_source(_import("litellm.router_utils.add_retry_fallback_headers"),
                            "_hidden_params")),
    Contact("deployment prices", "a deployment's own model_info prices are in litellm.model_cost "
            "under its model_info id, which the request's logging object keeps in its "
            "litellm_params metadata (Logging.get_router_model_id)", "x-ccproxy-cost prices a "
            "deployment with its own prices at the model map's",
            lambda: callable(getattr(getattr(_import("litellm.litellm_core_utils.litellm_logging"),
                                             "Logging", None), "get_router_model_id", None))),
    Contact("cache hits", "an answer from LiteLLM's response cache marks the request's "
            "logging object with caching_details.cache_hit (caching_handler); its success "
            "event keeps LiteLLM's metadata in litellm_params.litellm_metadata",
            "an answer from the cache carries x-ccproxy-cost of a real call; its ledger row "
            "has no user or route",
            lambda: _has_source(_import("litellm.caching.caching_handler"),
                                "logging_obj.caching_details = CachingDetails(")
            and _has_source(_import("litellm.litellm_core_utils.litellm_logging"),
                            'base_litellm_params["litellm_metadata"]')),
    Contact("usage and cost", "kwargs['standard_logging_object'] (StandardLoggingPayload) with "
            "prompt_tokens, completion_tokens, response_cost, model_map_information, startTime, "
            "endTime; "
            "litellm.cost_per_token", "the usage ledger has no tokens or cost",
            lambda: _has_source(_import("litellm.types.utils"), "class StandardLoggingPayload")
            and _has_source(_import("litellm.types.utils"), "model_map_information")
            and callable(getattr(import_litellm(), "cost_per_token", None))),
    Contact("upstream answer headers", "a /v1/messages call's raw answer headers in "
            "model_call_details['response_headers']; others as llm_provider-NAME in "
            "_hidden_params['additional_headers']", "anthropic-* answer headers (rate limits, "
            "anthropic-thinking-prefix-mismatch) do not reach Claude Code",
            lambda: _has_source(_import("litellm.llms.custom_httpx.llm_http_handler"),
                                '["response_headers"]')
            and _has_source(_import("litellm.litellm_core_utils.core_helpers"),
                            PROVIDER_HEADER_PREFIX)),
    Contact("router model list", "proxy_server.llm_router.model_list",
            "routing follows the config file, not models added at run time",
            lambda: hasattr(_import("litellm.proxy.proxy_server"), "llm_router")),
    Contact("config path", "proxy_server.user_config_file_path",
            "finding ccproxy.yaml beside a config LiteLLM was started with directly",
            lambda: hasattr(_import("litellm.proxy.proxy_server"), "user_config_file_path")),
    Contact("bundled tokenizer", "litellm_core_utils/tokenizers holds cl100k_base",
            "offline token counts (tiktoken would download the file)",
            lambda: bundled_tiktoken_dir() is not None),
    Contact("proxy command line", f"python -m {PROXY_MODULE} --config --host --port "
            "--num_workers --debug --detailed_debug", "`ccproxy start`", _check_cli_flags),
    Contact("keyless loopback", f"{WEAK_KEY_PERMIT_ENV} lets the proxy start without a master "
            "key", "`ccproxy start` without a proxy key",
            lambda: _has_source(_import("litellm.proxy.auth.master_key_boot_check"),
                                WEAK_KEY_PERMIT_ENV)),
)


def check_contacts() -> list[tuple[Contact, bool]]:
    """Run every contact check; a check that raises counts as missing."""
    results = []
    for contact in CONTACTS:
        try:
            ok = bool(contact.check())
        except Exception:  # a changed LiteLLM may fail in any way; that is what is checked
            ok = False
        results.append((contact, ok))
    return results


def litellm_version() -> str | None:
    """The installed LiteLLM's version (from its metadata: no import), or None."""
    from importlib import metadata

    try:
        return metadata.version("litellm")
    except metadata.PackageNotFoundError:
        return None


# ---- Config --------------------------------------------------------------------------------
# Finding, reading and merging the config files (ccproxy's section and LiteLLM's sections),
# with YAML line numbers kept for error messages. Uses only the standard library and yaml.

LITELLM_SECTIONS = ("model_list", "litellm_settings", "router_settings", "general_settings",
                    "environment_variables", "callback_settings", "credential_list",
                    "mcp_servers", "guardrails", "include", "files_settings", "search_tools",
                    "vector_store_registry", "prompts", "pass_through_endpoints")


@dataclasses.dataclass(slots=True, frozen=True)
class RuleSpec:
    """One `rules:` entry: the label it gives, the rule class path and its parameters."""

    name: str
    rule: str
    params: Mapping[str, Any]
    args: tuple = ()
    where: str = ""
    override: bool | None = None    # may switch models inside a turn (None: the rule's default)
    sticky: bool = False            # once matched, later turns of the conversation stay
    ab: tuple[tuple[str, int], ...] = ()    # A/B: route labels and their weights


@dataclasses.dataclass(slots=True, frozen=True)
class HookSpec:
    """One `hooks:` entry: an import path (or built-in name) and its parameters."""

    path: str | Callable[..., Any]
    params: Mapping[str, Any]
    where: str = ""


@dataclasses.dataclass(slots=True, frozen=True)
class BudgetSpec:
    """One `budgets:` entry: a limit in USD or tokens per day/week/month, counted for each
    user, label or model (or for all requests), and what happens when it is reached."""

    name: str
    per: str = "all"               # user | label | model | all
    period: str = "day"            # day | week | month
    usd: float | None = None
    tokens: int | None = None
    action: str = "block"          # block | downgrade
    to: str = ""                   # downgrade: the route label to use instead
    alert_at: float | None = None  # fraction of the limit that logs (and notifies) once
    notify: Mapping[str, str] = dataclasses.field(default_factory=dict)   # webhook, command
    where: str = ""


@dataclasses.dataclass(slots=True, frozen=True)
class UserSpec:
    """One `users:` entry: a user id or pattern, the route labels it may use (None: all), its
    own rules (None: the global ones) and its own budgets."""

    pattern: str
    labels: tuple[str, ...] | None = None
    rules: tuple[RuleSpec, ...] | None = None
    budgets: tuple[BudgetSpec, ...] = ()
    where: str = ""


@dataclasses.dataclass(slots=True, frozen=True)
class Settings:
    """The `ccproxy:` section, typed, with defaults."""

    debug: bool = False
    default_model_passthrough: bool = True
    hooks: tuple[HookSpec, ...] = tuple(HookSpec(h, {}) for h in DEFAULT_HOOKS)
    rules: tuple[RuleSpec, ...] = ()
    oat_sources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    oauth_required: bool = False
    oauth_refresh_interval: float = 300.0
    oauth_timeout: float = 10.0
    token_cache_max_chars: int = 64_000_000
    model_reload_cooldown: float = 30.0
    openai_chat_completions: bool = True
    preserve_thinking: bool = True
    proxy_key: bool = False
    shell_notice: bool = True
    gateway_hints: bool = True      # `run` and the shell: request classes, model discovery
    metrics_enabled: bool = True    # GET /ccproxy/metrics (Prometheus text)
    usage_ledger: bool = True       # one SQLite row per finished request (`usage` reads it)
    sticky_turns: bool = True
    strip_foreign_thinking: bool = True
    show_requested_model: bool = True
    route_count_tokens: bool = True
    local_usage: bool = True
    clamp_max_tokens: bool = True
    session_ttl: float = 3600.0
    max_sessions: int = 2000
    allowed_origins: tuple[str, ...] = ()   # browser origins let through (README, "Security")
    adaptive_only_models: tuple[str, ...] = ()   # more models that refuse `thinking: disabled`
    upstream_retries: int = 0       # LiteLLM's own retries (Claude Code retries by itself)
    retry_on: tuple[str, ...] = tuple(RETRY_KINDS)   # the failures upstream_retries applies to
    retry_backoff: float = 0.0      # seconds at least between two of LiteLLM's retries
    upstream_timeout: float = 600.0  # seconds for one upstream call (LiteLLM's is 6,000)
    # label -> labels that answer when it fails (LiteLLM's router fallbacks, session-safe)
    fallbacks: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    context_window_fallbacks: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=dict)
    quota_fallback: str = ""        # label for a session whose Claude plan limit is reached
    unshared_workers: bool = False  # allow num_workers > 1 with per-process session state
    # where LiteLLM's own tracing callbacks send spans with each routing decision (README,
    # "Tracing"): {otel: {endpoint, headers, service_name, message_content}, langfuse: {host}}
    tracing: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    budgets: tuple[BudgetSpec, ...] = ()
    users: tuple[UserSpec, ...] = ()
    user_header: str = ""           # a request header naming the user (else key, Claude Code)
    # LiteLLM's response cache for identical requests: {type: local|redis|disk, ttl: seconds}
    cache: Mapping[str, Any] = dataclasses.field(default_factory=dict)


LEGACY_HANDLER = "ccproxy.handler:CCProxyHandler"   # 1.x's `handler:` default: still true
# Keys ccproxy once used that no longer do anything: accepted, with a warning saying so.
RETIRED_SETTINGS = {
    "metadata_ttl": "ccproxy keeps no per-request store any more (sessions use session_ttl)",
    "metadata_max_entries": "ccproxy keeps no per-request store any more (see max_sessions)",
}
SETTINGS_KEYS = {f.name for f in dataclasses.fields(Settings)} | {
    "handler", "credentials"} | set(RETIRED_SETTINGS)
SERVER_KEYS = {"host", "port", "num_workers", "debug", "detailed_debug", "telemetry"}


@dataclasses.dataclass(slots=True, frozen=True)
class Config:
    """Everything ccproxy read: its settings, the server address and LiteLLM's sections."""

    settings: Settings
    litellm: Mapping[str, Any]            # model_list, litellm_settings, ... as LiteLLM reads them
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    num_workers: int = 1
    server: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    directory: Path | None = None
    ccproxy_file: Path | None = None       # where the `ccproxy:` section came from
    litellm_file: Path | None = None       # the file LiteLLM is started with
    warnings: tuple[str, ...] = ()
    ccproxy_node: Any = dataclasses.field(default=None, repr=False, compare=False)
    litellm_node: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def model_list(self) -> list[dict]:
        """The deployments of LiteLLM's `model_list` (empty list if none)."""
        models = self.litellm.get("model_list")
        return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []

    @property
    def url(self) -> str:
        """The base URL clients use to reach the proxy."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def files(self) -> list[Path]:
        """The config files in use, without repeats."""
        out = []
        for f in (self.ccproxy_file, self.litellm_file):
            if f is not None and f not in out:
                out.append(f)
        return out


def _yaml():
    import yaml  # ~15 ms; only commands that read a config pay for it

    return yaml


def read_yaml(path: Path) -> tuple[Any, Any]:
    """Read one YAML file: (data, node) where node keeps line numbers for messages."""
    yaml = _yaml()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}",
                          "check the file's permissions or pass another --config-dir") from exc
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}",
                          "fix the syntax at that line (indentation, quotes, colons)") from exc
    finally:
        loader.dispose()
    duplicate = _duplicate_key(node, yaml)
    if duplicate is not None:
        raise ConfigError(f"{path}:{duplicate[1]}: the key `{duplicate[0]}` appears twice in "
                          "one mapping (YAML would silently keep the last one)",
                          "remove one of them")
    return data, node


def _duplicate_key(node: Any, yaml: Any) -> tuple[str, int] | None:
    """The first key that a YAML mapping holds twice, with its line (iterative walk)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen = set()
            for key, value in current.value:
                name = getattr(key, "value", None)
                if isinstance(name, str):
                    if name in seen:
                        return name, key.start_mark.line + 1
                    seen.add(name)
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return None


def node_line(node: Any, *path: Any) -> int | None:
    """The 1-based line of the key (or list item) at `path` inside a composed YAML node."""
    yaml = _yaml()
    mark = None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            if pair is None:
                return None
            mark, node = pair[0].start_mark, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) \
                and 0 <= key < len(node.value):
            node = node.value[key]
            mark = node.start_mark
        else:
            return None
    return mark.line + 1 if mark is not None else None


def find_config_dir(explicit: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Where the config lives, and why: explicit/env > LiteLLM's config dir > ~/.ccproxy."""
    if explicit:
        return Path(explicit).expanduser().absolute(), "--config-dir"
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        return Path(env).expanduser().absolute(), ENV_CONFIG_DIR
    started = litellm_started_config()
    if started is not None:
        return started.parent, "LiteLLM --config"
    return Path(DEFAULT_CONFIG_DIR).expanduser(), "default"


def litellm_started_config() -> Path | None:
    """The config file the running LiteLLM proxy was started with, when inside one."""
    path = started_config_path()
    if not path:
        argv = sys.argv
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv):
                path = argv[i + 1]
            elif arg.startswith("--config="):
                path = arg.split("=", 1)[1]
    return Path(path).expanduser().resolve() if path else None


def load_config(config_dir: str | os.PathLike | None = None) -> Config:
    """Load the config from a directory (see find_config_dir); built-in defaults if no file.

    Layouts: `ccproxy.yaml` with LiteLLM's sections inside (one file), or `ccproxy.yaml` beside
    LiteLLM's `config.yaml` (ccproxy 1.x), or only a LiteLLM `config.yaml` (ccproxy.py dropped
    beside it). Raises ConfigError for unreadable files and invalid values.
    """
    directory, _why = find_config_dir(config_dir)
    ccproxy_path = directory / CONFIG_FILE
    litellm_path = directory / LITELLM_CONFIG_FILE
    for path in (ccproxy_path, litellm_path):
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is not a file", "it must be the YAML config file; "
                              "move whatever is there out of the way")
    raw: dict = {}
    node = lnode = None
    ccproxy_file = litellm_file = None
    if ccproxy_path.is_file():
        data, node = read_yaml(ccproxy_path)
        raw = _expect_mapping(data, ccproxy_path)
        ccproxy_file = ccproxy_path
    litellm_raw: dict = {}
    has_litellm_sections = any(k in raw for k in LITELLM_SECTIONS)
    if has_litellm_sections:
        litellm_raw = litellm_sections(raw)
        litellm_file, lnode = ccproxy_path, node
    elif litellm_path.is_file():
        data, lnode = read_yaml(litellm_path)
        litellm_raw = _expect_mapping(data, litellm_path)
        litellm_file = litellm_path
        if ccproxy_file is None and isinstance(litellm_raw.get("ccproxy"), dict):
            raw, node, ccproxy_file = litellm_raw, lnode, litellm_path
            litellm_raw = litellm_sections(raw)
    if ccproxy_file is None and litellm_file is None:
        return default_config(directory)
    config = build_config(raw, litellm_raw, directory=directory, ccproxy_file=ccproxy_file,
                          litellm_file=litellm_file, node=node)
    return dataclasses.replace(config, ccproxy_node=node, litellm_node=lnode)


def self_command(directory: Path | None) -> str:
    """How the user runs this file again for the same config dir (for hints)."""
    import shlex
    cmd = f"python {shlex.quote(Path(__file__).name)}"
    if directory is not None and directory != Path(DEFAULT_CONFIG_DIR).expanduser():
        cmd += f" --config-dir {shlex.quote(str(directory))}"
    return cmd


def litellm_sections(raw: Mapping[str, Any]) -> dict:
    """A config file's sections that are LiteLLM's (all but `ccproxy:` and `litellm:`)."""
    return {k: v for k, v in raw.items() if k not in ("ccproxy", "litellm")}


def default_config(directory: Path | None = None) -> Config:
    """The built-in configuration (the same text `install` writes)."""
    data = _yaml().safe_load(DEFAULT_CONFIG_YAML)
    litellm_raw = litellm_sections(data)
    return build_config(data, litellm_raw, directory=directory)


def _expect_mapping(data: Any, path: Path) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top level, got "
                          f"{type(data).__name__}", "the file must hold `key: value` sections")
    return data


def build_config(raw: Mapping[str, Any], litellm_raw: Mapping[str, Any], *,
                 directory: Path | None = None, ccproxy_file: Path | None = None,
                 litellm_file: Path | None = None, node: Any = None) -> Config:
    """Turn parsed YAML into a Config; raises ConfigError naming file:line for bad values."""
    problems = ConfigProblems(ccproxy_file, node)
    section = raw.get("ccproxy") or {}
    if not isinstance(section, dict):
        problems.error(("ccproxy",), "the `ccproxy:` section must be a mapping")
        section = {}
    settings = parse_settings(section, problems)
    server = raw.get("litellm") or {}
    if not isinstance(server, dict):
        problems.error(("litellm",), "the `litellm:` section must be a mapping (host, port, ...)")
        server = {}
    host = server.get("host", DEFAULT_HOST)
    port = server.get("port", DEFAULT_PORT)
    workers = server.get("num_workers", 1)
    if not isinstance(host, str) or not host:
        problems.error(("litellm", "host"), f"host must be a string, got {host!r}")
        host = DEFAULT_HOST
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        problems.error(("litellm", "port"), f"port must be a number 1-65535, got {port!r}")
        port = DEFAULT_PORT
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        problems.error(("litellm", "num_workers"), f"num_workers must be >= 1, got {workers!r}")
        workers = 1
    for key in server:
        if key not in SERVER_KEYS:
            problems.warn(("litellm", key),
                          f"unknown key `litellm.{key}`{_did_you_mean(key, SERVER_KEYS)}")
    if problems.errors:
        raise ConfigError("; ".join(problems.errors),
                          f"fix the config ({self_command(directory)} validate lists every "
                          "problem)",
                          problems.errors)
    return Config(settings=settings, litellm=dict(litellm_raw), host=host, port=port,
                  num_workers=workers, server=dict(server), directory=directory,
                  ccproxy_file=ccproxy_file, litellm_file=litellm_file,
                  warnings=tuple(problems.warnings))


class ConfigProblems:
    """Collects errors and warnings with `file:line` prefixes from YAML node marks."""

    def __init__(self, path: Path | None, node: Any) -> None:
        self.path, self.node = path, node
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def where(self, keys: tuple) -> str:
        """`file:line` for a key path in the ccproxy file (as precise as the marks allow)."""
        if self.path is None:
            return "<built-in config>"
        keys = tuple(keys)
        while keys:
            line = node_line(self.node, *keys)
            if line is not None:
                return f"{self.path}:{line}"
            keys = keys[:-1]
        return str(self.path)

    def error(self, keys: tuple, message: str) -> None:
        self.errors.append(f"{self.where(keys)}: {message}")

    def warn(self, keys: tuple, message: str) -> None:
        self.warnings.append(f"{self.where(keys)}: {message}")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def parse_params(params: Any) -> tuple[dict, tuple]:
    """Rule/hook params in either form: a mapping, or 1.x's list of one-key mappings/values."""
    if params is None:
        return {}, ()
    if isinstance(params, dict):
        return dict(params), ()
    if isinstance(params, list):
        if all(isinstance(p, dict) for p in params):
            merged: dict = {}
            for p in params:
                merged.update(p)
            return merged, ()
        return {}, tuple(params)
    return {}, (params,)


def parse_settings(section: Mapping[str, Any], problems: ConfigProblems) -> Settings:
    """The `ccproxy:` section as Settings; bad types are errors, unknown keys warnings."""
    base = Settings()
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in SETTINGS_KEYS:
            problems.warn(("ccproxy", key),
                          f"unknown key `ccproxy.{key}`{_did_you_mean(key, SETTINGS_KEYS)}")
            continue
        if key in RETIRED_SETTINGS:
            problems.warn(("ccproxy", key), f"`{key}` has no effect: {RETIRED_SETTINGS[key]}")
            continue
        if key == "handler" and value != LEGACY_HANDLER:
            problems.warn(("ccproxy", key), f"`handler: {value}` has no effect: LiteLLM loads "
                          "ccproxy from `litellm_settings.callbacks: [ccproxy.handler]`; to add "
                          "your own callback, list it there too")
        if key in ("handler", "hooks", "rules", "budgets", "users"):
            continue
        if key == "credentials":          # ccproxy 1.x: one command for the Anthropic token
            if isinstance(value, str) and value.strip():
                values.setdefault("oat_sources", {"anthropic": value})
            continue
        default = getattr(base, key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                problems.error(("ccproxy", key), f"`{key}` must be true or false, got {value!r}")
                continue
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or not math.isfinite(value):
                problems.error(("ccproxy", key),
                               f"`{key}` must be a non-negative number, got {value!r}")
                continue
            value = type(default)(value)
        elif key == "allowed_origins":
            value = parse_origins(value, problems)
            if value is None:
                continue
        elif key == "adaptive_only_models":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
                problems.error(("ccproxy", key), "`adaptive_only_models` must be a list of model "
                               "names or patterns like claude-opus-5*")
                continue
            value = tuple(items)
        elif key in ("fallbacks", "context_window_fallbacks"):
            value = parse_fallbacks(key, value, problems)
            if value is None:
                continue
        elif key == "retry_on":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(v in RETRY_KINDS for v in items):
                problems.error(("ccproxy", key), f"`retry_on` must list some of: "
                               f"{', '.join(RETRY_KINDS)}; got {value!r}")
                continue
            value = tuple(items)
        elif key == "tracing":
            value = parse_tracing(value, problems)
            if value is None:
                continue
        elif key == "cache":
            value = value or {}
            if not isinstance(value, dict) or set(value) - {"type", "ttl"} \
                    or value.get("type", "local") not in CACHE_TYPES \
                    or not isinstance(value.get("ttl", 1), (int, float)) \
                    or isinstance(value.get("ttl"), bool) or value.get("ttl", 1) <= 0:
                problems.error(("ccproxy", key), f"`cache` takes `type` ({', '.join(CACHE_TYPES)}"
                               f") and `ttl` (seconds); got {value!r}")
                continue
        elif key == "user_header":
            if not isinstance(value, str):
                problems.error(("ccproxy", key), "`user_header` names a request header")
                continue
            value = value.lower()
        elif key == "quota_fallback":
            if not isinstance(value, str):
                problems.error(("ccproxy", key), "`quota_fallback` must name a model_list entry")
                continue
        elif key == "oat_sources":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.error(("ccproxy", key), "`oat_sources` must map a provider to a command")
                continue
        values[key] = value
    if "hooks" in section:
        values["hooks"] = parse_hooks(section.get("hooks"), problems)
    if "rules" in section:
        values["rules"] = parse_rules(section.get("rules"), problems)
    if "budgets" in section:
        values["budgets"] = parse_budgets(section.get("budgets"), problems, ("ccproxy", "budgets"))
    if "users" in section:
        values["users"] = parse_users(section.get("users"), problems)
    return dataclasses.replace(base, **values)


CACHE_TYPES = ("local", "redis", "disk")
# The calls LiteLLM's cache answers (its default list also has embeddings and more; these are
# the ones ccproxy routes, measured to hit on LiteLLM 1.108.7, /v1/messages streaming too).
CACHE_CALL_TYPES = ["anthropic_messages", "acompletion", "completion"]
# `tracing:` backends: their keys (value types), and the packages LiteLLM needs for them.
TRACING_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "otel": {"endpoint": str, "headers": dict, "service_name": str, "message_content": bool},
    "langfuse": {"host": str, "message_content": bool}}
TRACING_PACKAGES = {"otel": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
                    "langfuse": ("langfuse",)}


def parse_tracing(value: Any, problems: ConfigProblems) -> dict | None:
    """`tracing:` as {backend: settings}; None (an error noted) when malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.error(("ccproxy", "tracing"), "`tracing` must be a mapping, e.g. "
                       "{otel: {endpoint: http://127.0.0.1:4318}}")
        return None
    out = {}
    for backend, options in value.items():
        keys = TRACING_KEYS.get(backend)
        if keys is None:
            problems.error(("ccproxy", "tracing", backend), f"unknown tracing backend "
                           f"`{backend}`{_did_you_mean(str(backend), TRACING_KEYS)}; "
                           f"one of: {', '.join(TRACING_KEYS)}")
            continue
        options = options or {}
        bad = [k for k, v in options.items() if k not in keys or not isinstance(v, keys[k])] \
            if isinstance(options, dict) else ["(not a mapping)"]
        if bad:
            problems.error(("ccproxy", "tracing", backend), f"tracing.{backend}: unknown or "
                           f"mistyped {', '.join(map(str, bad))}; it takes {', '.join(keys)}")
            continue
        endpoint = options.get("endpoint", "")
        if backend == "otel" and not re.fullmatch(r"https?://\S+", endpoint):
            problems.error(("ccproxy", "tracing", backend), "tracing.otel needs `endpoint`, the "
                           "collector's OTLP/HTTP address, e.g. http://127.0.0.1:4318")
            continue
        out[backend] = dict(options)
    return out


def tracing_backends(settings: Settings) -> tuple[list[str], list[str]]:
    """The `tracing:` backends LiteLLM can run here (their packages are installed), and a
    warning for each that cannot (it stays off: LiteLLM would refuse to start)."""
    ready, warnings = [], []
    for backend in settings.tracing:
        missing = missing_modules(TRACING_PACKAGES[backend])
        if missing:
            warnings.append(f"tracing.{backend} is off: {', '.join(missing)} not installed "
                            f"(pip install {' '.join(TRACING_PIP[backend])})")
        else:
            ready.append(backend)
    return ready, warnings


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules that cannot be imported here (found without importing them)."""
    import importlib.util

    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:     # its parent package is not there either
            found = False
        if not found:
            missing.append(module)
    return missing


TRACING_PIP = {"otel": ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"),
               "langfuse": ("'langfuse>=4.7,<5'",)}
# ccproxy's routing decision on each span, as scalar attributes `litellm.metadata.ccproxy.X`
# (LiteLLM's OpenTelemetry callback copies these requester_metadata keys; README, "Tracing").
TRACE_FIELDS = ("label", "requested_model", "model", "reason", "session", "agent", "user",
                "switch")


ORIGIN_PATTERN = re.compile(r"(?i)https?://[^/\s*]+")


def parse_origins(value: Any, problems: ConfigProblems) -> tuple[str, ...] | None:
    """`allowed_origins`: exact browser origins (`scheme://host[:port]`); no wildcard."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(o, str) for o in items):
        problems.error(("ccproxy", "allowed_origins"),
                       "`allowed_origins` must be a list of origins like http://localhost:3000")
        return None
    bad = [o for o in items if not ORIGIN_PATTERN.fullmatch(o.strip().rstrip("/"))]
    if bad:
        problems.error(("ccproxy", "allowed_origins"),
                       f"not an origin: {bad[0]!r} (write scheme://host[:port], no path and no "
                       "wildcard: each listed site can spend your credentials)")
        return None
    return tuple(o.strip().rstrip("/").lower() for o in items)


def parse_fallbacks(key: str, value: Any,
                    problems: ConfigProblems) -> dict[str, tuple[str, ...]] | None:
    """`fallbacks:` / `context_window_fallbacks:`: a label (or `*`) -> the labels to try."""
    if value is None:
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for label, targets in value.items() if isinstance(value, dict) else [(None, None)]:
        items = [targets] if isinstance(targets, str) else targets
        if not isinstance(label, str) or not isinstance(items, list) or not items \
                or not all(isinstance(t, str) and t for t in items):
            problems.error(("ccproxy", key), f"`{key}` maps a model_list entry to the entries "
                           "tried when it fails, e.g. {think: [default]}")
            return None
        out[label] = tuple(items)
    return out


def parse_hooks(hooks: Any, problems: ConfigProblems) -> tuple[HookSpec, ...]:
    """`hooks:` as a list of names/paths or `{hook: path, params: {...}}` mappings."""
    if hooks is None:
        return ()
    if not isinstance(hooks, list):
        problems.error(("ccproxy", "hooks"), "`hooks` must be a list")
        return ()
    out = []
    for i, item in enumerate(hooks):
        where = problems.where(("ccproxy", "hooks", i))
        if isinstance(item, str) or callable(item):    # 1.x code may list functions
            out.append(HookSpec(item, {}, where))
        elif isinstance(item, dict) and isinstance(item.get("hook"), str):
            params, _args = parse_params(item.get("params"))
            out.append(HookSpec(item["hook"], params, where))
        else:
            problems.error(("ccproxy", "hooks", i),
                           "a hook is a name/path or a mapping with `hook:` and `params:`")
    return tuple(out)


RULE_KEYS = ("name", "label", "rule", "params", "override", "sticky", "ab")


def list_of_mappings(value: Any, problems: ConfigProblems, at: tuple,
                     not_a_mapping: str) -> Iterable[tuple[tuple, dict]]:
    """(keys, item) for each mapping of a list-valued setting; a value that is not a list,
    and an entry that is not a mapping (`not_a_mapping` says what it must be), are errors."""
    if value is None:
        return
    if not isinstance(value, list):
        problems.error(at, f"`{at[-1]}` must be a list")
        return
    for i, item in enumerate(value):
        if isinstance(item, dict):
            yield at + (i,), item
        else:
            problems.error(at + (i,), not_a_mapping)


def parse_rules(rules: Any, problems: ConfigProblems,
                at: tuple = ("ccproxy", "rules")) -> tuple[RuleSpec, ...]:
    """`rules:` entries with `name` (1.x also `label`), `rule` and optional `params`."""
    out = []
    for keys, item in list_of_mappings(rules, problems, at, "a rule is a mapping with `name`, "
                                       "`rule` and optional `params`"):
        name = item.get("name", item.get("label"))
        path = item.get("rule")
        if not isinstance(name, str) or not name:
            problems.error(keys, "rule without a `name` (the model_list entry it routes to)")
            continue
        if not isinstance(path, str) or not path:
            problems.error(keys, f"rule `{name}` has no `rule:` class (e.g. TokenCountRule)")
            continue
        for key in item:
            if key not in RULE_KEYS:
                problems.warn(keys + (key,), f"rule `{name}`: unknown key `{key}`"
                              f"{_did_you_mean(key, RULE_KEYS)}")
        flags = {}
        for flag in ("override", "sticky"):
            if flag in item:
                if isinstance(item[flag], bool):
                    flags[flag] = item[flag]
                else:
                    problems.error(keys + (flag,), f"rule `{name}`: `{flag}` must be true or "
                                   f"false, got {item[flag]!r}")
        split: tuple[tuple[str, int], ...] = ()
        if "ab" in item:
            value = item["ab"]
            if isinstance(value, dict) and value and all(
                    isinstance(k, str) and k and isinstance(w, int) and not isinstance(w, bool)
                    and w > 0 for k, w in value.items()):
                split = tuple(value.items())
            else:
                problems.error(keys + ("ab",), f"rule `{name}`: `ab` maps route labels to "
                               f"positive whole weights, e.g. {{think-opus: 50, think-other: "
                               f"50}}; got {value!r}")
        params, args = parse_params(item.get("params"))
        out.append(RuleSpec(name, path, params, args, problems.where(keys), ab=split, **flags))
    return tuple(out)


BUDGET_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "per": str, "period": str, "usd": (int, float), "tokens": int, "action": str,
    "to": str, "alert_at": (int, float), "notify": dict}
BUDGET_CHOICES = {"per": ("user", "label", "model", "all"), "period": ("day", "week", "month"),
                  "action": ("block", "downgrade")}


def parse_budgets(value: Any, problems: ConfigProblems, at: tuple) -> tuple[BudgetSpec, ...]:
    """`budgets:` entries (see BudgetSpec); each problem an error at its line."""
    out = []
    for i, (keys, item) in enumerate(list_of_mappings(
            value, problems, at, "a budget is a mapping: {name, per, period, usd|tokens, action}")):
        wrong = [f"{k}{_did_you_mean(str(k), BUDGET_KEYS)}" if k not in BUDGET_KEYS else k
                 for k, v in item.items() if k not in BUDGET_KEYS or isinstance(v, bool)
                 or not isinstance(v, BUDGET_KEYS[k])]
        wrong += [f"{k}: {item[k]!r} (one of {', '.join(c)})" for k, c in BUDGET_CHOICES.items()
                  if k in item and item[k] not in c]
        name = str(item["name"]) if isinstance(item.get("name"), str) else f"budget {i + 1}"
        if wrong:
            problems.error(keys, f"budget `{name}`: unknown or mistyped {', '.join(wrong)}; "
                           f"keys: {', '.join(BUDGET_KEYS)}")
            continue
        limit = item.get("usd", item.get("tokens"))
        if ("usd" in item) == ("tokens" in item) or limit is None or limit <= 0:
            problems.error(keys, f"budget `{name}`: give one positive limit, `usd` or `tokens`")
            continue
        if item.get("action") == "downgrade" and not item.get("to"):
            problems.error(keys, f"budget `{name}`: `action: downgrade` needs `to:`, the route "
                           "label to use instead")
            continue
        notify = item.get("notify") or {}
        if set(notify) - {"webhook", "command"} or not all(isinstance(v, str) for v in
                                                           notify.values()):
            problems.error(keys, f"budget `{name}`: `notify` takes `webhook` (a URL) and/or "
                           "`command`")
            continue
        alert = item.get("alert_at")
        if alert is not None and not 0 < alert < 1:
            problems.error(keys, f"budget `{name}`: `alert_at` is a fraction of the limit "
                           f"between 0 and 1, e.g. 0.8; got {alert!r}")
            continue
        out.append(BudgetSpec(name=name, per=item.get("per", "all"),
                              period=item.get("period", "day"),
                              usd=float(item["usd"]) if "usd" in item else None,
                              tokens=item.get("tokens"), action=item.get("action", "block"),
                              to=item.get("to", ""), alert_at=alert, notify=dict(notify),
                              where=problems.where(keys)))
    return tuple(out)


def parse_users(value: Any, problems: ConfigProblems) -> tuple[UserSpec, ...]:
    """`users:` as {user id or pattern: {labels, rules, budgets}}."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        problems.error(("ccproxy", "users"), "`users` maps a user id (or a pattern like "
                       "'*@example.com') to {labels, rules, budgets}")
        return ()
    out = []
    for pattern, item in value.items():
        keys = ("ccproxy", "users", pattern)
        item = item or {}
        if not isinstance(item, dict) or set(item) - {"labels", "rules", "budgets"}:
            problems.error(keys, f"user `{pattern}`: takes `labels`, `rules` and `budgets`")
            continue
        labels = item.get("labels")
        if labels is not None and not (isinstance(labels, list) and labels
                                       and all(isinstance(x, str) for x in labels)):
            problems.error(keys + ("labels",), f"user `{pattern}`: `labels` lists the route "
                           "labels the user may use")
            continue
        budgets = parse_budgets(item.get("budgets"), problems, keys + ("budgets",))
        out.append(UserSpec(str(pattern), tuple(labels) if labels is not None else None,
                            parse_rules(item["rules"], problems, keys + ("rules",))
                            if "rules" in item else None,
                            tuple(dataclasses.replace(b, per="user") for b in budgets),
                            problems.where(keys)))
    return tuple(out)


def _secret(value: Any) -> str | None:
    """A config secret: a literal, or `os.environ/NAME` as LiteLLM writes it."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        return os.environ.get(value.split("/", 1)[1]) or None
    return value if isinstance(value, str) and value else None


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach."""
    import ipaddress
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def unprotected_bind(config: Config) -> bool:
    """True when the proxy would listen beyond this machine with no key to check."""
    return not is_loopback(config.host) and not config.settings.proxy_key \
        and not master_key_setting(config)


def master_key_setting(config: Config) -> Any:
    """LiteLLM's `general_settings.master_key` as written (a literal or os.environ/NAME)."""
    general = config.litellm.get("general_settings") or {}
    return general.get("master_key") if isinstance(general, dict) else None


def proxy_key(config: Config, create: bool = False) -> str | None:
    """The proxy key clients send in `x-ccproxy-key` (None when `proxy_key` is off).

    Kept in `proxy.key` (mode 0600) in the config dir; `create` makes one if missing.
    """
    import secrets
    if not config.settings.proxy_key or config.directory is None:
        return None
    path = config.directory / PROXY_KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise ProcessError(f"cannot read {path}: {exc.strerror}",
                           "fix its permissions or delete it to get a new key") from exc
    if not key and create:
        key = "sk-ccproxy-" + secrets.token_urlsafe(32)
        make_private_dir(config.directory)
        write_private(path, key + "\n")
    return key or None


def make_private_dir(directory: Path) -> None:
    """Create a config dir (0700: it holds keys, logs and PID files) if it is missing."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file that may hold a secret: created 0600 under a fresh temporary name (never
    readable by others, not even for a moment), then renamed over `path` in one step."""
    import secrets
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_private_append(path: Path) -> int:
    """A file descriptor appending to a file that may hold secrets (the log): created 0600,
    and an older file that others could read is made private before anything is written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def _litellm_params(dep: Mapping[str, Any]) -> Mapping[str, Any]:
    params = dep.get("litellm_params")
    return params if isinstance(params, Mapping) else {}


@dataclasses.dataclass(slots=True)
class ValidationReport:
    """Every problem of a config: errors stop `start`, warnings do not."""

    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no errors."""
        return not self.errors


def validate_config(config: Config, pipeline: "Pipeline") -> ValidationReport:
    """Check a config as `start` needs it, with the Pipeline built from it (its rules, hooks,
    model table and token sources); every problem with file:line where known."""
    report = ValidationReport(warnings=list(config.warnings))
    for problem in pipeline.problems:
        (report.warnings if " skipped: " in problem else report.errors).append(problem)
    ccproblems = ConfigProblems(config.ccproxy_file, config.ccproxy_node)
    lproblems = ConfigProblems(config.litellm_file, config.litellm_node)
    table = pipeline.models()
    catch_all = {getattr(r, "name", None) for r in pipeline.rules if getattr(r, "catch_all", 0)}
    seen: dict[str, str] = {}
    for i, spec in enumerate(config.settings.rules):
        keys = ("ccproxy", "rules", i)
        if spec.name in seen:
            report.errors.append(f"{ccproblems.where(keys)}: rule name `{spec.name}` is used "
                                 f"twice (first at {seen[spec.name]}); names must be unique")
        seen.setdefault(spec.name, ccproblems.where(keys))
        for arm, _weight in spec.ab:
            if arm not in table:
                report.errors.append(f"{ccproblems.where(keys + ('ab',))}: rule `{spec.name}`: "
                                     f"A/B arm `{arm}` has no model_list entry of that name"
                                     f"{_did_you_mean(arm, table.exact)}")
        if spec.name not in table and spec.name not in catch_all and not spec.ab:
            report.warnings.append(f"{ccproblems.where(keys)}: rule `{spec.name}` has no "
                                   f"model_list entry named `{spec.name}`; its requests fall "
                                   "back to the default route")
    if not config.settings.default_model_passthrough and "default" not in table:
        report.errors.append(f"{ccproblems.where(('ccproxy', 'default_model_passthrough'))}: "
                             "default_model_passthrough is false but model_list has no "
                             "`default` entry; add one or turn passthrough on")
    report.errors += fallback_problems(config, table, ccproblems)
    report.warnings += tracing_backends(config.settings)[1]
    report.errors += team_problems(config, table)
    if config.settings.cache.get("type") == "redis" and redis_settings(config) is None:
        report.errors.append(f"{ccproblems.where(('ccproxy', 'cache'))}: `cache: {{type: redis}}` "
                             "uses LiteLLM's Redis: set router_settings.redis_host (and port, "
                             "password) or redis_url")
    if "langfuse" in config.settings.tracing and not (os.environ.get("LANGFUSE_PUBLIC_KEY")
                                                      and os.environ.get("LANGFUSE_SECRET_KEY")):
        report.warnings.append("tracing.langfuse: LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY "
                               "are not set in this environment; Langfuse will refuse the traces")
    circles: set[frozenset] = set()
    for name in table.exact:
        chain = table.aliases(name)
        if chain[-1] == name and len(chain) > 1 and frozenset(chain) not in circles:
            circles.add(frozenset(chain))
            report.errors.append(f"{lproblems.where(('model_list',))}: model_list entries name "
                                 f"each other in a circle ({' -> '.join(chain)}); an entry's "
                                 "model may name another entry only once along the way")
    report.warnings += [
        f"{ccproblems.where(('ccproxy', key, label))}: {key}: `{name}` is a wildcard entry's "
        "model: its answers would count as the failed route's in the signature ledger; name an "
        "exact model_list entry" for key in ("fallbacks", "context_window_fallbacks")
        for label, targets in getattr(config.settings, key).items() for name in targets
        if name not in table and table.resolve(name) is not None]
    if config.num_workers > 1 and not config.settings.unshared_workers \
            and redis_settings(config) is None:
        report.errors.append(
            f"{ccproblems.where(('litellm', 'num_workers'))}: num_workers is "
            f"{config.num_workers}, but each worker would keep its own session state: turns "
            "would change model mid-tool-loop and thinking blocks would reach models that did "
            "not sign them; use 1, or share the state on Redis (router_settings.redis_host, "
            "see README, \"Running for a team\"), or `ccproxy.unshared_workers: true`")
    report.warnings += readable_secret_warnings(config)
    for i, spec in enumerate(config.settings.rules):
        target = table.resolve(spec.name) if spec.rule.rsplit(".", 1)[-1] == "ImageRule" else None
        if target is not None and supports_vision(target[1]) is False:
            report.warnings.append(f"{ccproblems.where(('ccproxy', 'rules', i))}: ImageRule "
                                   f"`{spec.name}` routes images to {target[1]}, which LiteLLM's "
                                   "model map says does not read images")
    for i, warning in pipeline.rule_warnings:
        report.warnings.append(f"{ccproblems.where(('ccproxy', 'rules', i))}: {warning}")
    for provider, source in pipeline.oauth.items():
        where = ccproblems.where(("ccproxy", "oat_sources", provider))
        syntax = shell_syntax_error(source.command)
        if syntax:
            report.errors.append(f"{where}: oat_sources.{provider}: the command is not valid "
                                 f"shell: {syntax}")
        if not known_provider(provider):
            report.errors.append(f"{where}: oat_sources.{provider}: LiteLLM knows no provider "
                                 f"`{provider}`{_did_you_mean(provider, provider_names())}")
    if unprotected_bind(config):
        report.errors.append(f"{ccproblems.where(('litellm', 'host'))}: host {config.host} is "
                             "reachable from other machines but no proxy key is set; set "
                             "`ccproxy.proxy_key: true` or bind to 127.0.0.1")
    models = config.litellm.get("model_list")
    if not models:
        report.warnings.append(f"{lproblems.where(('model_list',))}: model_list is empty: "
                               "LiteLLM has no model to send requests to")
    if models is not None and not isinstance(models, list):
        report.errors.append(f"{lproblems.where(('model_list',))}: model_list must be a list")
    for i, dep in enumerate(models if isinstance(models, list) else []):
        if not isinstance(dep, dict) or not isinstance(dep.get("model_name"), str) \
                or not isinstance(_litellm_params(dep).get("model"), str):
            report.errors.append(f"{lproblems.where(('model_list', i))}: a model_list entry "
                                 "needs model_name and litellm_params.model")
    report.errors += callback_problems(config, lproblems)
    return report


def team_problems(config: Config, table: "ModelTable") -> list[str]:
    """Budgets and users that name route labels model_list lacks, or that cannot count."""
    settings = config.settings
    problems = []
    budgets = list(settings.budgets) + [b for u in settings.users for b in u.budgets]
    if budgets and not settings.usage_ledger:
        problems.append(f"{budgets[0].where}: budgets count from the usage ledger; set "
                        "`usage_ledger: true` (or drop the budgets)")
    for budget in budgets:
        if budget.action == "downgrade" and budget.to not in table:
            problems.append(f"{budget.where}: budget `{budget.name}` downgrades to `{budget.to}`, "
                            f"which has no model_list entry{_did_you_mean(budget.to, table.exact)}")
    for user in settings.users:
        for label in user.labels or ():
            if label not in table and label != "default":
                problems.append(f"{user.where}: user `{user.pattern}` may use `{label}`, which "
                                f"has no model_list entry{_did_you_mean(label, table.exact)}")
    return problems


def fallback_problems(config: Config, table: "ModelTable",
                      problems: ConfigProblems) -> list[str]:
    """Fallback and quota labels that name no model_list entry."""
    out = []
    settings = config.settings
    for key in ("fallbacks", "context_window_fallbacks"):
        for label, targets in getattr(settings, key).items():
            for name in ((label,) if label != "*" else ()) + targets:
                if table.resolve(name) is None:
                    out.append(f"{problems.where(('ccproxy', key, label))}: {key}: model_list "
                               f"has no entry named `{name}`{_did_you_mean(name, table.names())}")
    if settings.quota_fallback and settings.quota_fallback not in table:
        out.append(f"{problems.where(('ccproxy', 'quota_fallback'))}: quota_fallback: "
                   f"model_list has no entry named `{settings.quota_fallback}`"
                   f"{_did_you_mean(settings.quota_fallback, table.names())}")
    return out


def callback_problems(config: Config, problems: ConfigProblems) -> list[str]:
    """`litellm_settings.callbacks` entries that name ccproxy but not its one callback; a
    LiteLLM tracing callback whose package is not installed (LiteLLM would not start)."""
    settings = config.litellm.get("litellm_settings")
    settings = settings if isinstance(settings, dict) else {}
    out = []
    for key in ("callbacks", "success_callback", "failure_callback"):
        listed = settings.get(key)
        listed = [listed] if isinstance(listed, str) else listed if isinstance(listed, list) else []
        for i, name in enumerate(listed):
            where = problems.where(("litellm_settings", key, i))
            missing = missing_modules(TRACING_PACKAGES[name]) \
                if isinstance(name, str) and name in TRACING_PACKAGES else []
            if missing:
                out.append(f"{where}: LiteLLM's `{name}` callback needs {', '.join(missing)}, "
                           f"which is not installed, so the proxy would not start: pip install "
                           f"{' '.join(TRACING_PIP[name])}, or take it out (ccproxy 1.x's "
                           "template lists it)")
            elif key != "callbacks":
                continue
            elif isinstance(name, str) and name.split(".")[0] == "ccproxy" \
                    and name != "ccproxy.handler":
                out.append(f"{where}: callback `{name}`: ccproxy's callback is `ccproxy.handler`"
                           f"{_did_you_mean(name, ['ccproxy.handler'])}")
            elif name == "ccproxy.handler" and listed.index(name) != i:
                out.append(f"{where}: `ccproxy.handler` is listed twice (each request would be "
                           "routed twice)")
    return out


def readable_secret_warnings(config: Config) -> list[str]:
    """A config file that holds a literal key (not `os.environ/...`) but others may read."""
    literal = any(isinstance(v, str) and v and not v.startswith("os.environ/")
                  for dep in config.model_list for k, v in _litellm_params(dep).items()
                  if k in ("api_key", "aws_secret_access_key", "vertex_credentials"))
    out = []
    for path in config.files if literal else ():
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            out.append(f"{path}: holds a literal api_key but others can read it (mode "
                       f"{mode:o}); run: chmod 600 {path}")
    return out


def shell_syntax_error(command: str) -> str | None:
    """`bash -n` on a command: the first error line, or None (nothing is executed)."""
    import shutil
    import subprocess

    shell = shutil.which("bash") or "/bin/sh"
    try:
        done = subprocess.run([shell, "-n", "-c", command], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not check ({exc})"
    if done.returncode == 0:
        return None
    return next((ln.strip() for ln in done.stderr.splitlines() if ln.strip()), "syntax error")


def known_provider(provider: str) -> bool:
    """True if LiteLLM knows the provider name (or LiteLLM is not installed to ask)."""
    names = provider_names()
    return not names or provider in names


# ---- Tokens --------------------------------------------------------------------------------
# The one tokenizer (tiktoken cl100k_base, loaded from the copy LiteLLM ships, no network) and
# the caches that make counting Claude Code's resent history cheap.

IMAGE_TOKENS = 1600      # an image or binary document block, whatever its size (an estimate)


class TokenCounter:
    """Counts tokens of requests with cl100k_base; caches counts by content.

    Two caches, both checked by equality (never by a hash that could collide):
    - a bounded LRU of string -> count, keyed cheaply by length and ends;
    - recent conversations (system, tools, messages with running totals), so a request that
      resends the same history with one new message only counts the new message.
    """

    def __init__(self, max_chars: int = 64_000_000, max_conversations: int = 64) -> None:
        self.max_chars = max_chars
        self.max_conversations = max_conversations
        self._lock = threading.Lock()
        self._encoding: Any = None
        self._load_failed: str | None = None
        self._strings: collections.OrderedDict = collections.OrderedDict()
        self._chars = 0
        self._conversations: collections.OrderedDict = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    # -- tokenizer ------------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        """False when the tokenizer could not load and counts are estimates."""
        self._ensure_encoding()
        return self._encoding is not None

    @property
    def load_error(self) -> str | None:
        """Why the tokenizer could not load (None when it did)."""
        self._ensure_encoding()
        return self._load_failed

    def _ensure_encoding(self) -> None:
        if self._encoding is not None or self._load_failed is not None:
            return
        with self._lock:
            if self._encoding is not None or self._load_failed is not None:
                return
            try:
                self._encoding = load_cl100k()
            except (ImportError, OSError, ValueError, KeyError) as exc:
                self._load_failed = f"{type(exc).__name__}: {exc}"
                log.error("tokenizer cl100k_base failed to load (%s); token counts are "
                          "ESTIMATES (chars/4) until this is fixed: install tiktoken and "
                          "litellm (which ships the file), or set TIKTOKEN_CACHE_DIR to a "
                          "directory holding it", self._load_failed)

    def encode_len(self, text: str) -> int:
        """Token count of one string, uncached."""
        self._ensure_encoding()
        if self._encoding is None:
            return (len(text) + 3) // 4
        return len(self._encoding.encode_ordinary(text))

    # -- string cache ---------------------------------------------------------------------
    def count_text(self, text: str) -> int:
        """Token count of one string, from the cache when the same text was seen before."""
        if not text:
            return 0
        key = text if len(text) <= 256 else (len(text), text[:64], text[-64:])
        strings = self._strings
        with self._lock:
            entry = strings.get(key)
            if entry is not None and (entry[0] is text or entry[0] == text):
                strings.move_to_end(key)
                self.hits += 1
                return entry[1]
        count = self.encode_len(text)
        with self._lock:
            self.misses += 1
            old = strings.pop(key, None)
            if old is not None:
                self._chars -= len(old[0])
            strings[key] = (text, count)
            self._chars += len(text)
            while self._chars > self.max_chars and strings:
                _k, (old_text, _c) = strings.popitem(last=False)
                self._chars -= len(old_text)
        return count

    def clear(self) -> None:
        """Forget every cached count (the tokenizer stays loaded)."""
        with self._lock:
            self._strings.clear()
            self._conversations.clear()
            self._chars = 0

    # -- request parts --------------------------------------------------------------------
    def count_value(self, value: Any) -> int:
        """Tokens of a system prompt, a message content or a single content block."""
        if isinstance(value, str):
            return self.count_text(value)
        if isinstance(value, list):
            return sum(self.count_value(v) for v in value)
        if isinstance(value, dict):
            return self.count_block(value)
        return 0

    def count_block(self, block: Mapping[str, Any]) -> int:
        """Tokens of one content block (text, tool_use, tool_result, thinking, image...)."""
        kind = block.get("type")
        if kind == "text" or (kind is None and "text" in block):
            return self.count_text(_as_text(block.get("text")))
        if kind == "thinking":
            return self.count_text(_as_text(block.get("thinking")))
        if kind == "redacted_thinking":
            return 0   # opaque encrypted data; its size says nothing about tokens
        if kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
            return self.count_text(_as_text(block.get("name"))) + \
                self.count_text(_json_text(block.get("input")))
        if kind in ("tool_result", "mcp_tool_result", "web_search_tool_result",
                    "web_fetch_tool_result", "code_execution_tool_result"):
            return self.count_value(block.get("content"))
        if kind == "tool_reference":
            return self.count_text(_as_text(block.get("tool_name")))
        if kind in ("image", "image_url", "input_image"):
            return IMAGE_TOKENS
        if kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                return self.count_text(_as_text(source.get("data")))
            if isinstance(source, dict) and source.get("type") == "content":
                return self.count_value(source.get("content"))
            return IMAGE_TOKENS
        if kind == "search_result":
            return self.count_text(_as_text(block.get("title"))) + \
                self.count_value(block.get("content"))
        # Unknown block types: count their JSON without cache markers.
        rest = {k: v for k, v in block.items() if k not in ("cache_control", "citations")}
        return self.count_text(_json_text(rest))

    def count_message(self, message: Any) -> int:
        """Tokens of one message, Anthropic or OpenAI shaped."""
        if not isinstance(message, dict):
            return self.count_value(message)
        total = self.count_value(message.get("content"))
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    total += self.count_text(_as_text(fn.get("name")))
                    total += self.count_text(_as_text(fn.get("arguments")))
        return total

    def count_tools(self, tools: Any) -> int:
        """Tokens of tool definitions: name, description and input schema JSON."""
        if not isinstance(tools, list):
            return 0
        total = 0
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            fn: dict = tool["function"] if isinstance(tool.get("function"), dict) else tool
            total += self.count_text(_as_text(fn.get("name")))
            total += self.count_text(_as_text(fn.get("description")))
            rest = {k: v for k, v in fn.items()
                    if k not in ("name", "description", "cache_control", "defer_loading")}
            if rest:
                total += self.count_text(_json_text(rest))
        return total

    # -- whole request --------------------------------------------------------------------
    def count_request(self, request: Mapping[str, Any], limit: int | None = None
                      ) -> tuple[int, bool]:
        """Tokens of a whole request (system, tools, messages): (count, complete).

        With `limit`, counting stops as soon as the count exceeds it; `complete` is then False
        and the count is a lower bound above the limit. A request nested too deeply to walk
        counts as 0 (it is no conversation anyone sends).
        """
        try:
            return self._count_request(request, limit)
        except RecursionError:
            return 0, False

    def _count_request(self, request: Mapping[str, Any], limit: int | None
                       ) -> tuple[int, bool]:
        system = request.get("system")
        tools = request.get("tools")
        messages = request.get("messages")
        if not isinstance(messages, list):
            messages = []
        key = (_cheap_key(system), _cheap_key(messages[0] if messages else None))
        with self._lock:
            snap = self._conversations.get(key)
            if snap is not None:
                self._conversations.move_to_end(key)
        system_same = snap is not None and snap.system == system
        tools_same = snap is not None and snap.tools == tools
        system_count = snap.system_count if snap is not None and system_same \
            else self.count_value(system)
        tools_count = snap.tools_count if snap is not None and tools_same \
            else self.count_tools(tools)
        head = system_count + tools_count
        if limit is not None and head > limit:
            return head, False
        # The longest prefix of messages equal to those counted before is already summed.
        same = 0
        if snap is not None:
            for old, new in zip(snap.messages, messages, strict=False):
                if old != new:
                    break
                same += 1
        cumulative = snap.cumulative[:same] if snap is not None else []
        if limit is not None and cumulative and head + cumulative[-1] > limit:
            i = bisect.bisect_right(cumulative, limit - head)
            return head + cumulative[i], False
        kept = snap.messages[:same] if snap is not None else []
        total = head + (cumulative[-1] if cumulative else 0)
        for message in messages[same:]:
            total += self.count_message(message)
            kept.append(_freeze(message))
            cumulative.append(total - head)
            if limit is not None and total > limit:
                break
        complete = len(kept) == len(messages)
        new_snap = _Conversation(
            system=snap.system if snap is not None and system_same else _freeze(system),
            system_count=system_count,
            tools=snap.tools if snap is not None and tools_same else _freeze(tools),
            tools_count=tools_count,
            messages=kept, cumulative=cumulative)
        with self._lock:
            self._conversations[key] = new_snap
            self._conversations.move_to_end(key)
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        return total, complete


@dataclasses.dataclass(slots=True)
class _Conversation:
    """A counted request: frozen copies of its parts and running message totals."""

    system: Any
    system_count: int
    tools: Any
    tools_count: int
    messages: list
    cumulative: list


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        except (TypeError, ValueError):
            return str(value)
    except RecursionError:        # absurdly deep nesting: nothing sensible to show or count
        return ""


def _scalar(value: Any) -> Any:
    """A value safe to hash: strings and numbers as they are, anything else by its type."""
    return value if isinstance(value, (str, int, float)) or value is None else type(value).__name__


def _cheap_key(value: Any) -> Any:
    """A small, cheap-to-hash summary of a value (equality is checked separately)."""
    if isinstance(value, str):
        return ("s", len(value), value[:48])
    if isinstance(value, dict):
        content = value.get("content", value.get("text"))
        return ("d", _scalar(value.get("role")), _scalar(value.get("type")), _cheap_key(content))
    if isinstance(value, list):
        return ("l", len(value) and 1, _cheap_key(value[0]) if value else None)
    return (type(value).__name__,)


def _freeze(value: Any) -> Any:
    """A private copy of JSON-like data (strings are shared: they cannot change)."""
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_freeze(v) for v in value]
    return value


# cl100k_base as tiktoken defines it (tiktoken_ext/openai_public.py): the ranks file is read
# from LiteLLM's bundled copy (checked against its SHA-256), so nothing is downloaded and
# no environment variable of the process is changed.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
                  r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


@functools.lru_cache(maxsize=1)
def load_cl100k() -> Any:
    """tiktoken's cl100k_base from LiteLLM's bundled copy; never downloads when it is there.
    Built once per process (parsing the ranks takes ~0.1 s) and shared by every counter."""
    import base64
    import hashlib

    import tiktoken

    folder = bundled_tiktoken_dir()
    if folder is None:
        return tiktoken.get_encoding("cl100k_base")   # the user's own tiktoken cache
    contents = (folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()).read_bytes()
    if hashlib.sha256(contents).hexdigest() != CL100K_SHA256:
        raise ValueError(f"LiteLLM's copy of cl100k_base in {folder} is damaged (hash)")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in contents.splitlines() if line)}
    return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PATTERN,
                             mergeable_ranks=ranks, special_tokens=CL100K_SPECIAL)


TOKENS = TokenCounter()


def count_tokens(text: str) -> int:
    """Token count of a string with the shared tokenizer."""
    return TOKENS.count_text(text)


def count_request_tokens(request: Mapping[str, Any], limit: int | None = None) -> int:
    """Token count of a whole request with the shared tokenizer and caches."""
    return TOKENS.count_request(request, limit)[0]


# ---- Rules ---------------------------------------------------------------------------------
# A rule looks at one request and says whether it matches, with the fact it used (for logs and
# `explain`). Built-ins are designed for what Claude Code sends today (see README, "Rules").


@dataclasses.dataclass(slots=True, frozen=True)
class Verdict:
    """A rule's answer for one request: matched or not, and the fact that decided it."""

    matched: bool
    fact: str = ""
    label: str | None = None      # route to this model_list entry instead of the rule's name


class Rule:
    """Base class of routing rules; subclass it and implement `evaluate` (or `check`).

    `evaluate(request, ctx) -> bool` is the ccproxy 1.x interface; `check` returns a Verdict
    with the fact that decided, which `explain` and debug logs show.
    """

    name: str = ""          # the label (model_list entry) this rule routes to; set on load
    overrides_turn = False  # True: may switch models inside a turn (config key `override`)
    override = False
    sticky = False

    def evaluate(self, request: dict, ctx: Any) -> bool:
        """True when the request matches."""
        return self.check(request, ctx).matched

    def check(self, request: dict, ctx: Any) -> Verdict:
        """The verdict with the fact behind it. Subclasses override this or evaluate."""
        if type(self).evaluate is Rule.evaluate:
            raise NotImplementedError(f"{type(self).__name__} implements neither evaluate "
                                      "nor check")
        return Verdict(bool(self.evaluate(request, ctx)))

    def describe(self) -> str:
        """One line naming the rule and its parameters."""
        return type(self).__name__


ClassificationRule = Rule   # ccproxy 1.x name


class DefaultRule(Rule):
    """Matches every request: a catch-all, e.g. last in the list to route the rest to X.

    With `passthrough: true` the matched request keeps the model the client asked for.
    """

    catch_all = True

    def __init__(self, passthrough: bool = False) -> None:
        self.passthrough = bool(passthrough)

    def check(self, request: dict, ctx: Any) -> Verdict:
        return Verdict(True, "catch-all")

    def describe(self) -> str:
        return f"DefaultRule(passthrough={self.passthrough})" if self.passthrough else "DefaultRule"


class MatchModelRule(Rule):
    """Matches when the requested model name contains `model_name` (case-insensitive).

    Match families, not releases: `haiku` matches claude-haiku-4-5-20251001 and
    claude-haiku-5-5. A list matches any of its names.
    """

    overrides_turn = True

    def __init__(self, model_name: str | list[str]) -> None:
        names = [model_name] if isinstance(model_name, str) else list(model_name or [])
        if not names or not all(isinstance(n, str) and n for n in names):
            raise RuleError(f"MatchModelRule: model_name must be a name or list of names, "
                            f"got {model_name!r}", "e.g. params: {model_name: haiku}")
        self.names = [n.lower() for n in names]
        self.model_name = model_name          # as ccproxy 1.x named it

    def check(self, request: dict, ctx: Any) -> Verdict:
        model = request.get("model")
        if not isinstance(model, str):
            return Verdict(False, "no model in request")
        low = model.lower()
        for n in self.names:
            if n in low:
                return Verdict(True, f"model {model} contains '{n}'")
        return Verdict(False, f"model {model}")

    def describe(self) -> str:
        return f"MatchModelRule({', '.join(self.names)})"


EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")


class ThinkingRule(Rule):
    """Matches requests that ask for deeper reasoning than Claude Code's defaults.

    Claude Code sends `thinking` on every request, so its presence means nothing. This rule
    matches when thinking is not disabled and one of these holds:
    - `thinking.type: enabled` with `budget_tokens >= min_budget_tokens` (default 32000,
      above Claude Code's own 31999 default, i.e. the user raised MAX_THINKING_TOKENS);
    - `output_config.effort` is one of `effort` (default xhigh, max: Claude Code's own
      defaults are high in 2.1.197 and medium in 2.1.332);
    - `thinking.type` is one of `types` (default none; `adaptive` would match every turn).
    """

    def __init__(self, min_budget_tokens: int | None = 32000,
                 effort: str | list[str] | tuple[str, ...] | None = ("xhigh", "max"),
                 types: str | list[str] | None = None) -> None:
        if min_budget_tokens is not None and (isinstance(min_budget_tokens, bool)
                                              or not isinstance(min_budget_tokens, int)):
            raise RuleError(f"ThinkingRule: min_budget_tokens must be a whole number, got "
                            f"{min_budget_tokens!r}", "e.g. min_budget_tokens: 32000")
        self.min_budget_tokens = min_budget_tokens
        self.effort = tuple(_str_list(effort, "ThinkingRule: effort"))
        for e in self.effort:
            if e not in EFFORT_LEVELS:
                raise RuleError(f"ThinkingRule: unknown effort level {e!r}",
                                f"use some of: {', '.join(EFFORT_LEVELS)}")
        self.types = tuple(_str_list(types, "ThinkingRule: types"))
        if "disabled" in self.types:
            raise RuleError("ThinkingRule: `disabled` thinking never matches",
                            "remove `disabled` from types")

    def check(self, request: dict, ctx: Any) -> Verdict:
        thinking = request.get("thinking")
        if not isinstance(thinking, dict):
            return Verdict(False, "no thinking")
        kind = thinking.get("type")
        if kind == "disabled" or not isinstance(kind, str):
            return Verdict(False, f"thinking {_scalar(kind) or 'without type'}")
        if kind in self.types:
            return Verdict(True, f"thinking type {kind}")
        budget = thinking.get("budget_tokens")
        if kind == "enabled" and self.min_budget_tokens is not None \
                and isinstance(budget, (int, float)) and not isinstance(budget, bool) \
                and budget >= self.min_budget_tokens:
            return Verdict(True, f"budget_tokens {budget:,} >= {self.min_budget_tokens:,}")
        config = request.get("output_config")
        effort = config.get("effort") if isinstance(config, dict) else None
        if effort in self.effort:
            return Verdict(True, f"effort {effort}")
        parts = [f"thinking {kind}"]
        if budget is not None:
            parts.append(f"budget_tokens {_scalar(budget)}")
        if effort is not None:
            parts.append(f"effort {_scalar(effort)}")
        return Verdict(False, ", ".join(parts))

    def describe(self) -> str:
        bits = []
        if self.min_budget_tokens is not None:
            bits.append(f"budget>={self.min_budget_tokens}")
        if self.effort:
            bits.append("effort in " + "/".join(self.effort))
        if self.types:
            bits.append("type in " + "/".join(self.types))
        return f"ThinkingRule({', '.join(bits)})"


# Fields in which a client may state a request's size (ccproxy 1.x read them too).
EXPLICIT_TOKEN_FIELDS = ("token_count", "num_tokens", "input_tokens")


class TokenCountRule(Rule):
    """Matches when the whole request (system, tools, messages) exceeds `threshold` tokens.

    Counted with the shared cl100k_base tokenizer; counting stops once the threshold is
    crossed, and resent history is counted from cache.
    """

    overrides_turn = True

    def __init__(self, threshold: int, lower_ratio: float = 0.8) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise RuleError(f"TokenCountRule: threshold must be a whole number of tokens, got "
                            f"{threshold!r}", "e.g. threshold: 60000 (not '60k')")
        if isinstance(lower_ratio, bool) or not isinstance(lower_ratio, (int, float)) \
                or not 0 < lower_ratio <= 1:
            raise RuleError(f"TokenCountRule: lower_ratio must be in (0, 1], got "
                            f"{lower_ratio!r}", "e.g. lower_ratio: 0.8")
        self.threshold = threshold
        self.lower_ratio = float(lower_ratio)

    def check(self, request: dict, ctx: Any) -> Verdict:
        # Hysteresis: a conversation already on this route stays while above the lower mark,
        # so a context hovering around the threshold does not flip models turn by turn.
        conversation = getattr(ctx, "conversation", None)
        staying = conversation is not None and self.name and \
            conversation.last_label == self.name
        limit = int(self.threshold * self.lower_ratio) if staying else self.threshold
        count, complete = TOKENS.count_request(request, limit)
        approx = "" if TOKENS.exact else " (estimated: tokenizer unavailable)"
        mark = f"{limit:,} (lower mark: already on {self.name})" if staying else f"{limit:,}"
        given = max((v for v in (request.get(k) for k in EXPLICIT_TOKEN_FIELDS)
                     if isinstance(v, int) and not isinstance(v, bool)), default=0)
        if given > max(count, limit):      # a count the client states (as ccproxy 1.x read)
            return Verdict(True, f"{given:,} tokens (as the request states) > {mark}")
        if count > limit:
            amount = f"{count:,}" if complete else f"over {count - 1:,}"
            return Verdict(True, f"{amount} tokens > {mark}{approx}")
        return Verdict(False, f"{count:,} tokens <= {mark}{approx}")

    def describe(self) -> str:
        return f"TokenCountRule({self.threshold})"


class MatchToolRule(Rule):
    """Matches when a tool's name contains `tool_name` (case-insensitive).

    Looks at Anthropic `tools[].name` and OpenAI `tools[].function.name`. Claude Code lists
    its client tools (WebSearch included) on every main turn, so this matches every turn for
    those names; use WebSearchRule for web search.
    """

    def __init__(self, tool_name: str) -> None:
        if not isinstance(tool_name, str) or not tool_name:
            raise RuleError(f"MatchToolRule: tool_name must be a name, got {tool_name!r}",
                            "e.g. params: {tool_name: mcp__github}")
        self.tool_name = tool_name.lower()

    def check(self, request: dict, ctx: Any) -> Verdict:
        for name in _tool_names(request.get("tools")):
            if self.tool_name in name.lower():
                return Verdict(True, f"tool {name}")
        return Verdict(False, f"no tool named like '{self.tool_name}'")

    def describe(self) -> str:
        return f"MatchToolRule({self.tool_name})"


class WebSearchRule(Rule):
    """Matches the web-search sub-request: a server tool of type `web_search_*`.

    Claude Code runs a web search as a separate request whose tool is the server tool
    `{"type": "web_search_20250305", ...}`; its client tool `WebSearch`, listed on every main
    turn, does not count.
    """

    overrides_turn = True

    def check(self, request: dict, ctx: Any) -> Verdict:
        tools = request.get("tools")
        if isinstance(tools, list):
            for tool in tools:
                kind = tool.get("type") if isinstance(tool, dict) else None
                if isinstance(kind, str) and kind.startswith(WEB_SEARCH_TOOL_PREFIX):
                    return Verdict(True, f"server tool {kind}")
        return Verdict(False, "no web_search server tool")


class ImageRule(Rule):
    """Matches when the current turn carries an image: an image block in the last user
    message, or inside one of its tool results (a screenshot, a Read of a PNG). It may switch
    models inside a turn, since the image must reach a model that reads images; the rest of
    the turn stays there."""

    overrides_turn = True

    def check(self, request: dict, ctx: Any) -> Verdict:
        last = last_turn_message(request.get("messages"))
        content = last.get("content") if last and last.get("role") == "user" else None
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "image":
                return Verdict(True, "an image in the message")
            inner = block.get("content") if block.get("type") == "tool_result" else None
            if isinstance(inner, list) and any(isinstance(b, dict) and b.get("type") == "image"
                                               for b in inner):
                return Verdict(True, "an image in a tool result")
        return Verdict(False, "no image in the current turn")


# Claude Code 2.1.332's request classes (x-claude-code-request-class, sent with
# CLAUDE_CODE_GATEWAY_HINT_HEADERS=1; see fixtures/README.md) and the prompt that opens a
# compaction request in both captured releases.
REQUEST_CLASSES = ("main", "subagent", "workflow", "compaction", "auxiliary", "side_reply")
REQUEST_CLASS_HEADER = "x-claude-code-request-class"
COMPACTION_PROMPT = "Your task is to create a detailed summary of the conversation so far"
GATEWAY_HINTS_ENV = "CLAUDE_CODE_GATEWAY_HINT_HEADERS"
MODEL_DISCOVERY_ENV = "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"


def request_class(request: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[str, str]:
    """(class, how it is known): Claude Code's request-class header when it sent one, else
    the same fact from the body: the compaction prompt, a subagent's marks, or main."""
    sent = (headers.get(REQUEST_CLASS_HEADER) or "").strip().lower()
    if sent in REQUEST_CLASSES:
        return sent, "header"
    last = last_turn_message(request.get("messages"))
    content = last.get("content") if last and last.get("role") == "user" else None
    texts = [content] if isinstance(content, str) else \
        [b.get("text") for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    if any(isinstance(t, str) and COMPACTION_PROMPT in t for t in texts):
        return "compaction", "its compaction prompt"
    if headers.get("x-claude-code-agent-id") \
            or any("cc_is_subagent=true" in t for t in _system_texts(request)[:2]):
        return "subagent", "a subagent's marks"
    return "main", "no other class's marks"


class RequestClassRule(Rule):
    """Matches Claude Code requests of the given classes (`main`, `subagent`, `workflow`,
    `compaction`, `auxiliary`, `side_reply`): from its request-class header, or without it
    from the body (compaction prompt, subagent marks). A compaction request switches away
    from the turn's route and is its own conversation."""

    overrides_turn = True

    def __init__(self, classes: str | list[str]) -> None:
        self.classes = tuple(c.lower() for c in _str_list(classes, "RequestClassRule: classes"))
        unknown = [c for c in self.classes if c not in REQUEST_CLASSES]
        if not self.classes or unknown:
            raise RuleError(f"RequestClassRule: unknown class {unknown[0] if unknown else '-'}",
                            f"classes: {', '.join(REQUEST_CLASSES)}")

    def check(self, request: dict, ctx: Any) -> Verdict:
        kind, how = getattr(ctx, "request_class", None) \
            or request_class(request, getattr(ctx, "headers", None) or {})
        return Verdict(kind in self.classes, f"{kind} ({how})")

    def describe(self) -> str:
        return f"RequestClassRule({', '.join(self.classes)})"


CCR_TAG = re.compile(r"<CCR-SUBAGENT-MODEL>(.*?)</CCR-SUBAGENT-MODEL>", re.S)


class SubagentRule(Rule):
    """Matches Claude Code's subagent requests (the `Agent` tool's conversations).

    A subagent is known by the `x-claude-code-agent-id` header or `cc_is_subagent=true` in the
    billing line of its system prompt. `system_contains` narrows it to agents whose system
    prompt holds one of the given phrases (Claude Code sends no agent name; the prompt is what
    tells agents apart). claude-code-router's `<CCR-SUBAGENT-MODEL>name</CCR-SUBAGENT-MODEL>`
    tag, found in any system block, routes to the model_list entry `name` (for CCR's
    `provider,model` form, the part after the comma when that is the entry).
    """

    overrides_turn = True

    def __init__(self, system_contains: str | list[str] | None = None,
                 ccr_tag: bool = True) -> None:
        self.phrases = tuple(_str_list(system_contains, "SubagentRule: system_contains"))
        self.ccr_tag = bool(ccr_tag)

    def check(self, request: dict, ctx: Any) -> Verdict:
        texts = _system_texts(request)
        if self.ccr_tag:
            for text in texts:
                if "<CCR-SUBAGENT-MODEL>" in text:
                    found = CCR_TAG.search(text)
                    if found and found.group(1).strip():
                        return Verdict(True, f"CCR tag {found.group(1).strip()}",
                                       label=_ccr_label(found.group(1).strip(), ctx))
        headers = getattr(ctx, "headers", None) or {}
        agent = headers.get("x-claude-code-agent-id")
        marked = any("cc_is_subagent=true" in t for t in texts[:2])
        if not agent and not marked:
            return Verdict(False, "not a subagent")
        who = f"subagent {agent}" if agent else "subagent (billing line)"
        if self.phrases:
            phrase = next((p for p in self.phrases if any(p in t for t in texts)), None)
            if phrase is None:
                return Verdict(False, f"{who}, system prompt without the phrases")
            return Verdict(True, f"{who}, system prompt has '{phrase[:40]}'")
        return Verdict(True, who)

    def describe(self) -> str:
        return f"SubagentRule({', '.join(self.phrases)})" if self.phrases else "SubagentRule"


def _system_texts(request: Mapping[str, Any]) -> list[str]:
    system = request.get("system")
    if isinstance(system, str):
        return [system]
    if isinstance(system, list):
        return [b["text"] for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return []


def _ccr_label(value: str, ctx: Any) -> str:
    pipeline = getattr(ctx, "pipeline", None)
    table = pipeline.models() if pipeline is not None else None
    candidates = [value] + ([value.split(",", 1)[1].strip()] if "," in value else [])
    if table is not None:
        for name in candidates:
            if name in table:
                return name
    return candidates[-1]


def _tool_names(tools: Any) -> Iterable[str]:
    if not isinstance(tools, list):
        return
    for tool in tools:
        if isinstance(tool, str):
            yield tool
        elif isinstance(tool, dict):
            if isinstance(tool.get("name"), str):
                yield tool["name"]
            fn = tool.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                yield fn["name"]


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RuleError(f"{what} must be a name or list of names, got {value!r}")


# Claude Code's own tools: it lists them on every main turn, so matching one matches all turns.
CLAUDE_CODE_TOOLS = frozenset({
    "agent", "bash", "edit", "read", "write", "websearch", "webfetch", "notebookedit", "task",
    "todowrite", "glob", "grep", "skill", "toolsearch", "workflow", "reportfindings"})
CLAUDE_CODE_DEFAULT_EFFORTS = frozenset({"high", "medium"})


def shadow_warning(rule: Any) -> str | None:
    """Why a rule would match every Claude Code turn (and hide the rules after it)."""
    if isinstance(rule, MatchToolRule) and any(rule.tool_name in t for t in CLAUDE_CODE_TOOLS):
        hint = " (for web search use WebSearchRule)" if "web" in rule.tool_name else ""
        return (f"MatchToolRule({rule.tool_name}) matches every Claude Code main turn: Claude "
                f"Code lists that tool on every request{hint}")
    if isinstance(rule, ThinkingRule):
        if "adaptive" in rule.types:
            return ("ThinkingRule with types [adaptive] matches every Claude Code main turn "
                    "(Claude Code sends adaptive thinking on every request)")
        common = CLAUDE_CODE_DEFAULT_EFFORTS.intersection(rule.effort)
        if common:
            return (f"ThinkingRule effort {'/'.join(sorted(common))} matches every Claude Code "
                    "main turn (its defaults: high in 2.1.197, medium in 2.1.332)")
    if isinstance(rule, DefaultRule):
        return ("DefaultRule matches every request that reaches it and routes it to its name "
                "(in ccproxy 1.x it never matched): the rules after it never run")
    if isinstance(rule, TokenCountRule) and rule.threshold < CLAUDE_CODE_BASELINE_TOKENS:
        return (f"TokenCountRule threshold {rule.threshold:,} is below Claude Code's baseline "
                f"of about {CLAUDE_CODE_BASELINE_TOKENS:,} tokens (system prompt and tools), "
                "so it matches every main turn")
    return None


BUILTIN_RULES: dict[str, type[Rule]] = {
    c.__name__: c for c in (DefaultRule, MatchModelRule, ThinkingRule, TokenCountRule,
                            MatchToolRule, WebSearchRule, SubagentRule, ImageRule,
                            RequestClassRule)
}
BUILTIN_RULES["ClassificationRule"] = Rule


def resolve_object(path: str, kind: str, builtins: Mapping[str, Any],
                   search_dir: Path | None = None) -> Any:
    """A rule class or hook function from a config path.

    Built-in names resolve bare (`TokenCountRule`) or with 1.x prefixes (`ccproxy.rules.X`,
    `ccproxy.hooks.X`, `ccproxy.X`); other dotted paths are imported, with the config
    directory searched first.
    """
    short = path
    for prefix in ("ccproxy.rules.", "ccproxy.hooks.", "ccproxy."):
        if path.startswith(prefix):
            short = path[len(prefix):]
            break
    if short in builtins:
        return builtins[short]
    if path.startswith("ccproxy.") or "." not in path:
        raise RuleError(f"unknown {kind} `{path}`",
                        f"built-in {kind}s: {', '.join(sorted(builtins))}"
                        f"{_did_you_mean(short, builtins)}")
    module_name, _, attr = path.rpartition(".")
    added = False
    if search_dir is not None and str(search_dir) not in sys.path:
        sys.path.insert(0, str(search_dir))
        added = True
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuleError(f"cannot import {kind} `{path}`: {exc}",
                        f"put {module_name.replace('.', '/')}.py next to the config or on "
                        "PYTHONPATH") from exc
    finally:
        if added:
            sys.path.remove(str(search_dir))
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise RuleError(f"{kind} `{path}`: module {module_name} has no `{attr}`",
                        "check the spelling of the class/function name") from exc


def build_rule(spec: RuleSpec, search_dir: Path | None = None) -> Rule:
    """Instantiate one configured rule; RuleError names the bad or missing parameter."""
    cls = resolve_object(spec.rule, "rule", BUILTIN_RULES, search_dir)
    if not (isinstance(cls, type) and issubclass(cls, Rule)) and not callable(cls):
        raise RuleError(f"rule `{spec.name}`: {spec.rule} is not a rule class",
                        "subclass ccproxy.Rule and implement evaluate()")
    try:
        sig = inspect.signature(cls)
        sig.bind(*spec.args, **spec.params)
    except TypeError as exc:
        raise RuleError(f"rule `{spec.name}` ({spec.rule}): bad params: {exc}",
                        f"parameters of {getattr(cls, '__name__', cls)}: {_signature_text(cls)}") \
            from exc
    except ValueError:
        pass   # no introspectable signature; let the call decide
    try:
        rule = cls(*spec.args, **spec.params)
    except RuleError as exc:
        raise RuleError(f"rule `{spec.name}` ({spec.rule}): {exc.args[0]}", exc.hint) from exc
    except (TypeError, ValueError) as exc:
        raise RuleError(f"rule `{spec.name}` ({spec.rule}): {exc}",
                        f"parameters: {_signature_text(cls)}") from exc
    if not hasattr(rule, "evaluate") and not hasattr(rule, "check"):
        raise RuleError(f"rule `{spec.name}`: {spec.rule} has no evaluate()",
                        "subclass ccproxy.Rule")
    try:
        rule.name = spec.name
        rule.override = getattr(rule, "overrides_turn", False) if spec.override is None \
            else spec.override
        rule.sticky = spec.sticky
        rule.ab = spec.ab
    except AttributeError as exc:
        raise RuleError(f"rule `{spec.name}` ({spec.rule}): ccproxy cannot set its name, "
                        f"override and sticky ({exc})",
                        "add `name`, `override`, `sticky` and `ab` to its __slots__, or drop "
                        "__slots__") from exc
    return rule


class RuleConfig:
    """ccproxy 1.x's `ccproxy.config.RuleConfig`: one `rules:` entry (`model_name` is the
    route it names, `rule_path` the class, `params` its arguments in either form)."""

    def __init__(self, name: str, rule_path: str, params: Any = None) -> None:
        self.model_name, self.rule_path = name, rule_path
        self.params = params if params is not None else []

    def create_instance(self) -> Any:
        params, args = parse_params(self.params)
        return build_rule(RuleSpec(self.model_name, self.rule_path, params, args))


class CCProxyConfig:
    """ccproxy 1.x's `ccproxy.config.CCProxyConfig`: what a 1.x rule's `evaluate(request,
    config)` or a 1.x hook reads (`config.debug`, `config.rules`, `get_oauth_token`, ...).

    Made the 1.x ways, from keywords (`CCProxyConfig(rules=[RuleConfig(...)], hooks=[...])`,
    unknown ones ignored as 1.x did) or `from_yaml(path)`, or from a loaded Config
    (`from_config`, what the proxy does). `pipeline` routes with it.
    """

    debug: bool
    metrics_enabled: bool
    default_model_passthrough: bool
    handler: str
    oat_sources: dict[str, Any]
    hooks: list[Any]
    rules: list[RuleConfig]
    ccproxy_config_path: Path
    litellm_config_path: Path
    FIELDS: dict[str, Any] = {
        "debug": False, "metrics_enabled": True, "default_model_passthrough": True,
        "handler": LEGACY_HANDLER, "oat_sources": {}, "hooks": [], "rules": [],
        "ccproxy_config_path": Path(CONFIG_FILE), "litellm_config_path": Path(LITELLM_CONFIG_FILE)}

    def __init__(self, **fields: Any) -> None:
        for name, default in self.FIELDS.items():
            setattr(self, name, copy.copy(fields.get(name, default)))
        self._config: Config | None = None
        self._pipeline: Pipeline | None = None

    @classmethod
    def from_config(cls, config: Config, pipeline: "Pipeline | None" = None) -> "CCProxyConfig":
        """A loaded Config as 1.x saw it; `pipeline`: the one already built from it."""
        settings = config.settings
        directory = config.directory or Path(".")
        made = cls(debug=settings.debug, metrics_enabled=settings.metrics_enabled,
                   default_model_passthrough=settings.default_model_passthrough,
                   oat_sources=dict(settings.oat_sources or {}),
                   hooks=[h.path if not h.params else {"hook": h.path, "params": dict(h.params)}
                          for h in settings.hooks],
                   rules=[RuleConfig(r.name, r.rule, dict(r.params) or list(r.args))
                          for r in settings.rules],
                   ccproxy_config_path=config.ccproxy_file or directory / CONFIG_FILE,
                   litellm_config_path=config.litellm_file or directory / LITELLM_CONFIG_FILE)
        made._config, made._pipeline = config, pipeline
        return made

    @classmethod
    def from_yaml(cls, yaml_path: str | os.PathLike, **fields: Any) -> "CCProxyConfig":
        """A config file's settings (defaults if it does not exist), OAuth tokens loaded."""
        path = Path(yaml_path)
        if path.name == CONFIG_FILE or not path.is_file():
            config = load_config(path.parent)
        else:
            data, node = read_yaml(path)
            raw = _expect_mapping(data, path)
            config = build_config(raw, litellm_sections(raw), directory=path.parent,
                                  ccproxy_file=path, litellm_file=path, node=node)
        made = cls.from_config(config)
        for name, value in fields.items():
            if name in cls.FIELDS:
                setattr(made, name, value)
        made._load_credentials()
        return made

    @classmethod
    def from_proxy_runtime(cls, **fields: Any) -> "CCProxyConfig":
        """The config of the config dir `start` would use; with no file there, 1.x's
        defaults (no rules, no hooks) updated by `fields`."""
        try:
            config = load_config()
        except ConfigError as exc:
            log.warning("%s; 1.x code gets the built-in defaults", exc)
            config = Config(settings=Settings(), litellm={})
        if config.files:
            return cls.from_config(config)
        directory = config.directory or Path(".")
        return cls(**{"ccproxy_config_path": directory / CONFIG_FILE,
                      "litellm_config_path": directory / LITELLM_CONFIG_FILE, **fields})

    def to_config(self) -> Config:
        """This config as a Config: the one it was read from, else made from its fields."""
        if self._config is not None:
            return self._config
        problems = ConfigProblems(None, None)
        section = {"debug": self.debug, "default_model_passthrough": self.default_model_passthrough,
                   "metrics_enabled": self.metrics_enabled, "oat_sources": self.oat_sources,
                   "hooks": self.hooks,
                   "rules": [{"name": r.model_name, "rule": r.rule_path, "params": r.params}
                             for r in self.rules]}
        settings = parse_settings(section, problems)
        if problems.errors:
            raise ConfigError("; ".join(problems.errors), "fix the CCProxyConfig fields")
        self._config = Config(settings=settings, litellm={},
                              directory=Path(self.ccproxy_config_path).parent)
        return self._config

    @property
    def pipeline(self) -> "Pipeline":
        """The pipeline that routes with this config (the proxy's own, when it runs)."""
        if self._pipeline is None:
            self._pipeline = Pipeline(self.to_config(), model_source=live_model_list)
            self._pipeline._legacy = self
        return self._pipeline

    def _load_credentials(self) -> None:
        """Run the oat_sources commands (1.x: an error when every one of them fails)."""
        failures = load_oauth_sources(self.pipeline, required=False)
        if failures and len(failures) == len(self.pipeline.oauth):
            raise RuntimeError(f"Failed to load OAuth tokens for all {len(failures)} "
                               "provider(s):\n  - " + "\n  - ".join(failures))

    def load_hooks(self) -> list[tuple[Callable[..., Any], dict]]:
        """The hooks as (function, params), as 1.x listed them."""
        return [(fn, params) for _name, fn, params in self.pipeline.hooks]

    @property
    def oat_values(self) -> dict[str, str]:
        """provider -> the OAuth token loaded for it."""
        return {p: s.token for p, s in self.pipeline.oauth.items() if s.token}

    @property
    def _oat_user_agents(self) -> dict[str, str]:
        return {p: s.user_agent for p, s in self.pipeline.oauth.items() if s.user_agent}

    def get_oauth_token(self, provider: str) -> str | None:
        return self.oat_values.get(provider)

    def get_oauth_user_agent(self, provider: str) -> str | None:
        return self._oat_user_agents.get(provider)


def _signature_text(obj: Any) -> str:
    try:
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return "unknown"
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                     for p in params) or "none"


def rule_verdict(rule: Any, request: dict, ctx: Any) -> Verdict:
    """Ask a rule (built-in, Rule subclass or 1.x-style object with evaluate) for a verdict."""
    own_check = getattr(type(rule), "check", None)
    if own_check is not None and own_check is not Rule.check:
        return rule.check(request, ctx)
    return Verdict(bool(rule.evaluate(request, ctx)))


# ---- Context -------------------------------------------------------------------------------
# The request context the hooks share, the routing decision, the model table and provider
# detection; and the one place that decides what is a secret in text. Uses Config and Rules.

def redact(name: str, value: Any) -> str:
    """A header value safe to log: secrets are replaced, everything else shortened."""
    if name.lower() in SECRET_HEADERS or "token" in name.lower() or "secret" in name.lower():
        return "<redacted>"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "..."


# What a credential looks like in free text: provider key prefixes, bearer values, JWTs, and
# long unbroken runs of key characters (a token a command printed to stderr, say).
SECRET_PATTERN = re.compile(
    r"(?i)\b(?:bearer|basic)\s+\S+"
    r"|\b(?:sk|pk|rk|ak|xox[abp])[-_][A-Za-z0-9_\-]{6,}"
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-.]+"
    r"|(?<![A-Za-z0-9_\-+/=.])[A-Za-z0-9_\-+/=.]{32,}")


def redact_secrets(text: str) -> str:
    """Free text (a command's stderr, an error message) with anything credential-like
    replaced by `<redacted>`: the one place that decides what may be shown or logged."""
    return SECRET_PATTERN.sub("<redacted>", text)


@dataclasses.dataclass(slots=True)
class RoutingDecision:
    """Where one request went and why."""

    label: str                  # rule name that matched, or "default"
    requested_model: str        # what the client asked for
    model: str                  # the model_list name handed to LiteLLM's router
    upstream: str               # litellm_params.model of that entry (the real model)
    passthrough: bool           # True when the requested model was kept
    reason: str = ""            # the matching rule's fact
    provider: str | None = None
    arm: str | None = None      # the A/B arm (a route label) a rule's `ab` split chose
    user: str | None = None     # who sent it (see request_user)

    def as_dict(self) -> dict:
        """JSON-safe form for metadata, logs and `explain --json`."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class RequestContext:
    """What the hooks of one request share: config, headers, ids, verdicts, the decision."""

    pipeline: "Pipeline"
    headers: dict[str, str]               # lower-case names, raw values: never log these
    call_type: str = "anthropic_messages"
    path: str = "/v1/messages"
    session_id: str | None = None
    agent_id: str | None = None
    label: str | None = None
    verdicts: list[tuple[str, str, Verdict]] = dataclasses.field(default_factory=list)
    decision: RoutingDecision | None = None
    auth: list[str] = dataclasses.field(default_factory=list)   # what auth forwarding did
    user_api_key_dict: Any = None
    hook_errors: list[str] = dataclasses.field(default_factory=list)
    session: "SessionState | None" = None           # this session's state (and agent's)
    conversation: "ConversationState | None" = None  # this conversation's routing state
    continuation: bool = False       # the request continues a turn (its last message: tool_result)
    route_label: str | None = None   # a matching rule's Verdict.label, when it names the route
    notes: list[str] = dataclasses.field(default_factory=list)   # what the fixes changed
    original_thinking: Any = None    # the client's `thinking`, as it arrived
    quota_resend: bool = False       # sent once more because the plan limit was reached
    switched: bool = False           # this request moved its conversation to another model
    arm: str | None = None           # the A/B arm the matching rule's `ab` split chose
    user: str | None = None          # who sent it (user_header, LiteLLM key, Claude Code account)
    blocked: tuple[str, float] | None = None   # a budget refuses it: (why, when it resets)
    request_class: tuple[str, str] | None = None   # (class, how known), once worked out

    @property
    def config(self) -> Config:
        """The configuration in use."""
        return self.pipeline.config

    def __getattr__(self, name: str) -> Any:
        # A ccproxy 1.x rule is called `evaluate(request, config)` and reads config.debug,
        # config.rules, ...: the context answers those as 1.x's CCProxyConfig did.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.pipeline.legacy_config, name)


def request_user(data: Mapping[str, Any], headers: Mapping[str, str], key: Any,
                 header: str = "") -> str | None:
    """Who sent a request: the configured header, else the user of the LiteLLM virtual key
    it came with (not the master key's, which the whole team shares), else Claude Code's
    account (or device) from metadata.user_id."""
    if header and headers.get(header):
        return headers[header]
    key_user = key.get("user_id") if isinstance(key, Mapping) else getattr(key, "user_id", None)
    if isinstance(key_user, str) and key_user and key_user != PROXY_ADMIN_USER:
        return key_user
    claude = claude_user(data.get("metadata"))
    return claude.get("claude_account_id") or claude.get("claude_user_hash")


def parse_session(metadata: Any, headers: Mapping[str, str]) -> str | None:
    """Claude Code's session id: metadata.user_id (JSON or 1.x string form), else the header."""
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and user_id:
        if user_id.startswith("{"):
            try:
                parsed = json.loads(user_id)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str) \
                    and parsed["session_id"]:
                return parsed["session_id"]
        elif "_session_" in user_id:
            session = user_id.rsplit("_session_", 1)[1]
            if session:
                return session
    return headers.get("x-claude-code-session-id") or None


def claude_user(metadata: Any) -> dict[str, str]:
    """Who is behind a Claude Code request, from metadata.user_id: the user (device) hash and
    the account id, under ccproxy 1.x's trace names; the JSON form or 1.x's
    `user_HASH_account_UUID_session_UUID` string."""
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return {}
    if user_id.startswith("{"):
        try:
            parsed = json.loads(user_id)
        except ValueError:
            return {}
        found = {"claude_user_hash": parsed.get("device_id"),
                 "claude_account_id": parsed.get("account_uuid")} \
            if isinstance(parsed, dict) else {}
    else:
        user, _, account = user_id.split("_session_", 1)[0].partition("_account_")
        found = {"claude_user_hash": user.removeprefix("user_"), "claude_account_id": account}
    return {k: v for k, v in found.items() if isinstance(v, str) and v}


class ModelTable:
    """LiteLLM's model_list by name: exact entries first, then wildcard ones (`claude-*`)."""

    def __init__(self, deployments: Iterable[Mapping[str, Any]]) -> None:
        self.deployments = [dep for dep in deployments if isinstance(dep, Mapping)]
        self.exact: dict[str, list[Mapping[str, Any]]] = {}
        self.wildcards: list[tuple[str, Mapping[str, Any]]] = []
        for dep in self.deployments:
            name = dep.get("model_name")
            if not isinstance(name, str):
                continue
            if "*" in name:
                self.wildcards.append((name, dep))
            else:
                self.exact.setdefault(name, []).append(dep)

    def __contains__(self, name: str) -> bool:
        return name in self.exact

    def names(self) -> list[str]:
        """Every model_name, exact ones first."""
        return list(self.exact) + [n for n, _ in self.wildcards]

    def aliases(self, name: str) -> list[str]:
        """ccproxy 1.x's aliases: an entry whose litellm_params.model is another entry's
        model_name stands for that entry. The names followed from `name` (itself first); a
        cycle ends the list with the name that closes it."""
        chain = [name]
        while True:
            deps = self.exact.get(chain[-1])
            model = _litellm_params(deps[0]).get("model") if deps else None
            if not isinstance(model, str) or model not in self.exact or model == chain[-1]:
                return chain
            chain.append(model)
            if model in chain[:-1]:
                return chain

    def with_aliases_of(self, written: "ModelTable") -> "ModelTable":
        """This table plus the aliases of the written model_list that it lacks (LiteLLM
        creates no deployment for an alias whose model names no provider)."""
        missing = [deps[0] for name, deps in written.exact.items()
                   if name not in self.exact and len(written.aliases(name)) > 1]
        return ModelTable(self.deployments + missing) if missing else self

    def flattened(self) -> list[Mapping[str, Any]]:
        """The model_list with each alias of an alias pointing at the entry its chain ends
        in, so that LiteLLM, which knows no aliases, can create it like any other alias."""
        out = []
        for dep in self.deployments:
            chain = self.aliases(dep["model_name"]) if isinstance(dep.get("model_name"), str) \
                else []
            if len(chain) > 2 and chain[-1] not in chain[:-1]:
                dep = dict(dep, litellm_params=dict(_litellm_params(dep), model=chain[-1]))
            out.append(dep)
        return out

    def resolve_route(self, label: str) -> tuple[Mapping[str, Any], str] | None:
        """(deployment, upstream model) a route label reaches, its aliases followed."""
        return self.resolve(self.aliases(label)[-1])

    def resolve(self, name: str) -> tuple[Mapping[str, Any], str] | None:
        """(deployment, upstream model) for a model name, wildcards included."""
        deps = self.exact.get(name)
        if deps:
            dep = deps[0]
            return dep, str(_litellm_params(dep).get("model", name))
        import fnmatch

        for pattern, dep in self.wildcards:
            if fnmatch.fnmatchcase(name, pattern):
                target = str(_litellm_params(dep).get("model", name))
                if "*" in target:
                    prefix = pattern.split("*", 1)[0]
                    target = target.replace("*", name[len(prefix):] if name.startswith(prefix)
                                            else name, 1)
                return dep, target
        return None

    def group(self, name: str) -> list[Mapping[str, Any]]:
        """All deployments LiteLLM may pick for this model name."""
        if name in self.exact:
            return list(self.exact[name])
        found = self.resolve(name)
        return [found[0]] if found else []


_PROVIDER_CACHE: dict[tuple, str | None] = {}
# Provider prefixes of `provider/model` names that LiteLLM takes as they are.
COMMON_PROVIDERS = frozenset({
    "anthropic", "openai", "custom_openai", "hosted_vllm", "gemini", "vertex_ai", "bedrock",
    "azure", "openrouter", "deepseek", "ollama", "ollama_chat", "groq", "mistral", "xai",
    "together_ai", "fireworks_ai", "perplexity", "cohere", "lm_studio", "litellm_proxy"})


def provider_of(params: Mapping[str, Any]) -> str | None:
    """The LLM provider LiteLLM will call for a deployment's litellm_params."""
    model = params.get("model")
    custom = params.get("custom_llm_provider")
    api_base = params.get("api_base")
    key = (model, custom, api_base)
    if key in _PROVIDER_CACHE:
        return _PROVIDER_CACHE[key]
    provider: str | None = custom if isinstance(custom, str) else None
    head = model.split("/", 1)[0] if isinstance(model, str) and "/" in model else ""
    if provider is None and head in COMMON_PROVIDERS:
        provider = head      # what LiteLLM decides first too, without importing it
    if provider is None and isinstance(model, str):
        provider = llm_provider(model, custom, api_base)
        if provider is None:
            provider = head or ("anthropic" if model.startswith("claude") else None)
    _PROVIDER_CACHE[key] = provider
    return provider


# ---- Sessions ------------------------------------------------------------------------------
# Per-session and per-conversation routing state: turns, sticky routes, the models that
# signed thinking blocks, switch figures; exportable (explain --session). Uses Context.

@dataclasses.dataclass(slots=True)
class ConversationState:
    """Routing state of one conversation: the route of its current turn and of its last
    request, and a sticky route if a sticky rule matched."""

    turn_label: str | None = None
    sticky_label: str | None = None
    last_label: str | None = None
    last_upstream: str | None = None


@dataclasses.dataclass(slots=True)
class SessionState:
    """One Claude Code session (or one of its subagents): conversations, the models that
    signed its thinking blocks, and its switch figures."""

    session_id: str
    agent_id: str | None = None
    requested_model: str = ""
    last_label: str = ""
    last_upstream: str = ""
    requests: int = 0
    switches: int = 0
    uncached_tokens: int = 0
    last_seen: float = 0.0
    conversations: collections.OrderedDict = dataclasses.field(
        default_factory=collections.OrderedDict)
    signatures: collections.OrderedDict = dataclasses.field(
        default_factory=collections.OrderedDict)
    producers: set = dataclasses.field(default_factory=set)   # models that signed any block

    def as_dict(self) -> dict:
        """What `GET /ccproxy/session/ID` and the status line show."""
        return {"session_id": self.session_id, "agent_id": self.agent_id,
                "requested_model": self.requested_model, "last_label": self.last_label,
                "last_upstream": self.last_upstream, "requests": self.requests,
                "switches": self.switches, "uncached_tokens": self.uncached_tokens}

    def export(self) -> dict:
        """All of the routing state, JSON-safe (signatures only as digests)."""
        return dict(self.as_dict(),
                    conversations={k: dataclasses.asdict(c)
                                   for k, c in self.conversations.items()},
                    signatures=dict(self.signatures), producers=sorted(self.producers))

    @classmethod
    def restore(cls, state: Mapping[str, Any]) -> "SessionState":
        """A SessionState from `export()`'s output (unknown or odd fields are skipped)."""
        session = cls(str(state.get("session_id", "")), state.get("agent_id") or None)
        for name in ("requested_model", "last_label", "last_upstream"):
            if isinstance(state.get(name), str):
                setattr(session, name, state[name])
        for name in ("requests", "switches", "uncached_tokens"):
            if isinstance(state.get(name), int):
                setattr(session, name, state[name])
        fields = {f.name for f in dataclasses.fields(ConversationState)}
        for key, conv in (state.get("conversations") or {}).items():
            if isinstance(conv, dict):
                session.conversations[key] = ConversationState(
                    **{k: v for k, v in conv.items() if k in fields and
                       (v is None or isinstance(v, str))})
        signatures = state.get("signatures")
        if isinstance(signatures, dict):
            session.signatures.update({str(k): str(v) for k, v in signatures.items()})
        session.producers.update(str(p) for p in state.get("producers") or ())
        return session


MAX_CONVERSATIONS = 64       # per session: the main thread plus side requests (web search...)
MAX_SIGNATURES = 4096        # per session


def signature_digest(value: str) -> str:
    """A short digest of a thinking block's signature (the signature itself is not kept)."""
    import hashlib

    return hashlib.sha256(value.encode()).hexdigest()[:32]


def thinking_signature(block: Any) -> str | None:
    """The signature (or redacted data) that binds a thinking block to its model."""
    if not isinstance(block, dict):
        return None
    if block.get("type") == "thinking" and isinstance(block.get("signature"), str):
        return block["signature"] or None
    if block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
        return block["data"] or None
    return None


def last_turn_message(messages: Any) -> dict | None:
    """The last user or assistant message (mid-conversation system messages skipped)."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") in ("user", "assistant"):
            return message
    return None


def conversation_key(request: Mapping[str, Any]) -> str:
    """What tells a session's conversations apart: a digest of the whole first message (two
    conversations that merely start alike stay apart)."""
    import hashlib

    messages = request.get("messages")
    first = messages[0] if isinstance(messages, list) and messages else None
    text = _json_text(first).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=12).hexdigest()


def is_continuation(request: Mapping[str, Any]) -> bool:
    """True when the request continues a turn: its last user message carries tool results."""
    last = last_turn_message(request.get("messages"))
    content = last.get("content") if last and last.get("role") == "user" else None
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


# Requests that carry a conversation's history but are not its next step: their route is
# not the conversation's, and they record nothing in it.
SEPARATE_CLASSES = ("compaction", "auxiliary")


class SessionStore:
    """Per-session routing state, bounded in sessions and entries and swept by TTL."""

    shared = False                  # one process's own sessions

    def __init__(self, ttl: float = 3600.0, max_sessions: int = 2000) -> None:
        self.ttl, self.max_sessions = ttl, max_sessions
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[tuple, SessionState] = \
            collections.OrderedDict()
        self._quota: dict[str, float] = {}    # session id -> when its plan limit resets

    def attach(self, ctx: "RequestContext", request: Mapping[str, Any]) -> None:
        """Give the context its session and conversation (created on first sight)."""
        if not ctx.session_id:
            return
        # A compaction (or auxiliary) request has its own route: no conversation of its own
        # to keep, and the main one's is not touched; the session's ledger still applies.
        ctx.request_class = request_class(request, ctx.headers)
        separate = ctx.request_class[0] in SEPARATE_CLASSES
        key = (ctx.session_id, ctx.agent_id)
        conv_key = conversation_key(request)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = SessionState(ctx.session_id, ctx.agent_id)
                self._sessions[key] = session
                while len(self._sessions) > self.max_sessions:
                    _k, old = self._sessions.popitem(last=False)
                    _log_session_end(old, "evicted")
            self._sessions.move_to_end(key)
            session.last_seen = time.monotonic()
            conversation = session.conversations.get(conv_key) if not separate else None
            if conversation is None and not separate:
                conversation = ConversationState()
                session.conversations[conv_key] = conversation
                while len(session.conversations) > MAX_CONVERSATIONS:
                    session.conversations.popitem(last=False)
            if conversation is not None:
                session.conversations.move_to_end(conv_key)
        ctx.session, ctx.conversation = session, conversation
        ctx.continuation = is_continuation(request)

    def record_route(self, ctx: "RequestContext", decision: RoutingDecision,
                     request: Mapping[str, Any], sticky: bool = False) -> None:
        """Remember where a conversation's request went; count model switches (and note a
        switch on the context)."""
        session, conversation = ctx.session, ctx.conversation
        if session is None or conversation is None:
            return
        with self._lock:
            switched = conversation.last_upstream not in (None, decision.upstream)
            if not ctx.continuation or decision.label != conversation.turn_label:
                conversation.turn_label = decision.label
            if sticky:
                conversation.sticky_label = decision.label
            conversation.last_label = decision.label
            conversation.last_upstream = decision.upstream
            session.requests += 1
            session.requested_model = decision.requested_model
            session.last_label, session.last_upstream = decision.label, decision.upstream
        ctx.switched = switched
        if switched:
            resent = self.resent_on_switch(session.session_id, decision, request)
            with self._lock:
                session.switches += 1
                session.uncached_tokens += resent

    @staticmethod
    def resent_on_switch(session_id: str, decision: RoutingDecision,
                         request: Mapping[str, Any]) -> int:
        """The tokens a switch sends uncached (the new model has none of this conversation
        cached: all of it goes again); logged."""
        resent = TOKENS.count_request(request)[0]
        log.info("session %s: switch to %s (%s), ~%d tokens sent uncached",
                 session_id[:8], decision.upstream, decision.label, resent)
        return resent

    def record_signature(self, session_id: str | None, agent_id: str | None, signature: str,
                         model: str) -> None:
        """Note which upstream model produced a thinking block."""
        if not session_id:
            return
        with self._lock:
            session = self._sessions.get((session_id, agent_id))
            if session is None:
                return
            session.signatures[signature_digest(signature)] = model
            session.producers.add(model)
            while len(session.signatures) > MAX_SIGNATURES:
                session.signatures.popitem(last=False)

    def producer(self, session: SessionState | None, signature: str) -> str | None:
        """The upstream model that produced a thinking block, if it went through us."""
        return self.producers_of(session, [signature]).get(signature)

    def producers_of(self, session: SessionState | None,
                     signatures: list[str]) -> dict[str, str | None]:
        """The models that produced these thinking blocks (None: not through us), in one
        look-up (one round trip on Redis)."""
        if session is None:
            return {}
        with self._lock:
            return {s: session.signatures.get(signature_digest(s)) for s in signatures}

    def backend(self) -> dict:
        """Where the state lives, for health."""
        return {"backend": "process", "ok": True}

    def export(self, session_id: str) -> dict:
        """Every state of a session (main thread and subagents), for `explain --session`."""
        with self._lock:
            states = [s.export() for (sid, _a), s in self._sessions.items() if sid == session_id]
        return {"session_id": session_id, "states": states}

    @classmethod
    def load(cls, exported: Mapping[str, Any]) -> "SessionStore":
        """A store holding a copy of exported session state (see export)."""
        store = cls()
        for state in exported.get("states") or ():
            if isinstance(state, dict):
                session = SessionState.restore(state)
                store._sessions[(session.session_id, session.agent_id)] = session
        return store

    def find(self, session_id: str) -> dict | None:
        """The session's state for the status line: its main thread, else its latest agent."""
        with self._lock:
            main = self._sessions.get((session_id, None))
            if main is None:
                agents = [s for (sid, _a), s in self._sessions.items() if sid == session_id]
                main = agents[-1] if agents else None
            found = main.as_dict() if main is not None else None
        if found is not None:
            found["quota_until"] = self.quota_until(session_id)
        return found

    def recent(self, limit: int = 50) -> list[dict]:
        """The sessions (and agents) seen last, newest first, with their idle seconds."""
        now = time.monotonic()
        with self._lock:
            latest = list(self._sessions.values())[-limit:]
            found = [dict(s.as_dict(), idle_s=round(now - s.last_seen, 1))
                     for s in reversed(latest)]
        return found

    def limit_reached(self, session_id: str, until: float) -> bool:
        """Note that the session's plan limit is reached until `until` (epoch seconds);
        True when this starts a window (the caller logs it once)."""
        with self._lock:
            new = self._quota.get(session_id, 0.0) <= time.time()
            self._quota[session_id] = until
            while len(self._quota) > self.max_sessions:
                del self._quota[next(iter(self._quota))]
        return new

    def quota_until(self, session_id: str | None) -> float | None:
        """When the session's plan limit resets, while it is reached; None after that."""
        with self._lock:
            until = self._quota.get(session_id or "")
            if until is None or until > time.time():
                return until
            del self._quota[session_id or ""]
        log.info("session %s: its plan limit has reset; back to its own routes",
                 (session_id or "")[:8])
        return None

    def sweep(self) -> int:
        """Forget sessions idle longer than the TTL (logging their figures); how many."""
        deadline = time.monotonic() - self.ttl
        with self._lock:
            old = [k for k, s in self._sessions.items() if s.last_seen < deadline]
            ended = [self._sessions.pop(k) for k in old]
        for session in ended:
            _log_session_end(session, "ended")
        return len(ended)

    def totals(self) -> dict:
        """Switches and uncached tokens over the sessions remembered now."""
        with self._lock:
            sessions = list(self._sessions.values())
            now = time.time()
            limited = sum(1 for until in self._quota.values() if until > now)
        return {"sessions": len(sessions), "switches": sum(s.switches for s in sessions),
                "uncached_tokens": sum(s.uncached_tokens for s in sessions),
                "plan_limited": limited}

    def __len__(self) -> int:
        return len(self._sessions)


def redis_settings(config: Config) -> dict[str, Any] | None:
    """The Redis LiteLLM is configured with (router_settings' redis_url or redis_host/port/
    password, else a redis cache in litellm_settings.cache_params), `os.environ/NAME`
    values read; None when there is none (session state stays in the process)."""
    def setting(section: Any, key: str) -> Any:
        value = section.get(key) if isinstance(section, Mapping) else None
        return _secret(value) if isinstance(value, str) else value

    router = config.litellm.get("router_settings")
    litellm_settings = config.litellm.get("litellm_settings")
    cache = litellm_settings.get("cache_params") if isinstance(litellm_settings, Mapping) else None
    for section in (router, cache if setting(cache, "type") == "redis" else None):
        url = setting(section, "redis_url") or setting(section, "url")
        host = setting(section, "redis_host") or setting(section, "host")
        if url:
            return {"url": str(url)}
        if host:
            return {"host": str(host), "port": int(setting(section, "redis_port")
                                                   or setting(section, "port") or 6379),
                    "password": setting(section, "redis_password") or setting(section, "password")}
    return None


# record_route on Redis, atomically: the conversation's routing state (a JSON field of the
# session's hash) and the session's figures; returns 1 when the conversation changed model.
RECORD_ROUTE_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local c = raw and cjson.decode(raw) or {}
local switched = 0
if c.last_upstream and c.last_upstream ~= ARGV[3] then switched = 1 end
if ARGV[5] == '0' or ARGV[2] ~= c.turn_label then c.turn_label = ARGV[2] end
if ARGV[6] == '1' then c.sticky_label = ARGV[2] end
c.last_label = ARGV[2]
c.last_upstream = ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(c), 'requested_model', ARGV[4],
           'last_label', ARGV[2], 'last_upstream', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'requests', 1)
if switched == 1 then
  redis.call('HINCRBY', KEYS[1], 'switches', 1)
  redis.call('HINCRBY', KEYS[2], 'switches', 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return switched
"""
REDIS_PREFIX = "ccproxy:"
REDIS_RETRY_S = 5.0          # after a failure, Redis is tried again this much later
REDIS_WARN_EVERY_S = 60.0    # at most one warning a minute while it stays unreachable
SESSION_FIELDS = ("requested_model", "last_label", "last_upstream", "requests", "switches",
                  "uncached_tokens")


class RedisSessionStore(SessionStore):
    """Session state on Redis, shared by every worker and proxy that uses the same Redis:
    conversations' turns and sticky routes, the signature ledger, switch figures, plan-limit
    windows. Updates are atomic (a Lua script, or single commands); keys expire after
    session_ttl instead of being swept. When Redis cannot be reached, requests go on routed
    by the rules alone (no stickiness, no ledger), a warning at most once a minute, and the
    state is used again once Redis answers."""

    shared = True                   # every worker's sessions: its totals are the whole

    def __init__(self, connection: Mapping[str, Any], ttl: float = 3600.0,
                 max_sessions: int = 2000) -> None:
        super().__init__(ttl, max_sessions)
        self.connection = dict(connection)
        self._client: Any = None
        self._record_route: Any = None
        self._down_until = 0.0
        self._warned_at = 0.0
        self.problem: str | None = None        # why Redis is not used now (health)

    # -- connection -----------------------------------------------------------------------
    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One try a call: redis-py's default retries with backoff held each request for
            # seconds while Redis was down; the down window (REDIS_RETRY_S) does the waiting.
            options: dict[str, Any] = dict(socket_timeout=0.5, socket_connect_timeout=0.5,
                                           decode_responses=True, health_check_interval=30,
                                           retry=Retry(NoBackoff(), 0))
            if "url" not in self.connection:
                options.update(host=self.connection["host"], port=self.connection["port"],
                               password=self.connection.get("password"))
            self._client = redis.Redis.from_url(self.connection["url"], **options) \
                if "url" in self.connection else redis.Redis(**options)
            self._record_route = self._client.register_script(RECORD_ROUTE_LUA)
        return self._client

    def where(self) -> str:
        """Redis's address for messages (never its password)."""
        url = self.connection.get("url")
        if url:
            return re.sub(r"//[^@/]*@", "//", str(url))
        return f"{self.connection['host']}:{self.connection['port']}"

    def call(self, work: Callable[[Any], Any]) -> Any:
        """work(client) against Redis; None while it cannot be reached (see the class)."""
        now = time.monotonic()
        if now < self._down_until:
            return None
        try:
            import redis
        except ImportError:
            self._down(now, "the redis package is not installed")
            return None
        try:
            result = work(self._redis())
        except (redis.RedisError, OSError) as exc:
            self._down(now, redact_secrets(f"{type(exc).__name__}: {exc}"))
            return None
        if self.problem is not None:
            log.warning("Redis at %s answers again: session state is shared again", self.where())
            self.problem = None
        return result

    def _down(self, now: float, why: str) -> None:
        self._down_until = now + REDIS_RETRY_S
        self.problem = why
        if now - self._warned_at >= REDIS_WARN_EVERY_S or not self._warned_at:
            self._warned_at = now
            log.warning("Redis at %s cannot be reached (%s): requests are routed by the rules "
                        "alone, without session state, until it answers (warned once a minute)",
                        self.where(), why)

    def _key(self, kind: str, session_id: str, agent_id: str | None = None) -> str:
        return f"{REDIS_PREFIX}{kind}:{session_id}\x1f{agent_id or ''}"

    # -- the interface ----------------------------------------------------------------------
    def attach(self, ctx: "RequestContext", request: Mapping[str, Any]) -> None:
        ctx.continuation = is_continuation(request)
        if not ctx.session_id:
            return
        ctx.request_class = request_class(request, ctx.headers)
        separate = ctx.request_class[0] in SEPARATE_CLASSES
        key = self._key("s", ctx.session_id, ctx.agent_id)
        producers_key = self._key("p", ctx.session_id, ctx.agent_id)
        conv_key = conversation_key(request)
        ttl_ms = int(self.ttl * 1000)
        agents_key = self._key("a", ctx.session_id)     # the session's threads, last seen last

        def read(r: Any) -> list:
            pipe = r.pipeline(transaction=False)
            pipe.hmget(key, SESSION_FIELDS)
            pipe.hget(key, f"c:{conv_key}")
            pipe.smembers(producers_key)
            pipe.zadd(f"{REDIS_PREFIX}seen", {key[len(REDIS_PREFIX) + 2:]: time.time()})
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(agents_key, {ctx.agent_id or "": time.time()})
            pipe.pexpire(agents_key, ttl_ms)
            return pipe.execute()

        found = self.call(read)
        if found is None:
            return
        fields, conversation_json, producers = found[0], found[1], found[2]
        session = SessionState(ctx.session_id, ctx.agent_id, last_seen=time.monotonic())
        for name, value in zip(SESSION_FIELDS, fields, strict=True):
            if value is not None:
                setattr(session, name, int(value) if name in ("requests", "switches",
                                                              "uncached_tokens") else value)
        session.producers.update(producers or ())
        conversation = None
        if not separate:
            state = json.loads(conversation_json) if conversation_json else {}
            conversation = ConversationState(**{k: state.get(k) for k in (
                "turn_label", "sticky_label", "last_label", "last_upstream")})
            session.conversations[conv_key] = conversation
        ctx.session, ctx.conversation = session, conversation

    def record_route(self, ctx: "RequestContext", decision: RoutingDecision,
                     request: Mapping[str, Any], sticky: bool = False) -> None:
        session, conversation = ctx.session, ctx.conversation
        if session is None or conversation is None or not ctx.session_id:
            return
        conv_key = next(iter(session.conversations))
        key = self._key("s", ctx.session_id, ctx.agent_id)
        switched = self.call(lambda r: self._record_route(
            keys=[key, f"{REDIS_PREFIX}totals"],
            args=[f"c:{conv_key}", decision.label, decision.upstream, decision.requested_model,
                  int(ctx.continuation), int(sticky), int(self.ttl * 1000)]))
        ctx.switched = bool(switched)
        session.last_label, session.last_upstream = decision.label, decision.upstream
        if ctx.switched:
            resent = self.resent_on_switch(ctx.session_id, decision, request)
            self.call(lambda r: r.pipeline(transaction=False).hincrby(key, "uncached_tokens",
                                                                      resent)
                      .hincrby(f"{REDIS_PREFIX}totals", "uncached_tokens", resent).execute())

    def record_signature(self, session_id: str | None, agent_id: str | None, signature: str,
                         model: str) -> None:
        if not session_id:
            return
        signatures, producers = self._key("g", session_id, agent_id), self._key("p", session_id,
                                                                                  agent_id)
        ttl_ms = int(self.ttl * 1000)
        self.call(lambda r: r.pipeline(transaction=False)
                  .hset(signatures, signature_digest(signature), model).pexpire(signatures, ttl_ms)
                  .sadd(producers, model).pexpire(producers, ttl_ms).execute())

    def producers_of(self, session: SessionState | None,
                     signatures: list[str]) -> dict[str, str | None]:
        if session is None or not signatures:
            return {}
        key = self._key("g", session.session_id, session.agent_id)
        found = self.call(lambda r: r.hmget(key, [signature_digest(s) for s in signatures]))
        return dict(zip(signatures, found or [None] * len(signatures), strict=True))

    def export(self, session_id: str) -> dict:
        states = []
        for agent in self.call(lambda r: r.zrange(self._key("a", session_id), 0, -1)) or ():
            state = self._state(session_id, agent or None, conversations=True)
            if state is not None:
                states.append(state)
        return {"session_id": session_id, "states": states}

    def _state(self, session_id: str, agent_id: str | None,
               conversations: bool = False) -> dict | None:
        key = self._key("s", session_id, agent_id)
        found = self.call(lambda r: r.hgetall(key))
        if not found:
            return None
        state: dict[str, Any] = {"session_id": session_id, "agent_id": agent_id}
        for name in SESSION_FIELDS:
            value = found.get(name)
            state[name] = int(value or 0) if name in ("requests", "switches",
                                                      "uncached_tokens") else value or ""
        if conversations:       # all of it, for `explain --session`
            state["conversations"] = {k[2:]: json.loads(v) for k, v in found.items()
                                      if k.startswith("c:")}
            state["signatures"] = self.call(lambda r: r.hgetall(
                self._key("g", session_id, agent_id))) or {}
            state["producers"] = sorted(self.call(lambda r: r.smembers(
                self._key("p", session_id, agent_id))) or ())
        return state

    def find(self, session_id: str) -> dict | None:
        found = self._state(session_id, None)
        if found is None:
            agents = self.export(session_id)["states"]
            found = {k: v for k, v in agents[-1].items() if k != "conversations"} \
                if agents else None
        if found is not None:
            found["quota_until"] = self.quota_until(session_id)
        return found

    def recent(self, limit: int = 50) -> list[dict]:
        seen = self.call(lambda r: r.zrevrange(f"{REDIS_PREFIX}seen", 0, limit - 1,
                                               withscores=True)) or []
        out = []
        for key, when in seen:
            sid, _sep, agent = key.partition("\x1f")
            state = self._state(sid, agent or None)
            if state is not None:
                out.append(dict(state, idle_s=round(time.time() - when, 1)))
        return out

    def limit_reached(self, session_id: str, until: float) -> bool:
        previous = self.call(lambda r: r.pipeline().zscore(f"{REDIS_PREFIX}quota", session_id)
                             .zadd(f"{REDIS_PREFIX}quota", {session_id: until}).execute())
        return previous is not None and (previous[0] is None or previous[0] <= time.time())

    def quota_until(self, session_id: str | None) -> float | None:
        if not session_id:
            return None
        until = self.call(lambda r: r.zscore(f"{REDIS_PREFIX}quota", session_id))
        if until is None or until > time.time():
            return until
        if self.call(lambda r: r.zrem(f"{REDIS_PREFIX}quota", session_id)):
            log.info("session %s: its plan limit has reset; back to its own routes",
                     session_id[:8])
        return None

    def sweep(self) -> int:
        """Forget the index entries of sessions idle longer than the TTL (their keys expire
        by themselves); how many."""
        now = time.time()
        removed = self.call(lambda r: r.pipeline(transaction=False)
                            .zremrangebyscore(f"{REDIS_PREFIX}seen", 0, now - self.ttl)
                            .zremrangebyscore(f"{REDIS_PREFIX}quota", 0, now).execute())
        return int(removed[0]) if removed else 0

    def totals(self) -> dict:
        now = time.time()
        found = self.call(lambda r: r.pipeline(transaction=False)
                          .zcount(f"{REDIS_PREFIX}seen", now - self.ttl, "+inf")
                          .hmget(f"{REDIS_PREFIX}totals", ["switches", "uncached_tokens"])
                          .zcount(f"{REDIS_PREFIX}quota", now, "+inf").execute())
        if found is None:
            return {"sessions": 0, "switches": 0, "uncached_tokens": 0, "plan_limited": 0}
        return {"sessions": found[0], "switches": int(found[1][0] or 0),
                "uncached_tokens": int(found[1][1] or 0), "plan_limited": found[2]}

    def __len__(self) -> int:
        return self.totals()["sessions"]

    def backend(self) -> dict:
        return {"backend": "redis", "at": self.where(), "ok": self.problem is None,
                "problem": self.problem}


def session_store_for(config: Config) -> SessionStore:
    """Where the proxy keeps session state: Redis when LiteLLM is configured with one, else
    this process."""
    settings = config.settings
    redis = redis_settings(config)
    if redis is None:
        return SessionStore(settings.session_ttl, settings.max_sessions)
    return RedisSessionStore(redis, settings.session_ttl, settings.max_sessions)


def period_start(period: str, now: float | None = None) -> float:
    """When the current day, week (Monday) or month began, local time (epoch seconds)."""
    today = datetime.date.fromtimestamp(time.time() if now is None else now)
    if period == "week":
        today -= datetime.timedelta(days=today.weekday())
    elif period == "month":
        today = today.replace(day=1)
    return time.mktime(today.timetuple())


def period_end(period: str, start: float) -> float:
    """When the period that began at `start` ends (the next one begins)."""
    first = datetime.date.fromtimestamp(start)
    if period == "day":
        nxt = first + datetime.timedelta(days=1)
    elif period == "week":
        nxt = first + datetime.timedelta(days=7)
    else:
        nxt = (first.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return time.mktime(nxt.timetuple())


# What a budget counts a request against, per `per`: the ledger column and the request's value.
BUDGET_COLUMNS = {"user": "user", "label": "label", "model": "answered_model", "all": "'*'"}


class BudgetBook:
    """What each budget has counted in its current period, per subject (a user, label, model
    or `*`): in this process, started from the usage ledger (so a restart forgets nothing),
    or on Redis when session state is there (every worker and proxy counts into the same
    figures). Spend is added by the ledger's writer thread, off the event loop."""

    def __init__(self, budgets: Iterable[BudgetSpec], users: Iterable[UserSpec],
                 sessions: SessionStore) -> None:
        self.budgets = list(budgets)
        self.user_budgets = [(u.pattern, b) for u in users for b in u.budgets]
        self.redis = sessions if isinstance(sessions, RedisSessionStore) else None
        self.ledger_path: Path | None = None
        self._spent: dict[tuple, list[float]] = {}      # (budget, subject, start) -> [usd, tokens]
        self._alerted: set[tuple] = set()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.budgets or self.user_budgets)

    def applying(self, user: str | None) -> list[BudgetSpec]:
        """The budgets a request of this user counts against."""
        import fnmatch

        mine = [b for pattern, b in self.user_budgets if user and fnmatch.fnmatchcase(user, pattern)]
        return self.budgets + mine

    @staticmethod
    def subject(budget: BudgetSpec, user: str | None, label: str, model: str) -> str | None:
        return {"user": user, "label": label, "model": model, "all": "*"}[budget.per]

    def spent(self, budget: BudgetSpec, subject: str) -> tuple[float, int]:
        """(USD, tokens) counted so far this period: on Redis when it is there (a count it
        lacks, after a restart or at a period's start, begins from the ledger), else here."""
        start = period_start(budget.period)
        if self.redis is not None:
            key = self._key(budget, subject, start)
            found = self.redis.call(lambda r: r.hmget(key, ["usd", "tokens"]))
            if found is not None:
                if self._spent:             # what was counted here while Redis was away
                    with self._lock:
                        self._spent.pop((budget.name, subject, start), None)
                if found[0] is None and found[1] is None:
                    found = self._seed(budget, subject, start, key)
                return float(found[0] or 0), int(found[1] or 0)
        return self._here(budget, subject, start)

    def _here(self, budget: BudgetSpec, subject: str, start: float) -> tuple[float, int]:
        """The count in this process, begun from the ledger (without Redis, or while it
        cannot be reached)."""
        with self._lock:
            counted = self._spent.get((budget.name, subject, start))
            if counted is None:
                counted = self._spent[budget.name, subject, start] = \
                    self._from_ledger(budget, subject, start)
            return counted[0], int(counted[1])

    def _seed(self, budget: BudgetSpec, subject: str, start: float, key: str) -> list:
        """Start a count Redis lacks from the ledger (unless another worker just did)."""
        usd, tokens = self._from_ledger(budget, subject, start)
        found = self.redis.call(lambda r: r.pipeline(transaction=False)
                                .hsetnx(key, "usd", usd).hsetnx(key, "tokens", int(tokens))
                                .expire(key, self._ttl(budget, start))
                                .hmget(key, ["usd", "tokens"]).execute()) \
            if self.redis is not None else None
        return found[-1] if found else [usd, tokens]

    def _from_ledger(self, budget: BudgetSpec, subject: str, start: float) -> list[float]:
        found = read_ledger(self.ledger_path, (
            "SELECT coalesce(sum(cost), 0), coalesce(sum(input_tokens + output_tokens), 0) "
            f"FROM usage WHERE ts >= ? AND {BUDGET_COLUMNS[budget.per]} = ?",
            (start, subject))) if self.ledger_path is not None else None
        usd, tokens = found[0][0] if found else (0.0, 0)
        return [float(usd), int(tokens)]

    def _key(self, budget: BudgetSpec, subject: str, start: float) -> str:
        return f"{REDIS_PREFIX}budget:{budget.name}\x1f{subject}\x1f{int(start)}"

    @staticmethod
    def _ttl(budget: BudgetSpec, start: float) -> int:
        """How long a count is kept on Redis: its period and a day."""
        return int(period_end(budget.period, start) - time.time()) + 86400

    def over(self, budget: BudgetSpec, subject: str) -> float:
        """The fraction of the budget used this period."""
        usd, tokens = self.spent(budget, subject)
        return usd / budget.usd if budget.usd else tokens / (budget.tokens or 1)

    def book(self, row: Mapping[str, Any]) -> None:
        """Count a finished request (a ledger row) against the budgets it falls under; a
        budget crossing its alert_at warns once a period (and notifies)."""
        usd, tokens = float(row.get("cost") or 0.0), 0 if row.get("cache_hit") else \
            int((row.get("input_tokens") or 0) + (row.get("output_tokens") or 0))
        user = row.get("user")
        for budget in self.applying(user):
            subject = self.subject(budget, user, str(row.get("label") or ""),
                                   str(row.get("answered_model") or ""))
            if not subject:
                continue
            start = period_start(budget.period)
            if self.redis is None or self.redis.call(functools.partial(
                    self._add_on_redis, self._key(budget, subject, start), usd, tokens,
                    self._ttl(budget, start))) is None:
                self._here(budget, subject, start)       # loaded from the ledger first
                with self._lock:
                    counted = self._spent[budget.name, subject, start]
                    counted[0] += usd
                    counted[1] += tokens
            if budget.alert_at is not None and self.over(budget, subject) >= budget.alert_at:
                self._alert(budget, subject, start)

    @staticmethod
    def _add_on_redis(key: str, usd: float, tokens: int, ttl: int, r: Any) -> Any:
        return r.pipeline(transaction=False).hincrbyfloat(key, "usd", usd) \
            .hincrby(key, "tokens", tokens).expire(key, ttl).execute()

    def _alert(self, budget: BudgetSpec, subject: str, start: float) -> None:
        key = (budget.name, subject, start)
        if self.redis is not None:
            first = self.redis.call(lambda r: r.set(self._key(budget, subject, start) + "\x1falert",
                                                    "1", nx=True, ex=40 * 86400))
        else:
            with self._lock:
                first = key not in self._alerted
                self._alerted.add(key)
        if not first:
            return
        used = self.over(budget, subject)
        log.warning("budget %s: %s has used %.0f%% of its %s limit (%s)", budget.name, subject,
                    used * 100, budget.period, budget_limit_text(budget))
        if budget.notify:
            threading.Thread(target=notify_budget, args=(budget, subject, used), daemon=True,
                             name="ccproxy-budget-notify").start()


def budget_limit_text(budget: BudgetSpec) -> str:
    return f"${budget.usd:g}" if budget.usd is not None else f"{budget.tokens:,} tokens"


def notify_budget(budget: BudgetSpec, subject: str, used: float) -> None:
    """Tell the budget's webhook (a JSON POST) and command (with CCPROXY_BUDGET_* set) that
    it crossed its alert_at; failures are logged, never raised."""
    import subprocess
    import urllib.request

    event = {"budget": budget.name, "subject": subject, "per": budget.per,
             "period": budget.period, "used": round(used, 4), "limit": budget_limit_text(budget)}
    if budget.notify.get("webhook"):
        try:
            request = urllib.request.Request(budget.notify["webhook"], method="POST",
                                             data=json.dumps(event).encode(),
                                             headers={"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=5).close()
        except (OSError, ValueError) as exc:
            log.warning("budget %s: webhook failed: %s", budget.name, redact_secrets(str(exc)))
    if budget.notify.get("command"):
        env = dict(os.environ, **{f"CCPROXY_BUDGET_{k.upper()}": str(v) for k, v in event.items()})
        try:
            subprocess.run(budget.notify["command"], shell=True, env=env, timeout=30,
                           stdin=subprocess.DEVNULL, capture_output=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("budget %s: command failed: %s", budget.name, exc)


def _log_session_end(session: SessionState, how: str) -> None:
    log.info("session %s%s %s: %d requests, %d model switches, ~%d tokens re-sent uncached",
             session.session_id[:8], f" agent {session.agent_id}" if session.agent_id else "",
             how, session.requests, session.switches, session.uncached_tokens)


def adaptive_only(upstream: str, settings: Settings) -> bool:
    """True for a model that refuses `thinking: disabled` (ADAPTIVE_ONLY_MODELS and the
    `adaptive_only_models` setting; shell-style patterns on the name without provider)."""
    import fnmatch

    name = model_name(upstream)
    return any(fnmatch.fnmatchcase(name, p)
               for p in ADAPTIVE_ONLY_MODELS + tuple(settings.adaptive_only_models))


def leading_thinking_is_foreign(data: Mapping[str, Any], ctx: RequestContext,
                                upstream: str) -> bool:
    """True when the last assistant message starts with a thinking block that `upstream`
    did not sign: routed there, the block must go, and a tool loop then needs thinking off."""
    messages = data.get("messages")
    last = next((m for m in reversed(messages) if isinstance(m, dict)
                 and m.get("role") == "assistant"), None) if isinstance(messages, list) else None
    content = last.get("content") if last else None
    signature = thinking_signature(content[0]) if isinstance(content, list) and content else None
    if signature is None:
        return False
    producer = ctx.pipeline.sessions.producer(ctx.session, signature) \
        or model_name(str(data.get("model", "")))
    return producer != model_name(upstream)


# ---- Hooks ---------------------------------------------------------------------------------
# Plain functions `hook(data, ctx, **params) -> data`: label, route, credentials, session
# id, captured headers; the OAuth token sources they use. Use Context and Sessions.

# ccproxy 1.x's hook contract: `hook(data, user_api_key_dict, classifier=, router=, **params)`,
# the route in data["metadata"] under these keys. Hooks written that way are called that way.
V1_METADATA_KEYS = ("ccproxy_model_name", "ccproxy_alias_model", "ccproxy_litellm_model",
                    "ccproxy_model_config", "ccproxy_is_passthrough")

# ccproxy 1.x's `get_config()` singleton: the running proxy's config (set at start), one set
# by 1.x code with set_config_instance, else the config dir's, read on first use.
_config_instance: CCProxyConfig | None = None
_CONFIG_INSTANCE_LOCK = threading.Lock()
_router_instance: "ModelRouter | None" = None


def get_config() -> CCProxyConfig:
    """The config 1.x rules and hooks read (ccproxy 1.x's `ccproxy.config.get_config`)."""
    global _config_instance
    with _CONFIG_INSTANCE_LOCK:         # hooks run in worker threads: one instance for all
        if _config_instance is None:
            made = CCProxyConfig.from_proxy_runtime()
            load_oauth_sources(made.pipeline, required=False)
            _config_instance = made
        return _config_instance


def set_config_instance(config: CCProxyConfig | None) -> None:
    """Make `config` what get_config() answers (1.x code and tests do this)."""
    global _config_instance
    _config_instance = config


def clear_config_instance() -> None:
    """Forget the config get_config() answers; the next call reads it again."""
    set_config_instance(None)


class RequestClassifier:
    """ccproxy 1.x's `ccproxy.classifier.RequestClassifier` (what a 1.x hook gets as
    `classifier=`): the rules in order, `classify(request)` the first match's label."""

    def __init__(self, pipeline: "Pipeline | None" = None) -> None:
        self._pipeline = pipeline
        self._rules: list[tuple[str, Any]] = []
        self._setup_rules()

    def _setup_rules(self) -> None:
        self._clear_rules()
        for rule in (self._pipeline or get_config().pipeline).rules:
            self.add_rule(rule.name, rule)

    def _clear_rules(self) -> None:
        self._rules.clear()

    def add_rule(self, model_name: str, rule: Any) -> None:
        """Add a rule after the others: `model_name` is the label it gives."""
        self._rules.append((model_name, rule))

    def classify(self, request: Any) -> str:
        """The label of the first rule that matches, else `default`."""
        dump = getattr(request, "model_dump", None)
        if callable(dump):
            try:
                request = dump()
            except Exception as exc:  # whatever a pydantic model raises: classify it as is
                log.debug("classify: model_dump failed (%s); the object is used as is", exc)
        if not isinstance(request, dict):
            return "default"
        ctx = RequestContext(pipeline=self._pipeline or get_config().pipeline, headers={})
        return evaluate_rules(self._rules, request, ctx) or "default"


class ModelRouter:
    """ccproxy 1.x's `ccproxy.router.ModelRouter` (what a 1.x hook gets as `router=`): the
    model_list by label, the live router's once the proxy runs."""

    def __init__(self, pipeline: "Pipeline | None" = None) -> None:
        self._pipeline = pipeline

    def _table(self, missing: str | None = None) -> "ModelTable":
        return (self._pipeline or get_config().pipeline).models(missing)

    @property
    def model_list(self) -> list:
        return self.get_model_list()

    def get_model_list(self) -> list:
        return [dict(dep) for dep in self._table().deployments]

    @property
    def model_group_alias(self) -> dict[str, list[str]]:
        """upstream model -> the model_list names that use it."""
        out: dict[str, list[str]] = {}
        for dep in self._table().deployments:
            model = _litellm_params(dep).get("model")
            if isinstance(model, str) and model and dep.get("model_name"):
                out.setdefault(model, []).append(dep["model_name"])
        return out

    def get_available_models(self) -> list[str]:
        return sorted(self._table().exact)

    def is_model_available(self, name: str) -> bool:
        return name in self._table().exact

    def get_model_for_label(self, label: str) -> dict | None:
        """The label's model_list entry, else `default`'s, else None (as 1.x did)."""
        exact = self._table().exact
        found = exact.get(label) or exact.get("default")
        return dict(found[0]) if found else None

    def reload_models(self) -> None:
        self._table(missing="\0")


def get_router() -> ModelRouter:
    """ccproxy 1.x's `ccproxy.router.get_router`: one ModelRouter for the process."""
    global _router_instance
    if _router_instance is None:
        _router_instance = ModelRouter()
    return _router_instance


def clear_router() -> None:
    global _router_instance
    _router_instance = None


def is_v1_hook(fn: Any) -> bool:
    """A hook written for ccproxy 1.x: its second parameter is `user_api_key_dict`."""
    return _params(fn)[1:2] == ["user_api_key_dict"] and fn not in BUILTIN_HOOKS.values()


def put_v1_metadata(data: dict, ctx: RequestContext) -> dict:
    """Put the route where 1.x hooks read it (data["metadata"]); that dict."""
    meta = data.setdefault("metadata", {})
    if not isinstance(meta, dict):
        return {}
    decision = ctx.decision
    if decision is None:
        meta.update(ccproxy_model_name=ctx.label or "default")
        meta.setdefault("ccproxy_alias_model", data.get("model"))
        return meta
    entry = ctx.pipeline.models().exact.get(decision.model)
    meta.update(ccproxy_model_name=decision.label, ccproxy_alias_model=decision.requested_model,
                ccproxy_litellm_model=decision.model, ccproxy_is_passthrough=decision.passthrough,
                ccproxy_model_config=None if decision.passthrough or not entry else dict(entry[0]))
    return meta


def v1_hook(fn: Callable[..., Any]) -> Callable[..., dict]:
    """A 1.x hook as a ccproxy hook: called the 1.x way, the route put where it looks."""
    def call(data: dict, ctx: RequestContext, **params: Any) -> dict:
        meta = put_v1_metadata(data, ctx)
        result = fn(data, ctx.user_api_key_dict or {}, classifier=RequestClassifier(ctx.pipeline),
                    router=ModelRouter(ctx.pipeline), **params)
        label = meta.get("ccproxy_model_name")
        if ctx.decision is None and isinstance(label, str) and label != (ctx.label or "default"):
            ctx.label, ctx.route_label = label, None       # the hook chose the route
        return result if isinstance(result, dict) else data

    call.__name__ = getattr(fn, "__name__", "hook")
    return call


def accepts_v1_call(v1_form: Callable[..., dict] | None = None) -> Callable[..., Any]:
    """A built-in hook that also takes 1.x's call form: `hook(data, user_api_key_dict,
    classifier=..., router=..., **params)` (as 1.x code and tests call them). Called so, it
    runs `v1_form(data, classifier, router)` when given (rule_evaluator and model_router work
    as in 1.x, through the classifier and router handed in); the others read the route from
    where 1.x put it (data["metadata"])."""
    def decorate(fn: Callable[..., dict]) -> Callable[..., dict]:
        @functools.wraps(fn)
        def call(data: dict, ctx: Any, **params: Any) -> dict:
            if isinstance(ctx, RequestContext):
                return fn(data, ctx, **params)
            classifier, router = params.pop("classifier", None), params.pop("router", None)
            if v1_form is not None:
                return v1_form(data, classifier, router)
            pipeline = getattr(router, "_pipeline", None) or \
                getattr(classifier, "_pipeline", None) or get_config().pipeline
            ctx = pipeline.context(data, user_api_key_dict=ctx)
            ctx.decision = decision_from_v1_metadata(data)
            return fn(data, ctx, **params)

        return call

    return decorate


def v1_metadata(data: dict) -> dict | None:
    """data["metadata"], made if missing (None if it is not a mapping)."""
    meta = data.setdefault("metadata", {})
    return meta if isinstance(meta, dict) else None


def v1_rule_evaluator(data: dict, classifier: Any, router: Any = None) -> dict:
    """1.x's rule_evaluator: the classifier's label in data["metadata"]."""
    meta = v1_metadata(data)
    if not isinstance(classifier, RequestClassifier) or meta is None:
        log.warning("Classifier not found or invalid type in rule_evaluator")
        return data
    meta["ccproxy_alias_model"] = data.get("model")
    meta["ccproxy_model_name"] = classifier.classify(data)
    return data


def v1_model_router(data: dict, classifier: Any, router: Any) -> dict:
    """1.x's model_router: the label's model_list entry from the router (the requested model
    kept for `default` with default_model_passthrough), recorded in data["metadata"]."""
    meta = v1_metadata(data)
    if not isinstance(router, ModelRouter) or meta is None:
        log.warning("Router not found or invalid type in model_router")
        return data
    label = meta.get("ccproxy_model_name")
    if not label:
        log.warning("No ccproxy_model_name found, using default")
        label = "default"
    if label == "default" and get_config().default_model_passthrough:
        if meta.get("ccproxy_alias_model"):
            meta.update(ccproxy_litellm_model=meta["ccproxy_alias_model"],
                        ccproxy_model_config=None, ccproxy_is_passthrough=True)
            return data
        log.warning("No original model found for passthrough mode, falling back to routing")
    entry = router.get_model_for_label(label)
    if entry is None:
        log.warning("No model configured for model_name %r, reloading the model list", label)
        router.reload_models()
        entry = router.get_model_for_label(label)
        if entry is None:
            raise ValueError(f"No model configured for model_name '{label}' and no 'default' "
                             "model available as fallback")
    routed = _litellm_params(entry).get("model")
    if routed:
        data["model"] = routed
    else:
        log.warning("No model found in config for model_name: %s", label)
    meta.update(ccproxy_litellm_model=routed, ccproxy_model_config=entry,
                ccproxy_is_passthrough=False)
    return data


def decision_from_v1_metadata(data: dict) -> RoutingDecision | None:
    """The route a 1.x model_router recorded in data["metadata"], as a RoutingDecision."""
    meta = data.get("metadata")
    model = meta.get("ccproxy_litellm_model") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(model, str) or not model:
        return None
    params = dict(_litellm_params(meta.get("ccproxy_model_config") or {}))
    params.setdefault("model", model)
    return RoutingDecision(label=str(meta.get("ccproxy_model_name") or "default"),
                           requested_model=str(meta.get("ccproxy_alias_model") or model),
                           model=model, upstream=str(params["model"]),
                           passthrough=bool(meta.get("ccproxy_is_passthrough")),
                           provider=provider_of(params))


@accepts_v1_call(v1_rule_evaluator)
def rule_evaluator(data: dict, ctx: RequestContext, **params: Any) -> dict:
    """Label the request with the first rule that matches (none: `default`)."""
    evaluate_rules(((getattr(r, "name", "") or type(r).__name__, r)
                    for r in ctx.pipeline.rules_for(ctx.user)), data, ctx)
    return data


def evaluate_rules(rules: Iterable[tuple[str, Any]], data: dict, ctx: RequestContext) -> str | None:
    """Ask (label, rule) pairs in order; the first match's label (None: no match) goes to
    ctx.label, every verdict to ctx.verdicts. A rule that raises is skipped."""
    ctx.label = None
    ctx.route_label = None
    ctx.verdicts = []
    for name, rule in rules:
        try:
            verdict = rule_verdict(rule, data, ctx)
        except Exception as exc:  # a broken custom rule is skipped, the others still decide
            problem = f"rule {name} failed: {type(exc).__name__}: {exc}"
            ctx.hook_errors.append(problem)
            ctx.pipeline.warn_once(f"rule:{name}:{type(exc).__name__}",
                                   f"{problem} (skipped; logged once)")
            verdict = Verdict(False, f"failed: {type(exc).__name__}")
        ctx.verdicts.append((name, _describe(rule), verdict))
        if verdict.matched:
            ctx.label = name
            ctx.route_label = verdict.label
            split = getattr(rule, "ab", ())
            if split and verdict.label is None:
                ctx.arm = ctx.route_label = ab_arm(split, name, ctx.session_id or
                                                   conversation_key(data))
            break
    return ctx.label


def ab_arm(split: Sequence[tuple[str, int]], rule: str, session: str) -> str:
    """The arm of a weighted split for a session: the same session always gets the same arm
    (a hash, so every worker and proxy agrees without sharing anything)."""
    import hashlib

    point = int.from_bytes(hashlib.blake2b(f"{rule}\x1f{session}".encode(), digest_size=8)
                           .digest(), "big") % sum(weight for _label, weight in split)
    for label, weight in split:
        if point < weight:
            return label
        point -= weight
    return split[-1][0]


def _describe(rule: Any) -> str:
    describe = getattr(rule, "describe", None)
    return describe() if callable(describe) else type(rule).__name__


@accepts_v1_call(v1_model_router)
def model_router(data: dict, ctx: RequestContext, **params: Any) -> dict:
    """Send the request to the model_list entry named like its label; record the decision.

    Within a conversation, a turn stays on the route its first request took (tool_result
    continuations follow it) unless the matching rule may override; a sticky rule keeps
    later turns too.
    """
    pipeline = ctx.pipeline
    requested: str = data["model"] if isinstance(data.get("model"), str) else ""
    rule = next((r for r in pipeline.rules if getattr(r, "name", None) == ctx.label), None) \
        if ctx.label is not None else None
    label = ctx.route_label or ctx.label or "default"
    reason = next((v.fact for n, _d, v in ctx.verdicts if n == ctx.label and v.matched), "")
    picked = requested[len(ROUTE_MODEL_PREFIX):] if requested.startswith(ROUTE_MODEL_PREFIX) else ""
    if label == "default" and picked in pipeline.models():
        label, reason = picked, f"{requested} picked in /model"      # the session's default
    conversation = ctx.conversation
    if conversation is not None and not getattr(rule, "override", False):
        kept = None
        if ctx.continuation and conversation.turn_label is not None:
            kept = conversation.turn_label, "the turn continues"
        elif conversation.sticky_label is not None:
            kept = conversation.sticky_label, "sticky rule"
        if kept is not None and kept[0] != label:
            label, reason = kept[0], f"{kept[1]} on {kept[0]}"
            rule = next((r for r in pipeline.rules if getattr(r, "name", None) == label), None)
    elif conversation is not None and ctx.continuation and conversation.turn_label \
            not in (None, label) and _override_needs_thinking_off(data, ctx, label):
        waited = conversation.turn_label
        reason = (f"the turn continues on {waited}: `{label}` refuses thinking off, which its "
                  "tool loop would need, so the switch waits for the turn's end")
        label = waited
        rule = next((r for r in pipeline.rules if getattr(r, "name", None) == label), None)
    quota = pipeline.config.settings.quota_fallback
    until = pipeline.sessions.quota_until(ctx.session_id) if quota else None
    if quota and (until or ctx.quota_resend) and label != quota:
        label, rule = quota, next((r for r in pipeline.rules if getattr(r, "name", None) == quota),
                                  None)
        reason = "the plan limit is reached" + (f" until {clock(until)}" if until else "")
    limited = user_limits(ctx, label, requested)
    if limited is not None:
        label, reason = limited
        rule = next((r for r in pipeline.rules if getattr(r, "name", None) == label), None)
    passthrough = (rule is None and label == "default"
                   and pipeline.config.settings.default_model_passthrough) \
        or bool(getattr(rule, "passthrough", False))
    table = pipeline.models()
    target = requested
    if not passthrough:
        if label not in table:
            table = pipeline.models(missing=label)
        if label in table:
            target = table.aliases(label)[-1]
        else:
            if label != "default":
                pipeline.warn_once(f"no-entry:{label}",
                                   f"rule `{label}` matched but model_list has no entry named "
                                   f"`{label}`; using the default route")
            if "default" in table and not pipeline.config.settings.default_model_passthrough:
                label, target = "default", "default"
            else:
                label, passthrough = "default", True
    resolved = table.resolve(target)
    upstream = resolved[1] if resolved else target
    provider = provider_of(_litellm_params(resolved[0])) if resolved else None
    if resolved is None:
        pipeline.warn_once(f"unrouted:{target}",
                           f"no model_list entry matches `{target}`: LiteLLM will reject it; "
                           "add an entry (e.g. model_name: \"claude-*\")")
    decision = RoutingDecision(label=label, requested_model=requested, model=target,
                               upstream=upstream, passthrough=passthrough, reason=reason,
                               provider=provider, arm=ctx.arm if ctx.arm == label else None,
                               user=ctx.user)
    ctx.decision = decision
    if conversation is not None:
        pipeline.sessions.record_route(ctx, decision, data, sticky=getattr(rule, "sticky", False))
    data["model"] = target
    meta = litellm_metadata(data)
    meta[METADATA_KEY] = decision.as_dict()
    return data


def user_limits(ctx: RequestContext, label: str, requested: str) -> tuple[str, str] | None:
    """(label, reason) when the user's allowed labels or a budget change the route; a budget
    that blocks sets ctx.blocked instead. None: the route stands."""
    pipeline = ctx.pipeline
    found = pipeline.user_spec(ctx.user)
    changed = None
    allowed = found[0].labels if found else None
    if allowed is not None and label not in allowed:
        changed = label, reason = allowed[0], f"user {ctx.user} may not use `{label}`"
    book = pipeline.budgets
    if not book:
        return changed
    table = pipeline.models()
    for budget in book.applying(ctx.user):
        resolved = table.resolve_route(label) if label in table else None
        model = resolved[1] if resolved else requested
        subject = book.subject(budget, ctx.user, label, model)
        if not subject or book.over(budget, subject) < 1.0:
            continue
        resets = period_end(budget.period, period_start(budget.period))
        why = (f"budget `{budget.name}` for {subject} is used up for this {budget.period} "
               f"({budget_limit_text(budget)}); it resets at {clock(resets)}")
        if budget.action == "block":
            ctx.blocked = why, resets
            return changed
        if budget.to != label:
            changed = label, reason = budget.to, why + f"; routed to `{budget.to}`"
    return changed


def clock(epoch: float) -> str:
    """A reset time as the user reads it: local HH:MM, with the date when not today."""
    moment = time.localtime(epoch)
    same_day = time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", moment)


def _override_needs_thinking_off(data: dict, ctx: RequestContext, label: str) -> bool:
    """True when switching this tool-loop request to `label` would need `thinking: disabled`
    (its leading thinking block is another model's) and that model refuses it."""
    thinking = data.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") == "disabled":
        return False
    table = ctx.pipeline.models()
    resolved = table.resolve_route(label)
    upstream = resolved[1] if resolved else ""
    return bool(upstream) and adaptive_only(upstream, ctx.config.settings) \
        and leading_thinking_is_foreign(data, ctx, upstream)


def _deployments_have_key(ctx: RequestContext) -> bool:
    """True when every deployment of the routed model group carries its own api_key."""
    decision = ctx.decision
    if decision is None:
        return False
    group = ctx.pipeline.models().group(decision.model)
    return bool(group) and all(_litellm_params(d).get("api_key") for d in group)


def client_credential(ctx: RequestContext) -> dict[str, str]:
    """The credential the client sent for the upstream: its Authorization or its x-api-key
    (one of them, Authorization first), or nothing."""
    for name in ("authorization", "x-api-key"):
        if ctx.headers.get(name):
            return {name: ctx.headers[name]}
    return {}


def _forward_client_credential(data: dict, ctx: RequestContext) -> None:
    """Forward the client's own credential to the routed Anthropic deployment, once: as a
    header only Anthropic gets; on chat completions as the request's api_key, unless the
    route has fallbacks (which would get it too)."""
    credential = client_credential(ctx)
    name, value = next(iter(credential.items()), ("", ""))
    shown = "Authorization" if name == "authorization" else name
    if ctx.call_type in ("completion", "acompletion"):
        if route_has_fallbacks(ctx):
            ctx.auth.append(f"client {shown} not forwarded: on chat completions it would "
                            "reach this route's fallbacks too")
            return
        ctx.auth.append(f"client {shown} forwarded (as api_key)")
        set_request_api_key(data, value.removeprefix("Bearer ").strip())
        return
    ctx.auth.append(f"client {shown} forwarded")
    if not any(k in provider_headers(data, "anthropic")
                                   for k in ("authorization", "x-api-key")):
        add_provider_headers(data, "anthropic", credential)


def route_has_fallbacks(ctx: RequestContext) -> bool:
    """True when LiteLLM may send this request on to another model group (fallbacks from
    ccproxy.yaml or router_settings, for its group or `*`)."""
    group = ctx.decision.model if ctx.decision else ""
    config = ctx.config
    router = config.litellm.get("router_settings")
    named: set = set()
    for key in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        named |= set(getattr(config.settings, key, None) or ())
        listed = router.get(key) if isinstance(router, dict) else None
        named |= {next(iter(item)) for item in listed or () if isinstance(item, dict) and item}
    return bool(named & {group, "*"})


@accepts_v1_call()
def forward_apikey(data: dict, ctx: RequestContext, **params: Any) -> dict:
    """Forward the client's own credentials (x-api-key or Authorization) to Anthropic.

    Only for requests routed to an Anthropic deployment without its own api_key; the header
    is scoped to the anthropic provider, so no other provider ever sees it.
    """
    if ctx.decision is None or ctx.decision.provider != "anthropic":
        return data
    if _deployments_have_key(ctx):
        ctx.auth.append("deployment api_key (client credentials not forwarded)")
    elif client_credential(ctx):
        _forward_client_credential(data, ctx)
    return data


@accepts_v1_call()
def forward_oauth(data: dict, ctx: RequestContext, **params: Any) -> dict:
    """Send a cached OAuth token (from `oat_sources`) to the provider it belongs to.

    Credentials go exactly where they belong: a deployment with its own api_key keeps it; a
    credential the client sent is never replaced (and goes only to Anthropic, like
    forward_apikey's); otherwise the provider's token goes, as `Authorization: Bearer ...`
    (plus the source's user_agent, if set), scoped to that provider.
    """
    decision = ctx.decision
    provider = decision.provider if decision else None
    if not provider:
        return data
    source = ctx.pipeline.oauth.get(provider)
    if _deployments_have_key(ctx):
        ctx.auth.append(f"deployment api_key (no oauth token or client credential for "
                        f"{provider})")
        return data
    if client_credential(ctx):
        if source is not None:
            ctx.auth.append(f"client credential kept (oauth token for {provider} not used)")
        if provider == "anthropic":
            _forward_client_credential(data, ctx)
        return data
    if source is None:
        return data
    token = source.token
    if not token:
        ctx.auth.append(f"no oauth token for {provider} (source failed); client auth kept")
        return data
    ctx.auth.append(f"oauth token for {provider} from oat_sources")
    # a command may print the header value itself ("Bearer ..."), as ccproxy 1.x accepted
    headers = {"authorization": token if token[:7].lower() == "bearer " else f"Bearer {token}"}
    if provider == "anthropic":
        headers["x-api-key"] = ""
    if source.user_agent:
        headers["user-agent"] = source.user_agent
    add_provider_headers(data, provider, headers)
    meta = litellm_metadata(data)
    meta.setdefault(METADATA_KEY, {})["oauth_provider"] = provider
    return data


@accepts_v1_call()
def extract_session_id(data: dict, ctx: RequestContext, **params: Any) -> dict:
    """Put Claude Code's session id (and subagent id) in LiteLLM's metadata for callbacks."""
    if ctx.session_id:
        meta = litellm_metadata(data)
        meta["session_id"] = ctx.session_id
        trace = meta.setdefault("trace_metadata", {})
        if isinstance(trace, dict):
            trace["claude_session_id"] = ctx.session_id
            trace.update(claude_user(data.get("metadata")))
            if ctx.agent_id:
                trace["claude_agent_id"] = ctx.agent_id
    return data


@accepts_v1_call()
def capture_headers(data: dict, ctx: RequestContext, headers: list[str] | None = None,
                    **params: Any) -> dict:
    """Copy request headers, secrets redacted, into LiteLLM's trace metadata."""
    wanted = {h.lower() for h in headers} if headers else None
    meta = litellm_metadata(data)
    trace = meta.setdefault("trace_metadata", {})
    if not isinstance(trace, dict):
        return data
    for name, value in ctx.headers.items():
        if value and (wanted is None or name in wanted):
            trace[f"header_{name}"] = redact(name, value)
    trace["http_path"] = ctx.path
    request = data.get("proxy_server_request")
    method = request.get("method") if isinstance(request, dict) else None
    if isinstance(method, str) and method:
        trace["http_method"] = method
    return data


BUILTIN_HOOKS: dict[str, Callable[..., dict]] = {
    f.__name__: f for f in (rule_evaluator, model_router, forward_oauth, forward_apikey,
                            extract_session_id, capture_headers)
}

# ccproxy 1.x hooks whose work ccproxy 2 does elsewhere or that it leaves to LiteLLM.
RETIRED_HOOKS = {
    "add_beta_headers": "Claude Code sends its own anthropic-beta header, which is forwarded",
    "inject_claude_code_identity": "not needed: Claude Code's own system prompt is forwarded",
    "inject_mcp_notifications": "not supported in ccproxy 2",
}


@dataclasses.dataclass(slots=True)
class OAuthSource:
    """One `oat_sources` entry and the token it last produced."""

    provider: str
    command: str
    user_agent: str | None = None
    token: str | None = None
    error: str | None = None        # short, safe to show anywhere ("exit code 3")
    detail: str = ""                # the command's first stderr line, redacted: logs only
    failures: int = 0
    loaded_at: float = 0.0

    def load(self, timeout: float) -> bool:
        """Run the command; keep the last good token on failure. True on success. One
        command at a time per process (start, background refresh, a 401's refresh)."""
        with _OAUTH_LOCK:
            return self._run(timeout)

    def _run(self, timeout: float) -> bool:
        import subprocess
        try:
            done = subprocess.run(self.command, shell=True, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return self._failed(f"timed out after {timeout:g}s")
        except OSError as exc:
            return self._failed(f"could not run: {exc.strerror}")
        token = done.stdout.strip()
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if ln.strip()), "")
            return self._failed(f"exit code {done.returncode}", redact_secrets(first.strip()))
        if not token:
            return self._failed("printed nothing")
        self.token, self.error, self.detail, self.failures = token, None, "", 0
        self.loaded_at = time.time()
        return True

    def _failed(self, why: str, detail: str = "") -> bool:
        self.error, self.detail = why, detail[:200]
        self.failures += 1
        return False

    @property
    def problem(self) -> str:
        """The failure with the command's (redacted) stderr line, for log lines."""
        return f"{self.error}: {self.detail}" if self.detail else str(self.error)

    def refresh_after_401(self, timeout: float, min_age: float = 2.0) -> bool:
        """Reload after the upstream rejected the token; concurrent 401s reload once."""
        with _OAUTH_LOCK:
            if time.time() - self.loaded_at < min_age and self.token:
                return True      # another request just refreshed it
            return self._run(timeout)


_OAUTH_LOCK = threading.Lock()
# Set by ccproxy's /v1/messages route for the request it serves: the failure hook marks it
# for one more send ("oauth": after an upstream 401 it fetched a fresh token; "quota": the
# session's plan limit is reached and quota_fallback answers instead).
_RESEND: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ccproxy_resend",
                                                                    default=None)


# ---- Fixes ---------------------------------------------------------------------------------
# What keeps a routed request valid whatever `hooks:` lists: foreign thinking, max_tokens,
# translated usage; and the SSE reading the answers need. Use Context and Sessions.

def fit_thinking_to_model(data: dict, ctx: RequestContext) -> None:
    """Never send `thinking: disabled` (or an `enabled` budget) to a model that refuses it:
    without `thinking` it thinks adaptively, the only shape it takes. Passthrough requests
    keep the client's own `thinking`."""
    decision = ctx.decision
    thinking = data.get("thinking")
    if decision is None or not isinstance(thinking, dict) \
            or thinking.get("type") not in ("disabled", "enabled") \
            or not adaptive_only(decision.upstream, ctx.config.settings):
        return
    if decision.passthrough and thinking == ctx.original_thinking:
        return
    if thinking.get("type") == "disabled":
        del data["thinking"]
        ctx.notes.append(f"thinking: disabled left out: {model_name(decision.upstream)} refuses "
                         "it (it thinks adaptively)")
    else:
        data["thinking"] = {k: v for k, v in thinking.items() if k == "display"}
        data["thinking"]["type"] = "adaptive"
        ctx.notes.append(f"thinking budget -> adaptive: {model_name(decision.upstream)} takes "
                         "no `enabled` budget")


def strip_foreign_thinking(data: dict, ctx: "RequestContext") -> None:
    """Drop thinking blocks another model signed; keep the request valid.

    Anthropic rejects a history thinking block signed by a different model (400 "Invalid
    `signature` in `thinking` block"). Blocks of unknown origin count as the requested
    model's. If the last assistant message of a tool loop loses its leading thinking block,
    Anthropic's other rule (with thinking on, that message must start with thinking) cannot
    be met with a forged block, so thinking is turned off for this one request (and its
    clear_thinking context edit with it); the next turn thinks again.
    """
    decision = ctx.decision
    messages = data.get("messages")
    if decision is None or decision.provider != "anthropic" or not isinstance(messages, list):
        return
    target = model_name(decision.upstream)
    requested = model_name(decision.requested_model)
    producers = ctx.session.producers if ctx.session is not None else set()
    if target == requested and producers <= {target}:
        return      # every block in this session came from (or counts as) the target model
    last = next((m for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "assistant"), None)
    dropped = 0
    lost_leading = False
    assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"
                 and isinstance(m.get("content"), list)]
    signed = [s for m in assistant for s in map(thinking_signature, m["content"]) if s]
    known = ctx.pipeline.sessions.producers_of(ctx.session, signed) if producers else {}
    for message in assistant:
        content = message["content"]
        kept = []
        for position, block in enumerate(content):
            signature = thinking_signature(block)
            producer = known.get(signature) if signature else None
            if signature is None or (producer or requested) == target:
                kept.append(block)
                continue
            dropped += 1
            if message is last and position == 0:
                lost_leading = True
        if len(kept) != len(content):
            message["content"] = kept or [{"type": "text", "text": "(reasoning omitted)"}]
    if not dropped:
        return
    ctx.notes.append(f"dropped {dropped} thinking block(s) signed by another model")
    log.debug("dropped %d thinking block(s) another model produced (target %s)", dropped,
              target)
    thinking = data.get("thinking")
    if lost_leading and ctx.continuation and isinstance(thinking, dict) \
            and thinking.get("type") != "disabled":
        ctx.notes.append("thinking off for this request: its tool loop began on another model")
        data["thinking"] = {"type": "disabled"}
        edits = (data.get("context_management") or {}).get("edits")
        if isinstance(edits, list):
            edits = [e for e in edits if not (isinstance(e, dict) and
                                              str(e.get("type", "")).startswith("clear_thinking"))]
            if edits:
                data["context_management"]["edits"] = edits
            else:
                data.pop("context_management", None)


def deployment_max_output(pipeline: "Pipeline", decision: RoutingDecision) -> int | None:
    """The largest output the routed deployment accepts: the config's model_info, else
    LiteLLM's model map (None when unknown)."""
    values = []
    for dep in pipeline.models().group(decision.model):
        info = dep.get("model_info") if isinstance(dep, Mapping) else None
        value = info.get("max_output_tokens") if isinstance(info, Mapping) else None
        if value is None:
            value = known_max_output(str(_litellm_params(dep).get("model", "")))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            values.append(int(value))
    return min(values) if values else None


def clamp_max_tokens(data: dict, ctx: "RequestContext") -> None:
    """Fit max_tokens (and a thinking budget) to the routed deployment; passthrough is never
    changed. Claude Code asks for 128000 on every request; many models accept far less."""
    decision = ctx.decision
    max_tokens = data.get("max_tokens")
    if decision is None or decision.passthrough or not isinstance(max_tokens, int):
        return
    limit = deployment_max_output(ctx.pipeline, decision)
    if limit is None or max_tokens <= limit:
        return
    ctx.notes.append(f"max_tokens {max_tokens} -> {limit} ({decision.model}'s maximum)")
    log.debug("max_tokens %d -> %d for %s", max_tokens, limit, decision.upstream)
    data["max_tokens"] = limit
    thinking = data.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if isinstance(thinking, dict) and isinstance(budget, int) and budget >= limit:
        if limit - 1 >= 1024:
            thinking["budget_tokens"] = limit - 1
        else:
            data["thinking"] = {"type": "disabled"}


def note_translated_usage(data: dict, ctx: "RequestContext") -> None:
    """For a route LiteLLM translates (not Anthropic): count the request offline, so the
    response's usage can be filled in, and key the provider's prompt cache by session."""
    decision = ctx.decision
    if decision is None or decision.provider in (None, "anthropic"):
        return
    if ctx.session_id:
        data.setdefault("prompt_cache_key", ctx.session_id)
    meta = litellm_metadata(data).setdefault(METADATA_KEY, {})
    meta["input_tokens"] = TOKENS.count_request(data)[0]


class SSEWatcher:
    """Reads an Anthropic SSE stream as it passes: thinking signatures, a message_start whose
    usage can be filled in, and whether the stream is whole (every `data:` is JSON, and it
    ends with message_stop or an error event). Frames may arrive split or merged."""

    def __init__(self) -> None:
        self._buffer = b""
        self.signatures: list[str] = []
        self.ended = False               # message_stop or an error event went by
        self.problem: str | None = None  # why the stream is broken; nothing after it passes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete frames seen so far, up to a broken one (the incomplete tail is kept for
        the next chunk)."""
        self._buffer += chunk
        frames = []
        while self.problem is None:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            frame, self._buffer = self._buffer[:end + 2], self._buffer[end + 2:]
            event = sse_data(frame)
            if event is None and (frame.startswith(b"data:") or b"\ndata:" in frame):
                self.problem = "the upstream sent an event that is not JSON"
                break
            frames.append(frame)
            kind = event.get("type") if isinstance(event, dict) else None
            self.ended = self.ended or kind in ("message_stop", "error")
            if kind in ("content_block_delta", "content_block_start"):
                delta = event.get("delta")
                signature = delta.get("signature") if isinstance(delta, dict) else None
                signature = signature or thinking_signature(event.get("content_block"))
                if isinstance(signature, str) and signature:
                    self.signatures.append(signature)
        return frames

    def close(self) -> bytes:
        """At the stream's end: an Anthropic error event if it is not whole, else nothing."""
        if self.problem is None and not self.ended:
            self.problem = ("the upstream stream ended in the middle of an event"
                            if self._buffer.strip() else
                            "the upstream stream ended before message_stop")
        if self.problem is None:
            return b""
        log.warning("stream cut short: %s; the client gets an error event", self.problem)
        error = {"type": "error", "error": {"type": "api_error", "message": self.problem}}
        return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"


class StreamBroken(Exception):
    """A stream that ccproxy ended with an error event (booked as a failure)."""


async def close_quietly(stream: Any) -> None:
    """Stop reading an upstream stream we gave up on (its connection is let go)."""
    try:
        await stream.aclose()
    except Exception as exc:  # closing is a courtesy: nothing of it may reach the client
        log.debug("closing the upstream stream: %s", type(exc).__name__)


def sse_data(frame: bytes) -> Any:
    """The JSON of a frame's `data:` line (None if there is none or it is not JSON)."""
    for line in frame.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                return json.loads(line[5:])
            except ValueError:
                return None
    return None


def with_input_tokens(frame: bytes, count: int) -> bytes:
    """A message_start frame whose zero usage.input_tokens is replaced by `count`."""
    event = sse_data(frame)
    message = event.get("message") if isinstance(event, dict) else None
    usage = message.get("usage") if isinstance(message, dict) else None
    if not isinstance(usage, dict) or usage.get("input_tokens"):
        return frame
    usage["input_tokens"] = count
    lines = [b"data: " + json.dumps(event, separators=(",", ":")).encode()
             if ln.startswith(b"data:") else ln for ln in frame.split(b"\n")]
    return b"\n".join(lines)


# ---- Pipeline ------------------------------------------------------------------------------
# Builds rules and hooks from a Config, makes each request's context, runs the hooks then
# the fixes; `route_request` is `explain`'s entry. Uses everything above.

def hook_function(hook: HookSpec, search_dir: Path | None) -> Callable[..., Any]:
    """The function a `hooks:` entry names (1.x code may give the function itself)."""
    if callable(hook.path):
        return hook.path
    short = hook.path.rsplit(".", 1)[-1]
    if hook.path.startswith("ccproxy.") and short in RETIRED_HOOKS:
        raise RuleError(f"hook {hook.path} skipped: {RETIRED_HOOKS[short]}")
    return resolve_object(hook.path, "hook", BUILTIN_HOOKS, search_dir)


def _top_level_copy(value: Any) -> Any:
    """A dict's own keys copied (the fixes replace values, never edit nested ones)."""
    return dict(value) if isinstance(value, dict) else value


class Pipeline:
    """Rules, hooks and the model table built from one Config; runs hooks for a request."""

    def __init__(self, config: Config,
                 model_source: Callable[[], list | None] | None = None,
                 sessions: "SessionStore | None" = None) -> None:
        self.config = config
        self.rules: list[Any] = []
        self.hooks: list[tuple[str, Callable[..., dict], dict]] = []
        self.v1_hooks = False        # a hook written for ccproxy 1.x is configured
        self.problems: list[str] = []
        search_dir = config.directory
        self.rule_warnings: list[tuple[int, str]] = []   # (index in `rules:`, why)
        for i, spec in enumerate(config.settings.rules):
            try:
                rule = build_rule(spec, search_dir)
            except RuleError as exc:
                self.problems.append(f"{spec.where}: {exc}")
                continue
            self.rules.append(rule)
            warning = shadow_warning(rule)
            if warning:
                self.rule_warnings.append((i, warning))
        for hook in config.settings.hooks:
            try:
                fn = hook_function(hook, search_dir)
            except RuleError as exc:
                self.problems.append(f"{hook.where}: {exc}")
                continue
            if is_v1_hook(fn):
                self.v1_hooks = True
                fn = v1_hook(fn)
            self.hooks.append((getattr(fn, "__name__", str(hook.path)), fn, dict(hook.params)))
        self.oauth: dict[str, OAuthSource] = {}
        for provider, source in (config.settings.oat_sources or {}).items():
            if isinstance(source, str):
                self.oauth[provider] = OAuthSource(provider, source)
            elif isinstance(source, dict) and isinstance(source.get("command"), str):
                self.oauth[provider] = OAuthSource(provider, source["command"],
                                                   source.get("user_agent"))
            else:
                self.problems.append(f"oat_sources.{provider}: expected a command string or "
                                     "{command, user_agent}")
        self.sessions = sessions if sessions is not None else \
            SessionStore(config.settings.session_ttl, config.settings.max_sessions)
        self._model_source = model_source
        self._models: ModelTable | None = None
        self._models_loaded = False
        self._last_reload = 0.0
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._legacy: CCProxyConfig | None = None
        self.budgets = BudgetBook(config.settings.budgets, config.settings.users, self.sessions)
        self.user_rules: list[tuple[UserSpec, list[Any]]] = []
        for user in config.settings.users:
            built = []
            for spec in user.rules or ():
                try:
                    built.append(build_rule(spec, search_dir))
                except RuleError as exc:
                    self.problems.append(f"{spec.where}: {exc}")
            self.user_rules.append((user, built))

    def user_spec(self, user: str | None) -> tuple[UserSpec, list[Any]] | None:
        """The `users:` entry (and its built rules) for a user, first match."""
        import fnmatch

        return next(((spec, rules) for spec, rules in self.user_rules
                     if user and fnmatch.fnmatchcase(user, spec.pattern)), None)

    def rules_for(self, user: str | None) -> list[Any]:
        """The rules that decide a user's requests: its own (`users:`) or the global ones."""
        found = self.user_spec(user)
        return found[1] if found and found[0].rules is not None else self.rules

    @property
    def legacy_config(self) -> CCProxyConfig:
        """This config as ccproxy 1.x's CCProxyConfig (for 1.x rules and hooks)."""
        if self._legacy is None:
            self._legacy = CCProxyConfig.from_config(self.config, self)
        return self._legacy

    def models(self, missing: str | None = None) -> ModelTable:
        """The model table; reloaded from the live router when not loaded yet, or (at most
        once per cooldown) when a model name is missing."""
        with self._lock:
            now = time.monotonic()
            stale = not self._models_loaded or (
                missing is not None
                and now - self._last_reload >= self.config.settings.model_reload_cooldown)
            if self._models is None or (stale and self._model_source is not None):
                return self._load_models(now)
            return self._models

    def _load_models(self, now: float) -> ModelTable:
        self._last_reload = now
        deployments = None
        if self._model_source is not None:
            try:
                deployments = self._model_source()
            except Exception as exc:  # whatever the router does: the config's list, and
                self.warn_once(f"model-source:{type(exc).__name__}",   # no retry before the cooldown
                               f"reading LiteLLM's model list failed ({type(exc).__name__}: "
                               f"{exc}); using the config's until it works")
                self._models, self._models_loaded = ModelTable(self.config.model_list), True
                return self._models
        if deployments is None:
            # The live router is not ready (or there is none): use the config's list, and
            # do not mark it loaded so the live list is picked up once it exists.
            self._models = ModelTable(self.config.model_list)
            self._models_loaded = self._model_source is None
            return self._models
        self._models = ModelTable(deployments).with_aliases_of(ModelTable(self.config.model_list))
        self._models_loaded = True
        return self._models

    def warn_once(self, key: str, message: str) -> None:
        """Log a warning the first time it happens in this process."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def context(self, data: dict, *, call_type: str = "anthropic_messages",
                headers: Mapping[str, str] | None = None,
                user_api_key_dict: Any = None, quota_resend: bool = False) -> RequestContext:
        """The context for one request."""
        hdrs = dict(headers) if headers is not None else client_headers(data)
        ctx = RequestContext(pipeline=self, headers=hdrs, call_type=call_type,
                             path=request_path(data),
                             session_id=parse_session(data.get("metadata"), hdrs),
                             agent_id=hdrs.get("x-claude-code-agent-id") or None,
                             user_api_key_dict=user_api_key_dict, quota_resend=quota_resend,
                             original_thinking=_top_level_copy(data.get("thinking")))
        ctx.user = request_user(data, hdrs, user_api_key_dict, self.config.settings.user_header)
        if self.config.settings.sticky_turns and call_type != "count_tokens":
            self.sessions.attach(ctx, data)
        else:
            ctx.continuation = is_continuation(data)
        return ctx

    def run(self, data: dict, ctx: RequestContext) -> dict:
        """Run the hooks in order; a failing hook is logged and skipped."""
        for name, fn, params in self.hooks:
            try:
                result = fn(data, ctx, **params)
            except Exception as exc:  # a broken hook must not break the request
                message = f"hook {name} failed: {type(exc).__name__}: {exc}"
                ctx.hook_errors.append(message)
                log.error("%s (skipped; the request goes on)", message)
                continue
            if isinstance(result, dict):
                data = result
        if self.v1_hooks and isinstance(data.get("metadata"), dict) \
                and ctx.call_type == "anthropic_messages":
            for key in V1_METADATA_KEYS:      # Anthropic's metadata takes user_id alone
                data["metadata"].pop(key, None)
        self.finish(data, ctx)
        return data

    def finish(self, data: dict, ctx: RequestContext) -> None:
        """The fixes that keep routed requests valid, whatever `hooks:` lists (each has a
        setting to turn it off)."""
        settings = self.config.settings
        steps = [(settings.strip_foreign_thinking, strip_foreign_thinking),
                 (settings.clamp_max_tokens, clamp_max_tokens),
                 (True, fit_thinking_to_model),
                 (settings.local_usage, note_translated_usage)]
        for enabled, step in steps:
            if not enabled:
                continue
            try:
                step(data, ctx)
            except Exception as exc:  # a broken fix must not break the request either
                message = f"{step.__name__} failed: {type(exc).__name__}: {exc}"
                ctx.hook_errors.append(message)
                log.error("%s (skipped; the request goes on)", message)
        if not settings.show_requested_model and ctx.decision is not None:
            # LiteLLM answers with the requested model name unless told otherwise.
            answer_with_upstream_model_name(data)
        if settings.tracing and ctx.decision is not None:
            note_for_tracing(data, ctx, ctx.decision)


def note_for_tracing(data: dict, ctx: RequestContext, decision: RoutingDecision) -> None:
    """The routing decision where LiteLLM's tracing callbacks take it from: its logging
    metadata's requester_metadata (OpenTelemetry span attributes, Langfuse metadata)."""
    requester = litellm_metadata(data).setdefault("requester_metadata", {})
    if isinstance(requester, dict):
        user = claude_user(data.get("metadata")).get("claude_account_id")
        requester[METADATA_KEY] = {
            "label": decision.label, "requested_model": decision.requested_model,
            "model": decision.upstream, "reason": decision.reason,
            "session": ctx.session_id or "", "agent": ctx.agent_id or "", "user": user or "",
            "switch": ctx.switched}


def run_pipeline(pipeline: Pipeline, data: dict, **context: Any) -> tuple[dict, RequestContext]:
    """Build the context for a request and run the pipeline: (data, context)."""
    ctx = pipeline.context(data, **context)
    return pipeline.run(data, ctx), ctx


def route_request(request: dict, config: Config | None = None,
                  headers: Mapping[str, str] | None = None,
                  sessions: SessionStore | None = None) -> RequestContext:
    """Decide where a request would go, as the proxy would (what `explain` shows): the same
    pipeline on a deep copy of the request, against a copy of some session state (e.g. a
    live session's, see SessionStore.load) or none; the request itself is left as it was."""
    pipeline = Pipeline(config or load_config(), sessions=sessions)
    _data, ctx = run_pipeline(pipeline, copy.deepcopy(request), headers=headers or {})
    return ctx


# ---- Handler -------------------------------------------------------------------------------
# Handler (plain: runs the pipeline, watches answers, counts outcomes, serves ccproxy's routes),
# the request guard in front of the proxy, and CCProxyHandler, the few lines LiteLLM loads.

ROUTED_CALL_TYPES = frozenset({"anthropic_messages", "completion", "acompletion"})


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each line."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(debug: bool = False) -> None:
    """Send ccproxy's log lines to stderr (the proxy log), once per process."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler_ = _StderrHandler()
        handler_.setFormatter(logging.Formatter("%(asctime)s ccproxy %(levelname)s %(message)s",
                                                "%H:%M:%S"))
        log.addHandler(handler_)
        log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)


class FirstLineOnly(logging.Handler):
    """Takes a library's log lines and logs the first as one warning of ccproxy's: an
    unreachable collector makes OpenTelemetry's exporter log a line per retry and batch."""

    def __init__(self, what: str) -> None:
        super().__init__(logging.WARNING)
        self.what, self.seen = what, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.seen:
            self.seen = True
            lines = record.getMessage().strip().splitlines() or [""]
            log.warning("%s: %s (logged once; requests are not affected)", self.what,
                        redact_secrets(lines[0])[:300])


def quiet_tracing_logs() -> None:
    """OpenTelemetry's own log lines become one ccproxy warning (see FirstLineOnly)."""
    otel = logging.getLogger("opentelemetry")
    if not any(isinstance(h, FirstLineOnly) for h in otel.handlers):
        otel.addHandler(FirstLineOnly("tracing: the OpenTelemetry exporter reports"))
        otel.propagate = False


RECURSION_LIMIT = 4000    # in the proxy process (see Handler.start)
# Upper bounds (seconds) of the request-latency histogram in /ccproxy/metrics.
LATENCY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)


class Stats:
    """What the handler counts, as Prometheus-style series: (name, labels) -> value, where
    labels is a sorted tuple of (key, value) pairs; histograms keep per-bucket counts under
    `<name>_bucket` with an `le` label. Plus each label's last outcome (this process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.series: collections.defaultdict[tuple, float] = collections.defaultdict(float)
        self.last_ok: dict[str, bool] = {}        # label -> did its last request succeed

    @staticmethod
    def key(name: str, **labels: Any) -> tuple:
        """A series' key: its name and its labels, sorted."""
        return name, tuple(sorted((k, str(v)) for k, v in labels.items()))

    def add(self, name: str, value: float = 1, **labels: Any) -> None:
        """Add to a counter."""
        key = self.key(name, **labels)
        with self.lock:
            self.series[key] += value

    @classmethod
    def observation(cls, name: str, seconds: float, **labels: Any) -> list[tuple[tuple, float]]:
        """The changes that note one duration in a histogram (LATENCY_BUCKETS)."""
        _name, key = cls.key(name, **labels)
        bound = LATENCY_BUCKETS[bisect.bisect_left(LATENCY_BUCKETS, seconds)]
        return [((f"{name}_bucket", tuple(sorted(key + (("le", _le(bound)),)))), 1),
                ((f"{name}_sum", key), seconds), ((f"{name}_count", key), 1)]

    def copy(self) -> dict[tuple, float]:
        with self.lock:
            return dict(self.series)

    def routed(self, label: str, ctx: "RequestContext", seconds: float) -> None:
        """Count one routed request: its label, the rules' verdicts, the hooks' time."""
        with self.lock:
            series = self.series
            series["requests_total", (("label", label),)] += 1
            series["hook_seconds_total", ()] += seconds
            if ctx.hook_errors:
                series["hook_errors_total", ()] += len(ctx.hook_errors)
            if ctx.quota_resend:
                series["quota_resends_total", ()] += 1
            for name, _desc, verdict in ctx.verdicts:
                outcomes = ["evaluated"] + ["matched"] * verdict.matched + \
                    ["failed"] * verdict.fact.startswith("failed:")
                for outcome in outcomes:
                    series["rule_verdicts_total", (("rule", name), ("verdict", outcome))] += 1

    def finished(self, row: Mapping[str, Any], retries: int) -> None:
        """Count a finished request from its usage row (see Handler.usage_row)."""
        label, model = str(row.get("label") or "unrouted"), str(row.get("answered_model"))
        ok = row["status"] == "ok"
        key = self.key
        changes: list[tuple[tuple, float]] = [
            (key("answers_total", label=label, model=model, status=row["status"]), 1)]
        if not ok:
            changes.append((key("failures_total", label=label), 1))
        changes += [(key("tokens_total", label=label, model=model, kind=kind),
                     row[f"{kind}_tokens"]) for kind in ("input", "output", "cache_read",
                                                         "cache_write")
                    if row.get(f"{kind}_tokens")]
        if row.get("cost") is not None:
            changes.append((key("cost_usd_total", label=label, model=model), row["cost"]))
        elif ok:
            changes.append((key("unpriced_total", label=label, model=model), 1))
        if retries:
            changes.append((key("retries_total", label=label), retries))
        routed = row.get("routed_model")
        if ok and routed and model_name(str(routed)) != model_name(model):
            changes.append((key("fallbacks_total", label=label), 1))
        for name, seconds in (("request_seconds", "latency_s"), ("ttfb_seconds", "ttfb_s")):
            if ok and row.get(seconds) is not None:
                changes += self.observation(name, row[seconds], label=label)
        with self.lock:                 # one lock for all of it
            for series_key, value in changes:
                self.series[series_key] += value
            self.last_ok[label] = ok

    def snapshot(self, series: Mapping[tuple, float] | None = None) -> dict:
        """JSON-safe figures: of `series` (every worker's), else of this process."""
        series = self.copy() if series is None else series
        def counts(name: str) -> dict[str, int]:
            return {k: int(v) for k, v in by_label(series, name, "label").items()}

        routes = counts("requests_total")
        routed = sum(routes.values())
        return {"uptime_s": round(time.time() - self.started, 1),
                "requests": routed, "routes": routes, "failures": counts("failures_total"),
                "hook_errors": int(series.get(("hook_errors_total", ()), 0)),
                "count_tokens": counts("count_tokens_total"),
                "hook_ms_avg": round(series.get(("hook_seconds_total", ()), 0) * 1000
                                     / max(1, routed), 3),
                "tokenizer": "cl100k_base" if TOKENS.exact else "estimate",
                "token_cache": {"hits": TOKENS.hits, "misses": TOKENS.misses}}


def price_requested(row: dict, stats: "Stats | None") -> None:
    """Fill in what the requested model would have cost for the row's tokens and count the
    saving. A price lookup (~0.1 ms in LiteLLM): the ledger's thread does it, off the event
    loop, unless the ledger is off."""
    requested, answered = str(row.get("requested_model") or ""), str(row.get("answered_model"))
    cost = row.get("cost")
    if model_name(requested) == model_name(answered):
        row["requested_cost"] = cost
    elif requested:
        row["requested_cost"] = model_cost(requested, *(row.get(k) or 0 for k in (
            "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")))
    if stats is not None and cost is not None and row.get("requested_cost") is not None:
        stats.add("saved_usd_total", row["requested_cost"] - cost,
                  label=str(row.get("label") or "unrouted"), model=answered)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def by_label(series: Mapping[tuple, float], name: str, *keys: str) -> dict:
    """One counter's values by the given label(s) (a tuple key when several)."""
    out: dict = {}
    for (series_name, labels), value in series.items():
        if series_name == name:
            found = dict(labels)
            key = tuple(found.get(k, "") for k in keys)
            out[key[0] if len(keys) == 1 else key] = out.get(key[0] if len(keys) == 1 else key,
                                                              0) + value
    return out


# /ccproxy/metrics: name -> (type, help). Counters and histograms are summed across workers
# through the usage database when the ledger is on (see Ledger.read_series); gauges are
# summed over the live workers.
METRIC_FAMILIES = {
    "requests_total": ("counter", "Requests routed, by route label"),
    "answers_total": ("counter", "Finished requests by route label, answering model and status"),
    "failures_total": ("counter", "Requests answered with an error (or a stream ended by one), "
                                  "by route label"),
    "tokens_total": ("counter", "Tokens of finished requests by label, answering model and kind "
                                "(input includes cache reads and writes)"),
    "cost_usd_total": ("counter", "Cost of the answers by LiteLLM's prices, by label and model"),
    "saved_usd_total": ("counter", "What the requested models would have cost for the same tokens, "
                                   "minus what the answers cost, by label and model"),
    "unpriced_total": ("counter", "Answers from a model LiteLLM has no price for"),
    "retries_total": ("counter", "Retries LiteLLM made for requests it then answered, by label"),
    "upstream_errors_total": ("counter", "Failed upstream attempts (retried ones too), by label "
                                         "and status"),
    "fallbacks_total": ("counter", "Answers from another deployment than the routed one, by label"),
    "quota_resends_total": ("counter", "Requests sent once more to quota_fallback (plan limit)"),
    "count_tokens_total": ("counter", "count_tokens requests, by route label"),
    "budget_blocks_total": ("counter", "Requests refused because a budget was used up"),
    "rule_verdicts_total": ("counter", "Rule evaluations, matches and failures"),
    "hook_errors_total": ("counter", "Hooks that raised (skipped)"),
    "hook_seconds_total": ("counter", "Time spent in the hook pipeline"),
    "ledger_dropped_total": ("counter", "Usage rows not written (queue full or database failing)"),
    "request_seconds": ("histogram", "Time to a complete answer, by route label"),
    "ttfb_seconds": ("histogram", "Time to the first byte of the answer, by route label"),
    "sessions": ("gauge", "Sessions remembered now"),
    "session_switches": ("gauge", "Model switches of the sessions remembered now"),
    "session_uncached_tokens": ("gauge", "Tokens re-sent uncached after switches (remembered "
                                         "sessions)"),
    "session_plan_limited": ("gauge", "Sessions on quota_fallback now"),
}
SESSION_GAUGES = {"sessions": "sessions", "switches": "session_switches",
                  "uncached_tokens": "session_uncached_tokens",
                  "plan_limited": "session_plan_limited"}


def prometheus_text(series: Mapping[tuple, float], gauges: Mapping[str, float]) -> str:
    """GET /ccproxy/metrics in Prometheus' text format (histogram buckets made cumulative)."""
    def esc(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    def text(labels: Iterable[tuple[str, str]]) -> str:
        inner = ",".join(f'{k}="{esc(v)}"' for k, v in labels)
        return f"{{{inner}}}" if inner else ""

    grouped: dict[str, list] = collections.defaultdict(list)
    for (name, labels), value in series.items():
        grouped[name].append((labels, value))
    lines: list[str] = []
    for family, (kind, help_text) in METRIC_FAMILIES.items():
        lines += [f"# HELP ccproxy_{family} {help_text}", f"# TYPE ccproxy_{family} {kind}"]
        if kind == "gauge":
            lines.append(f"ccproxy_{family} {gauges.get(family, 0)}")
        elif kind == "counter":
            lines += [f"ccproxy_{family}{text(labels)} {value}"
                      for labels, value in sorted(grouped.get(family, []))]
        else:
            lines += _histogram_lines(family, grouped, text)
    return "\n".join(lines) + "\n"


def _histogram_lines(family: str, grouped: Mapping[str, list],
                     text: Callable[[Iterable[tuple[str, str]]], str]) -> list[str]:
    counts: dict[tuple, dict[str, float]] = collections.defaultdict(dict)
    for labels, value in grouped.get(f"{family}_bucket", []):
        rest = tuple(p for p in labels if p[0] != "le")
        counts[rest][dict(labels)["le"]] = value
    sums = dict(grouped.get(f"{family}_sum", []))
    lines = []
    for labels, count in sorted(grouped.get(f"{family}_count", [])):
        running = 0.0
        for bound in LATENCY_BUCKETS:
            running += counts[labels].get(_le(bound), 0)
            lines.append(f"ccproxy_{family}_bucket{text(labels + (('le', _le(bound)),))} {running}")
        lines += [f"ccproxy_{family}_sum{text(labels)} {sums.get(labels, 0.0)}",
                  f"ccproxy_{family}_count{text(labels)} {count}"]
    return lines


# Anthropic's error types and the statuses it sends them with.
ANTHROPIC_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                          "permission_error": 403, "not_found_error": 404,
                          "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                          "overloaded_error": 529}
# A plan-limit 429 without a usable reset time: the fallback holds this long; a reset time
# further away than a week is taken as a week.
PLAN_LIMIT_DEFAULT_WAIT = 3600.0
PLAN_LIMIT_MAX_WAIT = 7 * 86400.0
# Upstream answer headers a client's retry logic reads (Claude Code reads retry-after and the
# rate-limit family), passed on with the error.
PASSED_ERROR_HEADERS = ("retry-after", "x-should-retry", "request-id")
# Set per Anthropic-format request by UpstreamErrors; the failure hook fills it in.
_UPSTREAM_ERROR: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "ccproxy_upstream_error", default=None)


def upstream_error(exception: BaseException) -> dict | None:
    """What the upstream answered, from LiteLLM's exception for it: the Anthropic error body
    (LiteLLM keeps it inside its message), its status, and the headers worth passing on."""
    message = str(getattr(exception, "message", "") or exception)
    start = message.find("{")
    try:
        body, _end = json.JSONDecoder().raw_decode(message[start:]) if start >= 0 else (None, 0)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) and body.get("type") == "error" else None
    if not isinstance(error, dict) or not isinstance(error.get("type"), str):
        return None
    code = getattr(exception, "status_code", None)
    # LiteLLM keeps the upstream's status, except that a 529 becomes its 500.
    status = code if isinstance(code, int) and code not in (500, 529) \
        else ANTHROPIC_ERROR_STATUS.get(error["type"], 500)
    raw = getattr(exception, "litellm_response_headers", None) or {}
    headers = {str(k).lower(): str(v) for k, v in dict(raw).items()
               if str(k).lower() in PASSED_ERROR_HEADERS
               or str(k).lower().startswith("anthropic-ratelimit-")}
    return {"status": status, "body": body, "headers": headers}


def plan_limit_reset(headers: Mapping[str, str]) -> float | None:
    """When a 429 says the Claude plan's limit is reached (Anthropic's unified rate-limit
    headers: status `rejected`), the reset time it gives (epoch seconds); else None."""
    if headers.get("anthropic-ratelimit-unified-status", "").strip().lower() != "rejected":
        return None
    now = time.time()
    for name, base in (("anthropic-ratelimit-unified-reset", 0.0), ("retry-after", now)):
        try:
            value = float(headers.get(name, ""))
        except ValueError:
            continue
        if math.isfinite(value) and value + base > now:
            return min(value + base, now + PLAN_LIMIT_MAX_WAIT)
    return now + PLAN_LIMIT_DEFAULT_WAIT


class UpstreamErrors:
    """ASGI layer for Anthropic-format routes: an error answer carries what the upstream
    sent (its status, e.g. 529 overloaded or 429, its error JSON unwrapped, retry-after and
    the rate-limit headers) instead of LiteLLM's 500 with the error inside its message; any
    other error answer that is not Anthropic's error JSON (LiteLLM's own for a body it cannot
    parse, a plain-text 500) is put in that form, with its status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).startswith("/v1/messages"):
            await self.app(scope, receive, send)
            return
        slot: dict = {}
        token = _UPSTREAM_ERROR.set(slot)
        held: dict | None = None
        started = False
        chunks: list[bytes] = []

        async def send_as_upstream(message: dict) -> None:
            nonlocal held, started
            started = started or message.get("type") == "http.response.start"
            if message.get("type") == "http.response.start" and message.get("status", 200) >= 400:
                held = message
                return
            if held is None or message.get("type") != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            status, body = (slot["status"], slot["body"]) if slot.get("body") else \
                (held["status"], anthropic_error_body(held["status"], b"".join(chunks)))
            if body is None:                   # Anthropic's form already: as it came
                await send(held)
                await send({"type": "http.response.body", "body": b"".join(chunks)})
                return
            raw = json.dumps(body).encode()
            headers = [(k, v) for k, v in held.get("headers") or ()
                       if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(raw)).encode())]
            headers += [(k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in slot.get("headers", {}).items()]
            await send(dict(held, status=status, headers=headers))
            await send({"type": "http.response.body", "body": raw})

        try:
            await self.app(scope, receive, send_as_upstream)
        except Exception as exc:  # LiteLLM failed before answering (e.g. on a body that
            if started:           # is JSON but not an object): Anthropic's 500, one line
                raise
            why = redact_secrets(f"{type(exc).__name__}: {exc}")[:300]
            log.warning("LiteLLM failed on %s before answering: %s", scope.get("path"), why)
            raw = json.dumps({"type": "error", "error": {
                "type": "api_error", "message": f"the proxy failed before answering ({why})"}})
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(raw)).encode())]})
            await send({"type": "http.response.body", "body": raw.encode()})
        finally:
            _UPSTREAM_ERROR.reset(token)


def anthropic_error_body(status: int, raw: bytes) -> dict | None:
    """An error answer's body in Anthropic's form ({"type": "error", "error": {type,
    message}}); None when it is in that form already."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") == "error":
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    if kind not in ANTHROPIC_ERROR_STATUS:
        kind = next((k for k, v in ANTHROPIC_ERROR_STATUS.items() if v == status),
                    "api_error" if status >= 500 else "invalid_request_error")
    message = error.get("message") if isinstance(error, dict) else \
        parsed.get("detail") if isinstance(parsed, dict) else None
    text = message if isinstance(message, str) and message else \
        raw.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return {"type": "error", "error": {"type": kind, "message": redact_secrets(text)[:2000]}}


class Handler:
    """ccproxy inside a LiteLLM proxy: runs the pipeline for each request, watches the
    answers (thinking signatures, usage), counts outcomes and serves ccproxy's routes.

    LiteLLM talks to it through CCProxyHandler, a few lines below. `__init__` only reads the
    config and builds; `start()` does the I/O: logging, the LiteLLM contact checks and
    globals, OAuth commands, the background thread, the guard and the routes.
    """

    def __init__(self, config_dir: str | os.PathLike | None = None,
                 config: Config | None = None) -> None:
        self.config_error: str | None = None
        legacy = _config_instance if config is None and config_dir is None else None
        if legacy is not None:          # 1.x code set the config with set_config_instance
            config = legacy.to_config()
        elif config is None:
            try:
                config = load_config(config_dir)
            except ConfigError as exc:
                self.config_error = str(exc)
                config = Config(settings=Settings(), litellm={})
        self.config = config
        self.pipeline = legacy.pipeline if legacy is not None else \
            Pipeline(config, model_source=live_model_list, sessions=session_store_for(config))
        self.stats = Stats()
        self.missing: list[str] = []        # LiteLLM contact points not found at start
        self.guarded = False
        self._thinking_registered: set[str] = set()
        self._http: Any = None
        self._started = False
        self.ledger = Ledger((config.directory or Path(DEFAULT_CONFIG_DIR).expanduser())
                             / LEDGER_FILE, self.stats, self.session_gauges,
                             on_row=self.pipeline.budgets.book if self.pipeline.budgets else None)
        self.pipeline.budgets.ledger_path = self.ledger.path
        self._failed_calls: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ledger_tables: tuple[float, dict] | None = None    # (when read, the dashboard's)

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Do what loading ccproxy into a proxy needs, once."""
        if self._started:
            return
        self._started = True
        config = self.config
        setup_logging(config.settings.debug)
        if self.config_error:
            log.error("config error, routing disabled (every request passes through): %s",
                      self.config_error.replace("\n", " "))
        for problem in self.pipeline.problems:
            log.error("%s", problem)
        for warning in config.warnings:
            log.warning("%s", warning)
        for contact, ok in check_contacts():
            if not ok:
                self.missing.append(contact.name)
                log.error("LiteLLM %s: %s not found (checked on %s); without it: %s",
                          litellm_version(), contact.relies_on, LITELLM_CHECKED, contact.breaks)
        TOKENS.max_chars = config.settings.token_cache_max_chars
        # LiteLLM parses and walks request bodies recursively, and ccproxy's ASGI layers add
        # frames to every request: with Python's default limit (1,000) a body nested ~900
        # deep that LiteLLM alone answers 400 crashed LiteLLM's auth and its error handler
        # (a plain-text 500). Headroom makes such bodies fail no worse than without ccproxy.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
        if config.settings.openai_chat_completions:
            use_chat_completions_for_openai()
        for dep in config.model_list:
            params = _litellm_params(dep)
            if isinstance(params.get("model"), str) and "*" not in params["model"]:
                self.keep_thinking(params["model"], params)
        files = ", ".join(str(f) for f in config.files) or "built-in defaults"
        log.info("ccproxy %s loaded: %d rules (%s), hooks: %s; config: %s", __version__,
                 len(self.pipeline.rules),
                 ", ".join(getattr(r, "name", "?") for r in self.pipeline.rules) or "none",
                 ", ".join(n for n, _f, _p in self.pipeline.hooks) or "none", files)
        load_oauth_sources(self.pipeline, required=config.settings.oauth_required)
        set_config_instance(self.pipeline.legacy_config)     # what 1.x's get_config() gives
        if "otel" in config.settings.tracing:
            quiet_tracing_logs()
        BACKGROUND.start(self.pipeline)
        if config.settings.usage_ledger:
            self.ledger.start()
        app = proxy_app()
        if app is not None and not getattr(app.state, "ccproxy", False):
            app.state.ccproxy = True
            wrap_app(app, UpstreamErrors)
            wrap_app(app, ModelDiscovery, models=lambda: discovery_models(self.pipeline))
            self.guarded = wrap_app(app, RequestGuard, policy=AccessPolicy.from_config(config))
            if not self.guarded:
                log.error("cannot guard the proxy: browser requests and the proxy key are "
                          "NOT checked by ccproxy")
            add_routes(app, self.routes())

    def keep_thinking(self, upstream: str, params: Mapping[str, Any] | None = None) -> None:
        """Make LiteLLM pass `thinking` and `output_config` to an Anthropic model as sent
        (see keep_thinking_as_sent); once per model name."""
        if not self.config.settings.preserve_thinking or upstream in self._thinking_registered:
            return
        self._thinking_registered.add(upstream)
        if provider_of(params or {"model": upstream}) == "anthropic" \
                and keep_thinking_as_sent(model_name(upstream)):
            log.debug("thinking and effort pass through unchanged for %s", upstream)

    # -- requests -------------------------------------------------------------------------
    def pre_call(self, data: Any, call_type: str, user_api_key_dict: Any = None,
                 v1_call: bool = False) -> Any:
        """Route one request (LiteLLM calls this before choosing a deployment). `v1_call`:
        called the 1.x way, which leaves the route in data["metadata"] as 1.x did."""
        if call_type not in ROUTED_CALL_TYPES or not isinstance(data, dict):
            return data
        started = time.perf_counter()
        resend = _RESEND.get() or {}
        data, ctx = run_pipeline(self.pipeline, data, call_type=call_type,
                                 user_api_key_dict=user_api_key_dict,
                                 quota_resend=resend.get("sent") == "quota")
        decision = ctx.decision
        elapsed = (time.perf_counter() - started) * 1000
        self.stats.routed(decision.label if decision else "unrouted", ctx, elapsed / 1000)
        if ctx.blocked is not None:     # counted as routed above, and as failed when answered
            self.stats.add("budget_blocks_total")
            log.warning("refused (429): %s", ctx.blocked[0])
            refuse(_UPSTREAM_ERROR.get(), 429, "rate_limit_error", ctx.blocked[0],
                   {"retry-after": str(max(1, int(ctx.blocked[1] - time.time())))})
        if decision is not None and decision.provider == "anthropic":
            self.keep_thinking(decision.upstream)
        if decision is not None:
            log.info("route %s: %s -> %s%s%s", decision.label, decision.requested_model,
                     decision.model if decision.model == decision.upstream
                     else f"{decision.model} ({decision.upstream})",
                     " [passthrough]" if decision.passthrough else "",
                     f" session={ctx.session_id[:8]}" if ctx.session_id else "")
            if log.isEnabledFor(logging.DEBUG):
                for name, desc, verdict in ctx.verdicts:
                    log.debug("  %s %s: %s%s", name, desc,
                              "match" if verdict.matched else "no match",
                              f" ({verdict.fact})" if verdict.fact else "")
                log.debug("  hooks %.2f ms; auth: %s", elapsed, "; ".join(ctx.auth) or "-")
        if v1_call:
            put_v1_metadata(data, ctx)
        return data

    def response_headers(self, data: Mapping[str, Any], response: Any = None,
                         call_info: Any = None) -> dict:
        """Tell the client where its request went (x-ccproxy-* response headers): the
        deployment that answered, which after a fallback is not the one routed to; noted
        for the signature ledger too (an SSE answer's headers come before its blocks). The
        upstream's anthropic-* headers (rate limits, thinking-prefix mismatch) and request-id
        go on as sent (LiteLLM drops or renames them)."""
        passed = {k: v for k, v in upstream_answer_headers(data, response).items()
                  if k.startswith("anthropic-") or k == "request-id"}
        decision = routing_metadata(data)
        if "label" not in decision:
            return passed
        model_id = answer_model_id(response, call_info) or call_model_id(data)
        answered = decision.get("answered_by") or deployment_model(model_id)
        if answered:
            decision["answered_by"] = answered
        model = answered or str(decision.get("upstream") or decision.get("model"))
        headers = dict(passed, **{"x-ccproxy-rule": str(decision["label"]),
                                  "x-ccproxy-model": model})
        own_prices = model_id if deployment_model(model_id) == model else None  # (a fallback's)
        cost = 0.0 if answered_from_cache(data) else answer_cost(model, response, own_prices)
        if cost is not None:        # a JSON answer from a priced model (a stream's headers
            headers["x-ccproxy-cost"] = f"{cost:.6f}"    # go before its usage is known)
        return headers

    def _record_signatures(self, request_data: Mapping[str, Any], decision: dict,
                           signatures: Iterable[str]) -> None:
        headers = client_headers(request_data)
        session = parse_session(request_data.get("metadata"), headers)
        agent = headers.get("x-claude-code-agent-id") or None
        producer = model_name(str(decision.get("answered_by") or decision.get("upstream", "")))
        for signature in signatures:
            self.pipeline.sessions.record_signature(session, agent, signature, producer)

    def on_success(self, data: Mapping[str, Any], response: Any) -> Any:
        """A JSON answer: note who signed its thinking blocks; fill in zero usage."""
        decision = routing_metadata(data)
        if not decision or not isinstance(response, dict):
            return response
        answered = deployment_model(answer_model_id(response))
        if answered:
            decision["answered_by"] = answered
            if answered != decision.get("upstream") and self.config.settings.show_requested_model \
                    and decision.get("requested_model"):
                # LiteLLM 1.108.7 restamps a fallback's SSE answer but not its JSON one.
                response["model"] = decision["requested_model"]
        content = response.get("content")
        if isinstance(content, list):
            self._record_signatures(data, decision,
                                    filter(None, map(thinking_signature, content)))
        usage = response.get("usage")
        if isinstance(usage, dict) and not usage.get("input_tokens") \
                and decision.get("input_tokens"):
            usage["input_tokens"] = decision["input_tokens"]
        return response

    async def stream(self, response: Any, request_data: Mapping[str, Any]) -> Any:
        """An Anthropic SSE answer, passed on frame by frame as it comes: note who signed its
        thinking blocks; fill a zero input_tokens in message_start for translated routes;
        a stream that breaks (a `data:` that is not JSON, no message_stop: empty, cut off)
        ends with an Anthropic error event. (An upstream that fails while sending raises
        through here, and LiteLLM sends the error event.)"""
        if not request_path(request_data).startswith("/v1/messages"):
            async for chunk in response:          # OpenAI format: passed as it comes
                yield chunk
            return
        decision = routing_metadata(request_data)
        fill = decision.get("input_tokens") if decision.get("provider") != "anthropic" \
            else None
        fill = fill if isinstance(fill, int) else 0
        watcher = SSEWatcher()
        async for chunk in response:
            if not isinstance(chunk, bytes):
                yield chunk
                continue
            frames = watcher.feed(chunk)
            if fill and any(b"message_start" in f for f in frames):
                frames = [with_input_tokens(f, fill) if b"message_start" in f else f
                          for f in frames]
                fill = 0
            if frames:
                yield b"".join(frames)
            if watcher.problem:
                await close_quietly(response)
                break
        ending = watcher.close()
        if ending:
            yield ending
            self.record_finished(request_data, "failed", StreamBroken(watcher.problem or ""))
        if watcher.signatures and decision:
            self._record_signatures(request_data, decision, watcher.signatures)

    async def on_upstream_failure(self, request_data: Mapping[str, Any],
                                  exception: BaseException) -> None:
        """A failed upstream attempt (LiteLLM awaits this after each): note what the upstream
        answered, for UpstreamErrors to pass on; after a 401 for a token from oat_sources,
        get a fresh one before the retry."""
        slot = _UPSTREAM_ERROR.get()
        found = upstream_error(exception) if slot is not None else None
        if slot is not None:
            slot.clear()
            slot.update(found or {})
        self.stats.add("upstream_errors_total",
                       label=routing_metadata(request_data).get("label", "unrouted"),
                       status=(found or {}).get("status") or getattr(exception, "status_code", "-"))
        until = plan_limit_reset(found["headers"]) if found and found["status"] == 429 else None
        if until is not None:
            self.plan_limit_reached(request_data, until)
        if getattr(exception, "status_code", None) != 401:
            return
        provider = routing_metadata(request_data).get("oauth_provider")
        source = self.pipeline.oauth.get(provider) if provider else None
        if source is None:
            return
        import asyncio

        ok = await asyncio.to_thread(source.refresh_after_401,
                                     self.config.settings.oauth_timeout)
        slot = _RESEND.get()
        if ok and slot is not None:
            slot["again"] = "oauth"
        log.warning("upstream answered 401 for the oauth token of %s; %s", provider,
                    "fetched a fresh one" if ok else f"refreshing failed ({source.problem})")

    def plan_limit_reached(self, request_data: Mapping[str, Any], until: float) -> None:
        """An upstream said the Claude plan's limit is reached: the session goes to
        quota_fallback until the reset, starting with this request (sent once more)."""
        quota = self.config.settings.quota_fallback
        decision = routing_metadata(request_data)
        if not quota or decision.get("label") == quota:
            return
        slot = _RESEND.get()
        if slot is not None:
            slot["again"] = "quota"
        session = parse_session(request_data.get("metadata"), client_headers(request_data))
        if session and self.pipeline.sessions.limit_reached(session, until):
            log.warning("session %s: the plan limit is reached (429 from %s); routing it to "
                        "`%s` until %s", session[:8], decision.get("upstream", "?"), quota,
                        clock(until))

    def record_finished(self, kwargs: Mapping[str, Any], status: str,
                        exception: BaseException | None = None) -> None:
        """Count a finished request against the route it took and book it in the usage
        ledger: `ok` from a success event's kwargs, `failed` from the request data of the
        error answer; LiteLLM's own health checks aside."""
        if is_health_check(kwargs) or not self._first_outcome(kwargs, status):
            return
        row = self.usage_row(kwargs, status, exception)
        self.stats.finished(row, attempted_retries(kwargs))
        if self.config.settings.usage_ledger:
            self.ledger.add(row)            # its thread prices the requested model
        else:
            price_requested(row, self.stats)

    def _first_outcome(self, kwargs: Mapping[str, Any], status: str) -> bool:
        """False for a request already booked as failed: a stream ccproxy ended with an
        error event, which LiteLLM may still log as a success, or fail again."""
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(call_id, str):
            return True
        with self.stats.lock:
            if call_id in self._failed_calls:
                return False
            if status == "failed":
                self._failed_calls[call_id] = None
                while len(self._failed_calls) > 10_000:
                    self._failed_calls.popitem(last=False)
        return True

    def usage_row(self, kwargs: Mapping[str, Any], status: str,
                  exception: BaseException | None = None) -> dict:
        """One finished request: who, which route, which deployment answered, tokens, its
        cost and what the requested model would have cost (the ledger's row). `kwargs`: a
        success event's, or a failed request's data."""
        decision = routing_metadata(kwargs)
        params = kwargs.get("litellm_params")
        request = params.get("proxy_server_request") if isinstance(params, Mapping) else \
            kwargs.get("proxy_server_request")
        body = request.get("body") if isinstance(request, Mapping) else None
        metadata = body.get("metadata") if isinstance(body, Mapping) else None
        headers = client_headers(kwargs) or client_headers({"proxy_server_request": request})
        usage = answer_usage(kwargs)
        answered = str(decision.get("answered_by") or decision.get("upstream") or
                       kwargs.get("model") or "")
        requested = str(decision.get("requested_model") or kwargs.get("model") or "")
        cost = usage.get("cost")
        tokens = {k: usage.get(k, 0) for k in ("input_tokens", "output_tokens",
                                                 "cache_read_tokens", "cache_write_tokens")}
        return {
            "ts": time.time(), "session": parse_session(metadata, headers),
            "agent": headers.get("x-claude-code-agent-id"),
            "user": decision.get("user") or claude_user(metadata).get("claude_account_id"),
            "label": decision.get("label"), "requested_model": requested,
            "answered_model": answered, "provider": decision.get("provider"),
            "routed_model": decision.get("upstream"), "arm": decision.get("arm"), **tokens,
            "cost": cost, "cache_hit": usage.get("cache_hit", False),
            "latency_s": usage.get("latency_s"), "ttfb_s": usage.get("ttfb_s"), "status": status,
            "error": failure_text(kwargs, exception) if status != "ok" else None}

    # -- ccproxy's routes -----------------------------------------------------------------
    def routes(self) -> list[tuple[str, Callable[..., Any], str, bool]]:
        """ccproxy's routes in the proxy: (path, endpoint, method, authenticated)."""
        routes = [(HEALTH_PATH, self._health_route, "GET", False),
                  (DASHBOARD_PATH, self._dashboard_page, "GET", False),
                  (DASHBOARD_DATA_PATH, self._dashboard_data, "GET", False),
                  (SESSION_PATH + "/{session_id}", self._session_route, "GET", False)]
        if self.config.settings.metrics_enabled:
            routes.append((METRICS_PATH, self._metrics_route, "GET", False))
        if self.config.settings.route_count_tokens:     # LiteLLM runs no hook for it
            routes.append(("/v1/messages/count_tokens", self._count_tokens_route, "POST", True))
        if self.pipeline.oauth or self.config.settings.quota_fallback:
            routes.append(("/v1/messages", self._messages_route, "POST", True))
        return routes

    async def _health_route(self, request: Any, response: Any, key: Any) -> Any:
        import asyncio

        return json_response(await asyncio.to_thread(self.health))  # (reads the ledger)

    async def _dashboard_page(self, request: Any, response: Any, key: Any) -> Any:
        return text_response(DASHBOARD_HTML, "text/html; charset=utf-8", DASHBOARD_HEADERS)

    async def _dashboard_data(self, request: Any, response: Any, key: Any) -> Any:
        import asyncio

        return json_response(await asyncio.to_thread(self.dashboard_figures))

    def dashboard_figures(self) -> dict:
        """What the dashboard shows: health, the recent sessions with their cost, the latest
        errors; cost per day for 30 days and the week per user and per A/B arm."""
        sessions = self.pipeline.sessions.recent(50)
        ledger = self.config.settings.usage_ledger
        spent = self.ledger.session_costs([s["session_id"] for s in sessions]) if ledger else {}
        for session in sessions:
            session["cost_usd"], session["saved_usd"] = spent.get(session["session_id"],
                                                                  (None, None))
        return {"health": self.health(), "sessions": sessions,
                "errors": self.ledger.recent_errors() if ledger else [],
                **(self.ledger_tables() if ledger else {"days": [], "arms": [], "users": []})}

    def ledger_tables(self) -> dict:
        """The dashboard's tables summed over days of the ledger, read again at most every
        DASHBOARD_TABLES_S: at 100,000 rows a week they take 0.6 s to sum, and the page asks
        every 3 s."""
        now = time.monotonic()
        if self._ledger_tables is None or now - self._ledger_tables[0] >= DASHBOARD_TABLES_S:
            week = {by: [r for r in usage_rows(self.ledger.path, 7 * 86400, by) or () if r[by]]
                    for by in ("arm", "user")}
            self._ledger_tables = now, {"days": self.ledger.daily(30), "arms": week["arm"],
                                        "users": week["user"]}
        return self._ledger_tables[1]

    async def _metrics_route(self, request: Any, response: Any, key: Any) -> Any:
        import asyncio

        series, gauges = await asyncio.to_thread(self.shared_series)
        return text_response(prometheus_text(series, gauges),
                             "text/plain; version=0.0.4; charset=utf-8")

    def session_gauges(self) -> dict[str, float]:
        """This process's session figures as /ccproxy/metrics gauges."""
        return {SESSION_GAUGES[k]: v for k, v in self.pipeline.sessions.totals().items()}

    def shared_series(self, gauges: bool = True) -> tuple[Mapping[tuple, float],
                                                          Mapping[str, float]]:
        """The counts and (unless not wanted) gauges of every worker, through the usage
        database; this process's alone when the ledger is off or cannot be read. Session
        gauges from a shared store are every worker's already: not summed again."""
        mode = "none" if not gauges else "own" if self.pipeline.sessions.shared else "summed"
        shared = self.ledger.read_series(mode) if self.config.settings.usage_ledger else None
        return shared or (self.stats.copy(), self.session_gauges() if gauges else {})

    async def _session_route(self, request: Any, response: Any, key: Any) -> Any:
        session_id = request.path_params.get("session_id", "")
        if request.query_params.get("state"):
            state = self.pipeline.sessions.export(session_id)
            return json_response(state, 200 if state["states"] else 404)
        found = self.pipeline.sessions.find(session_id)
        if found and self.config.settings.usage_ledger:
            import asyncio

            spent = (await asyncio.to_thread(self.ledger.session_costs, [session_id])).get(
                session_id)
            if spent is not None:
                found = dict(found, cost_usd=spent[0], saved_usd=spent[1])
        return json_response(found or {"error": "unknown session"}, 200 if found else 404)

    async def _count_tokens_route(self, request: Any, response: Any, key: Any) -> Any:
        body = await parsed_json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return json_response({"type": "error", "error": {
                "type": "invalid_request_error",
                "message": "body must be a JSON object with model and messages"}}, 400)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            status, answer = await self.count_tokens(body, headers, request.url.query)
        except Exception as exc:  # the route's boundary: an Anthropic error, never plain text
            log.error("count_tokens failed: %s: %s", type(exc).__name__, redact_secrets(str(exc)))
            status, answer = 500, {"type": "error", "error": {
                "type": "api_error", "message": f"ccproxy could not count: {type(exc).__name__}"}}
        return json_response(answer, status)

    async def _messages_route(self, request: Any, response: Any, key: Any) -> Any:
        # The failure hook has, by the time LiteLLM's endpoint returns, fetched a fresh token
        # after a 401 for one from oat_sources, or noted that the plan limit is reached
        # (quota_fallback): the same request is sent once more, routed anew.
        slot: dict[str, str | None] = {"again": None, "sent": None}
        token = _RESEND.set(slot)
        try:
            result = await litellm_messages_endpoint(request, response, key)
            if slot["again"] and getattr(result, "status_code", 200) >= 400:
                log.info("sending the request once more (%s)", "with the fresh oauth token"
                         if slot["again"] == "oauth" else "to quota_fallback")
                slot.update(sent=slot["again"], again=None)
                result = await litellm_messages_endpoint(request, response, key)
            return result
        finally:
            _RESEND.reset(token)

    async def count_tokens(self, body: dict, headers: Mapping[str, str],
                           query: str = "") -> tuple[int, dict]:
        """Answer /v1/messages/count_tokens for the route the rules pick: the Anthropic
        upstream's own count (with the same auth a message would get), or the offline
        tokenizer's count of the whole request for any other provider."""
        import asyncio

        data, ctx = await asyncio.to_thread(run_pipeline, self.pipeline, dict(body),
                                            call_type="count_tokens", headers=headers)
        decision = ctx.decision
        self.stats.add("count_tokens_total", label=decision.label if decision else "unrouted")
        if decision is not None and decision.provider == "anthropic":
            group = self.pipeline.models().group(decision.model)
            params = _litellm_params(group[0]) if group else {}
            upstream_model = model_name(decision.upstream)
            log.info("count_tokens %s: %s -> %s (upstream count)", decision.label,
                     decision.requested_model, upstream_model)
            return await self._anthropic_count(dict(body, model=upstream_model), params,
                                               data, headers, query)
        count = (await asyncio.to_thread(TOKENS.count_request, body))[0]
        log.info("count_tokens %s: %s -> %s (local count %d)",
                 decision.label if decision else "-", body.get("model"),
                 decision.upstream if decision else "-", count)
        return 200, {"input_tokens": count}

    async def _anthropic_count(self, body: dict, params: Mapping[str, Any], data: dict,
                               headers: Mapping[str, str], query: str) -> tuple[int, dict]:
        import httpx

        base = str(params.get("api_base") or os.environ.get("ANTHROPIC_API_BASE")
                   or "https://api.anthropic.com").rstrip("/")
        base = base[:-3] if base.endswith("/v1") else base
        out = {"content-type": "application/json",
               "anthropic-version": headers.get("anthropic-version", "2023-06-01")}
        if headers.get("anthropic-beta"):
            out["anthropic-beta"] = headers["anthropic-beta"]
        forwarded = {k: v for k, v in provider_headers(data, "anthropic").items() if v}
        if "authorization" in forwarded:      # one credential upstream, never two
            forwarded.pop("x-api-key", None)
        if not any(k in forwarded for k in ("authorization", "x-api-key")):
            key = _secret(params.get("api_key")) or os.environ.get("ANTHROPIC_API_KEY")
            if key:
                forwarded["x-api-key"] = key
        out.update(forwarded)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=60.0)
        url = f"{base}/v1/messages/count_tokens" + (f"?{query}" if query else "")
        try:
            resp = await self._http.post(url, json=body, headers=out)
        except httpx.HTTPError as exc:
            return 502, {"type": "error", "error": {
                "type": "api_error", "message": f"count_tokens upstream failed: {exc}"}}
        try:
            answer = resp.json()
        except ValueError:
            answer = {"type": "error", "error": {"type": "api_error",
                                                 "message": resp.text[:200]}}
        return resp.status_code, answer

    def health(self) -> dict:
        """ccproxy's live figures for GET /ccproxy/health and `status` (no secrets): the
        counts of every worker (as in /ccproxy/metrics), the last outcome per label this
        worker's."""
        series = self.shared_series(gauges=False)[0]
        report = self.stats.snapshot(series)
        shared = self.pipeline.sessions.backend()["ok"]
        report.update(status="ok" if not self.missing and shared else "degraded", version=__version__,
                      instance=os.environ.get(INSTANCE_ENV, ""), guarded=self.guarded,
                      litellm=litellm_version(), missing=self.missing,
                      rules=[getattr(r, "name", "?") for r in self.pipeline.rules],
                      config_error=self.config_error,
                      sessions=self.pipeline.sessions.totals(),
                      state=self.pipeline.sessions.backend(),
                      oauth={p: ("ok" if s.token else (s.error or "not loaded"))
                             for p, s in self.pipeline.oauth.items()},
                      rule_counts=self._rule_counts(series), labels=self._label_health(),
                      ledger={"written": self.ledger.written, "dropped": self.ledger.dropped,
                              "queued": self.ledger.rows.qsize()})
        return report

    @staticmethod
    def _rule_counts(series: Mapping[tuple, float]) -> dict:
        """Per rule: how often it was evaluated, matched and failed."""
        out: dict[str, dict[str, int]] = {}
        for (rule, verdict), n in by_label(series, "rule_verdicts_total", "rule",
                                           "verdict").items():
            out.setdefault(rule, {"evaluated": 0, "matched": 0, "failed": 0})[verdict] = int(n)
        return out

    def _label_health(self) -> dict:
        """Per route label (A/B arms too): the deployment it resolves to (None: no entry)
        and whether its last request succeeded (None: none yet)."""
        table = self.pipeline.models()
        with self.stats.lock:
            last = dict(self.stats.last_ok)
        labels = []
        for rule in self.pipeline.rules:
            labels += [getattr(rule, "name", "")] + [arm for arm, _w in getattr(rule, "ab", ())]
        out = {}
        for label in dict.fromkeys(labels + ["default"]):
            resolved = table.resolve_route(label) if label in table else None
            out[label] = {"deployment": resolved[1] if resolved else None,
                          "last_ok": last.get(label)}
        return out


def _make_handler_class() -> type:
    """CCProxyHandler: LiteLLM's CustomLogger around a Handler. LiteLLM runs a hook only when
    it is defined on the callback's own class, so each is spelled out here."""

    base: Any = custom_logger_base()

    class CCProxyHandler(base):
        """The LiteLLM callback (`ccproxy.handler`): every hook hands over to `self.core`."""

        def __init__(self, config_dir: str | os.PathLike | None = None,
                     config: Config | None = None) -> None:
            super().__init__()
            self.core = Handler(config_dir, config)
            self.core.start()

        @property
        def hooks(self) -> list[tuple[Callable[..., Any], dict]]:
            """The hooks as (function, params), as ccproxy 1.x's handler listed them."""
            return self.core.pipeline.legacy_config.load_hooks()

        async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any = None,
                                      data: Any = None, call_type: str = "completion",
                                      **_kwargs: Any) -> Any:
            # In a worker thread: counting a long context takes milliseconds (tiktoken lets
            # go of the GIL), which the event loop must not spend.
            import asyncio

            if data is None:        # ccproxy 1.x's own form: (data, user_api_key_dict)
                return await asyncio.to_thread(self.core.pre_call, user_api_key_dict,
                                               "anthropic_messages", cache, v1_call=True)
            return await asyncio.to_thread(self.core.pre_call, data, call_type,
                                           user_api_key_dict)

        async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict: Any,
                                                        response: Any, request_headers: Any = None,
                                                        litellm_call_info: Any = None) -> dict:
            return self.core.response_headers(data, response, litellm_call_info)

        async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any,
                                               response: Any) -> Any:
            return self.core.on_success(data, response)

        async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any,
                                                          response: Any,
                                                          request_data: dict) -> Any:
            async for chunk in self.core.stream(response, request_data):
                yield chunk

        async def async_post_call_failure_deployment_hook(self, request_data: Any,
                                                          exception: Any, call_type: Any,
                                                          *args: Any, **kwargs: Any) -> None:
            await self.core.on_upstream_failure(request_data, exception)

        async def async_post_call_failure_hook(self, request_data: dict, original_exception: Any,
                                               user_api_key_dict: Any,
                                               traceback_str: Any = None) -> None:
            self.core.record_finished(request_data, "failed", original_exception)

        async def async_log_success_event(self, kwargs: dict, response_obj: Any,
                                          start_time: Any, end_time: Any) -> None:
            self.core.record_finished(kwargs, "ok")

    return CCProxyHandler


LIVENESS_PATHS = frozenset({"/health/liveliness", "/health/liveness"})


def host_of(hostport: str) -> str:
    """The host part of a Host header: `[::1]:4000` -> `::1`, `localhost:4000` -> `localhost`."""
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def key_matches(presented: str | None, key: str) -> bool:
    """A presented key, bare or as `Bearer <key>`, equals `key` (in constant time)."""
    import hmac
    if not presented:
        return False
    value = presented.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return hmac.compare_digest(value.encode(), key.encode())


@dataclasses.dataclass(slots=True, frozen=True)
class AccessPolicy:
    """Who may use the proxy; RequestGuard asks it about every HTTP request.

    Browsers: a request with an `Origin` (or `Sec-Fetch-Site: cross-site|same-site`) is a web
    page's, refused unless its origin is listed. Keys: with ccproxy's proxy key every route
    but liveness needs it; with only LiteLLM's master key, ccproxy's own routes need it (LiteLLM
    checks its routes itself). Without any key, only this machine is answered: a loopback
    peer that names a loopback host (a page on a rebound DNS name names its own).
    """

    allowed_origins: frozenset[str] = frozenset()
    proxy_key: str | None = None
    master_key: str | None = None
    key_header: str | None = None        # LiteLLM's litellm_key_header_name, if set

    @classmethod
    def from_config(cls, config: Config) -> "AccessPolicy":
        """The policy for a config; the proxy key from `start`'s environment or its file."""
        general = config.litellm.get("general_settings")
        header = general.get("litellm_key_header_name") if isinstance(general, dict) else None
        key = (os.environ.get(PROXY_KEY_ENV) or proxy_key(config)) \
            if config.settings.proxy_key else None
        return cls(allowed_origins=frozenset(config.settings.allowed_origins),
                   proxy_key=key, master_key=_secret(master_key_setting(config)),
                   key_header=str(header).lower() if header else None)

    def refusal(self, path: str, headers: Mapping[str, str],
                peer: str | None) -> tuple[int, str, str] | None:
        """(status, Anthropic error type, message) for a request to refuse, else None."""
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site", "").lower()
        if (origin is not None or site in ("cross-site", "same-site")) \
                and (origin or "").lower() not in self.allowed_origins:
            return 403, "permission_error", (
                f"ccproxy refuses requests from web pages (origin {origin or site!r}): a page "
                "could spend your credentials; list a trusted origin in "
                "ccproxy.allowed_origins to allow it")
        if not (self.proxy_key or self.master_key):
            host = host_of(headers.get("host") or "localhost")
            if not (peer and is_loopback(peer) and is_loopback(host)):
                return 403, "permission_error", (
                    "ccproxy without a proxy key answers only clients on this machine that "
                    "address it as 127.0.0.1 or localhost; set ccproxy.proxy_key: true to "
                    "serve others")
            return None
        if path in LIVENESS_PATHS or path == DASHBOARD_PATH:     # the page holds no data; its
            return None                                              # data route needs the key
        if self.proxy_key:
            if not key_matches(headers.get(PROXY_KEY_HEADER), self.proxy_key):
                return 401, "authentication_error", (
                    f"missing or wrong proxy key: send it in the {PROXY_KEY_HEADER} header "
                    f"(`python ccproxy.py run claude` and the shell integration do)")
        elif self.master_key and (path.startswith("/ccproxy/")
                                  or is_model_discovery(path, headers)):
            names = ("authorization", "x-api-key", "x-litellm-api-key", self.key_header)
            if not any(key_matches(headers.get(n), self.master_key) for n in names if n):
                return 401, "authentication_error", (
                    "ccproxy's routes need LiteLLM's master key (Authorization: Bearer <key>)")
        return None


def scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """An ASGI request's headers, names lower-case."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


def is_model_discovery(path: str, headers: Mapping[str, str]) -> bool:
    """Claude Code's model discovery (an Anthropic client asking for /v1/models)."""
    return path == MODELS_PATH and "anthropic-version" in headers


class ModelDiscovery:
    """ASGI layer: Claude Code's model discovery (`GET /v1/models` with `anthropic-version`,
    CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1) gets ccproxy's routes as models its /model
    picker offers, in Anthropic's format; other clients get LiteLLM's own list."""

    def __init__(self, app: Any, models: Callable[[], list[dict]]) -> None:
        self.app, self.models = app, models

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "GET" \
                or scope.get("path") != MODELS_PATH \
                or not is_model_discovery(MODELS_PATH, scope_headers(scope)):
            await self.app(scope, receive, send)
            return
        data = self.models()
        body = json.dumps({"data": data, "has_more": False,
                           "first_id": data[0]["id"] if data else None,
                           "last_id": data[-1]["id"] if data else None}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def discovery_models(pipeline: Pipeline) -> list[dict]:
    """What Claude Code's /model picker lists: each rule's route as `claude-route-LABEL`
    (Claude Code keeps only ids that name claude; picked, it is the session's default route,
    the other rules still apply), then the exact model_list entries that name claude.
    `model_info.display_name` / `description` of an entry say how it is shown."""
    table = pipeline.models()
    out = []
    labels = [r.name for r in pipeline.rules if getattr(r, "name", None) in table.exact]
    for name in dict.fromkeys(labels + [n for n in table.exact if "claude" in n.lower()]):
        info = table.exact[name][0].get("model_info")
        info = info if isinstance(info, dict) else {}
        routed = name in labels
        upstream = (table.resolve_route(name) or ({}, name))[1]
        out.append({"type": "model", "id": ROUTE_MODEL_PREFIX + name if routed else name,
                    "display_name": str(info.get("display_name") or
                                        (f"{name} (ccproxy)" if routed else name)),
                    "description": str(info.get("description") or
                                       f"ccproxy's {name} route: {upstream}"),
                    "created_at": "2026-01-01T00:00:00Z"})
    return out


class RequestGuard:
    """The outermost ASGI layer of the proxy: applies an AccessPolicy to every HTTP request
    before LiteLLM sees it, and keeps wildcard CORS headers off every answer."""

    def __init__(self, app: Any, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy
        self._logged: set[tuple[int, str]] = set()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = scope_headers(scope)
        client = scope.get("client")
        refusal = self.policy.refusal(str(scope.get("path", "")), headers,
                                      client[0] if client else None)
        if refusal is not None:
            await self._refuse(refusal, headers.get("origin") or (client or ["?"])[0], send)
            return
        if self.policy.proxy_key:      # LiteLLM reads its key header only as `Bearer <key>`
            scope = dict(scope, headers=[
                (k, f"Bearer {self.policy.proxy_key}".encode()
                 if k.lower() == PROXY_KEY_HEADER.encode() else v)
                for k, v in scope.get("headers") or ()])
        origin = headers.get("origin")

        async def send_without_wildcard(message: dict) -> None:
            if message.get("type") == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers") or ()
                        if k.lower() not in (b"access-control-allow-origin",
                                             b"access-control-allow-credentials")]
                if origin:             # an allowed origin: named exactly, never `*`
                    kept += [(b"access-control-allow-origin", origin.encode("latin-1")),
                             (b"vary", b"Origin")]
                message = dict(message, headers=kept)
            await send(message)

        await self.app(scope, receive, send_without_wildcard)

    async def _refuse(self, refusal: tuple[int, str, str], who: str, send: Any) -> None:
        status, kind, message = refusal
        if len(self._logged) < 256 and (status, who) not in self._logged:
            self._logged.add((status, who))
            log.warning("refused a request (%d %s) from %s: %s", status, kind,
                        redact_secrets(who)[:100], message.split(":")[0])
        body = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def load_oauth_sources(pipeline: Pipeline, required: bool) -> list[str]:
    """Run every `oat_sources` command once; one warning per failing provider.

    Returns the failure messages; with `required`, raises OAuthError if there are any.
    """
    failures = []
    for provider, source in pipeline.oauth.items():
        if source.load(pipeline.config.settings.oauth_timeout):
            log.info("oauth token for %s loaded", provider)
        else:
            message = (f"oauth source for {provider} failed ({source.problem}); requests to "
                       f"{provider} keep the client's own auth")
            failures.append(message)
            log.warning("%s", message)
    if failures and required:
        raise OAuthError("; ".join(failures),
                         "fix the oat_sources command(s) or set oauth_required: false")
    return failures


# ---- Background ----------------------------------------------------------------------------
# The daemon thread that forgets idle sessions (session_ttl) and refreshes OAuth tokens;
# started once per process, stopped by its event (and with the process, being a daemon).


OAUTH_RETRY_BASE = 5.0


class Background:
    """One daemon thread running periodic upkeep for a pipeline."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pipeline: Pipeline | None = None
        self.sweeps = 0
        self.swept = 0

    def start(self, pipeline: Pipeline) -> None:
        """Start (or retarget) the upkeep thread for this pipeline."""
        self._pipeline = pipeline
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ccproxy-upkeep", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _interval(self) -> float:
        pipeline = self._pipeline
        if pipeline is None:
            return 60.0
        return max(0.05, min(60.0, pipeline.config.settings.session_ttl / 4))

    @staticmethod
    def retry_delay(source: OAuthSource, interval: float) -> float:
        """Seconds until the next run: the interval after success; after failures a backoff
        of OAUTH_RETRY_BASE, doubling each time, up to the interval."""
        if source.failures == 0:
            return interval
        return min(interval, OAUTH_RETRY_BASE * 2 ** min(source.failures - 1, 16))

    def _loop(self) -> None:
        next_refresh: dict[str, float] = {}
        while not self._stop.wait(self._interval()):
            pipeline = self._pipeline
            if pipeline is None:
                continue
            self.swept += pipeline.sessions.sweep()
            self.sweeps += 1
            self._refresh_oauth(pipeline, next_refresh)

    def _refresh_oauth(self, pipeline: Pipeline, next_refresh: dict[str, float]) -> None:
        interval = pipeline.config.settings.oauth_refresh_interval
        if interval <= 0:
            return
        now = time.monotonic()
        for provider, source in pipeline.oauth.items():
            due = next_refresh.setdefault(provider, now + self.retry_delay(source, interval))
            if now < due:
                continue
            ok = source.load(pipeline.config.settings.oauth_timeout)
            next_refresh[provider] = now + self.retry_delay(source, interval)
            if not ok:
                log.warning("oauth refresh for %s failed (%s); keeping the last good token",
                            provider, source.problem)


BACKGROUND = Background()


LEDGER_COLUMNS = ("ts", "session", "agent", "user", "label", "requested_model", "answered_model",
                  "provider", "input_tokens", "output_tokens", "cost", "requested_cost",
                  "latency_s", "ttfb_s", "status", "cache_read_tokens", "cache_write_tokens",
                  "error", "arm")
SERIES_FLUSH_S = 1.0        # how often each worker adds its counters to the shared totals
GAUGE_STALE_S = 10.0        # a worker whose gauges are older than this is gone
LEDGER_BUSY_S = 5.0         # SQLite's busy timeout: how long one statement waits for a lock
LEDGER_LOCKED_S = 30.0      # how long a batch waits out another process's lock before it drops


class Ledger:
    """The usage ledger: one row per finished request in SQLite (WAL, 0600) in the config
    dir. Rows go through a bounded queue to one writer thread, so the event loop never waits
    on the disk; a full queue or a failing database counts rows as dropped (shown in health
    and metrics), one warning, and the proxy keeps serving.

    The same thread adds this process's new counts (Stats) to the database's `series` totals
    and its session gauges to `gauges` at least every SERIES_FLUSH_S, so /ccproxy/metrics
    answers for all workers, whichever one serves it."""

    def __init__(self, path: Path, stats: "Stats | None" = None,
                 gauges: Callable[[], Mapping[str, float]] | None = None,
                 capacity: int = 10_000,
                 on_row: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        import queue

        self.path = path
        self.rows: "queue.Queue[dict]" = queue.Queue(maxsize=capacity)
        self.written = self.dropped = 0
        self.stats = stats
        self.gauges = gauges
        self.on_row = on_row            # e.g. the budgets, counting each row's spend
        self.process = f"{os.getpid()}-{os.environ.get(INSTANCE_ENV, '')}"
        self._flushed: dict[tuple, float] = {}     # the counts `series` has from this process
        self._series_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned = False

    def add(self, row: Mapping[str, Any]) -> None:
        """Queue one row (never blocks)."""
        import queue

        try:
            self.rows.put_nowait(dict(row))
        except queue.Full:
            self._drop(1, "the ledger's queue is full")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ccproxy-ledger", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued row is written (tests, shutdown); False on time-out."""
        deadline = time.monotonic() + timeout
        while self.rows.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.rows.unfinished_tasks

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.stats is not None:
            self.stats.add("ledger_dropped_total", count)
        if not self._warned:
            self._warned = True
            log.warning("usage ledger: %s; %d row(s) dropped (counted in health); requests "
                        "are not affected", why, count)

    def _run(self) -> None:
        import queue
        import sqlite3

        db = None
        insert = (f"INSERT INTO usage ({', '.join(LEDGER_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(LEDGER_COLUMNS))})")
        locked: list[dict] = []         # a batch waiting out another process's lock
        locked_since = 0.0
        while True:
            batch, locked = locked, []
            try:
                batch = batch or [self.rows.get(timeout=SERIES_FLUSH_S)]
            except queue.Empty:
                pass
            while batch and len(batch) < 500 and not self.rows.empty():
                batch.append(self.rows.get_nowait())
            try:
                db = db or open_ledger(self.path)
                for row in batch:
                    if "requested_cost" not in row:
                        price_requested(row, self.stats)
                        row["requested_cost"] = row.get("requested_cost")
                        if self.on_row is not None:
                            self.on_row(row)
                with self._series_lock:
                    with db:
                        db.executemany(insert, [tuple(r.get(c) for c in LEDGER_COLUMNS)
                                                for r in batch])
                        series = self._write_series(db)
                    self._flushed = series
                self.written += len(batch)
            except (sqlite3.Error, OSError) as exc:
                db = None
                # SQLite says "locked" at once, without its busy timeout, to a process turning
                # on WAL while another creates the same file: such a batch is tried again
                locked_since = locked_since or time.monotonic()
                if "locked" in str(exc) and time.monotonic() - locked_since < LEDGER_LOCKED_S:
                    locked = batch
                    time.sleep(0.05)
                    continue
                if batch:
                    self._drop(len(batch), f"cannot write {self.path.name}: {exc}")
            locked_since = 0.0
            for _row in batch:
                self.rows.task_done()

    def _write_series(self, db: Any) -> dict[tuple, float]:
        """Add this process's counts since the last flush to `series`; its gauges to
        `gauges`. The counts now flushed."""
        if self.stats is None:
            return self._flushed
        current = self.stats.copy()
        new = [(name, json.dumps(labels), value - self._flushed.get((name, labels), 0))
               for (name, labels), value in current.items()
               if value != self._flushed.get((name, labels), 0)]
        db.executemany("INSERT INTO series (name, labels, value) VALUES (?, ?, ?) ON CONFLICT "
                       "(name, labels) DO UPDATE SET value = value + excluded.value", new)
        if self.gauges is not None:
            now = time.time()
            db.executemany("INSERT OR REPLACE INTO gauges VALUES (?, ?, ?, ?)",
                           [(self.process, name, value, now)
                            for name, value in self.gauges().items()])
        return current

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple] | None:
        """Rows of a read-only query on the ledger (every worker's); None when there is no
        ledger yet or it cannot be read."""
        found = read_ledger(self.path, (sql, tuple(params)))
        return found[0] if found is not None else None

    def session_costs(self, sessions: list[str]) -> dict[str, tuple[float, float]]:
        """session -> (cost, saving) of its priced answers, for those with any."""
        rows = self.query(f"SELECT session, sum(cost), sum(requested_cost - cost) FROM usage "
                          f"WHERE session IN ({', '.join('?' * len(sessions))}) GROUP BY 1",
                          sessions) if sessions else None
        return {s: (round(c, 6), round(saved or 0.0, 6)) for s, c, saved in rows or ()
                if c is not None}

    def daily(self, days: int) -> list[dict]:
        """Cost, saving and requests per local day, the last `days` days (zeros included)."""
        today = datetime.date.today()
        first = today - datetime.timedelta(days=days - 1)
        since = time.mktime(first.timetuple())
        found = {day: (cost, saved, n) for day, cost, saved, n in self.query(
            "SELECT date(ts, 'unixepoch', 'localtime'), sum(cost), sum(requested_cost - cost), "
            "count(*) FROM usage WHERE ts >= ? GROUP BY 1", (since,)) or ()}
        out = []
        for i in range(days):
            day = (first + datetime.timedelta(days=i)).isoformat()
            cost, saved, n = found.get(day, (None, None, 0))
            out.append({"day": day, "cost_usd": cost or 0.0, "saved_usd": saved or 0.0,
                        "requests": n})
        return out

    def recent_errors(self, limit: int = 10) -> list[dict]:
        """The latest failed requests, newest first."""
        rows = self.query("SELECT ts, label, answered_model, error FROM usage WHERE status = "
                          "'failed' ORDER BY ts DESC LIMIT ?", (limit,))
        return [dict(zip(("ts", "label", "answered_model", "error"), r, strict=True))
                for r in rows or ()]

    def read_series(self, gauges: str = "summed") -> tuple[dict[tuple, float],
                                                          dict[str, float]] | None:
        """Every worker's counts (the database's totals plus this process's counts not
        flushed yet) and gauges: `summed` over the live workers, this process's `own` (a
        shared session store's, every worker's already), or `none`; None if the database
        cannot be read."""
        if self.stats is None:
            return None
        queries: list[tuple[str, tuple]] = [("SELECT name, labels, value FROM series", ())]
        if gauges == "summed":
            queries.append(("SELECT name, sum(value) FROM gauges WHERE updated >= ? AND "
                            "process != ? GROUP BY name",
                            (time.time() - GAUGE_STALE_S, self.process)))
        with self._series_lock:
            found = read_ledger(self.path, *queries)
            if found is None:
                return None
            series = {key: value - self._flushed.get(key, 0)
                      for key, value in self.stats.copy().items()}
        for name, labels, value in found[0]:
            key = (name, tuple(tuple(pair) for pair in json.loads(labels)))
            series[key] = series.get(key, 0) + value
        current = dict(self.gauges() if self.gauges is not None and gauges != "none" else {})
        for name, value in found[1] if gauges == "summed" else ():
            current[name] = current.get(name, 0) + value
        return series, current


USAGE_GROUPS = {"day": "date(ts, 'unixepoch', 'localtime')", "label": "label",
                "model": "answered_model", "session": "session", "user": "user", "arm": "arm"}
SINCE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def read_ledger(path: Path, *queries: tuple[str, tuple]) -> list[list[tuple]] | None:
    """Each query's rows, read-only on one connection (the proxy may be writing); None when
    the ledger does not exist or cannot be read."""
    import sqlite3

    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=LEDGER_BUSY_S)) as db:
            return [db.execute(sql, params).fetchall() for sql, params in queries]
    except sqlite3.Error:
        return None


USAGE_FIELDS = ("requests", "failed", "input_tokens", "output_tokens", "cache_read_tokens",
                "cache_write_tokens", "cost_usd", "unpriced", "saved_usd", "latency_p50_s",
                "latency_p95_s")     # a `usage` row's figures, after the group's name


def usage_rows(path: Path, since_s: float, by: str) -> list[dict] | None:
    """The ledger summed per group since `since_s` seconds ago, with each group's latency
    p50/p95; None if it cannot be read. Unpriced requests count as such: their cost is not
    taken as 0."""
    found = read_ledger(path, ("PRAGMA table_info(usage)", ()))
    if not found:
        return None
    have = {row[1] for row in found[0]}
    # (a ledger from before the cache and arm columns: 0 and NULL there)
    cache_read, cache_write = (c if c in have else "0"
                               for c in ("cache_read_tokens", "cache_write_tokens"))
    key = USAGE_GROUPS[by] if by != "arm" or "arm" in have else "NULL"
    since = (time.time() - since_s,)
    found = read_ledger(path, (
        f"SELECT {key}, count(*), sum(status = 'failed'), sum(input_tokens), "
        f"sum(output_tokens), sum({cache_read}), sum({cache_write}), sum(cost), "
        "sum(cost IS NULL AND status = 'ok'), sum(requested_cost - cost) "
        "FROM usage WHERE ts >= ? GROUP BY 1 ORDER BY 1", since), (
        f"SELECT {key}, latency_s FROM usage WHERE ts >= ? AND latency_s IS NOT NULL ORDER BY 2",
        since))
    if found is None:
        return None
    rows, timed = found
    latencies: dict[Any, list[float]] = collections.defaultdict(list)
    for group, latency in timed:
        latencies[group].append(latency)
    out = []
    for row in rows:
        entry = dict(zip((by,) + USAGE_FIELDS[:-2], row, strict=True))
        ordered = latencies.get(row[0], [])
        entry["latency_p50_s"] = ordered[len(ordered) // 2] if ordered else None
        entry["latency_p95_s"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] \
            if ordered else None
        out.append(entry)
    return out


def open_ledger(path: Path) -> Any:
    """The ledger database, created private (0600, its WAL files too) with its tables; a
    ledger written by an older ccproxy gets the columns it lacks."""
    import sqlite3

    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, timeout=LEDGER_BUSY_S, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.execute(f"CREATE TABLE IF NOT EXISTS usage ({', '.join(LEDGER_COLUMNS)})")
        have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
        for column in LEDGER_COLUMNS:
            if column not in have:
                db.execute(f"ALTER TABLE usage ADD COLUMN {column}")
        db.execute("CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)")
        db.execute("CREATE INDEX IF NOT EXISTS usage_session ON usage (session)")
        db.execute("CREATE INDEX IF NOT EXISTS usage_failed ON usage (ts) WHERE status = 'failed'")
        db.execute("CREATE TABLE IF NOT EXISTS series (name TEXT NOT NULL, labels TEXT NOT NULL, "
                   "value REAL NOT NULL, PRIMARY KEY (name, labels))")
        db.execute("CREATE TABLE IF NOT EXISTS gauges (process TEXT NOT NULL, name TEXT NOT NULL, "
                   "value REAL NOT NULL, updated REAL NOT NULL, PRIMARY KEY (process, name))")
    return db


def __getattr__(name: str) -> Any:
    """Build `handler` and `CCProxyHandler` on first use, so importing ccproxy stays cheap."""
    if name == "CCProxyHandler":
        cls = _make_handler_class()
        globals()["CCProxyHandler"] = cls
        return cls
    if name == "handler":
        instance = __getattr__("CCProxyHandler")()
        globals()["handler"] = instance
        return instance
    if name in ("rules", "hooks", "config", "classifier", "router") \
            and f"ccproxy.{name}" in sys.modules:
        return sys.modules[f"ccproxy.{name}"]      # `import ccproxy.rules` (1.x paths)
    raise AttributeError(f"module 'ccproxy' has no attribute {name!r}")


# ---- Process -------------------------------------------------------------------------------
# The proxy process: its PID file, the start lock, ports, and start/stop mechanics. stdlib only.

PID_FILE = "ccproxy.pid"
LOG_FILE = "ccproxy.log"
LEGACY_PID_FILE = "litellm.lock"     # ccproxy 1.x's PID file (its log: litellm.log)
LOCK_FILE = "ccproxy.lock"
GENERATED_CONFIG = ".ccproxy-litellm.yaml"


@dataclasses.dataclass(slots=True, frozen=True)
class ProxyState:
    """What the PID file says about a running proxy, checked against the live process."""

    pid: int
    url: str
    started: float
    config_dir: str
    command: tuple[str, ...] = ()
    start_ticks: int | None = None      # the process's start time (/proc), against PID reuse
    instance: str = ""                  # the start's nonce, in every proxy process's environment
    pgid: int | None = None             # its own process group (detached starts): all workers
    orphans: tuple[int, ...] = ()       # workers left serving after the main process died

    def as_dict(self) -> dict:
        """JSON form stored in the PID file ("pid" first: the shell snippets read it)."""
        return {"pid": self.pid, "url": self.url, "started": self.started,
                "config_dir": self.config_dir, "command": list(self.command),
                "start_ticks": self.start_ticks, "instance": self.instance, "pgid": self.pgid}


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (field 3, the state, first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc field 22); None if unknown."""
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat else None
    except (IndexError, ValueError):
        return None


def process_instance(pid: int) -> str | None:
    """The INSTANCE_ENV value in a process's environment ("" if unset); None if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{INSTANCE_ENV}=".encode()
    return next((v[len(prefix):].decode(errors="replace") for v in raw.split(b"\0")
                 if v.startswith(prefix)), "")


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc ([] without /proc)."""
    members = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and len(stat) > 2 and stat[0] != "Z" and stat[2] == str(pgid):
                members.append(int(entry.name))
    return members


def process_cmdline(pid: int) -> list[str] | None:
    """The command line of a process, or None if it cannot be read."""
    import shlex
    import subprocess
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shlex.split(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() \
        else None


def cmdline_config_dir(cmd: list[str]) -> Path | None:
    """The directory of the `--config` file a LiteLLM command line names."""
    for i, arg in enumerate(cmd):
        if arg in ("--config", "-c") and i + 1 < len(cmd):
            return Path(cmd[i + 1]).expanduser().resolve().parent
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).expanduser().resolve().parent
    return None


def is_our_proxy(pid: int, state: ProxyState, directory: Path) -> bool:
    """True if `pid` is the LiteLLM proxy that ccproxy started for `directory`: the same
    process (start time, nonce, command line), never one reusing its PID or another
    config dir's proxy."""
    if not pid_alive(pid):
        return False
    cmd = process_cmdline(pid)
    if not cmd or not any(PROXY_MODULE in part for part in cmd):
        return False
    if state.command and cmd != list(state.command):
        return False
    ticks = process_start_ticks(pid)
    if state.start_ticks is not None and ticks is not None and ticks != state.start_ticks:
        return False
    if state.instance and process_instance(pid) not in (None, state.instance):
        return False
    return cmdline_config_dir(cmd) == directory.resolve()


def orphaned_workers(state: ProxyState) -> list[int]:
    """Processes of a detached proxy whose main process is gone (its workers, still serving
    the port): the members of its process group that carry its nonce. A group's id is
    never handed to a new process while the group has members."""
    if state.pgid is None or pid_alive(state.pid):
        return []
    return [pid for pid in group_members(state.pgid)
            if process_instance(pid) in (None, state.instance or "")]


class PidFile:
    """The PID file of the proxy in one config dir: read, validate, write, clean up."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / PID_FILE

    def read(self) -> tuple[ProxyState | None, str | None]:
        """(state, problem): state when the file names this dir's live proxy (or workers it
        left behind: then `state.orphans` lists them); otherwise a problem description when
        the file exists but is corrupt, stale or names another process."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"PID file {self.path} unreadable ({exc.strerror})"
        try:
            data: dict[str, Any] = json.loads(text) if text.strip().startswith("{") \
                else {"pid": int(text)}
            ticks, pgid = data.get("start_ticks"), data.get("pgid")
            state = ProxyState(pid=int(data["pid"]), url=str(data.get("url", "")),
                               started=float(data.get("started", 0)),
                               config_dir=str(data.get("config_dir", "")),
                               command=tuple(str(c) for c in data.get("command") or ()),
                               start_ticks=int(ticks) if ticks is not None else None,
                               instance=str(data.get("instance") or ""),
                               pgid=int(pgid) if pgid is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            snippet = text.strip()[:40]
            return None, f"PID file {self.path} is corrupt ({snippet!r})" if snippet \
                else f"PID file {self.path} is empty"
        if not pid_alive(state.pid):
            orphans = orphaned_workers(state)
            if orphans:
                return dataclasses.replace(state, orphans=tuple(orphans)), (
                    f"the proxy's main process {state.pid} is gone, but {len(orphans)} of its "
                    f"worker processes (pid {', '.join(map(str, orphans))}) still serve "
                    f"{state.url}")
            return None, f"stale PID file {self.path} (process {state.pid} is gone)"
        if not is_our_proxy(state.pid, state, self.directory):
            return None, (f"PID file {self.path} names process {state.pid}, which is not "
                          "this config dir's ccproxy proxy (PID reused, or another proxy)")
        return state, None

    def write(self, state: ProxyState) -> None:
        """Write atomically (0600)."""
        write_private(self.path, json.dumps(state.as_dict()))

    def remove(self) -> None:
        """Delete the file if present."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class StartLock:
    """An exclusive, non-blocking lock so two `start`s never race (fcntl.flock)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "StartLock":
        self._fd = open_private_append(self.path)
        try:
            import fcntl     # here, not at the top: the callback must import on Windows too
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._fd)
            self._fd = None
            raise ProcessError("another `ccproxy start` is running for this config dir",
                               f"wait for it, then check `{self_command(self.path.parent)} status`"
                               ) from exc
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing the descriptor releases the flock
            self._fd = None


def port_owner(port: int) -> str | None:
    """Who listens on a TCP port (from /proc on Linux), e.g. 'pid 123 (python3 -m http...)'."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = " ".join(process_cmdline(int(proc.name)) or [])
                    return f"pid {proc.name} ({cmd})"
        except OSError:
            continue
    return None


def check_port_free(host: str, port: int) -> None:
    """Raise ProcessError naming the owner when host:port cannot be bound."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn does: connections of a stopped proxy left in TIME_WAIT must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            owner = port_owner(port)
            raise ProcessError(f"port {port} on {host} is in use"
                               + (f" by {owner}" if owner else "")
                               + f" ({exc.strerror})",
                               "stop that process or set another `litellm.port` in the "
                               "config") from exc


def http_get(url: str, timeout: float = 2.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """GET over a plain socket, for the proxy's own loopback routes: cheaper to import than
    urllib (the status line runs on every Claude Code repaint). (status, body); 0 when
    unreachable."""
    import socket

    rest = url.split("://", 1)[-1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            sock.sendall(f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n{extra}\r\n".encode())
            data = b""
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
    except (OSError, ValueError):
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b""


def client_environment(config: Config, env: Mapping[str, str]) -> dict[str, str]:
    """Environment for a client of the proxy: base URLs, Claude Code's request-class hints
    (gateway_hints), and the proxy key header if on."""
    out = dict(env)
    out["ANTHROPIC_BASE_URL"] = config.url
    out["OPENAI_BASE_URL"] = out["OPENAI_API_BASE"] = config.url + "/v1"
    if config.settings.gateway_hints:               # the user's own values win
        out.setdefault(GATEWAY_HINTS_ENV, "1")
        out.setdefault(MODEL_DISCOVERY_ENV, "1")
    key = proxy_key(config)
    if key:
        line = f"{PROXY_KEY_HEADER}: Bearer {key}"
        kept = [h for h in out.get("ANTHROPIC_CUSTOM_HEADERS", "").splitlines()
                if h.strip() and not h.lower().startswith(PROXY_KEY_HEADER)]
        out["ANTHROPIC_CUSTOM_HEADERS"] = "\n".join(kept + [line])
    return out


def litellm_config_for_start(config: Config) -> Path:
    """The file LiteLLM starts with, generated beside the user's (0600): LiteLLM's sections
    as written, plus ccproxy's callback, the upstream retries and timeout ccproxy chooses for
    Claude Code where LiteLLM's own settings do not say, and the proxy key if on."""
    settings = config.litellm.get("litellm_settings") or {}
    callbacks = settings.get("callbacks") if isinstance(settings, dict) else None
    listed = [callbacks] if isinstance(callbacks, str) else list(callbacks or [])
    directory = config.directory or Path(DEFAULT_CONFIG_DIR).expanduser()
    make_private_dir(directory)
    data = litellm_sections(config.litellm)
    if isinstance(data.get("model_list"), list):
        data["model_list"] = ModelTable(data["model_list"]).flattened()
    litellm_settings = dict(settings) if isinstance(settings, dict) else {}
    if "ccproxy.handler" not in listed:
        litellm_settings["callbacks"] = listed + ["ccproxy.handler"]
    litellm_settings.setdefault("request_timeout", config.settings.upstream_timeout)
    data["litellm_settings"] = litellm_settings
    add_tracing(data, config.settings)
    add_cache(data, config)
    router = data.get("router_settings")
    data["router_settings"] = dict(router) if isinstance(router, dict) else {}
    data["router_settings"].update(router_settings_for(config.settings, data["router_settings"]))
    if config.settings.proxy_key:
        # LiteLLM checks the key on its own header, so Claude Code's Authorization and
        # x-api-key stay free to carry the user's credentials upstream.
        general = dict(data.get("general_settings") or {})
        general["master_key"] = f"os.environ/{PROXY_KEY_ENV}"
        general["litellm_key_header_name"] = PROXY_KEY_HEADER
        data["general_settings"] = general
    path = directory / GENERATED_CONFIG
    text = ("# Generated by `ccproxy start` from "
            + (str(config.litellm_file) if config.litellm_file else "the built-in defaults")
            + ("; edit that instead.\n" if config.litellm_file else
               " (write a config to edit with: " + self_command(config.directory) + " install).\n")
            + _yaml().safe_dump(data, sort_keys=False))
    write_private(path, text)
    return path


def add_tracing(data: dict, settings: Settings) -> None:
    """LiteLLM's tracing callbacks for the `tracing:` backends whose packages are here; the
    decision's fields as OpenTelemetry span attributes; prompts and answers left out of the
    traces unless a backend says `message_content: true`."""
    ready = tracing_backends(settings)[0]
    if not ready:
        return
    litellm_settings = data["litellm_settings"]
    listed = list(litellm_settings["callbacks"])
    litellm_settings["callbacks"] = listed + [b for b in ready if b not in listed]
    callback_settings = dict(data.get("callback_settings") or {})
    if "otel" in ready:
        otel = dict(callback_settings.get("otel") or {})
        otel.setdefault("baggage_metadata_keys",
                        [f"requester_metadata.ccproxy.{field}" for field in TRACE_FIELDS])
        otel.setdefault("turn_off_message_logging",
                        not settings.tracing["otel"].get("message_content", False))
        callback_settings["otel"] = otel
        data["callback_settings"] = callback_settings
    if "langfuse" in ready and not settings.tracing["langfuse"].get("message_content", False):
        litellm_settings.setdefault("turn_off_message_logging", True)


def add_cache(data: dict, config: Config) -> None:
    """LiteLLM's response cache from `cache:` (unless litellm_settings already sets one): on
    Redis, LiteLLM's own Redis (router_settings)."""
    spec = config.settings.cache
    litellm_settings = data["litellm_settings"]
    if not spec or "cache" in litellm_settings:
        return
    params: dict[str, Any] = {"type": spec.get("type", "local"),
                              "supported_call_types": list(CACHE_CALL_TYPES)}
    if "ttl" in spec:
        params["ttl"] = spec["ttl"]
    if params["type"] == "redis":
        params.update({k: v for k, v in (redis_settings(config) or {}).items() if v is not None})
    litellm_settings.update(cache=True, cache_params=params)


def tracing_environment(settings: Settings) -> dict[str, str]:
    """What LiteLLM's tracing callbacks read from the environment (kept out of every file:
    a collector's headers may hold a token). Header values `os.environ/NAME` are read here."""
    env: dict[str, str] = {}
    otel = settings.tracing.get("otel")
    if otel:
        env.update(OTEL_EXPORTER="otlp_http", OTEL_ENDPOINT=otel["endpoint"],
                   OTEL_SERVICE_NAME=otel.get("service_name", "ccproxy"))
        headers = {k: _secret(str(v)) or "" for k, v in (otel.get("headers") or {}).items()}
        if headers:
            env["OTEL_HEADERS"] = ",".join(f"{k}={v}" for k, v in headers.items())
        if not otel.get("message_content", False):
            env["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = "NO_CONTENT"
    langfuse = settings.tracing.get("langfuse")
    if langfuse and langfuse.get("host"):
        env["LANGFUSE_HOST"] = langfuse["host"]
    return env


def router_settings_for(settings: Settings, router: Mapping[str, Any]) -> dict[str, Any]:
    """LiteLLM router settings from ccproxy's retry and fallback settings; what
    `router_settings` itself says wins (per label for fallbacks)."""
    out: dict[str, Any] = {"num_retries": router.get("num_retries", settings.upstream_retries)}
    if settings.upstream_retries and "retry_policy" not in router:
        policy = dict.fromkeys(NEVER_RETRIED, 0)
        for kind, fields in RETRY_KINDS.items():
            policy.update(dict.fromkeys(fields, settings.upstream_retries
                                        if kind in settings.retry_on else 0))
        out["retry_policy"] = policy
    if settings.retry_backoff and "retry_after" not in router:
        out["retry_after"] = settings.retry_backoff
    for key in ("fallbacks", "context_window_fallbacks"):
        own = getattr(settings, key)
        listed = router.get(key)
        theirs: list = listed if isinstance(listed, list) else []
        named = {next(iter(item)) for item in theirs if isinstance(item, dict) and item}
        extra = [{label: list(targets)} for label, targets in own.items() if label not in named]
        if extra:
            out[key] = list(theirs) + extra
    return out


def proxy_environment(config: Config) -> dict[str, str]:
    """Environment for the LiteLLM process: this file importable as `ccproxy`, config dir,
    offline cost map, and the loopback-only permission to run without a master key."""
    env = dict(os.environ)
    here = str(importable_dir(config))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if config.directory is not None:
        env[ENV_CONFIG_DIR] = str(config.directory)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    key = proxy_key(config, create=True)
    env.pop(PROXY_KEY_ENV, None)
    if not is_loopback(config.host):       # never inherit the permission beyond loopback
        env.pop(WEAK_KEY_PERMIT_ENV, None)
    if key:
        env[PROXY_KEY_ENV] = key
    elif not master_key_setting(config) and is_loopback(config.host):
        env[WEAK_KEY_PERMIT_ENV] = "True"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(tracing_environment(config.settings))
    return env


def importable_dir(config: Config) -> Path:
    """A directory from which `import ccproxy` finds this very file.

    Its own directory when it is named ccproxy.py; renamed (dotfiles, `uv run x.py`), a
    `ccproxy.py` link to it in the config dir.
    """
    me = Path(__file__).resolve()
    if me.stem == "ccproxy":
        return me.parent
    folder = (config.directory or Path(DEFAULT_CONFIG_DIR).expanduser()) / ".ccproxy-module"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "ccproxy.py"
    if not (link.is_symlink() and link.resolve() == me):
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(me)
        except OSError:
            link.write_bytes(me.read_bytes())
    return folder


def proxy_command(config: Config, litellm_file: Path, extra: list[str]) -> list[str]:
    """The LiteLLM command line, run by this very interpreter (never a `litellm` on PATH)."""
    cmd = [sys.executable, "-m", PROXY_MODULE, "--config", str(litellm_file),
           "--host", config.host, "--port", str(config.port),
           "--num_workers", str(config.num_workers)]
    if config.server.get("detailed_debug"):
        cmd.append("--detailed_debug")
    elif config.server.get("debug"):
        cmd.append("--debug")
    return cmd + list(extra)


SERVER_ARGS = {"--host": "host", "--port": "port", "--num_workers": "num_workers"}


def apply_server_args(config: Config, extra: list[str]) -> tuple[Config, list[str]]:
    """Take --host, --port and --num_workers out of the arguments for LiteLLM into the config,
    so that the address checked, waited on and shown is the one LiteLLM binds."""
    rest: list[str] = []
    values: dict[str, Any] = {}
    args = iter(extra)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c"):
            raise UsageError("LiteLLM's --config is chosen by ccproxy",
                             "pass the config directory instead: --config-dir DIR")
        if name not in SERVER_ARGS:
            rest.append(arg)
            continue
        if not eq:
            value = next(args, "")
        field = SERVER_ARGS[name]
        if field != "host":
            try:
                values[field] = int(value)
            except ValueError:
                raise UsageError(f"{name} needs a number, got {value!r}",
                                 f"e.g. -- {name} 4001") from None
        elif value:
            values[field] = value
        else:
            raise UsageError("--host needs an address", "e.g. -- --host 127.0.0.1")
    config = dataclasses.replace(config, **values)
    if not 0 < config.port < 65536 or config.num_workers < 1:
        raise UsageError(f"--port must be 1-65535 and --num_workers at least 1, got "
                         f"{config.port} and {config.num_workers}", "e.g. -- --port 4001")
    return config, rest


def ccproxy_route_headers(config: Config) -> dict[str, str]:
    """The key ccproxy's own routes (/ccproxy/...) ask of a client, as headers: the proxy
    key, else LiteLLM's master key; none on a keyless (loopback) proxy."""
    key = proxy_key(config)
    if key:
        return {PROXY_KEY_HEADER: key}
    master = _secret(master_key_setting(config))
    return {"authorization": f"Bearer {master}"} if master else {}


def check_bind_security(config: Config) -> None:
    """Refuse a non-loopback bind without a master key: anyone reaching the port would
    spend the user's credentials."""
    if unprotected_bind(config):
        raise ProcessError(f"refusing to listen on {config.host} without a proxy key: anyone "
                           "who can reach the port would spend your credentials",
                           "set `ccproxy.proxy_key: true` (clients then need the key, which "
                           "`run` and the shell integration send), or bind to 127.0.0.1 "
                           "(README, \"Security\")")


def tail_lines(path: Path, count: int, end: int | None = None) -> list[str]:
    """The last `count` lines of a text file, or of its first `end` bytes (reads from the
    end; fine for big logs)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END) if end is None else end
            block, data = 8192, b""
            while size > 0 and data.count(b"\n") <= count:
                step = min(block, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-count:] if count > 0 else []


def wait_until_live(proc: Any, url: str, timeout: float, instance: str,
                    headers: Mapping[str, str] | None = None, out: Any = None) -> str:
    """Poll ccproxy's health route until this start's own proxy answers with its nonce.

    Returns "live", "exited", "timeout", "degraded: ..." (LiteLLM lacks contact points), or
    what answered instead (another proxy holding the port, or LiteLLM without ccproxy's
    callback): a bare liveness check would take any server on the port for ours.
    """
    out = out or sys.stderr
    tty = hasattr(out, "isatty") and out.isatty()
    spinner = "|/-\\"
    deadline = time.monotonic() + timeout
    i = 0
    outcome = "timeout"
    if not tty:
        out.write(f"starting LiteLLM's proxy on {url} (it takes 5-15 s) ...\n")
        out.flush()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            outcome = "exited"
            break
        status, body = http_get(url + HEALTH_PATH, timeout=1.0, headers=headers)
        if status == 200:
            try:
                health = json.loads(body)
                answered, missing = health.get("instance"), health.get("missing")
            except (ValueError, AttributeError):
                answered, missing = None, None
            outcome = "live" if answered == instance else \
                f"another ccproxy proxy answers on {url} (not the one just started)"
            if outcome == "live" and missing:    # (Redis away does not stop a start)
                outcome = "degraded: " + degraded_reasons({"missing": list(map(str, missing))})[0]
            break
        if status in (401, 403, 404):
            outcome = (f"another server answers on {url} ({status} from {HEALTH_PATH})"
                       if status != 404 else
                       f"LiteLLM answers on {url} without ccproxy's callback (404 from "
                       f"{HEALTH_PATH}): another proxy, or ccproxy.handler failed to load")
            break
        if tty:
            out.write(f"\rstarting LiteLLM's proxy on {url} (5-15 s) {spinner[i % 4]}")
            out.flush()
        i += 1
        time.sleep(0.25)
    if tty:
        out.write("\r\033[K")
    return outcome


def stop_process(pid: int, deadline: float = 10.0, group: int | None = None) -> str:
    """SIGTERM the proxy (its whole process group when it leads one, or `group`: workers
    included), wait, then SIGKILL; returns how it ended."""
    import signal
    if group is None:
        try:
            group = pid if os.getpgid(pid) == pid else None
        except ProcessLookupError:
            return "already gone"

    def alive() -> bool:
        return pid_alive(pid) or bool(group is not None and group_members(group))

    def send(sig: int) -> bool:
        try:
            os.killpg(group, sig) if group is not None else os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    if not send(signal.SIGTERM):
        return "already gone"
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if not alive():
            return "stopped"
        time.sleep(0.1)
    if not send(signal.SIGKILL):
        return "stopped"
    end = time.monotonic() + 5
    while time.monotonic() < end and alive():
        time.sleep(0.05)
    return "killed (did not stop within the deadline)"


# ---- Shell ---------------------------------------------------------------------------------
# Snippets for bash, zsh and fish that wrap `claude`: when it is invoked (never at a prompt),
# a PID file read and `kill -0` decide whether the proxy is up. Builtins only, no process.

SHELLS = ("bash", "zsh", "fish")
RC_MARK_START = "# >>> ccproxy shell integration >>>"
RC_MARK_END = "# <<< ccproxy shell integration <<<"

POSIX_SNIPPET = r"""# ccproxy shell integration for {shell} (from: {self_cmd} shell {shell})
# `claude` goes through the proxy at {url} while it runs; otherwise it runs unchanged.
__ccproxy_url={url_q}
__ccproxy_pidfile={pidfile_q}
__ccproxy_keyfile={keyfile_q}
__ccproxy_notice={notice}
__ccproxy_hints={hints}
__ccproxy_up() {{
  local line pid url
  [ -r "$__ccproxy_pidfile" ] || return 1
  IFS= read -r line < "$__ccproxy_pidfile" || [ -n "$line" ] || return 1
  pid=${{line#*\"pid\": }}
  pid=${{pid%%[,\}}]*}}
  case "$pid" in ''|*[!0-9]*) return 1 ;; esac
  url=${{line#*\"url\": \"}}
  case "$url" in "$line") url=$__ccproxy_url ;; *) url=${{url%%\"*}} ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  __ccproxy_live_url=$url
}}
if [ -z "${{__ccproxy_wrapped:-}}" ]; then
  __ccproxy_wrapped=1
  __ccproxy_alias=
{capture}
fi
__ccproxy_call() {{
  if [ -n "$__ccproxy_alias" ]; then
    eval "$__ccproxy_alias \"\$@\""
  elif {has_orig}; then
    __ccproxy_orig_claude "$@"
  else
    command claude "$@"
  fi
}}
claude() {{
  if __ccproxy_up; then
    (
      export ANTHROPIC_BASE_URL="$__ccproxy_live_url"
      [ "$__ccproxy_hints" = 1 ] && export {hints_env}="${{{hints_env}-1}}" \
        {discovery_env}="${{{discovery_env}-1}}"
      if [ -r "$__ccproxy_keyfile" ]; then
        IFS= read -r __ccproxy_key < "$__ccproxy_keyfile"
        export ANTHROPIC_CUSTOM_HEADERS="${{ANTHROPIC_CUSTOM_HEADERS:+$ANTHROPIC_CUSTOM_HEADERS
}}{key_header}: Bearer $__ccproxy_key"
      fi
      __ccproxy_call "$@"
    )
  else
    [ "$__ccproxy_notice" = 1 ] && printf '%s\n' "ccproxy: proxy not running, claude talks to its default endpoint" >&2
    __ccproxy_call "$@"
  fi
}}
ccproxy() {{
  {ccproxy_cmd} "$@"
}}
"""

BASH_CAPTURE = r"""  if alias claude >/dev/null 2>&1; then
    __ccproxy_alias=${BASH_ALIASES[claude]}
    unalias claude
    case "$__ccproxy_alias" in claude|claude[[:space:]]*) __ccproxy_alias="command $__ccproxy_alias" ;; esac
  elif declare -F claude >/dev/null && ! declare -F __ccproxy_orig_claude >/dev/null; then
    __ccproxy_def=$(declare -f claude)
    eval "__ccproxy_orig_claude${__ccproxy_def#claude}"
    unset __ccproxy_def
  fi"""

ZSH_CAPTURE = r"""  if (( ${+aliases[claude]} )); then
    __ccproxy_alias=${aliases[claude]}
    unalias claude
    case "$__ccproxy_alias" in claude|claude[[:space:]]*) __ccproxy_alias="command $__ccproxy_alias" ;; esac
  elif (( ${+functions[claude]} )) && ! (( ${+functions[__ccproxy_orig_claude]} )); then
    functions[__ccproxy_orig_claude]=${functions[claude]}
  fi"""

FISH_SNIPPET = r"""# ccproxy shell integration for fish (from: {self_cmd} shell fish)
# `claude` goes through the proxy at {url} while it runs; otherwise it runs unchanged.
set -g __ccproxy_url {url_q}
set -g __ccproxy_pidfile {pidfile_q}
set -g __ccproxy_keyfile {keyfile_q}
set -g __ccproxy_notice {notice}
set -g __ccproxy_hints {hints}
function __ccproxy_up
    test -r $__ccproxy_pidfile; or return 1
    read -l line < $__ccproxy_pidfile; or test -n "$line"; or return 1
    set -l pid (string match -r '"pid": *([0-9]+)' -- $line)[2]
    test -n "$pid"; or return 1
    kill -0 $pid 2>/dev/null; or return 1
    set -g __ccproxy_live_url (string match -r '"url": *"([^"]*)"' -- $line)[2]
    test -n "$__ccproxy_live_url"; or set -g __ccproxy_live_url $__ccproxy_url
end
if not set -q __ccproxy_wrapped
    set -g __ccproxy_wrapped 1
    if functions -q claude; and not functions -q __ccproxy_orig_claude
        functions -c claude __ccproxy_orig_claude
    end
end
function __ccproxy_call
    if functions -q __ccproxy_orig_claude
        __ccproxy_orig_claude $argv
    else
        command claude $argv
    end
end
function claude --description 'claude through ccproxy when it runs'
    if __ccproxy_up
        set -lx ANTHROPIC_BASE_URL $__ccproxy_live_url
        test "$__ccproxy_hints" = 1; and not set -q {hints_env}; and set -lx {hints_env} 1
        test "$__ccproxy_hints" = 1; and not set -q {discovery_env}; and set -lx {discovery_env} 1
        set -l key
        set -l headers
        test -r $__ccproxy_keyfile; and read key < $__ccproxy_keyfile
        if test -n "$key"
            set headers "{key_header}: Bearer $key"
            if set -q ANTHROPIC_CUSTOM_HEADERS; and test -n "$ANTHROPIC_CUSTOM_HEADERS"
                set headers "$ANTHROPIC_CUSTOM_HEADERS"\n"$headers"
            end
        end
        test -n "$headers"; and set -lx ANTHROPIC_CUSTOM_HEADERS $headers
        __ccproxy_call $argv
    else
        test "$__ccproxy_notice" = 1; and echo "ccproxy: proxy not running, claude talks to its default endpoint" >&2
        __ccproxy_call $argv
    end
end
function ccproxy --description 'ccproxy command'
    {ccproxy_cmd} $argv
end
"""


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _fish_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


SHELL_CACHE_FILE = ".shell-cache.json"


def shell_settings(directory: Path) -> tuple[str, bool, bool]:
    """(proxy URL, notice on/off, gateway hints on/off) for the shell snippet, without YAML
    when possible.

    The snippet is generated at every shell start, so the values are cached beside the
    config, keyed by the config files' modification times; no config file: the defaults.
    """
    stamps = []
    for name in (CONFIG_FILE, LITELLM_CONFIG_FILE):
        try:
            stamps.append([name, (directory / name).stat().st_mtime_ns])
        except OSError:
            continue
    if not stamps:
        defaults = Settings()
        return (Config(settings=defaults, litellm={}).url, defaults.shell_notice,
                defaults.gateway_hints)
    cache = directory / SHELL_CACHE_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamps") == stamps:
            return str(cached["url"]), bool(cached["notice"]), bool(cached["hints"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    config = load_config(directory)
    try:
        cache.write_text(json.dumps({"stamps": stamps, "url": config.url,
                                     "notice": config.settings.shell_notice,
                                     "hints": config.settings.gateway_hints}))
    except OSError:
        pass      # a read-only config dir only costs the YAML parse next time
    return config.url, config.settings.shell_notice, config.settings.gateway_hints


def shell_snippet(shell: str, url: str, config_dir: Path, explicit_dir: bool,
                  notice: bool = True, hints: bool = True) -> str:
    """The integration snippet for one shell (bash, zsh or fish)."""
    quote = _fish_quote if shell == "fish" else _sh_quote
    self_cmd = f"{quote(sys.executable)} {quote(str(Path(__file__).resolve()))}"
    ccproxy_cmd = self_cmd + (f" --config-dir {quote(str(config_dir))}" if explicit_dir else "")
    values = dict(shell=shell, url=url, url_q=quote(url),
                  pidfile_q=quote(str(config_dir / PID_FILE)),
                  keyfile_q=quote(str(config_dir / PROXY_KEY_FILE)),
                  notice=1 if notice else 0, self_cmd=self_cmd, ccproxy_cmd=ccproxy_cmd,
                  key_header=PROXY_KEY_HEADER, hints_env=GATEWAY_HINTS_ENV,
                  discovery_env=MODEL_DISCOVERY_ENV, hints=1 if hints else 0)
    if shell == "fish":
        return FISH_SNIPPET.format(**values)
    capture = BASH_CAPTURE if shell == "bash" else ZSH_CAPTURE
    has_orig = ("declare -F __ccproxy_orig_claude >/dev/null" if shell == "bash"
                else "(( ${+functions[__ccproxy_orig_claude]} ))")
    return POSIX_SNIPPET.format(capture=capture, has_orig=has_orig, **values)


def rc_file(shell: str) -> Path:
    """The rc file `shell --install` edits for a shell."""
    home = Path.home()
    if shell == "zsh":
        return Path(os.environ.get("ZDOTDIR") or home) / ".zshrc"
    if shell == "fish":
        return Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "fish" / \
            "config.fish"
    return home / ".bashrc"


def snippet_file(directory: Path, shell: str) -> Path:
    """Where `shell --install` keeps the snippet for a shell: in the config dir."""
    return directory / f"shell.{shell}"


def write_snippet_file(directory: Path, shell: str) -> Path:
    """Write (or refresh) the static snippet the rc line sources: a new shell then reads one
    small file and starts no process at all."""
    url, notice, hints = shell_settings(directory)
    path = snippet_file(directory, shell)
    make_private_dir(directory)
    write_private(path, shell_snippet(shell, url, directory, True, notice=notice, hints=hints))
    return path


def refresh_snippet_files(directory: Path) -> None:
    """Rewrite the installed snippets of a config dir (its settings may have changed)."""
    for shell in SHELLS:
        if snippet_file(directory, shell).exists():
            write_snippet_file(directory, shell)


def rc_block(shell: str, snippet: Path) -> str:
    """The marked block `shell --install` appends: it sources the snippet file if present."""
    if shell == "fish":
        line = f"test -r {_fish_quote(str(snippet))}; and source {_fish_quote(str(snippet))}"
    else:
        line = f"[ -r {_sh_quote(str(snippet))} ] && . {_sh_quote(str(snippet))}"
    return f"\n{RC_MARK_START}\n{line}\n{RC_MARK_END}\n"


def rc_install(path: Path, block: str) -> bool:
    """Append the block (or replace a previous one); False when it is already there."""
    text = path.read_text() if path.exists() else ""
    old = _rc_block_span(text)
    if old is not None and text[old[0]:old[1]] == block:
        return False
    if old is not None:
        text = text[:old[0]] + text[old[1]:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + block)
    return True


def rc_uninstall(path: Path) -> bool:
    """Remove exactly the block `rc_install` added; False when there is none."""
    if not path.exists():
        return False
    text = path.read_text()
    span = _rc_block_span(text)
    if span is None:
        return False
    path.write_text(text[:span[0]] + text[span[1]:])
    return True


def _rc_block_span(text: str) -> tuple[int, int] | None:
    start = text.find("\n" + RC_MARK_START + "\n")
    if start < 0:
        return None
    end = text.find(RC_MARK_END + "\n", start)
    if end < 0:
        return None
    return start, end + len(RC_MARK_END) + 1


STATUSLINE_BACKUP = ".ccproxy-backup"


def short_model(name: str) -> str:
    """`claude-opus-5-5` -> `opus`; other names without their provider prefix."""
    name = model_name(name)
    found = re.match(r"claude-([a-z]+)-", name)
    return found.group(1) if found else name


def statusline_text(session: Mapping[str, Any] | None, up: bool) -> str:
    """The one line Claude Code shows: model and rule of the session's last request."""
    if not up:
        return "ccproxy: proxy down"
    if not session:
        return "ccproxy: up (no request from this session yet)"
    switches = int(session.get("switches") or 0)
    until = session.get("quota_until")
    return (f"ccproxy: {short_model(str(session.get('requested_model', '?')))}"
            f"\u2192{model_name(str(session.get('last_upstream', '?')))} "
            f"({session.get('last_label', '?')}) \u00b7 {switches} "
            f"switch{'es' if switches != 1 else ''}"
            + (f" \u00b7 plan limit reached until {clock(until)}"
               if isinstance(until, (int, float)) else "") + cost_text(session))


def cost_text(session: Mapping[str, Any]) -> str:
    """` · $0.42 (saved $1.10)` for a session with priced answers (else nothing)."""
    cost, saved = session.get("cost_usd"), session.get("saved_usd")
    if not isinstance(cost, (int, float)) or isinstance(cost, bool):
        return ""
    text = f" \u00b7 {usd(cost)}"
    if isinstance(saved, (int, float)) and not isinstance(saved, bool) and abs(saved) >= 0.00005:
        text += f" (saved {usd(saved)})" if saved > 0 else f" ({usd(-saved)} more)"
    return text


def usd(amount: float) -> str:
    """Dollars as people read them: cents, or four decimals below ten cents."""
    return f"${amount:.2f}" if amount >= 0.1 else f"${amount:.4f}"


def plan_usage_text(data: Any) -> str:
    """The plan's usage Claude Code 2.1.332 hands the status line (`rate_limits`: five_hour,
    seven_day, spend_limit, from the unified rate-limit headers ccproxy passes on)."""
    limits = data.get("rate_limits") if isinstance(data, dict) else None
    parts = []
    for key, name in (("five_hour", "5h"), ("seven_day", "7d"), ("spend_limit", "spend")):
        used = limits.get(key) if isinstance(limits, dict) else None
        value = used.get("used_percentage") if isinstance(used, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(f"{name} {value:.0f}%")
    return f" \u00b7 {' '.join(parts)}" if parts else ""

def claude_settings_file() -> Path:
    """Claude Code's user settings file (CLAUDE_CONFIG_DIR honoured)."""
    base = os.environ.get("CLAUDE_CONFIG_DIR") or str(Path.home() / ".claude")
    return Path(base) / "settings.json"


def statusline_command(config_dir: Path | None) -> str:
    """The command Claude Code runs for the status line (cached bytecode via -m)."""
    here = str(Path(__file__).resolve().parent)
    cmd = f"PYTHONPATH={_sh_quote(here)} {_sh_quote(sys.executable)} -m ccproxy"
    if config_dir is not None:
        cmd += f" --config-dir {_sh_quote(str(config_dir))}"
    return cmd + " statusline"


def install_statusline(path: Path, command: str) -> str:
    """Set Claude Code's statusLine to ours, keeping every other setting and a backup."""
    original = path.read_bytes() if path.exists() else None
    try:
        settings = json.loads(original) if original else {}
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})",
                          "fix the file first; nothing was changed") from exc
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} does not hold a JSON object", "fix the file first")
    ours = {"type": "command", "command": command, "padding": 0}
    if settings.get("statusLine") == ours:
        return f"{path} already shows ccproxy's status line"
    backup = path.with_name(path.name + STATUSLINE_BACKUP)
    path.parent.mkdir(parents=True, exist_ok=True)      # (Claude Code has not run here yet)
    if not backup.exists():
        write_private(backup, json.dumps({"existed": original is not None,
                                          "bytes": (original or b"").decode("utf-8")}))
    settings["statusLine"] = ours
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return f"added ccproxy's status line to {path} (backup: {backup})"


def uninstall_statusline(path: Path, command: str) -> str:
    """Take our statusLine out again: the file comes back byte for byte when nothing else
    changed since; otherwise only our key goes (an earlier statusLine comes back)."""
    backup = path.with_name(path.name + STATUSLINE_BACKUP)
    if not path.exists():
        return f"{path} does not exist; nothing to remove"
    try:
        settings = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})", "fix the file first") from exc
    ours = isinstance(settings, dict) and isinstance(settings.get("statusLine"), dict) \
        and settings["statusLine"].get("command") == command
    if not ours:
        return f"{path} has no ccproxy status line; nothing to remove"
    saved = json.loads(backup.read_text()) if backup.exists() else None
    previous = None
    if saved is not None and saved.get("existed"):
        try:
            previous = json.loads(saved["bytes"]) if saved["bytes"] else {}
        except ValueError:
            previous = None
    untouched = previous is not None and {k: v for k, v in settings.items()
                                          if k != "statusLine"} == \
        {k: v for k, v in previous.items() if k != "statusLine"}
    if saved is not None and not saved.get("existed") and list(settings) == ["statusLine"]:
        path.unlink()
    elif untouched and saved is not None:
        path.write_text(saved["bytes"])
    else:
        settings.pop("statusLine")
        if isinstance(previous, dict) and "statusLine" in previous:
            settings["statusLine"] = previous["statusLine"]
        path.write_text(json.dumps(settings, indent=2) + "\n")
    if backup.exists():
        backup.unlink()
    return f"removed ccproxy's status line from {path}"


# ---- CLI -----------------------------------------------------------------------------------
# argparse; one cmd_<name>(args) -> int per subcommand; main(argv) maps errors to exit codes.


def _print(*parts: Any, err: bool = False) -> None:
    print(*parts, file=sys.stderr if err else sys.stdout, flush=True)


def _config_for(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config_dir", None))


def _config_dir(args: argparse.Namespace) -> Path:
    return find_config_dir(getattr(args, "config_dir", None))[0]


def cmd_install(args: argparse.Namespace) -> int:
    """Write the default config (never over an existing one without --force); with
    --statusline, add (or --uninstall: remove) the status line in Claude Code's settings."""
    if args.statusline or args.uninstall:
        if not args.statusline:
            raise UsageError("--uninstall goes with --statusline",
                             "python ccproxy.py install --statusline --uninstall")
        directory, why = find_config_dir(getattr(args, "config_dir", None))
        command = statusline_command(directory if why in ("--config-dir", ENV_CONFIG_DIR)
                                     else None)
        path = claude_settings_file()
        _print(uninstall_statusline(path, command) if args.uninstall
               else install_statusline(path, command))
        return 0
    directory = _config_dir(args)
    make_private_dir(directory)
    target = directory / CONFIG_FILE
    if target.exists() and not args.force:
        _print(f"{target} already exists; left unchanged "
               "(use --force to replace it; a backup is kept)")
        return 0
    if target.exists():
        backup = target.with_name(f"{CONFIG_FILE}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        write_private(backup, target.read_bytes())
        _print(f"backed up {target} to {backup}")
    write_private(target, DEFAULT_CONFIG_YAML)
    refresh_snippet_files(directory)
    _print(f"wrote {target}\nstart the proxy with: {self_command(directory)} start --detach")
    return 0


def checked_start_config(args: argparse.Namespace) -> tuple[Config, list[str], "Pipeline",
                                                          "ValidationReport"]:
    """The config a start would run, with LiteLLM's extra arguments; ConfigError if it has
    problems (nothing is started or stopped then)."""
    extra = list(getattr(args, "litellm_args", None) or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    config, extra = apply_server_args(_config_for(args), extra)
    check_bind_security(config)
    pipeline = Pipeline(config)
    report = validate_config(config, pipeline)
    if not report.ok:
        raise ConfigError("the config has problems:\n  " + "\n  ".join(report.errors),
                          f"fix them ({self_command(config.directory)} validate lists every "
                          "problem)")
    return config, extra, pipeline, report


def _prepare_start(args: argparse.Namespace) -> tuple[Config, Path, list[str], dict[str, str]]:
    checked = getattr(args, "checked_config", None)     # (restart checked it before stopping)
    config, extra, pipeline, report = checked or checked_start_config(args)
    for warning in report.warnings:
        _print(f"warning: {warning}", err=True)
    if config.settings.oauth_required and pipeline.oauth:
        load_oauth_sources(pipeline, required=True)
    if config.directory is not None:
        legacy = config.directory / "ccproxy.py"
        if legacy.is_file() and legacy.resolve() != Path(__file__).resolve():
            _print(f"note: {legacy} (ccproxy 1.x's generated handler) is not needed any more: "
                   f"this file is the handler. It still works; you may delete it.", err=True)
    litellm_file = litellm_config_for_start(config)
    cmd = proxy_command(config, litellm_file, extra)
    env = proxy_environment(config)
    return config, litellm_file, cmd, env


def key_notice(config: Config, env: Mapping[str, str]) -> str | None:
    """One line on how clients authenticate, for a proxy that is up (never the key)."""
    if env.get(PROXY_KEY_ENV):
        return (f"proxy key on: clients send it in {PROXY_KEY_HEADER} "
                f"(key in {Path(config.directory or '.') / PROXY_KEY_FILE})")
    if env.get(WEAK_KEY_PERMIT_ENV) == "True" and WEAK_KEY_PERMIT_ENV not in os.environ:
        return f"no master key: allowed because the proxy listens on loopback only ({config.host})"
    return None


def cmd_start(args: argparse.Namespace) -> int:
    """Run LiteLLM's proxy with ccproxy's config, in the foreground or detached."""
    import secrets
    import subprocess
    directory = _config_dir(args)
    make_private_dir(directory)
    pidfile = PidFile(directory)
    with StartLock(directory):
        state, problem = pidfile.read()
        if state is not None and state.orphans:
            raise ProcessError(f"{problem}", f"stop them first: {self_command(directory)} stop")
        if state is not None:
            raise ProcessError(f"ccproxy is already running (pid {state.pid}, {state.url})",
                               f"stop it first: {self_command(directory)} stop")
        legacy = legacy_proxy_pid(directory)
        if legacy is not None:
            raise ProcessError(f"ccproxy 1.x's proxy is running from this config dir (pid "
                               f"{legacy}, in {LEGACY_PID_FILE})",
                               f"stop it first: {self_command(directory)} stop")
        if problem:
            pidfile.remove()
            _print(f"{problem}; removed it", err=True)
        config, _litellm_file, cmd, env = _prepare_start(args)
        check_port_free(config.host, config.port)
        refresh_snippet_files(directory)
        instance = env[INSTANCE_ENV] = secrets.token_hex(16)
        notice = key_notice(config, env)
        if not args.detach:
            if notice:
                _print(notice, err=True)
            return _run_foreground(config, cmd, env, pidfile)
        log_path = directory / LOG_FILE
        with os.fdopen(open_private_append(log_path), "ab") as logf:
            logf.write(f"\n{START_LOG_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n"
                       .encode())
            logf.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        pidfile.write(ProxyState(proc.pid, config.url, time.time(), str(directory), tuple(cmd),
                                 start_ticks=process_start_ticks(proc.pid), instance=instance,
                                 pgid=proc.pid))
        outcome = wait_until_live(proc, config.url, args.timeout, instance,
                                  ccproxy_route_headers(config))
        if outcome.startswith("degraded") and args.allow_degraded:
            _print(f"warning: {outcome}; kept running (--allow-degraded)", err=True)
        elif outcome != "live":
            if proc.poll() is None:
                stop_process(proc.pid, 5, group=proc.pid)
            pidfile.remove()
            raise start_failure(outcome, proc.returncode, args.timeout, log_path, directory)
        _print(f"ccproxy is running: {config.url} (pid {proc.pid}); log: {log_path}")
        if notice:
            _print(notice, err=True)
        return 0


def start_failure(outcome: str, code: int | None, timeout: float, log_path: Path,
                  directory: Path) -> ProcessError:
    """Why a detached start failed, with what this start wrote to the log (not an earlier
    run's lines) and what to do."""
    lines = tail_lines(log_path, 20)
    header = max((i for i, ln in enumerate(lines) if ln.startswith(START_LOG_HEADER)), default=-1)
    lines = [ln for ln in lines[header + 1:] if ln.strip()]
    logs = f"{self_command(directory)} logs shows the whole log"
    if outcome.startswith("degraded"):
        why, hint = outcome, (f"run `{self_command(directory)} doctor`; use a LiteLLM release "
                              f"ccproxy was tested on ({LITELLM_CHECKED}), or start with "
                              "--allow-degraded")
    elif outcome == "timeout":
        why = f"did not answer within {timeout:g} s"
        hint = (f"fix the problem above, or if there is none, it is only slow: start again with "
                f"a longer --timeout ({logs})")
    else:
        why = f"exited with code {code}" if outcome == "exited" else outcome
        hint = f"fix the problem above, then start again ({logs})"
    shown = f"; last lines of {log_path}:\n" + "\n".join("  | " + ln for ln in lines) if lines \
        else f"; it wrote nothing to {log_path}"
    return ProcessError(f"the proxy {why} during start-up{shown}", hint)


def _run_foreground(config: Config, cmd: list[str], env: dict[str, str],
                    pidfile: PidFile) -> int:
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, env=env)
    pidfile.write(ProxyState(proc.pid, config.url, time.time(), str(config.directory or ""),
                             tuple(cmd), start_ticks=process_start_ticks(proc.pid),
                             instance=env[INSTANCE_ENV]))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        pidfile.remove()


def legacy_proxy_pid(directory: Path) -> int | None:
    """The pid of a LiteLLM proxy that ccproxy 1.x started from this config dir (its
    `litellm.lock`), while it runs."""
    try:
        pid = int((directory / LEGACY_PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = process_cmdline(pid) if pid > 0 and pid_alive(pid) else None
    return pid if cmd and any("litellm" in part for part in cmd) else None


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the detached proxy of this config dir (or the one ccproxy 1.x started there)."""
    directory = _config_dir(args)
    pidfile = PidFile(directory)
    state, problem = pidfile.read()
    legacy = legacy_proxy_pid(directory) if state is None else None
    if legacy is not None:
        how = stop_process(legacy, args.timeout)
        (directory / LEGACY_PID_FILE).unlink(missing_ok=True)
        _print(f"ccproxy 1.x's proxy (pid {legacy}, from {LEGACY_PID_FILE}) {how}")
        return 0
    if state is None:
        if problem:
            pidfile.remove()
            _print(f"{problem}; removed it. Nothing to stop.")
        else:
            _print(f"ccproxy is not running (config dir {directory})")
        return 0
    how = stop_process(state.pid, args.timeout, group=state.pgid)
    pidfile.remove()
    what = f"the workers left by ccproxy (pid {', '.join(map(str, state.orphans))})" \
        if state.orphans else f"ccproxy (pid {state.pid})"
    _print(f"{what} {how}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """Stop, then start with the given flags (detached again if the stopped proxy was); a
    config with problems stops nothing."""
    args.checked_config = checked_start_config(args)
    state, _problem = PidFile(_config_dir(args)).read()
    args.detach = args.detach or (state is not None and state.pgid is not None)
    cmd_stop(args)
    return cmd_start(args)


def status_report(args: argparse.Namespace) -> dict:
    """Everything `status` shows, as a JSON-safe dict."""
    directory = _config_dir(args)
    state, problem = PidFile(directory).read()
    report: dict[str, Any] = {"running": state is not None, "pid": None, "url": None,
                              "uptime_s": None, "config_dir": str(directory)}
    try:
        config = load_config(directory)
    except ConfigError as exc:
        report["config_error"] = str(exc)
        config = None
    if config is not None:
        report["url"] = config.url
        report["config_files"] = [str(f) for f in config.files] or ["<built-in defaults>"]
        report["rules"] = [{"name": r.name, "rule": r.rule} for r in config.settings.rules]
        report["hooks"] = [h.path for h in config.settings.hooks]
        report["models"] = ModelTable(config.model_list).names()
        report["proxy_key"] = PROXY_KEY_HEADER if config.settings.proxy_key else None
    if problem:
        report["pid_file_problem"] = problem
    legacy = legacy_proxy_pid(directory) if state is None else None
    if legacy is not None:
        report["legacy_1x_pid"] = legacy
    if state is not None and state.orphans:
        report.update(running=False, orphans=list(state.orphans), url=state.url)
    elif state is not None:
        report.update(pid=state.pid, url=state.url, uptime_s=round(time.time() - state.started))
        status, body = http_get(state.url + HEALTH_PATH, timeout=1.0,
                                headers=ccproxy_route_headers(config) if config else None)
        if status == 200:
            try:
                report["live"] = json.loads(body)
            except ValueError:
                pass
    return report


def cmd_status(args: argparse.Namespace) -> int:
    """Show whether the proxy runs, where, and with which config."""
    report = status_report(args)
    if args.json:
        _print(json.dumps(report, indent=2, sort_keys=True))
        return 0 if report["running"] else 1
    if report["running"]:
        up = report["uptime_s"] or 0
        _print(f"ccproxy is running: {report['url']} (pid {report['pid']}, "
               f"up {up // 3600}h{up % 3600 // 60:02d}m{up % 60:02d}s)")
    else:
        _print(f"ccproxy is not running (config dir {report['config_dir']})"
               + (f": {report['pid_file_problem']}" if report.get("pid_file_problem") else ""))
        if report.get("orphans"):
            _print(f"stop them with: {self_command(Path(report['config_dir']))} stop")
        if report.get("legacy_1x_pid"):
            _print(f"ccproxy 1.x's proxy runs from this config dir (pid {report['legacy_1x_pid']}, "
                   f"{LEGACY_PID_FILE}; log litellm.log): stop it with "
                   f"`{self_command(Path(report['config_dir']))} stop`, then start this one")
    if "config_error" in report:
        _print(f"config error: {report['config_error']}")
    else:
        _print(f"config: {', '.join(report['config_files'])}")
        rules = ", ".join(f"{r['name']} ({r['rule'].rsplit('.', 1)[-1]})" for r in report["rules"])
        _print(f"rules: {rules or 'none (everything passes through)'}")
        _print(f"hooks: {', '.join(report['hooks']) or 'none'}")
        _print(f"models: {', '.join(report['models']) or 'none'}")
    live = report.get("live")
    if isinstance(live, dict):
        for why in degraded_reasons(live):
            _print(f"degraded: {why}")
        routes = ", ".join(f"{k} {v}" for k, v in sorted(live.get("routes", {}).items()))
        _print(f"requests: {live.get('requests', 0)}" + (f" ({routes})" if routes else ""))
        sessions = live.get("sessions")
        if isinstance(sessions, dict):
            _print(f"sessions: {sessions.get('sessions', 0)}, model switches "
                   f"{sessions.get('switches', 0)}, ~{sessions.get('uncached_tokens', 0):,} "
                   "tokens re-sent uncached")
            if sessions.get("plan_limited"):
                _print(f"plan limit reached: {sessions['plan_limited']} session(s) answered by "
                       "quota_fallback until their reset")
    return 0 if report["running"] else 1


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the end of the proxy log; -f follows it."""
    path = _config_dir(args) / LOG_FILE
    if not path.exists():
        _print(f"no log at {path} (the proxy writes it when started with --detach)", err=True)
        return 1
    with open(path, "rb") as f:
        # The tail ends where following starts: a line written meanwhile is printed once.
        end = f.seek(0, os.SEEK_END)
        for line in tail_lines(path, args.lines, end):
            _print(line)
        return _follow(f) if args.follow else 0


def _follow(f: Any) -> int:
    """Print what is appended to an open file until Ctrl-C."""
    try:
        while True:
            chunk = f.readline()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    except KeyboardInterrupt:
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a command with the proxy's URL in ANTHROPIC_BASE_URL and OPENAI_BASE_URL."""
    import shutil
    import subprocess
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run needs a command", "e.g. python ccproxy.py run claude")
    config = _config_for(args)
    env = client_environment(config, os.environ)
    if shutil.which(command[0], path=env.get("PATH")) is None and "/" not in command[0]:
        raise ProcessError(f"command not found: {command[0]}",
                           "install it or give its full path")
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        raise ProcessError(f"cannot run {command[0]}: {exc.strerror}",
                           "check that it is an executable") from exc


def _read_request(source: str | None) -> tuple[dict, dict]:
    """(body, headers) from a file or stdin: a bare request body, or a capture with `body`."""
    try:
        text = sys.stdin.read() if source in (None, "-") else Path(source).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}", "give a JSON file") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{source or 'stdin'} is not JSON: {exc}",
                         "give a request body (or a capture with path/headers/body)") from exc
    if not isinstance(data, dict):
        raise UsageError("the request must be a JSON object", "give a /v1/messages body")
    if isinstance(data.get("body"), dict):
        headers = {str(k).lower(): str(v) for k, v in (data.get("headers") or {}).items()}
        return data["body"], headers
    return data, {}


def live_session_state(config: Config, directory: Path, session_id: str) -> SessionStore:
    """A copy of a live session's routing state, from the running proxy of this config dir."""
    state, _problem = PidFile(directory).read()
    if state is None:
        raise ProcessError(f"--session needs the running proxy (config dir {directory})",
                           f"start it: {self_command(directory)} start --detach")
    from urllib.parse import quote
    status, body = http_get(f"{state.url}{SESSION_PATH}/{quote(session_id, safe='')}?state=1",
                            timeout=5.0, headers=ccproxy_route_headers(config))
    if status == 404:
        raise UsageError(f"the proxy knows no session {session_id!r}",
                         f"`{self_command(directory)} status` shows the proxy; the id is Claude Code's "
                         "session id (its status line input, or the x-claude-code-session-id "
                         "header)")
    try:
        exported = json.loads(body) if status == 200 else None
    except ValueError:
        exported = None
    if not isinstance(exported, dict):
        raise ProcessError(f"the proxy did not answer the session query ({status or 'no answer'})",
                           f"check it: {self_command(directory)} status")
    return SessionStore.load(exported)


def cmd_explain(args: argparse.Namespace) -> int:
    """Show how the rules decide one request: the proxy's own pipeline on a copy of the
    request, against a copy of a live session's state (--session) or none."""
    config = _config_for(args)
    body, headers = _read_request(args.request)
    sessions = live_session_state(config, _config_dir(args), args.session) \
        if args.session else None
    ctx = route_request(body, config, headers, sessions)
    pipeline = ctx.pipeline
    if args.session and ctx.session_id != args.session:
        pipeline.problems.append(f"the request belongs to session {ctx.session_id!r}, not "
                                 f"{args.session!r}: routed without that session's state")
    decision = ctx.decision
    result = {
        "requested_model": body.get("model"),
        "session_id": ctx.session_id, "agent_id": ctx.agent_id,
        "rules": [{"name": n, "rule": d, "matched": v.matched, "fact": v.fact}
                  for n, d, v in ctx.verdicts],
        "decision": decision.as_dict() if decision else None,
        "auth": ctx.auth, "fixes": ctx.notes, "hook_errors": ctx.hook_errors,
        "problems": pipeline.problems,
    }
    if args.json:
        _print(json.dumps(result, indent=2))
        return 0
    _print(f"request: model {body.get('model')}"
           + (f", session {ctx.session_id}" if ctx.session_id else ""))
    for n, d, v in ctx.verdicts:
        _print(f"  {d} [{n}]: {v.fact or '-'} -> {'match' if v.matched else 'no match'}")
    if decision is None:
        _print("no decision (model_router is not in hooks)")
    else:
        _print(f"label: {decision.label}" + (f" ({decision.reason})" if decision.reason else ""))
        how = "passthrough of the requested model" if decision.passthrough \
            else f"model_list entry `{decision.model}`"
        _print(f"route: {how} -> {decision.upstream} (provider {decision.provider or '?'})")
    _print(f"auth: {'; '.join(ctx.auth) or 'unchanged (deployment or LiteLLM defaults)'}")
    for note in ctx.notes:
        _print(f"fix: {note}")
    for p in pipeline.problems + ctx.hook_errors:
        _print(f"problem: {p}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the config and report every problem with file and line."""
    config: Config | None = None
    try:
        config = _config_for(args)
    except ConfigError as exc:
        report = ValidationReport(errors=list(exc.problems))
    else:
        report = validate_config(config, Pipeline(config))
    if args.json:
        _print(json.dumps({"ok": report.ok, "errors": report.errors,
                           "warnings": report.warnings,
                           "files": [str(f) for f in config.files] if config else []},
                          indent=2))
    else:
        for e in report.errors:
            _print(f"error: {e}")
        for w in report.warnings:
            _print(f"warning: {w}")
        if report.ok:
            _print("config OK" + (f" ({len(report.warnings)} warning(s))" if report.warnings
                                  else ""))
        else:
            _print(f"{len(report.errors)} error(s): fix them, then run validate again")
    return 0 if report.ok else 1


def cmd_usage(args: argparse.Namespace) -> int:
    """What the proxy served, what it cost and what routing saved, from the usage ledger."""
    match = re.fullmatch(r"(\d+)([mhdw])", args.since)
    if not match:
        raise UsageError(f"--since takes a number and a unit (m, h, d, w), got {args.since!r}",
                         "e.g. --since 7d")
    path = _config_dir(args) / LEDGER_FILE
    if not path.is_file():
        _print(f"no usage recorded yet ({path} does not exist; the proxy writes it)")
        return 0
    rows = usage_rows(path, int(match.group(1)) * SINCE_UNITS[match.group(2)], args.by)
    if rows is None:
        raise CCProxyError(f"{path} cannot be read (not a usage ledger, or damaged)",
                         "move it aside; the proxy starts a new one")
    if args.json:
        _print(json.dumps(rows, indent=2))
        return 0
    if args.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=[args.by, *USAGE_FIELDS])
        writer.writeheader()
        writer.writerows(rows)
        return 0
    total = {args.by: "total"} | {k: sum(r[k] or 0 for r in rows) for k in rows[0]
                                  if k != args.by and not k.startswith("latency")} if rows else {}
    width = max([28] + [len(str(row[args.by])) for row in rows])     # names are never cut
    _print(f"usage since {args.since} ago, by {args.by}")
    _print(f"{args.by:<{width}} {'requests':>9} {'failed':>7} {'input':>11} {'cached':>11} "
           f"{'output':>9} {'cost $':>10} {'saved $':>9} {'unpriced':>9} {'p50 s':>7} {'p95 s':>7}")
    for row in rows + ([total] if total else []):
        p50, p95 = (f"{row[k]:.2f}" if row.get(k) is not None else "-"
                    for k in ("latency_p50_s", "latency_p95_s"))
        group = "(none)" if row[args.by] is None else str(row[args.by])   # e.g. no session
        _print(f"{group:<{width}} {row['requests']:>9,} {row['failed'] or 0:>7,} "
               f"{row['input_tokens'] or 0:>11,} {row['cache_read_tokens'] or 0:>11,} "
               f"{row['output_tokens'] or 0:>9,} {row['cost_usd'] or 0:>10.4f} "
               f"{row['saved_usd'] or 0:>9.4f} {row['unpriced'] or 0:>9,} {p50:>7} {p95:>7}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Open the running proxy's page; the proxy key goes in the address's #fragment, which
    the browser never sends anywhere (the page moves it to its session storage)."""
    directory = _config_dir(args)
    state, problem = PidFile(directory).read()
    if state is None:
        raise ProcessError(f"the proxy is not running{f' ({problem})' if problem else ''}",
                           f"start it: {self_command(directory)} start --detach")
    url = state.url + DASHBOARD_PATH
    if args.print_only:
        _print(url)
        return 0
    import webbrowser

    try:
        key = (directory / PROXY_KEY_FILE).read_text().strip()
    except OSError:
        key = ""
    if not webbrowser.open(url + (f"#key={key}" if key else "")):
        _print(f"no browser to open here; open {url} yourself"
               + (f" (it asks for the proxy key, in {directory / PROXY_KEY_FILE})" if key else ""))
        return 1
    _print(f"opened {url} in the browser" + (" (with the proxy key)" if key else ""))
    return 0


def cmd_statusline(args: argparse.Namespace) -> int:
    """One short line for Claude Code's statusLine: never a traceback, always exit 0."""
    try:
        raw = sys.stdin.read() if not sys.stdin.isatty() else ""
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, OSError):
        data = {}
    session_id = data.get("session_id") if isinstance(data, dict) else None
    directory = find_config_dir(getattr(args, "config_dir", None))[0]
    state, _problem = PidFile(directory).read()
    if state is None:
        _print(statusline_text(None, up=False))
        return 0
    session = None
    if isinstance(session_id, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", session_id):
        try:   # the key file, not the config: the status line runs on every repaint
            key = (directory / PROXY_KEY_FILE).read_text().strip()
        except OSError:
            key = ""
        status, body = http_get(f"{state.url}/ccproxy/session/{session_id}", timeout=0.15,
                                headers={PROXY_KEY_HEADER: key} if key else None)
        if status == 0:
            _print(statusline_text(None, up=False))
            return 0
        try:
            session = json.loads(body) if status == 200 else None
        except ValueError:
            session = None
    _print(statusline_text(session, up=True) + plan_usage_text(data))
    return 0



def cmd_shell(args: argparse.Namespace) -> int:
    """Print the shell snippet, or add/remove the line that sources it in the rc file."""
    shell = args.shell_name or args.shell or Path(os.environ.get("SHELL", "")).name
    if shell not in SHELLS:
        raise UsageError(f"unknown shell {shell or '(none: $SHELL is empty)'!r}",
                         f"name one: {', '.join(SHELLS)}")
    directory, why = find_config_dir(getattr(args, "config_dir", None))
    explicit = why in ("--config-dir", ENV_CONFIG_DIR)
    if args.install or args.uninstall:
        path = rc_file(shell)
        if args.uninstall:
            done = rc_uninstall(path)
            _print(f"removed ccproxy's block from {path}" if done
                   else f"no ccproxy block in {path}; nothing to remove")
            return 0
        snippet = write_snippet_file(directory, shell)
        done = rc_install(path, rc_block(shell, snippet))
        _print(f"added ccproxy's block to {path} (it sources {snippet}); open a new shell to "
               "use it" if done else f"{path} already has ccproxy's block; refreshed {snippet}")
        return 0
    url, notice, hints = shell_settings(directory)
    sys.stdout.write(shell_snippet(shell, url, directory, explicit, notice=notice, hints=hints))
    return 0


@dataclasses.dataclass(slots=True, frozen=True)
class Check:
    """One line of `doctor`: what was checked, ok / warn / fail, and what was found."""

    name: str
    status: str
    detail: str


def doctor_checks(args: argparse.Namespace) -> list[Check]:
    """Everything `doctor` looks at, in the order a user would fix things."""
    from importlib import metadata

    checks = [Check("python", "ok" if sys.version_info >= (3, 11) else "fail",
                    f"{sys.version.split()[0]} ({sys.executable})")]
    for package, needed in (("litellm", True), ("pyyaml", True), ("tiktoken", True),
                            ("fastapi", False), ("uvicorn", False)):
        try:
            checks.append(Check(package, "ok", metadata.version(package)))
        except metadata.PackageNotFoundError:
            checks.append(Check(package, "fail" if needed else "warn",
                                f"not installed: {INSTALL_HINT}"))
    version = litellm_version()
    if version is not None:
        tested = version.rsplit(".", 1)[0] == LITELLM_CHECKED.rsplit(".", 1)[0]
        checks.append(Check("litellm line", "ok" if tested else "warn",
                            f"{version}; tested on {LITELLM_CHECKED}"
                            + ("" if tested else ": the contact checks below say what differs")))
        for contact, ok in check_contacts():
            checks.append(Check(f"litellm: {contact.name}", "ok" if ok else "fail",
                                "found" if ok else
                                f"missing ({contact.relies_on}); without it: {contact.breaks}"))
    checks += _doctor_config(args)
    checks += _doctor_claude_code(_config_dir(args))
    return checks


def _doctor_config(args: argparse.Namespace) -> list[Check]:
    directory = _config_dir(args)
    try:
        config = load_config(directory)
    except ConfigError as exc:
        return [Check("config", "fail", str(exc).replace("\n", " "))]
    report = validate_config(config, Pipeline(config))
    files = ", ".join(str(f) for f in config.files) or f"built-in defaults (dir {directory})"
    checks = [Check("config", "ok" if report.ok else "fail",
                    files if report.ok else "; ".join(report.errors))]
    checks += [Check("config warning", "warn", w) for w in report.warnings]
    state, problem = PidFile(directory).read()
    if state is None or state.orphans:
        try:
            check_port_free(config.host, config.port)
            checks.append(Check("port", "ok", f"{config.host}:{config.port} is free"))
        except ProcessError as exc:
            checks.append(Check("port", "fail", str(exc).replace("\n", " ")))
        checks.append(Check("proxy", "warn" if problem else "ok",
                            problem or f"not running (config dir {directory})"))
        return checks
    status, body = http_get(state.url + HEALTH_PATH, timeout=2.0,
                            headers=ccproxy_route_headers(config))
    try:
        health = json.loads(body) if status == 200 else {}
    except ValueError:
        health = {}
    if health.get("status") == "ok":
        checks.append(Check("proxy", "ok", f"running at {state.url} (pid {state.pid}), "
                            f"{health.get('requests', 0)} requests"))
    else:
        why = "; ".join(degraded_reasons(health)) or f"health answered {status}"
        checks.append(Check("proxy", "fail", f"running at {state.url} (pid {state.pid}) but "
                            f"degraded: {why}"))
    return checks


def degraded_reasons(health: Mapping[str, Any]) -> list[str]:
    """Why a running proxy's health says degraded, one line each."""
    out = []
    if health.get("missing"):
        out.append("this LiteLLM lacks what ccproxy uses for: " + ", ".join(health["missing"])
                   + " (the log says what stops working)")
    state = health.get("state")
    if isinstance(state, Mapping) and state.get("ok") is False:
        out.append(f"{state.get('backend')} at {state.get('at')} cannot be reached "
                   f"({state.get('problem')}): requests are routed by the rules alone, without "
                   "session state; budgets count from this proxy's ledger")
    return out


def _doctor_claude_code(directory: Path) -> list[Check]:
    import shutil
    import subprocess

    checks = []
    claude = shutil.which("claude")
    if claude is None:
        checks.append(Check("claude code", "warn", "`claude` is not on PATH "
                            "(npm install -g @anthropic-ai/claude-code)"))
    else:
        try:
            done = subprocess.run([claude, "--version"], capture_output=True, text=True,
                                  timeout=20, stdin=subprocess.DEVNULL)
            found = done.stdout.strip().splitlines()[0] if done.stdout.strip() else "?"
        except (OSError, subprocess.TimeoutExpired) as exc:
            found = f"did not answer --version ({exc})"
        checks.append(Check("claude code", "ok", f"{found} ({claude})"))
    shell = Path(os.environ.get("SHELL", "")).name
    if shell in SHELLS:
        try:
            installed = RC_MARK_START in rc_file(shell).read_text()
        except OSError:
            installed = False
        checks.append(Check("shell integration", "ok" if installed else "warn",
                            f"{rc_file(shell)}" if installed else
                            f"not in {rc_file(shell)} ({self_command(directory)} shell --install)"))
    try:
        settings = json.loads(claude_settings_file().read_text())
        line = settings.get("statusLine") if isinstance(settings, dict) else None
        command = line.get("command", "") if isinstance(line, dict) else ""
    except (OSError, ValueError):
        command = ""
    checks.append(Check("status line", "ok" if "ccproxy" in command else "warn",
                        "installed" if "ccproxy" in command else
                        f"not installed ({self_command(directory)} install --statusline)"))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check what ccproxy needs, one line each; exit 1 when anything failed."""
    checks = doctor_checks(args)
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        _print(json.dumps({"ok": not failed, "checks": [dataclasses.asdict(c) for c in checks]},
                          indent=2))
    else:
        for c in checks:
            _print(f"{c.status:<4}  {c.name}: {c.detail}")
        _print(f"{len(failed)} problem(s)" if failed else "everything ccproxy needs is in place")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="ccproxy.py", description="Route Claude Code's requests through LiteLLM by rules.",
        epilog="Config: --config-dir, else $CCPROXY_CONFIG_DIR, else ~/.ccproxy.")
    parser.add_argument("--version", action="version", version=f"ccproxy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="config directory (default: $CCPROXY_CONFIG_DIR or ~/.ccproxy)")
    parser.add_argument("--config-dir", metavar="DIR", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    p = sub.add_parser("install", parents=[common], help="write the default config")
    p.add_argument("--force", action="store_true", help="replace an existing config (backed up)")
    p.add_argument("--statusline", action="store_true",
                   help="add ccproxy's status line to Claude Code's settings.json")
    p.add_argument("--uninstall", action="store_true",
                   help="with --statusline: remove it again (and only it)")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("usage", parents=[common],
                       help="requests, tokens, cost and what routing saved (the usage ledger)")
    p.add_argument("--since", default="7d", help="how far back: 30m, 24h, 7d, 4w (default 7d)")
    p.add_argument("--by", choices=list(USAGE_GROUPS), default="label", help="group by")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="JSON rows")
    shown.add_argument("--csv", action="store_true", help="CSV rows")
    p.set_defaults(func=cmd_usage)
    p = sub.add_parser("dashboard", parents=[common],
                       help="open the proxy's dashboard page in the browser")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="only print its address (without the proxy key)")
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("statusline", parents=[common],
                       help="one line for Claude Code's statusLine (reads its JSON on stdin)")
    p.set_defaults(func=cmd_statusline)

    for name, func, text in (("start", cmd_start, "run the proxy"),
                             ("restart", cmd_restart, "stop, then start the proxy")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--detach", "-d", action="store_true", help="run in the background")
        p.add_argument("--timeout", type=float, default=180.0,
                       help="seconds to wait for the proxy to answer (default 180)")
        p.add_argument("--allow-degraded", action="store_true",
                       help="keep a proxy running whose LiteLLM lacks contact points ccproxy "
                            "uses (see `doctor`)")
        p.add_argument("litellm_args", nargs=argparse.REMAINDER,
                       help="after --: extra arguments for LiteLLM's proxy")
        p.set_defaults(func=func)

    p = sub.add_parser("stop", parents=[common], help="stop the detached proxy")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", parents=[common], help="show the proxy's state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", parents=[common], help="show the proxy log")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("run", parents=[common], help="run a command through the proxy")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explain", parents=[common], help="show how a request would be routed")
    p.add_argument("request", nargs="?", help="request JSON file (default: stdin)")
    p.add_argument("--session", metavar="ID",
                   help="route against this live session's state (turn, sticky routes, "
                        "thinking signatures) in the running proxy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("shell", parents=[common], help="shell integration for claude")
    p.add_argument("shell_name", nargs="?", choices=SHELLS, metavar="SHELL",
                   help="bash, zsh or fish (default: from $SHELL)")
    p.add_argument("--shell", choices=SHELLS, help=argparse.SUPPRESS)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--install", action="store_true",
                       help="add the line that sources the snippet to the shell's rc file")
    group.add_argument("--uninstall", action="store_true",
                       help="remove that line (and only that)")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("doctor", parents=[common],
                       help="check Python, packages, LiteLLM's contact points, config, proxy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("validate", parents=[common], help="check the config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "subcommand", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except CCProxyError as exc:
        _print(f"ccproxy: error: {exc}", err=True)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        _print(f"ccproxy: error: the package `{exc.name}` is missing\n  -> {INSTALL_HINT}",
               err=True)
        return 1
    except BrokenPipeError:         # the reader went away (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nor at exit's flush)
        return 1
    except Exception as exc:  # the CLI's boundary: one line, never a traceback
        _print(f"ccproxy: internal error: {type(exc).__name__}: {redact_secrets(str(exc))[:300]}"
               "\n  -> please report it with the command you ran", err=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
