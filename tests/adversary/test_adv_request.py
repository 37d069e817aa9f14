"""The request is the client's, whole: every field that changes what the engine computes is
compared with what the client saved (verify(expected_request=..., expected_endpoint=...)), in
every profile; chat vs completion comes from the request's shape and the endpoint the client
called, never from a flag the provider sets; a field the verifier does not know is refused.
Both directions: each form the server accepts verifies when served honestly."""

from __future__ import annotations

import dataclasses

import pytest
from commitllm.verifier import request as request_mod
from advworld import CHAT_TEXT, GREEDY, NONCE, SAMPLED, World, assert_rejected, quantized

PROFILES = ("w8a16", "a8", "w16a16")
USER = [{"role": "user", "content": CHAT_TEXT}]


@pytest.fixture(scope="module", params=PROFILES)
def pworld(request, tiny_llama) -> World:
    """The tiny Llama served with SAMPLED settings, keyed and served under each profile."""
    return World(quantized(tiny_llama, request.param))


def _audit(w: World, s, req, **kw):
    return w.audit(s, tier="routine", expected_request=req, **kw)


# --- every bound field: tampered by the provider, or left at a default the provider ignored ----

def _tampers(w: World):
    """(name, what the provider serves, the client's request)."""
    full = w.client_request()
    bare = {k: v for k, v in full.items() if k not in ("temperature", "top_p", "top_k")}
    return [
        ("temperature", {"params": dataclasses.replace(SAMPLED, temperature=0.5)}, full),
        ("top_p", {"params": dataclasses.replace(SAMPLED, top_p=0.5)}, full),
        ("top_k", {"params": dataclasses.replace(SAMPLED, top_k=3)}, full),
        ("seed", {"params": dataclasses.replace(SAMPLED, seed=99)}, full),
        ("max_tokens", {"max_tokens": 12}, full),
        ("prompt", {"request": {"prompt": "y"}}, full),
        ("prompt-list", {"request": {"prompt": "y"}}, full | {"prompt": ["x"]}),
        ("nonce", {"nonce": "provider-nonce"}, full | {"nonce": NONCE}),
        # the client left these to OpenAI's defaults (1.0, 1.0, 0); SAMPLED is 0.9, 0.95, 30
        ("default-temperature", {}, bare | {"top_p": 0.95, "top_k": 30}),
        ("default-top_p", {}, bare | {"temperature": 0.9, "top_k": 30}),
        ("default-top_k", {}, bare | {"temperature": 0.9, "top_p": 0.95}),
        ("greedy-for-default", {"params": GREEDY}, bare),
        # the client left these to the protocol's rule: the seed its nonce implies, OpenAI's
        # max_tokens (16 on /v1/completions); the provider chose its own
        ("default-seed", {}, _without(full, "seed")),
        ("default-max_tokens", {"max_tokens": 5}, _without(full, "max_tokens")),
    ]


def _without(req: dict, *keys: str) -> dict:
    return {k: v for k, v in req.items() if k not in keys}


TAMPERS = [
    "temperature", "top_p", "top_k", "seed", "max_tokens", "prompt", "prompt-list", "nonce",
    "default-temperature", "default-top_p", "default-top_k", "greedy-for-default",
    "default-seed", "default-max_tokens"]


@pytest.mark.parametrize("name", TAMPERS)
def test_bound_field_tampered(pworld, name):
    w = pworld
    serve, req = next((s, r) for n, s, r in _tampers(w) if n == name)
    s = w.serve(**serve) if serve else w.served
    assert_rejected(_audit(w, s, req, expected_nonce=None), "request_mismatch")


HONEST_FORMS = {
    "every-field": lambda r: r,
    "prompt-list": lambda r: r | {"prompt": ["x"]},
    "with-nonce": lambda r: r | {"nonce": NONCE},
    "inert-fields": lambda r: r | {"model": "tiny", "stream": True, "user": "u1",
                                   "stream_options": {"include_usage": True}},
    "neutral-fields": lambda r: r | {"n": 1, "stop": None, "logprobs": False, "echo": False,
                                     "presence_penalty": 0, "frequency_penalty": 0.0,
                                     "logit_bias": {}, "best_of": 1, "suffix": ""},
    "nulls": lambda r: r | {"stop": None, "user": None},
    "int-temperature": lambda r: r,  # see test_honest_int_settings
}


