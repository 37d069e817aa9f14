"""The FastAPI application: OpenAI endpoints with receipts, the audit endpoint, the commitment."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...verifier import container, safejson
from ...verifier.numerics.sampler import SamplingParams
from ...verifier.opening import OPENING_MAGIC, OPENING_VERSION
from ..batching import Refused
from ..commit import Committer
from ..generate import TextDeltas
from ..open import OpenError
from .audit import BadChallenge, check_challenge, opening_bytes
from .protocol import ApiError, Limits, chunk, finish, parse, response, usage
from .worker import Job, Worker, WorkerDown

MAX_RECEIPTS_LISTED = 1000
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks for its client
AUDIT_RETRY_AFTER_S = 5  # what a 429 from a full audit queue tells the auditor
BUSY_RETRY_AFTER_S = 1  # what a 429 from too many requests in flight tells the client


@dataclass
class ServerConfig:
    model_id: str
    limits: Limits
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 64
    api_key: str | None = None  # when set, every client endpoint needs `Authorization: Bearer`
    audit_key: str | None = None  # /v1/audit and /v1/receipts: this key only (see _auditor)
    max_audit_queue: int = 4  # openings waiting or running; more get 429 with Retry-After
    max_opening_bytes: int = 1 << 30  # an answer over this is refused (413) before re-execution

    def __post_init__(self):
        if self.audit_key is not None and self.api_key is not None and hmac.compare_digest(
                self.audit_key.encode(), self.api_key.encode()):
            raise ValueError("the audit key must differ from the client API key")


class _Gate:
    """At most n requests in flight; the next one is refused (429), not queued without bound."""

    def __init__(self, n: int, what: str = "concurrent requests", retry_after: int | None = None):
        self.n, self.busy, self._lock = n, 0, threading.Lock()
        self.what, self.retry_after = what, retry_after

    def __enter__(self):
        with self._lock:
            if self.busy >= self.n:
                raise ApiError(429, f"too many {self.what} (limit {self.n}); retry later",
                               code="rate_limit_exceeded", headers=None if self.retry_after is None
                               else {"Retry-After": str(self.retry_after)})
            self.busy += 1

    def __exit__(self, *exc):
        with self._lock:
            self.busy -= 1


def _bearer(req: Request, key: str) -> bool:
    scheme, _, token = req.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def create_app(worker: Worker, cfg: ServerConfig) -> FastAPI:
    async def _client(req: Request) -> None:
        """Every client endpoint (and the API description): the client API key, when set."""
        if cfg.api_key is not None and not _bearer(req, cfg.api_key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                           code="invalid_api_key")

    async def _auditor(req: Request) -> None:
        """Openings and the receipt list (every client's requests): the audit key only. A server
        without any key is open (local use); one with client keys but no audit key audits no one."""
        if cfg.audit_key is not None and _bearer(req, cfg.audit_key):
            return
        if cfg.audit_key is None and cfg.api_key is None:
            return
        if cfg.audit_key is None:
            raise ApiError(403, "this server has no audit key (serve --audit-key)",
                           code="audit_key_required")
        if cfg.api_key is not None and _bearer(req, cfg.api_key):
            raise ApiError(403, "a client API key cannot audit: this endpoint needs the audit key",
                           code="audit_key_required")
        raise ApiError(401, "missing or wrong audit key (Authorization: Bearer <key>)",
                       code="invalid_api_key")

    client, auditor = [Depends(_client)], [Depends(_auditor)]
    app = FastAPI(title="CommitLLM", docs_url=None, redoc_url=None, openapi_url=None)
    gate = _Gate(cfg.max_concurrent, retry_after=BUSY_RETRY_AFTER_S)
    audits = _Gate(cfg.max_audit_queue, "audits queued", AUDIT_RETRY_AFTER_S)
    audit_pool = ThreadPoolExecutor(1, thread_name_prefix="commitllm-audit")  # one at a time
    committer = Committer(worker.model, worker.tokenizer)

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.get("/openapi.json", dependencies=client, include_in_schema=False)
    async def openapi():
        return app.openapi()

    @app.get("/docs", dependencies=client, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="CommitLLM")

    @app.get("/v1/models", dependencies=client)
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": 0,
                                            "owned_by": "commitllm",
                                            "model_commitment": committer.model_commitment}]}

    @app.get("/v1/commitment", dependencies=client)
    async def commitment():
        return {"model": cfg.model_id, "model_commitment": committer.model_commitment,
                "manifest": _public_manifest(committer, worker.eos_ids)}

    @app.get("/v1/stats", dependencies=client)
    async def stats():
        st = worker.stats
        return {"batching": worker.batching, "batches": st.batches, "requests": st.requests,
                "largest_batch": st.largest_batch,
                "mean_batch": st.batched / st.batches if st.batches else 0.0,
                "mean_step_tokens": st.step_tokens / st.batches
                if st.batches and worker.batching == "continuous" else None,
                "cancelled": st.cancelled, "failed": st.failed, "preemptions": st.preemptions,
                "in_flight": gate.busy, "kv_cache": worker.kv_stats()}

    @app.get("/v1/receipts", dependencies=auditor)
    async def receipts(limit: int = 100):
        if not hasattr(worker.store, "recent"):
            raise ApiError(501, "this store cannot list receipts")
        if not 1 <= limit <= MAX_RECEIPTS_LISTED:
            raise ApiError(400, f"limit must be in [1, {MAX_RECEIPTS_LISTED}]", "limit")
        data = await asyncio.to_thread(worker.store.recent, limit)
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=client)
    async def chat(req: Request):
        return await _complete(req, "chat")

    @app.post("/v1/completions", dependencies=client)
    async def completions(req: Request):
        return await _complete(req, "completion")

    @app.post("/v1/audit", dependencies=auditor)
    async def audit(req: Request):
        challenge = await _json_body(req, cfg.max_body_bytes)
        if not isinstance(challenge, dict) or not isinstance(challenge.get("mac"), str):
            raise ApiError(400, "the body must be a challenge (a JSON object with a mac)")
        try:
            transcript = await asyncio.to_thread(worker.store.get,
                                                 str(challenge.get("receipt_id")))
        except KeyError as e:
            raise ApiError(404, str(e.args[0] if e.args else e), "receipt_id",
                           "receipt_not_found") from None
        _check_shape(challenge, transcript["receipt"])
        audits.__enter__()  # the queue is bounded (429 beyond); the pool runs one at a time

        def job():
            try:
                return worker.open(challenge, transcript)
            finally:  # the slot is freed when the work is done, not when the caller gives up
                audits.__exit__()
        try:
            fut = audit_pool.submit(job)
        except BaseException:
            audits.__exit__()
            raise
        try:
            meta, arrays = await asyncio.wrap_future(fut)
        except Exception as e:  # noqa: BLE001 - every failure of the opening gets its status
            raise _open_error(e) from None
        data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
        return Response(data, media_type="application/octet-stream")

    def _check_shape(challenge, receipt) -> None:
        n_layers = worker.model.cfg.num_layers
        try:
            check_challenge(challenge, receipt, n_layers)
        except BadChallenge as e:
            raise ApiError(400, f"challenge does not fit the receipt: {e}", "challenge") from None
        size = opening_bytes(challenge, worker.model.cfg, worker.model.profile)
        if size > cfg.max_opening_bytes:
            raise ApiError(413, f"the opening would take about {size} bytes, over this server's "
                                f"{cfg.max_opening_bytes}", "challenge")

    def _open_error(e: Exception) -> ApiError:
        if isinstance(e, KeyError):
            return ApiError(404, str(e.args[0] if e.args else e), "receipt_id",
                            "receipt_not_found")
        if isinstance(e, OpenError):
            return ApiError(409, str(e), code="open_failed")
        if isinstance(e, WorkerDown):
            return _unavailable(e)
        if isinstance(e, (ValueError, TypeError, IndexError)):
            return ApiError(400, f"malformed challenge ({e})")
        return ApiError(500, f"opening failed: {e}", code="server_error")

    async def _complete(req: Request, kind: str):
        body = await _json_body(req, cfg.max_body_bytes)
        gate.__enter__()
        streaming = False
        try:
            p = parse(body, kind, cfg.model_id, worker.tokenizer, cfg.limits)
            if p.stream:
                resp = _stream(kind, p)
                streaming = True  # the stream releases the gate when it ends
                return resp
            try:
                receipt, reason = await _result(req, Job(p.seq))
            except WorkerDown as e:
                raise _unavailable(e) from None
            except Refused as e:  # the scheduler cannot run it (e.g. more than the K/V pool)
                raise ApiError(400, str(e)) from None
            except Exception as e:  # noqa: BLE001 - no receipt, no answer: say why
                raise ApiError(500, f"generation failed: {e}", code="server_error") from None
            return response(kind, _rid(kind, receipt), cfg.model_id, receipt, reason,
                            worker.tokenizer)
        finally:
            if not streaming:
                gate.__exit__()

    async def _result(req: Request, job: Job):
        """The job's (receipt, reason); a client that disconnects meanwhile cancels it."""
        fut = asyncio.wrap_future(worker.submit(job))
        while True:
            done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if done:
                return fut.result()
            if await req.is_disconnected():
                job.cancelled = True
                return await fut  # raises Cancelled unless it had just finished

    def _stream(kind: str, p):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(p.seq, lambda t: loop.call_soon_threadsafe(events.put_nowait, t))
        try:
            fut = worker.submit(job)
        except WorkerDown as e:
            raise _unavailable(e) from None
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, None))

        async def gen():
            try:
                async for item in _sse(kind, p, events, fut):
                    yield item
            finally:  # also when the client went away mid-stream: stop generating for it
                job.cancelled = not fut.done()
                gate.__exit__()
        return StreamingResponse(gen(), media_type="text/event-stream")

    async def _sse(kind, p, events: asyncio.Queue, fut):
        rid, deltas, first = _stream_id(kind), TextDeltas(worker.tokenizer, p.seq.output.stop), True
        if p.seq.output.echo:  # the prompt first, as it is returned without streaming
            prompt = p.seq.request["prompt"]
            yield _event(chunk(kind, rid, cfg.model_id, prompt if isinstance(prompt, str)
                               else worker.tokenizer.decode(prompt), first=True))
            first = False
        while (t := await events.get()) is not None:
            if delta := deltas.push(t):
                yield _event(chunk(kind, rid, cfg.model_id, delta, first=first))
                first = False
        try:
            receipt, reason = fut.result()
        except Exception as e:  # noqa: BLE001 - tell the client; no receipt, no claim
            yield _event({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
            return
        rest = deltas.rest(receipt["text"])
        last = chunk(kind, rid, cfg.model_id, rest or None, finish(reason),
                     first=first)
        last["receipt"] = receipt
        yield _event(last)
        if p.include_usage:
            yield _event({"id": rid, "object": last["object"], "choices": [],
                          "created": last["created"], "model": cfg.model_id,
                          "usage": usage(receipt)})
        yield "data: [DONE]\n\n"

    return app


def _unavailable(e: WorkerDown) -> ApiError:
    return ApiError(503, f"{e}; the server is shutting down", code="engine_unavailable")


def _rid(kind: str, receipt: dict) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + receipt["receipt_id"][:24]


def _stream_id(kind: str) -> str:
    """One id for every chunk of a stream (the receipt is not known until the last one)."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(12).hex()


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _json_body(req: Request, limit: int):
    n = req.headers.get("content-length")
    if n is not None and (not n.isdigit() or int(n) > limit):
        raise ApiError(413, f"request body larger than {limit} bytes")
    data = bytearray()
    async for part in req.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
    try:
        return safejson.loads(bytes(data), max_bytes=limit)
    except safejson.JSONError as e:
        raise ApiError(400, f"malformed JSON ({e})") from None


def _public_manifest(com: Committer, eos_ids) -> dict:
    man = com.manifest(SamplingParams(), None, 0, eos_ids)
    for k in ("sampling", "seed_commitment"):
        man.pop(k)
    man["limits"].pop("max_tokens")
    return man
