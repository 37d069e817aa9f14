"""Starting a tensor-parallel job: under torchrun (RANK/WORLD_SIZE in the environment), or by
spawning the follower ranks on this machine (`--tp N`). Rank 0 gets a TPEngine; the others run
`follower_main` until rank 0 stops them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from .comm import Comm, TPError
from .model import TPModel, follow
from .shard import make_plan

DEFAULT_TIMEOUT_S = 60.0


def env_rank() -> int | None:
    """This process's rank when launched by torchrun (or our spawner), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"])


def share_cores(size: int) -> None:
    """Give each of `size` ranks on this machine its share of the cores (unless OMP_NUM_THREADS
    says otherwise): oversubscribed ranks make every collective wait on a descheduled peer."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPEngine:
    """Rank 0's handle on a running job: `model` is used like an ExactModel by every caller
    (generate_exact, generate_with_receipts, build_opening, audit); close() stops the ranks."""

    def __init__(self, model: TPModel, procs: list[subprocess.Popen], timeout_s: float):
        self.model, self.procs, self.timeout_s = model, procs, timeout_s

    @property
    def size(self) -> int:
        return self.model.comm.size

    def close(self) -> None:
        """Stop the followers and wait for them (a clean end)."""
        try:
            self.model.stop()
        except TPError:
            pass
        self._finish()

    def abort(self) -> None:
        """After a failure: leave the group (the followers' pending collectives then fail at once
        instead of waiting for the timeout) and reap the spawned ranks."""
        self._finish()

    def _finish(self) -> None:
        self.model.comm.close()
        deadline = time.monotonic() + self.timeout_s + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()  # our own child, by its handle
                p.wait()
        self.procs = []


BACKENDS = ("exact", "triton")


def shard(qm, comm: Comm, backend: str = "exact"):
    """This rank's model: TPModel (torch backend) or TPTritonModel (Triton kernels; on a machine
    without CUDA they run through the Triton interpreter, as `--backend triton` does)."""
    if backend == "exact":
        return TPModel(qm, comm)
    if backend != "triton":
        raise TPError(f"unknown backend {backend!r} for --tp; choose one of {', '.join(BACKENDS)}")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .triton_model import TPTritonModel

    return TPTritonModel(qm, comm)


def start(model_arg: str, qm_loader, cfg, tp: int, timeout_s: float = DEFAULT_TIMEOUT_S,
          profile: str = "w8a16", backend: str = "exact") -> TPEngine:
    """Rank 0: check the shapes, start (or join, under torchrun) the group, shard the model.

    qm_loader() returns the QuantizedModel (called after the followers are started, so they load
    in parallel). Spawned followers run `python -m commitllm.engine.tp MODEL PROFILE`."""
    make_plan(cfg, 0, tp)  # a shape that does not divide fails here, before any process starts
    rank, procs = env_rank(), []
    share_cores(tp)
    if rank is not None:
        size = int(os.environ["WORLD_SIZE"])
        if size != tp:
            raise TPError(f"--tp {tp} but torchrun started {size} processes")
        comm = Comm.init(0, size, timeout_s)
    else:
        port = _free_port()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(tp),
                   COMMITLLM_TP_TIMEOUT=str(timeout_s))
        procs = [subprocess.Popen([sys.executable, "-m", "commitllm.engine.tp", model_arg, profile,
                                   backend],
                                  env=dict(env, RANK=str(r)), stdin=subprocess.DEVNULL)
                 for r in range(1, tp)]
        try:
            comm = Comm.init(0, tp, timeout_s, init_method=f"tcp://127.0.0.1:{port}")
        except TPError:
            _reap(procs)
            raise
    try:
        return TPEngine(shard(qm_loader(), comm, backend), procs, timeout_s)
    except BaseException:
        comm.close()
        _reap(procs)
        raise


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def follower_main(model_arg: str, profile: str, timeout_s: float | None = None,
                  backend: str = "exact") -> int:
    """Ranks > 0: load, shard, follow rank 0 until it stops the job. Errors: one line, exit 1."""
    from ...verifier.numerics import get_profile
    from ..loader import load_model

    rank, size = env_rank(), int(os.environ.get("WORLD_SIZE", "0"))
    timeout_s = timeout_s or float(os.environ.get("COMMITLLM_TP_TIMEOUT", DEFAULT_TIMEOUT_S))
    comm = None
    try:
        share_cores(size)
        comm = Comm.init(rank, size, timeout_s)
        loaded = load_model(model_arg, need_tokenizer=False)
        model = shard(loaded.quantized(get_profile(profile)), comm, backend)
        follow(model)
        comm.close()
        return 0
    except Exception as e:  # noqa: BLE001  one line per rank, a non-zero exit, never a hang
        msg = " ".join(str(e).split())
        msg = msg if isinstance(e, TPError) else f"rank {rank}: {msg}"  # TPError names its rank
        sys.stderr.write(f"error: {msg}\n")  # one write: ranks share the pipe, lines stay whole
        sys.stderr.flush()
        if comm is not None:
            comm.close()
        return 1
