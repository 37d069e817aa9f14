"""Load a model, open the store, start the worker and serve with uvicorn."""

from __future__ import annotations

from pathlib import Path

from ..runner import Runner
from .app import ServerConfig, create_app
from .protocol import Limits
from .store import SqliteStore
from .worker import Worker


def build(model: str, profile: str, store_dir: Path, console, *, served_name: str | None = None,
          retention_days: float = 0.0, max_batch: int = 16, max_concurrent: int = 64,
          max_body_bytes: int = 1 << 20, default_max_tokens: int = 256):
    """(app, worker, store). Raises EngineError on a bad model."""
    runner = Runner.create(model, "exact", profile, console)
    if runner.tokenizer is None:
        from ..runner import EngineError

        raise EngineError("serving needs a tokenizer (tokenizer.json) next to the model")
    store = SqliteStore(store_dir, retention_days * 86400.0)
    store.purge()
    worker = Worker(runner.model, runner.tokenizer, runner.eos_ids(), store,
                    {"model": model if model == "default" else str(Path(model).resolve()),
                     "profile": profile}, max_batch=max_batch)
    name = served_name or (runner.loaded.folder.name if model != "default" else "default")
    cfg = ServerConfig(name, Limits(runner.loaded.cfg.max_position_embeddings, default_max_tokens),
                       max_body_bytes, max_concurrent)
    return create_app(worker, cfg), worker, store


def serve(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
