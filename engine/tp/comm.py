"""The collectives a sharded model needs, over torch.distributed (gloo on CPU, nccl on GPU).

Only exact collectives: integer sums, maxima, and gathers of raw bytes. Nothing floating-point is
summed across ranks. A failed collective (a rank died, or one did not answer within the process
group's timeout) raises TPError on the survivors instead of hanging.
"""

from __future__ import annotations

import json
from datetime import timedelta

import torch

MAX_COMMAND_BYTES = 1 << 26  # a command is JSON: token ids and flags, never tensors


class TPError(RuntimeError):
    """A tensor-parallel job failed: a rank died, timed out, or disagrees. The message is one line."""


class Comm:
    """rank/size of a tensor-parallel group; size 1 is the no-op communicator (no torch.distributed)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @classmethod
    def init(cls, rank: int, size: int, timeout_s: float, init_method: str = "env://",
             backend: str = "gloo") -> Comm:
        """Join (or create) the default process group; every collective then times out after
        timeout_s seconds."""
        import torch.distributed as dist

        try:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                    timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise TPError(f"rank {rank}: cannot join the tensor-parallel group ({_line(e)})") from None
        return cls(rank, size)

    def close(self) -> None:
        import torch.distributed as dist

        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _run(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as e:  # DistBackendError and gloo's connection/timeout errors
            raise TPError(f"rank {self.rank}: {what} failed: a rank died or timed out "
                          f"({_line(e)})") from None

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce SUM; only for integer tensors (exact in any order)."""
        if self.size == 1:
            return t
        if t.is_floating_point():
            raise TypeError("only integer tensors are summed across ranks")
        import torch.distributed as dist

        self._run("all-reduce(sum)", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce MAX (exact for any dtype: a max rounds nothing)."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        self._run("all-reduce(max)", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape and dtype on every rank), moved as raw bytes."""
        if self.size == 1:
            return [t]
        import torch.distributed as dist

        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        out = [torch.empty_like(raw) for _ in range(self.size)]
        self._run("all-gather", lambda: dist.all_gather(out, raw))
        return [o.view(t.dtype).reshape(t.shape) for o in out]

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (in place)."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        self._run("broadcast", lambda: dist.broadcast(t, src=0))
        return t

    def send_command(self, cmd: dict) -> None:
        """Rank 0: one JSON command to every follower."""
        data = json.dumps(cmd).encode()
        self.broadcast(torch.tensor([len(data)], dtype=torch.int64))
        self.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv_command(self) -> dict:
        """Followers: the next command from rank 0 (size checked before allocation)."""
        n = int(self.broadcast(torch.zeros(1, dtype=torch.int64))[0])
        if not 0 < n <= MAX_COMMAND_BYTES:
            raise TPError(f"rank {self.rank}: bad command size {n}")
        buf = self.broadcast(torch.empty(n, dtype=torch.uint8))
        return json.loads(bytes(buf.numpy()).decode())


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