@pytest.mark.parametrize("form", sorted(HONEST_FORMS))
def test_honest_request_forms_accept(pworld, form):
    w = pworld
    v = _audit(w, w.served, HONEST_FORMS[form](w.client_request()),
               expected_endpoint="/v1/completions")
    assert v.accepted, v.to_json()
    assert any(c["check"] == "request" and c["ok"] for c in v.checks)


def test_honest_int_settings(world):
    """temperature 1 and top_p 1 sent as JSON integers verify like 1.0 (the server's float())."""
    p = dataclasses.replace(SAMPLED, temperature=1.0, top_p=1.0)
    s = world.serve(params=p)
    req = {"prompt": "x", "max_tokens": 16, "temperature": 1, "top_p": 1, "top_k": 30,
           "seed": SAMPLED.seed}
    assert _audit(world, s, req).accepted


def test_honest_defaults_accept(pworld):
    """A client that fixes neither seed nor max_tokens: the honest server's defaults (the seed
    from the nonce, 16 tokens on a completion) verify; the same receipt under the client's
    request with a seed it did not send does not (the rule is what the verifier checks)."""
    w = pworld
    s = w.serve(params=dataclasses.replace(SAMPLED, seed=request_mod.default_seed(NONCE)),
                max_tokens=request_mod.DEFAULT_COMPLETION_MAX_TOKENS)
    req = _without(w.client_request(), "seed", "max_tokens")
    v = _audit(w, s, req, expected_endpoint="/v1/completions")
    assert v.accepted, v.to_json()
    assert_rejected(_audit(w, s, req | {"seed": SAMPLED.seed}), "request_mismatch")


def test_chat_default_max_tokens_is_the_rest_of_the_context(chat_world):
    """A chat request without max_tokens: the rest of the context, as OpenAI; a provider that
    cut it short (a smaller limit, its answer stopped at that length) is rejected."""
    w = chat_world
    ctx = w.key.meta["config"]["max_position_embeddings"]
    rest = ctx - len(w.prompt)
    req = {"messages": USER, "temperature": 0}
    honest = w.serve(params=GREEDY, max_tokens=rest, request={"messages": USER})
    v = _audit(w, honest, req, expected_endpoint="/v1/chat/completions")
    assert v.accepted, v.to_json()
    short = w.serve(params=GREEDY, max_tokens=2, request={"messages": USER})
    assert_rejected(_audit(w, short, req, expected_endpoint="/v1/chat/completions"),
                    "request_mismatch")


def test_greedy_honest_without_seed(world):
    s = world.serve(params=GREEDY)
    req = {"prompt": "x", "max_tokens": 16, "temperature": 0}
    v = _audit(world, s, req)
    assert v.accepted, v.to_json()


# --- fields the verifier does not know, or knows only at their neutral value --------------------

UNKNOWN = {"unknown-field": {"foo": 1}, "five-stop-strings": {"stop": list("abcde")},
           "empty-stop-string": {"stop": ["\n", ""]}, "stop-not-text": {"stop": [1]},
           "logprobs": {"logprobs": True}, "penalty": {"presence_penalty": 0.5},
           "n": {"n": 2}, "top-logprobs-in-completion": {"top_logprobs": 1},
           "logprobs-over-20": {"logprobs": 21}, "echo-not-bool": {"echo": 1},
           "chat-only-field-in-completion": {"max_completion_tokens": 16},
           "messages-and-prompt": {"messages": USER}, "not-an-object": None,
           "bad-type": {"top_k": 1.5}, "bool-as-int": {"max_tokens": True},
           "nan": {"temperature": float("nan")}, "long-nonce": {"nonce": "n" * 257},
           "stream-options": {"stream_options": {"foo": True}}}


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_unknown_or_unsupported_field_refused(pworld, name):
    w = pworld
    req = None if UNKNOWN[name] is None else w.client_request() | UNKNOWN[name]
    v = _audit(w, w.served, [] if req is None else req)
    assert_rejected(v, "request_invalid")


def test_max_tokens_and_max_completion_tokens_disagree(chat_world):
    w = chat_world
    req = {"messages": USER, "max_tokens": 8, "max_completion_tokens": 9, "temperature": 0}
    assert_rejected(_audit(w, w.served, req), "request_invalid")


# --- chat vs completion: from the request and the endpoint, never from the provider -------------

