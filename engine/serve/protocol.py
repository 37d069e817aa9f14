"""OpenAI request parsing and response shapes. A request is either fully understood and
verifiable, or refused with a 4xx and one clear message: nothing is silently ignored."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ...verifier.numerics.sampler import SamplingParams
from ..receipts import SeqRequest

MAX_NONCE = 256
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream",
           "stream_options", "nonce", "user", "n", "logit_bias", "presence_penalty",
           "frequency_penalty", "stop", "logprobs"}
_KEYS = {"chat": _COMMON | {"messages", "max_completion_tokens", "tools", "tool_choice",
                            "functions", "function_call", "parallel_tool_calls", "top_logprobs",
                            "response_format"},
         "completion": _COMMON | {"prompt", "echo", "best_of", "suffix"}}
# Parameters the engine cannot honour verifiably; accepted only at their neutral value.
_NEUTRAL = {"n": (1,), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0), "stop": (None, [], ""), "logprobs": (None, False),
            "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
            "functions": (None, []), "function_call": (None, "none"),
            "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}),
            "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}


class ApiError(Exception):
    """Refused request: HTTP status, one-line message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.code, "param": self.param,
                          "code": self.code}}


@dataclass
class Parsed:
    seq: SeqRequest
    stream: bool
    include_usage: bool


@dataclass
class Limits:
    context_length: int
    default_max_tokens: int = 256


def parse(body, kind: str, model_id: str, tokenizer, limits: Limits) -> Parsed:
    """The SeqRequest for an OpenAI body (kind 'chat' or 'completion'); raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_keys(body, kind)
    if body.get("model") != model_id:
        raise ApiError(404, f"unknown model {body.get('model')!r}; this server serves "
                            f"{model_id!r}", "model", "model_not_found")
    if kind == "chat":
        binding, prompt_ids, chat = _messages(body, tokenizer)
    else:
        binding, prompt_ids, chat = _prompt(body, tokenizer)
    max_tokens = _max_tokens(body, len(prompt_ids), limits)
    stream = _typed(body, "stream", bool, False)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise ApiError(400, "stream_options supports only include_usage", "stream_options")
    nonce = _typed(body, "nonce", str, None)
    if nonce is not None and len(nonce) > MAX_NONCE:
        raise ApiError(400, f"nonce longer than {MAX_NONCE} characters", "nonce")
    seq = SeqRequest(binding, prompt_ids, _sampling(body), max_tokens,
                     nonce if nonce is not None else os.urandom(16).hex(), chat)
    return Parsed(seq, stream, bool(opts.get("include_usage", False)))


def _check_keys(body: dict, kind: str) -> None:
    for k, v in body.items():
        if k not in _KEYS[kind]:
            raise ApiError(400, f"unsupported parameter {k!r}", k)
        if k in _NEUTRAL and v not in _NEUTRAL[k]:
            raise ApiError(400, f"unsupported parameter {k!r}={v!r}: the exact engine "
                                f"serves only verifiable decoding (accepted: "
                                f"{', '.join(map(repr, _NEUTRAL[k]))})", k)


def _typed(body: dict, key: str, typ, default):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise ApiError(400, f"{key} must be a {getattr(typ, '__name__', 'number')}", key)
    return v


def _messages(body: dict, tokenizer):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    for m in msgs:
        if (not isinstance(m, dict) or set(m) != {"role", "content"}
                or not isinstance(m["role"], str) or not isinstance(m["content"], str)):
            raise ApiError(400, "each message must be {role, content} with string values "
                                "(no names, tool calls or content parts)", "messages")
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        ids = tokenizer.encode_chat(msgs)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    return {"messages": msgs}, ids, True


def _prompt(body: dict, tokenizer):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # the client's list form of one prompt
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ApiError(400, "prompt is empty", "prompt")
    return {"prompt": prompt}, ids, False


def _max_tokens(body: dict, n_prompt: int, limits: Limits) -> int:
    ctx = limits.context_length
    if n_prompt >= ctx:
        raise ApiError(400, f"the prompt has {n_prompt} tokens; the context holds {ctx} "
                            f"(at least one must be left to generate)", "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = _typed(body, key, int, None)
    if mt is None:
        return min(limits.default_max_tokens, ctx - n_prompt)
    if mt < 1:
        raise ApiError(400, f"{key} must be >= 1", key)
    if n_prompt + mt > ctx:
        raise ApiError(400, f"{n_prompt} prompt tokens + {key} {mt} exceed the context length "
                            f"{ctx}", key)
    return mt


def _sampling(body: dict) -> SamplingParams:
    temperature = float(_typed(body, "temperature", (int, float), 1.0))
    top_p = float(_typed(body, "top_p", (int, float), 1.0))
    top_k = _typed(body, "top_k", int, 0)
    seed = _typed(body, "seed", int, None)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    try:
        return SamplingParams(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


# --- responses ----------------------------------------------------------------------------------

def finish(reason: str | None) -> str:
    return "stop" if reason == "eos" else "length"


def usage(receipt: dict) -> dict:
    p, c = len(receipt["prompt_token_ids"]), len(receipt["output_token_ids"])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def response(kind: str, rid: str, model_id: str, receipt: dict, reason: str | None) -> dict:
    choice = {"index": 0, "finish_reason": finish(reason), "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": receipt["text"]}
    else:
        choice["text"] = receipt["text"]
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice],
            "usage": usage(receipt), "receipt": receipt}


def chunk(kind: str, rid: str, model_id: str, text: str | None, reason: str | None = None,
          first: bool = False) -> dict:
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    if kind == "chat":
        choice["delta"] = ({"role": "assistant", "content": text or ""} if first
                           else ({} if text is None else {"content": text}))
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice]}
