"""OpenAI request parsing and response shapes. A request is either fully understood and
verifiable, or refused with a 4xx and one clear message: nothing is silently ignored. Which
fields exist, their types and ranges are verifier/request.py's, the list the verifier checks a
client's saved request against (one list: what is served is what verifies)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ...verifier import request as request_mod
from ...verifier.outputs import returned_text
from ..receipts import SeqRequest


class ApiError(Exception):
    """Refused request: HTTP status, one-line message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

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
    max_tokens_cap: int | None = None  # refuse requests whose max_tokens (given or default) exceed it


def parse(body, kind: str, model_id: str, tokenizer, limits: Limits) -> Parsed:
    """The SeqRequest for an OpenAI body (kind 'chat' or 'completion'); raises ApiError."""
    try:
        req = request_mod.parse(body, kind)
    except request_mod.RequestError as e:
        raise ApiError(400, str(e), e.param) from None
    if req.model != model_id:
        raise ApiError(404, f"unknown model {req.model!r}; this server serves {model_id!r}",
                       "model", "model_not_found")
    prompt_ids = _messages(req, tokenizer) if kind == "chat" else _prompt(req, tokenizer)
    max_tokens = _max_tokens(req, len(prompt_ids), limits)
    nonce = req.nonce if req.nonce is not None else os.urandom(16).hex()
    params = req.sampling(request_mod.default_seed(nonce))  # the client's seed if given
    if req.stream and req.output.logprobs is not None:
        raise ApiError(400, "logprobs are served without streaming (stream: false): they are "
                            "committed in the receipt, which comes with the last chunk", "stream")
    if req.output.stop and tokenizer is None:
        raise ApiError(400, "stop strings need the model's tokenizer", "stop")
    seq = SeqRequest(req.binding, prompt_ids, params, max_tokens, nonce, output=req.output)
    return Parsed(seq, req.stream, req.include_usage)


def _messages(req, tokenizer) -> list[int]:
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        return tokenizer.encode_chat(req.binding["messages"])
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None


def _prompt(req, tokenizer) -> list[int]:
    prompt = req.binding["prompt"]
    if isinstance(prompt, list):  # the client's token ids, bound as sent
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        if vocab is not None and max(prompt) >= vocab:
            raise ApiError(400, f"prompt token id {max(prompt)} is not below the vocabulary size "
                                f"{vocab}", "prompt")
        return list(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ApiError(400, "prompt is empty", "prompt")
    return ids


def _max_tokens(req, n_prompt: int, limits: Limits) -> int:
    ctx, key, mt = limits.context_length, req.max_tokens_param, req.max_tokens
    if n_prompt >= ctx:
        raise ApiError(400, f"the prompt has {n_prompt} tokens; the context holds {ctx} "
                            f"(at least one must be left to generate)", "messages")
    if mt is None:  # the protocol's rule, which the verifier checks (not the server's choice)
        mt = request_mod.default_max_tokens(req.kind, n_prompt, ctx)
    elif n_prompt + mt > ctx:
        raise ApiError(400, f"{n_prompt} prompt tokens + {key} {mt} exceed the context length "
                            f"{ctx}", key)
    cap = limits.max_tokens_cap
    if cap is not None and mt > cap:  # refused, never cut short (the receipt would not verify)
        given = f"{key} {mt}" if req.max_tokens is not None else f"{key} left out means {mt}"
        raise ApiError(400, f"{given}; this server generates at most {cap} tokens per request",
                       key)
    return mt
    if n_prompt + mt > ctx:
        raise ApiError(400, f"{n_prompt} prompt tokens + {key} {mt} exceed the context length "
                            f"{ctx}", key)
    if limits.max_tokens_cap is not None and mt > limits.max_tokens_cap:
        raise ApiError(400, f"{key} {mt}: this server generates at most {limits.max_tokens_cap} "
                            f"tokens per request", key)
    return mt


# --- responses ----------------------------------------------------------------------------------

def finish(reason: str | None) -> str:
    return "stop" if reason in ("eos", "stop") else "length"


def usage(receipt: dict) -> dict:
    p, c = len(receipt["prompt_token_ids"]), len(receipt["output_token_ids"])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _token(tokenizer, i: int) -> str:
    return tokenizer.decode([i], skip_special_tokens=False)


def chat_logprobs(receipt: dict, tokenizer) -> dict | None:
    """OpenAI's chat `logprobs` ({content: [...]}) rendered from the receipt's committed ones."""
    lp = receipt["logprobs"]
    if lp is None:
        return None

    def one(i, v):
        t = _token(tokenizer, i)
        return {"token": t, "logprob": v, "bytes": list(t.encode())}
    return {"content": [one(i, e[0]) | {"top_logprobs": [one(j, w) for j, w in e[1]]}
                        for i, e in zip(receipt["output_token_ids"], lp["output"])]}


def completion_logprobs(receipt: dict, tokenizer) -> dict | None:
    """The completions `logprobs` ({tokens, token_logprobs, top_logprobs, text_offset}) from the
    receipt; with echo the prompt's tokens come first (the first has no logprob)."""
    lp = receipt["logprobs"]
    if lp is None:
        return None
    ids, entries = list(receipt["output_token_ids"]), list(lp["output"])
    if lp["prompt"] is not None:
        ids = receipt["prompt_token_ids"] + ids
        entries = [None, *lp["prompt"], *entries]
    tokens = [_token(tokenizer, i) for i in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {_token(tokenizer, j): w for j, w in e[1]}
                             for e in entries],
            "text_offset": offsets}


def response(kind: str, rid: str, model_id: str, receipt: dict, reason: str | None,
             tokenizer=None) -> dict:
    choice = {"index": 0, "finish_reason": finish(reason), "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": receipt["text"]}
        choice["logprobs"] = chat_logprobs(receipt, tokenizer)
    else:
        choice["text"] = returned_text(receipt, tokenizer)
        choice["logprobs"] = completion_logprobs(receipt, tokenizer)
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
