"""What a client saves of one exchange, and what the verifier takes from it.

A saved exchange is the client's own record, written as the exchange happens (docs/SERVING.md):

    {"endpoint": "/v1/chat/completions",      # the path it called (optional: else the shape says)
     "request":  {...},                        # the body exactly as it sent it
     "response": {...}}                        # the body exactly as it received it
    or "chunks": [{...}, ...] instead of "response" for a streamed answer (every SSE data object)

From it the verifier takes the request (only from the client's "request", never from anything
inside the server's answer), the content the client received (chat `message.content`, completion
`text`, or the concatenation of the streamed deltas) and the receipt. A bare receipt or a bare
server response also loads, with nothing of the client's to compare (request None, text None).
"""

from __future__ import annotations

from dataclasses import dataclass

from .request import CHAT, COMPLETION, ENDPOINTS, RequestError, kind_of

EXCHANGE_KEYS = {"endpoint", "request", "response", "chunks", "receipt"}


class ExchangeError(ValueError):
    """A saved exchange that cannot be read (code exchange_malformed)."""


@dataclass
class Exchange:
    receipt: dict
    request: dict | None = None  # the request as the client sent it (None: not saved)
    endpoint: str | None = None
    text: str | None = None  # the content the client received (None: not saved)

    def verify_kwargs(self) -> dict:
        """verify()'s client-side inputs: everything this exchange holds of the client's."""
        nonce = self.request.get("nonce") if isinstance(self.request, dict) else None
        return {"expected_nonce": nonce if isinstance(nonce, str) else None,
                "expected_request": self.request, "expected_endpoint": self.endpoint,
                "expected_text": self.text}


def is_exchange(obj) -> bool:
    """A client's record (request + response/chunks/receipt), not a server's answer that might
    carry a "request" of the server's choosing."""
    return (isinstance(obj, dict) and "request" in obj and set(obj) <= EXCHANGE_KEYS
            and sum(k in obj for k in ("response", "chunks", "receipt")) == 1)


def from_saved(obj) -> Exchange:
    """The Exchange of a saved object (an exchange, a server response, or a receipt)."""
    if not isinstance(obj, dict):
        raise ExchangeError("not a JSON object")
    if ("request" in obj and "choices" not in obj and "receipt_id" not in obj
            and not is_exchange(obj)):  # neither a receipt nor a server answer (whose "request"
        # is the server's, never read) but a client's record we cannot read whole:
        extra = sorted(str(k)[:40] for k in set(obj) - EXCHANGE_KEYS)[:8]  # never drop the
        raise ExchangeError(  # request silently and audit the receipt alone
            "a saved exchange must hold 'request' and exactly one of 'response', 'chunks', "
            f"'receipt' (and 'endpoint'){f'; unknown fields {extra}' if extra else ''}")
    if not is_exchange(obj):  # nothing of the client's: only the receipt is read
        return Exchange(_receipt_of(obj))
    request, endpoint = obj["request"], obj.get("endpoint")
    if endpoint is not None and endpoint not in ENDPOINTS:
        raise ExchangeError(f"unknown endpoint {str(endpoint)[:60]!r}")
    kind = _kind(request, endpoint)
    if "receipt" in obj:
        return Exchange(_receipt_of(obj["receipt"]), request, endpoint)
    if "response" in obj:
        resp = obj["response"]
        return Exchange(_receipt_of(resp), request, endpoint, response_text(resp, kind))
    receipt, text = streamed(obj["chunks"], kind)
    return Exchange(receipt, request, endpoint, text)


def _kind(request, endpoint) -> str | None:
    try:
        return kind_of(request, endpoint) if isinstance(request, dict) else None
    except RequestError:
        return None  # verify() refuses the request itself, with its reason


def _receipt_of(obj) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("receipt"), dict):
        return obj["receipt"]
    if isinstance(obj, dict) and "receipt_id" in obj:
        return obj
    raise ExchangeError("no receipt in it")


def _choice(obj) -> dict:
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ExchangeError("a response must hold exactly one choice")
    return choices[0]


def _kind_of_response(obj, kind: str | None) -> str:
    if kind is not None:
        return kind
    kinds = {"chat.completion": CHAT, "chat.completion.chunk": CHAT,
             "text_completion": COMPLETION}
    k = kinds.get(obj.get("object")) if isinstance(obj, dict) else None
    if k is None:
        raise ExchangeError("cannot tell a chat response from a completion")
    return k


def _field(obj, key: str):
    return obj.get(key) if isinstance(obj, dict) else None


def response_text(resp, kind: str | None) -> str:
    """The content a client reads from a non-streamed response."""
    kind, c = _kind_of_response(resp, kind), _choice(resp)
    text = _field(c.get("message"), "content") if kind == CHAT else c.get("text")
    if not isinstance(text, str):
        raise ExchangeError(f"the response has no {'message content' if kind == CHAT else 'text'}")
    return text


def streamed(chunks, kind: str | None) -> tuple[dict, str]:
    """(receipt, concatenated content) of a streamed answer's data objects."""
    if not isinstance(chunks, list) or not chunks:
        raise ExchangeError("chunks must be a non-empty list of the stream's data objects")
    parts, receipts = [], []
    for ch in chunks:
        if not isinstance(ch, dict):
            raise ExchangeError("a chunk is not a JSON object")
        if "receipt" in ch:
            receipts.append(_receipt_of(ch))
        if not ch.get("choices"):
            continue  # the usage chunk
        k, c = _kind_of_response(ch, kind), _choice(ch)
        piece = _field(c.get("delta"), "content") if k == CHAT else c.get("text")
        if piece is not None and not isinstance(piece, str):
            raise ExchangeError("a chunk's content is not a string")
        parts.append(piece or "")
    if len(receipts) != 1:
        raise ExchangeError(f"a stream carries exactly one receipt, this one {len(receipts)}")
    return receipts[0], "".join(parts)
