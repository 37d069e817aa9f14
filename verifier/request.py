"""The client's request: one allow-list of fields, shared by the server (engine/serve) and the
verifier, so what the server honours and what the verifier checks cannot drift apart.

Every field is either bound (it changes what the engine computes, and the verifier compares it
with the receipt: the prompt or messages, max_tokens / max_completion_tokens, temperature, top_p,
top_k, seed, nonce, and what is returned beside the tokens: stop, stop_token_ids, logprobs,
top_logprobs, echo, see verifier/outputs.py), inert (it changes only the transport or the OpenAI
bookkeeping: model, stream, stream_options, user) or accepted at its neutral value only (what the
exact engine cannot honour verifiably: penalties, logit_bias, tools ...; n > 1, as one receipt
answers one sequence: a client that wants n sequences sends n requests). A field outside the list is refused by
both sides: the server with a 400, the verifier with `request_invalid` (fail closed).

Chat or plain completion comes from the request itself (messages -> chat, prompt -> completion)
and from the endpoint the client called, never from a flag the provider sets.

What the client leaves out is fixed by rule, never left to the provider (the verifier enforces
the rule when it is given the client's request):
- `max_tokens`: OpenAI's defaults, 16 for a plain completion, the rest of the context for a chat
  (both capped by the context): `default_max_tokens`.
- `seed`: derived from the receipt's nonce (`default_seed`), so a provider cannot try seeds and
  keep the sampled output it prefers. When the client sends no nonce either, the server draws the
  nonce and with it the seed: a client that wants the sampler's own draw sends a nonce."""

from __future__ import annotations

import math
from dataclasses import dataclass

import blake3

from .numerics.sampler import SamplingParams
from .outputs import MAX_STOP, MAX_STOP_CHARS, MAX_STOP_IDS, MAX_TOP_LOGPROBS, OutputPolicy

CHAT, COMPLETION = "chat", "completion"
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
MAX_NONCE = 256
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_TOP_K = 1.0, 1.0, 0  # OpenAI's defaults
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
_BOTH = (CHAT, COMPLETION)
_SEED_DOMAIN = b"commitllm/default-seed/v1\0"

# field -> the kinds it is allowed in. Bound and inert fields are checked in parse().
_FIELDS = {"model": _BOTH, "messages": (CHAT,), "prompt": (COMPLETION,), "max_tokens": _BOTH,
           "max_completion_tokens": (CHAT,), "temperature": _BOTH, "top_p": _BOTH,
           "top_k": _BOTH, "seed": _BOTH, "nonce": _BOTH, "stream": _BOTH,
           "stream_options": _BOTH, "user": _BOTH, "stop": _BOTH, "stop_token_ids": _BOTH,
           "logprobs": _BOTH, "top_logprobs": (CHAT,), "echo": (COMPLETION,)}
# Fields accepted only at their neutral value (what the engine does anyway), per kind.
_NEUTRAL = {"n": ((1,), _BOTH), "logit_bias": ((None, {}), _BOTH),
            "presence_penalty": ((None, 0, 0.0), _BOTH),
            "frequency_penalty": ((None, 0, 0.0), _BOTH),
            "tools": ((None, []), (CHAT,)), "tool_choice": ((None, "none"), (CHAT,)),
            "functions": ((None, []), (CHAT,)), "function_call": ((None, "none"), (CHAT,)),
            "parallel_tool_calls": ((None,), (CHAT,)),
            "response_format": ((None, {"type": "text"}), (CHAT,)),
            "best_of": ((None, 1), (COMPLETION,)),
            "suffix": ((None, ""), (COMPLETION,))}


class RequestError(ValueError):
    """A request this protocol does not accept: the offending parameter and why."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ClientRequest:
    """What a request obliges the engine to compute, with OpenAI's defaults filled in."""

    kind: str  # CHAT or COMPLETION
    binding: dict  # the receipt's request: {"messages": [...]} or {"prompt": "..."}
    max_tokens: int | None  # None: the client left it to the server
    max_tokens_param: str  # which field fixed it (for messages)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None: the server draws one (committed in the receipt)
    nonce: str | None  # None: the server draws one
    model: str | None
    stream: bool
    include_usage: bool
    output: OutputPolicy = OutputPolicy()  # stop, logprobs, echo

    def sampling(self, seed: int) -> SamplingParams:
        """The decode policy the request asks for; seed: the client's, or the server's draw."""
        try:
            return SamplingParams(self.temperature, self.top_k, self.top_p,
                                  seed if self.seed is None else self.seed)
        except ValueError as e:
            raise RequestError(None, str(e)) from None


