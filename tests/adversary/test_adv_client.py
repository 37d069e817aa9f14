"""What the client saw is what was verified: the content a client received (chat
`message.content`, completion `text`, the concatenation of streamed deltas) is compared with the
receipt's text, and the request is taken only from the client's own record of the exchange,
never from anything inside the server's answer. Every profile."""

from __future__ import annotations

import copy

import pytest
from advworld import CHAT_TEXT, World, assert_rejected, quantized
from commitllm.verifier.client import ExchangeError, from_saved

PROFILES = ("w8a16", "a8", "w16a16")
USER = [{"role": "user", "content": CHAT_TEXT}]


@pytest.fixture(scope="module", params=PROFILES)
def pworld(request, tiny_llama) -> World:
    return World(quantized(tiny_llama, request.param))


def _completion(w: World, text: str | None = None) -> dict:
    r = w.served.receipt
    return {"id": "cmpl-1", "object": "text_completion", "model": "tiny", "receipt": r,
            "choices": [{"index": 0, "text": r["text"] if text is None else text,
                         "finish_reason": "length", "logprobs": None}]}


def _chunks(w: World, pieces: list[str]) -> list[dict]:
    base = {"id": "cmpl-2", "object": "text_completion", "model": "tiny"}
    out = [base | {"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
    out[-1] = out[-1] | {"receipt": w.served.receipt}
    return out


def _split(text: str) -> list[str]:
    k = max(1, len(text) // 3)
    return [text[i:i + k] for i in range(0, len(text), k)] or [""]


def _check(w: World, saved: dict):
    ex = from_saved(saved)
    c = w.challenge(ex.receipt, "routine")
    return ex, w.verify(ex.receipt, c, *w.open(w.served, c), **ex.verify_kwargs())


def _saved(w: World, **kw) -> dict:
    return {"endpoint": "/v1/completions", "request": w.client_request(), **kw}


def test_honest_response_and_stream_accept(pworld):
    w = pworld
    for saved in (_saved(w, response=_completion(w)),
                  _saved(w, chunks=_chunks(w, _split(w.served.receipt["text"])))):
        ex, v = _check(w, saved)
        assert v.accepted, v.to_json()
        assert {"request", "text"} <= {c["check"] for c in v.checks if c["ok"]}


def test_response_text_differs_from_the_receipt(pworld):
    """The server shows the client other text than the receipt it attaches (the receipt is an
    honest one: only what the client read differs)."""
    w = pworld
    _, v = _check(w, _saved(w, response=_completion(w, w.served.receipt["text"] + " Buy ACME.")))
    assert_rejected(v, "text_mismatch")


@pytest.mark.parametrize("edit", ["altered", "dropped", "added", "reordered"])
def test_streamed_deltas_altered(pworld, edit):
    w = pworld
    pieces = _split(w.served.receipt["text"] + "zz")  # 'zz' keeps a split of >= 2 pieces
    pieces[-1] = pieces[-1][:-2] if len(pieces[-1]) > 2 else pieces[-1]
    pieces = [p for p in pieces if p] or ["x"]
    honest = "".join(pieces)
    assert honest == w.served.receipt["text"] or not w.served.receipt["text"]
    bad = {"altered": [p + "!" for p in pieces], "dropped": pieces[1:] if len(pieces) > 1 else [],
           "added": pieces + [" and more"], "reordered": pieces[::-1] + ["!"]}[edit]
    if "".join(bad) == honest:
        bad = bad + ["!"]
    _, v = _check(w, _saved(w, chunks=_chunks(w, bad or [""])))
    assert_rejected(v, "text_mismatch")


def test_request_is_never_taken_from_the_server_answer(pworld):
    """A server answer carrying a "request" of the server's choosing (what it served, not what
    the client sent), saved as the client's file: no request is checked, and none claimed."""
    w = pworld
    forged_request = {"prompt": "x", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95,
                      "top_k": 30, "seed": 4242}
    resp = _completion(w) | {"request": forged_request}
    ex, v = _check(w, resp)
    assert ex.request is None and ex.text is None
    assert v.accepted and "request" not in {c["check"] for c in v.checks}
    # a record with keys no client record has is not taken for one (refused, fail closed)
    with pytest.raises(ExchangeError):
        from_saved({"request": forged_request, "response": resp, "note": "x"})


def test_saved_request_is_checked_against_the_receipt(pworld):
    w = pworld
    saved = _saved(w, response=_completion(w))
    saved["request"] = saved["request"] | {"max_tokens": 15}
    assert_rejected(_check(w, saved)[1], "request_mismatch")


def test_chat_content(chat_world):
    w = chat_world
    r = w.served.receipt
    resp = {"object": "chat.completion", "receipt": r, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": r["text"]}}]}
    req = {"messages": USER, "max_tokens": 8, "temperature": 0}
    saved = {"endpoint": "/v1/chat/completions", "request": req, "response": resp}
    assert _check(w, saved)[1].accepted
    bad = copy.deepcopy(saved)
    bad["response"]["choices"][0]["message"]["content"] = "Something else."
    assert_rejected(_check(w, bad)[1], "text_mismatch")
    chunks = [{"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": r["text"][:3]}}]},
        {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": r["text"][3:]}}], "receipt": r}]
    stream = {"endpoint": "/v1/chat/completions", "request": req, "chunks": chunks}
    assert _check(w, stream)[1].accepted
    chunks[0]["choices"][0]["delta"]["content"] = "X"
    assert_rejected(_check(w, stream)[1], "text_mismatch")


@pytest.mark.parametrize("saved", [
    {"request": {}, "chunks": []},
    {"request": {}, "chunks": [{"choices": [{"text": "a"}]}]},  # no receipt
    {"request": {}, "response": {"object": "text_completion", "choices": []}},
    {"request": {}, "response": {"object": "chat.completion", "receipt": {"receipt_id": "x"},
                                 "choices": [{"message": "not an object"}]}},
    {"endpoint": "/v1/embeddings", "request": {}, "receipt": {"receipt_id": "x"}},
    [1, 2]])
def test_malformed_saved_exchanges_are_refused(saved):
    with pytest.raises(ExchangeError):
        from_saved(saved)


def test_two_receipts_in_one_stream_refused(world):
    r = world.served.receipt
    chunks = [{"object": "text_completion", "choices": [{"text": "a"}], "receipt": r},
              {"object": "text_completion", "choices": [{"text": "b"}], "receipt": r}]
    with pytest.raises(ExchangeError, match="exactly one receipt"):
        from_saved({"request": {"prompt": "x"}, "chunks": chunks})
