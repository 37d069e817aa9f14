"""Load a model, open the store, start the worker and serve with uvicorn."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from ..batching import DEFAULT_TOKEN_BUDGET
from ..exact.paged import KVPool, default_kv_bytes
from ..runner import EngineError, Runner
from .app import ServerConfig, create_app
from .protocol import Limits
from .store import SqliteStore
from .worker import Worker


def build(model: str, profile: str, store_dir: Path, console, *, served_name: str | None = None,
          retention_days: float = 0.0, max_batch: int = 16, max_concurrent: int = 64,
          max_body_bytes: int = 1 << 20, max_tokens_cap: int | None = None, tp: int = 1,
          tp_timeout: float = 60.0, on_fatal=None, api_key: str | None = None,
          audit_key: str | None = None, max_audit_queue: int = 4,
          max_opening_bytes: int = 1 << 30, batching: str = "continuous",
          token_budget: int = DEFAULT_TOKEN_BUDGET, kv_cache_mib: int | None = None,
          prefix_cache: bool = True):
    """(app, worker, store). Raises EngineError on a bad model. With tp > 1 (or under torchrun)
    the model is sharded over tp ranks; worker.stop() then stops them, and on_fatal(message) is
    called if the group fails while serving. Continuous batching on one process keeps K/V rows
    in a paged pool of kv_cache_mib (default: default_kv_bytes) with prefix caching."""
    if api_key is not None and audit_key is not None and api_key == audit_key:
        raise EngineError("the audit key must differ from the client API key")
    runner = Runner.create(model, "exact", profile, console, tp=tp, tp_timeout=tp_timeout)
    try:
        if runner.tokenizer is None:
            raise EngineError("serving needs a tokenizer (tokenizer.json) next to the model")
        store = SqliteStore(store_dir, retention_days * 86400.0)
        store.purge()
    except BaseException:
        runner.close()
        raise
    kv_bytes = None
    if batching == "continuous" and runner.tp is None:
        cfg_, prof = runner.loaded.cfg, runner.model.profile
        kv_bytes = (kv_cache_mib << 20 if kv_cache_mib is not None
                    else default_kv_bytes(cfg_, prof, max_batch,
                                             device=getattr(runner.model, "device", None)))
        if kv_bytes < KVPool.bytes_for(cfg_, prof, 1):
            runner.close()
            store.close()
            raise EngineError(f"--kv-cache-mib {kv_cache_mib} holds no K/V block")
    worker = Worker(runner.model, runner.tokenizer, runner.eos_ids(), store,
                    {"model": model if model == "default" else str(Path(model).resolve()),
                     "profile": profile}, max_batch=max_batch,
                    heartbeat_s=tp_timeout / 4 if runner.tp is not None else None,
                    on_fatal=on_fatal, release=runner.close, batching=batching,
                    token_budget=token_budget, kv_cache_bytes=kv_bytes,
                    prefix_cache=prefix_cache)
    name = served_name or (runner.loaded.folder.name if model != "default" else "default")
    cfg = ServerConfig(name, Limits(runner.loaded.cfg.max_position_embeddings, max_tokens_cap),
                       max_body_bytes, max_concurrent, api_key, audit_key, max_audit_queue,
                       max_opening_bytes)
    return create_app(worker, cfg), worker, store


class Shutdown:
    """on_fatal for the server run by serve(): say why, then stop it as Ctrl-C would."""

    def __init__(self, console):
        self.console, self.server = console, None

    def __call__(self, message: str) -> None:
        self.console.print(f"error: {message}; shutting down", highlight=False, markup=False)
        if self.server is not None:
            self.server.should_exit = True


class _Signalled(Exception):
    pass


def _raise_signalled(_sig, _frame):
    raise _Signalled


class AccessLog:
    """ASGI middleware: one line per request in the usual access-log form, with the tokens
    generated and the milliseconds taken:
    ``127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 16 tokens 412 ms``."""

    MAX_BODY = 8 << 20  # completions bodies are small; larger ones are not parsed for tokens

    def __init__(self, app, console):
        self.app, self.console = app, console

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, state = time.perf_counter(), {"status": 0, "body": bytearray(), "tokens": None}

        async def logged_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if len(state["body"]) + len(body) <= self.MAX_BODY:
                    state["body"] += body
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            tokens = _tokens(bytes(state["body"]))
            self.console.print(
                f'{client[0]}:{client[1]} - "{scope.get("method", "-")} {scope.get("path", "")} '
                f'HTTP/{scope.get("http_version", "1.1")}" {state["status"] or 500} '
                f'{"-" if tokens is None else tokens} tokens '
                f"{(time.perf_counter() - t0) * 1000:.0f} ms", highlight=False, markup=False)


def _tokens(body: bytes) -> int | None:
    """Generated tokens in a completions answer (JSON, or the SSE chunk with the receipt)."""
    from ...verifier.safejson import JSONError, loads

    if b'"receipt"' not in body:
        return None
    docs = [body]
    if body.lstrip().startswith(b"data:"):
        docs = [ln[5:] for ln in body.splitlines() if ln.startswith(b"data:") and b'"receipt"' in ln]
    for d in docs:
        try:
            rec = loads(d, max_bytes=len(d)).get("receipt")
            return len(rec["output_token_ids"])
        except (JSONError, AttributeError, KeyError, TypeError, UnicodeDecodeError):
            continue
    return None


def serve(app, host: str, port: int, shutdown: Shutdown | None = None, console=None) -> bool:
    """Run uvicorn until Ctrl-C, SIGTERM or shutdown(); False when it could not start (the
    reason is logged). uvicorn re-raises the signal that stopped it: caught here, so the caller
    still stops the worker (and the tensor-parallel ranks) cleanly. With a console: prints
    "listening on http://HOST:PORT" once bound, and one access-log line per request."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and console is not None and self.servers:
                bound = self.servers[0].sockets[0].getsockname()
                console.print(f"listening on http://{host}:{bound[1]} (OpenAI base URL "
                              f"http://{host}:{bound[1]}/v1)", highlight=False, markup=False)

    if console is not None:
        app = AccessLog(app, console)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                    timeout_graceful_shutdown=5))
    if shutdown is not None:
        shutdown.server = server
    previous = signal.signal(signal.SIGTERM, _raise_signalled)
    try:
        server.run()
    except (KeyboardInterrupt, _Signalled):
        pass
    except SystemExit:  # uvicorn exits when it cannot bind the port
        if server.started:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return server.started