def default_max_tokens(kind: str, n_prompt: int, context_length: int) -> int:
    """max_tokens for a request that gives none: OpenAI's default for the kind, within what is
    left of the context."""
    left = context_length - n_prompt
    return min(DEFAULT_COMPLETION_MAX_TOKENS, left) if kind == COMPLETION else left


def default_seed(nonce: str) -> int:
    """The sampling seed of a request that fixes none: a function of the receipt's nonce."""
    return int.from_bytes(blake3.blake3(_SEED_DOMAIN + nonce.encode()).digest()[:8], "little")


def kind_of(body: dict, endpoint: str | None = None) -> str:
    """CHAT or COMPLETION: from the endpoint the client called, else from the body's shape."""
    if endpoint is not None:
        if endpoint not in ENDPOINTS:
            raise RequestError(None, f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)}")
        return ENDPOINTS[endpoint]
    has_m, has_p = "messages" in body, "prompt" in body
    if has_m == has_p:
        raise RequestError(None, "a request has exactly one of 'messages' and 'prompt'")
    return CHAT if has_m else COMPLETION


def parse(body, kind: str | None = None, endpoint: str | None = None) -> ClientRequest:
    """The ClientRequest of a request body; raises RequestError for anything not understood."""
    if not isinstance(body, dict):
        raise RequestError(None, "the request must be a JSON object")
    kind = kind or kind_of(body, endpoint)
    check_text(body, "request")
    _check_keys(body, kind)
    binding = _messages(body) if kind == CHAT else _prompt(body)
    mt_param, max_tokens = _max_tokens(body)
    opts = body.get("stream_options")
    opts = {} if opts is None else opts
    if (not isinstance(opts, dict) or set(opts) - {"include_usage"}
            or not isinstance(opts.get("include_usage", False), bool)):
        raise RequestError("stream_options", "stream_options supports only include_usage (bool)")
    nonce = _typed(body, "nonce", str, None)
    if nonce is not None and len(nonce) > MAX_NONCE:
        raise RequestError("nonce", f"nonce longer than {MAX_NONCE} characters")
    _typed(body, "user", str, None)
    req = ClientRequest(
        kind, binding, max_tokens, mt_param,
        float(_number(body, "temperature", DEFAULT_TEMPERATURE)),
        float(_number(body, "top_p", DEFAULT_TOP_P)), _typed(body, "top_k", int, DEFAULT_TOP_K),
        _typed(body, "seed", int, None), nonce, _typed(body, "model", str, None),
        _typed(body, "stream", bool, False), bool(opts.get("include_usage", False)),
        _output(body, kind))
    req.sampling(0)  # every decode setting in range (SamplingParams says which is not)
    return req


def _check_keys(body: dict, kind: str) -> None:
    if type(body.get("n")) is int and body["n"] > 1:
        raise RequestError("n", "n > 1 is not served: one receipt answers one sequence; send n "
                                "requests (each gets its own receipt and nonce)")
    for k, v in body.items():
        if k in _NEUTRAL:
            values, kinds = _NEUTRAL[k]
            if kind not in kinds:
                raise RequestError(k, f"unsupported parameter {k!r} for a {kind} request")
            if not any(type(v) is type(n) and v == n for n in values):  # 0 is not False
                raise RequestError(k, f"unsupported parameter {k!r}={v!r}: the exact engine "
                                      f"serves only verifiable decoding (accepted: "
                                      f"{', '.join(map(repr, values))})")
        elif kind not in _FIELDS.get(k, ()):
            raise RequestError(k, f"unsupported parameter {k!r}" + (
                f" for a {kind} request" if k in _FIELDS else ""))


def _typed(body: dict, key: str, typ, default):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise RequestError(key, f"{key} must be a {typ.__name__}")
    return v


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise RequestError(key, f"{key} must be a finite number")
    return v