def test_chat_template_applied_to_a_completion_request(chat_world):
    """The client sent a plain completion; the provider wrapped it in the chat template (and
    said so in its own manifest on main: `chat: true`). The receipt keeps the client's prompt."""
    w = chat_world
    s = w.serve(request={"prompt": CHAT_TEXT})  # w.prompt is the chat-templated prompt
    req = {"prompt": CHAT_TEXT, "max_tokens": 8, "temperature": 0}
    assert_rejected(_audit(w, s, req, expected_endpoint="/v1/completions"), "prompt_binding")
    assert_rejected(_audit(w, s, None), "prompt_binding")  # also without the client's request


def test_provider_set_chat_flag_is_refused(chat_world):
    """A receipt whose manifest carries a `chat: true` flag (receipt v1's) for a plain prompt
    does not switch the verifier to the chat template: the field is unknown (fail closed)."""
    w = chat_world
    s = World.claim(w.serve(request={"prompt": CHAT_TEXT}), chat=True)
    assert_rejected(_audit(w, s, None), "receipt_malformed")


def test_chat_request_served_as_completion(chat_world):
    """The client sent messages; the provider claims (and ran) the plain prompt."""
    w = chat_world
    prompt = w.tokenizer.encode(CHAT_TEXT)
    s = w.serve(request={"prompt": CHAT_TEXT}, prompt=prompt)
    req = {"messages": USER, "max_tokens": 8, "temperature": 0}
    assert_rejected(_audit(w, s, req, expected_endpoint="/v1/chat/completions"),
                    "request_mismatch")


@pytest.mark.parametrize("endpoint,req", [
    ("/v1/chat/completions", {"prompt": CHAT_TEXT}),  # a completion body saved as a chat call
    ("/v1/completions", {"messages": USER}),
    ("/v1/embeddings", {"messages": USER})])
def test_request_does_not_fit_the_endpoint(chat_world, endpoint, req):
    w = chat_world
    v = _audit(w, w.served, req | {"max_tokens": 8, "temperature": 0}, expected_endpoint=endpoint)
    assert_rejected(v, "request_invalid")


def test_chat_honest_accepts_with_endpoint(chat_world):
    w = chat_world
    req = {"messages": USER, "max_completion_tokens": 8, "temperature": 0}
    v = _audit(w, w.served, req, expected_endpoint="/v1/chat/completions")
    assert v.accepted, v.to_json()


def test_max_completion_tokens_is_bound(chat_world):
    w = chat_world
    s = w.serve(max_tokens=20)  # the same answer (EOS comes first), a larger limit than asked
    assert s.output == w.served.output
    req = {"messages": USER, "max_completion_tokens": 8, "temperature": 0}
    assert_rejected(_audit(w, s, req), "request_mismatch")


@pytest.mark.parametrize("body", [
    {"prompt": "a\ud800", "max_tokens": 3}, {"prompt": "a", "nonce": "\udfff"},
    {"prompt": "a", "user": "\ud800"}, {"prompt": "a", "temperature": 10**400},
    {"messages": [{"role": "user", "content": "\ud800"}]},
])
def test_request_not_text_or_not_a_number_is_invalid(body):
    """A lone surrogate (JSON's \\ud800 escape) anywhere, or an int no float holds: refused by
    the one parser the server and the verifier share (the server answers 400, not 500)."""
    with pytest.raises(request_mod.RequestError):
        request_mod.parse(body)


def test_saved_exchange_with_an_unknown_field_is_not_read_as_a_bare_receipt(world):
    """A client's record with one field too many must not have its request dropped silently
    (the receipt alone would then verify, and the audit pass): exchange_malformed."""
    from commitllm.verifier import client

    obj = {"endpoint": "/v1/completions", "request": {"prompt": "other"},
           "receipt": world.served.receipt, "saved_at": "now"}
    with pytest.raises(client.ExchangeError, match="saved_at"):
        client.from_saved(obj)


def test_resealed_receipt_with_a_surrogate_in_its_request_is_malformed(chat_world):
    """The receipt's own request is text too: a lone surrogate in it is receipt_malformed (the
    structure check), before any tokenizer sees it."""
    w = chat_world
    r = w.served.receipt
    from commitllm.verifier.receipt import build_receipt

    bad = build_receipt(r["manifest"], {"messages": [{"role": "user", "content": "\ud800"}]},
                        r["nonce"], r["prompt_token_ids"], r["output_token_ids"], r["text"],
                        r["trace"])
    c = w.challenge(w.served, "routine")
    meta, arrays = w.open(w.served, c)
    assert_rejected(w.verify(bad, c, meta, arrays), "receipt_malformed")