def check_text(v, where: str, depth: int = 0) -> None:
    """Every string in the body is encodable UTF-8 (JSON's \\ud800 escapes decode to lone
    surrogates, which no tokenizer or hash takes)."""
    if depth > 32:
        raise RequestError(where, "nested too deeply")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(where, f"{where} holds a lone UTF-16 surrogate (not text)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            check_text(k, where, depth + 1)
            check_text(x, where if depth else str(k)[:40], depth + 1)
    elif isinstance(v, list):
        for x in v:
            check_text(x, where, depth + 1)


def _output(body: dict, kind: str) -> OutputPolicy:
    """stop / stop_token_ids / logprobs / top_logprobs / echo as the receipt binds them."""
    stop = body.get("stop")
    if stop is None or stop == "":
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise RequestError("stop", f"stop must be a string or a list of at most {MAX_STOP} "
                                   f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    stop = list(dict.fromkeys(stop))  # a repeated string stops at the same place
    ids = body.get("stop_token_ids")
    ids = [] if ids is None else ids
    if (not isinstance(ids, list) or len(ids) > MAX_STOP_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                       for t in ids)):
        raise RequestError("stop_token_ids", f"stop_token_ids must be a list of at most "
                                             f"{MAX_STOP_IDS} token ids")
    ids = list(dict.fromkeys(ids))
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == CHAT:
        if lp is not None and not isinstance(lp, bool):
            raise RequestError("logprobs", "logprobs must be a bool for a chat request")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool)
                                or not 0 <= top <= MAX_TOP_LOGPROBS):
            raise RequestError("top_logprobs", f"top_logprobs must be an integer in "
                                               f"[0, {MAX_TOP_LOGPROBS}]")
        if top and not lp:
            raise RequestError("top_logprobs", "top_logprobs needs logprobs: true")
        k = (top or 0) if lp else None
    else:
        lp = None if lp is False else lp  # false: off, as null (clients send it so)
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool)
                               or not 0 <= lp <= MAX_TOP_LOGPROBS):
            raise RequestError("logprobs", f"logprobs must be an integer in "
                                           f"[0, {MAX_TOP_LOGPROBS}] for a completion request")
        k = lp
    echo = _typed(body, "echo", bool, False) if kind == COMPLETION else False
    return OutputPolicy(tuple(stop), tuple(ids), k, echo)


def _messages(body: dict) -> dict:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages", "messages must be a non-empty list")
    for m in msgs:
        if (not isinstance(m, dict) or set(m) != {"role", "content"}
                or not isinstance(m["role"], str) or not isinstance(m["content"], str)):
            raise RequestError("messages", "each message must be {role, content} with string "
                                           "values (no names, tool calls or content parts)")
    return {"messages": msgs}


def _prompt(body: dict) -> dict:
    """{"prompt": text} or {"prompt": [token ids]} (what evaluation harnesses send: the ids are
    bound as they are, no tokenizer in between)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the client's list form of one prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt):
        return {"prompt": prompt}
    if not isinstance(prompt, str):
        raise RequestError("prompt", "prompt must be a string, a list of token ids, or a list of "
                                     "one of them (one prompt per request)")
    return {"prompt": prompt}


def _max_tokens(body: dict) -> tuple[str, int | None]:
    got = {k: _typed(body, k, int, None) for k in ("max_tokens", "max_completion_tokens")}
    got = {k: v for k, v in got.items() if v is not None}
    if len(set(got.values())) > 1:
        raise RequestError("max_completion_tokens", "max_tokens and max_completion_tokens differ")
    for k, v in got.items():
        if v < 1:
            raise RequestError(k, f"{k} must be >= 1")
    key = "max_completion_tokens" if "max_completion_tokens" in got else "max_tokens"
    return key, got.get(key)


def mismatch(req: ClientRequest, receipt: dict, params: SamplingParams) -> str | None:
    """Why the receipt (already structurally checked) is not an answer to this request, or None.
    params: the decode policy the receipt commits, with the seed the opening revealed."""
    from .commitment import canonical_json

    if canonical_json(req.binding) != canonical_json(receipt["request"]):
        what = "messages" if req.kind == CHAT else "prompt"
        return f"the receipt's request is not the client's {req.kind} request ({what} differs)"
    man = receipt["manifest"]
    want = req.sampling(params.seed)
    if canonical_json(want.manifest()) != canonical_json(man["sampling"]):
        return (f"decode settings: the client asked {want.manifest()}, the receipt has "
                f"{man['sampling']}")
    if not want.greedy:
        seed = req.seed if req.seed is not None else default_seed(receipt["nonce"])
        if seed != params.seed:
            return ("seed: the revealed seed differs from the client's" if req.seed is not None
                    else "seed: the client fixed none, and the revealed seed is not the one the "
                         "receipt's nonce implies")
    lim = man["limits"]
    mt = req.max_tokens
    if mt is None:
        mt = default_max_tokens(req.kind, len(receipt["prompt_token_ids"]), lim["context_length"])
    if mt != lim["max_tokens"]:
        asked = f"asked {mt}" if req.max_tokens is not None else f"left it out, so it is {mt}"
        return f"{req.max_tokens_param}: the client {asked}, the receipt has {lim['max_tokens']}"
    if req.nonce is not None and req.nonce != receipt["nonce"]:
        return "nonce: the receipt does not carry the client's nonce"
    if canonical_json(req.output.manifest()) != canonical_json(man["output"]):
        return (f"stop/logprobs/echo: the client asked {req.output.manifest()}, the receipt has "
                f"{man['output']}")
    return None
