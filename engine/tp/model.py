"""TPModel: ExactModel sharded Megatron-style over a Comm; every rank holds the unsharded bits.

Column-parallel linears (qkv, gate_up, LM head) read the replicated input, quantize it exactly as
one device would, and produce their own output columns. Row-parallel linears (o, down) read a
column slice of their input: they take the row's GLOBAL absmax (an exact all-reduce MAX), quantize
their slice with that scale, and all-reduce their int64 accumulators (exact in any order) before
the dequantization, which every rank then does on identical integers. The LM head's logits are
gathered as raw bytes. Rank 0 drives: each forward, cache gather and LM-head re-run it performs is
first broadcast as a command that the other ranks execute in `follow`.
"""

from __future__ import annotations

import weakref

import torch

from ...verifier.numerics.rope import RopeTable
from ...verifier.numerics.weights import QuantizedModel
from ..exact import ops
from ..exact.model import ExactModel, SeqCache, TorchExperts, TorchLinear, _TorchLayer
from .comm import Comm, TPError
from .shard import Plan, cols, layer_spans, make_plan, rows


class ColumnLinear(TorchLinear):
    """Output columns split by rank; `parts` are the local widths of the fused blocks."""

    def __init__(self, lin, qmax: int, comm: Comm, parts: list[int]):
        super().__init__(lin, qmax)
        self.comm, self.parts = comm, parts

    def traced(self, name, qx, sx, z) -> dict:
        return {f"{name}.q": qx, f"{name}.s": sx, f"{name}.z": self.unshard(z)}

    def unshard(self, y: torch.Tensor) -> torch.Tensor:
        return gather_columns(self.comm, y, self.parts)


def gather_columns(comm: Comm, y: torch.Tensor, parts: list[int]) -> torch.Tensor:
    """The full-width tensor of a column-parallel output whose fused blocks have local widths
    `parts`: block b of every rank, in rank order, block after block."""
    per_rank = [t.split(parts, dim=-1) for t in comm.gather(y)]
    return torch.cat([blk[b] for b in range(len(parts)) for blk in per_rank], dim=-1)


class VocabLinear(ColumnLinear):
    """The LM head split by vocabulary blocks of `chunk` rows (the last one padded); its logits are
    gathered so every rank holds the full row."""

    def __init__(self, lin, qmax: int, comm: Comm, chunk: int, vocab: int):
        super().__init__(lin, qmax, comm, [chunk])
        self.chunk, self.vocab = chunk, vocab

    def unshard(self, y: torch.Tensor) -> torch.Tensor:
        return gather_vocab(self.comm, y, self.chunk, self.vocab)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.unshard(y)


def gather_vocab(comm: Comm, y: torch.Tensor, chunk: int, vocab: int) -> torch.Tensor:
    """Every rank's block of `chunk` vocabulary columns (the last one padded), in rank order."""
    pad = chunk - y.shape[-1]
    if pad:
        y = torch.cat([y, y.new_zeros(y.shape[0], pad)], dim=-1)
    return torch.cat(comm.gather(y), dim=-1)[:, :vocab]


class RowLinear(TorchLinear):
    """Input columns split by rank: global-absmax quantization, int64 accumulators all-reduced."""

    def __init__(self, lin, qmax: int, comm: Comm):
        super().__init__(lin, qmax)
        self.comm = comm

    def quantize(self, x: torch.Tensor, act_qmax: int):
        return ops.quantize_rows(x, act_qmax, self.comm.max_(ops.row_absmax(x)))

    def accumulate(self, qx: torch.Tensor, act_qmax: int) -> torch.Tensor:
        return self.comm.sum_(self.weight.matmul(qx, act_qmax))

    def traced(self, name, qx, sx, z) -> dict:
        return {f"{name}.q": torch.cat(self.comm.gather(qx), dim=-1), f"{name}.s": sx,
                f"{name}.z": z}


class TPExperts(TorchExperts):
    """A Mixtral MLP with every expert split as the dense MLP is: gate_up column-parallel, down
    row-parallel (global absmax, int64 accumulators all-reduced). The router is replicated, so
    every rank selects the same experts and runs their collectives in the same order."""

    def __init__(self, ex, wq: int, cfg, p: Plan, comm: Comm):
        span, lo = layer_spans(cfg, p)["gate_up"], p.rank * p.ffn
        self.router = TorchLinear(ex.router, wq)
        self.gate_up = [ColumnLinear(rows(lin, span), wq, comm, [p.ffn, p.ffn])
                        for lin in ex.gate_up]
        self.down = [RowLinear(cols(lin, lo, lo + p.ffn), wq, comm) for lin in ex.down]

    def full(self, lin: ColumnLinear, z: torch.Tensor) -> torch.Tensor:
        return lin.unshard(z)


class _TPLayer(_TorchLayer):
    """A decoder block over this rank's heads and intermediate columns; the same __call__."""

    def __init__(self, layer, wq: int, cfg, p: Plan, comm: Comm):
        spans = layer_spans(cfg, p)
        self.local = (p.heads, p.kv_heads, p.q_size, p.kv_size, p.ffn)
        self.q_norm, self.k_norm = (None if w is None else torch.from_numpy(w)  # per head
                                    for w in (layer.q_norm, layer.k_norm))
        self.attn_norm = torch.from_numpy(layer.attn_norm)
        self.mlp_norm = torch.from_numpy(layer.mlp_norm)
        self.qkv = ColumnLinear(rows(layer.qkv, spans["qkv"]), wq, comm,
                                [p.q_size, p.kv_size, p.kv_size])
        lo = p.rank * p.q_size
        self.o = RowLinear(cols(layer.o, lo, lo + p.q_size), wq, comm)
        self.experts = None if layer.experts is None else \
            TPExperts(layer.experts, wq, cfg, p, comm)
        if layer.experts is None:
            self.gate_up = ColumnLinear(rows(layer.gate_up, spans["gate_up"]), wq, comm,
                                        [p.ffn, p.ffn])
            self.down = RowLinear(cols(layer.down, p.rank * p.ffn, (p.rank + 1) * p.ffn), wq,
                                  comm)

    def sizes(self, cfg):
        return self.local


class TPModel(ExactModel):
    """One rank's shard. Rank 0 keeps the full QuantizedModel (commitments, openings' embedding
    rows); the others drop it. With comm.size == 1 it is an unsharded model with no-op
    collectives (the same bits as ExactModel)."""

    def __init__(self, qm: QuantizedModel, comm: Comm):
        self._init_driver(qm, comm)
        cfg, p = qm.cfg, self.plan
        self.embed_q = torch.from_numpy(qm.embed.q)
        self.embed_s = torch.from_numpy(qm.embed.s)
        self.layers = [_TPLayer(layer, qm.profile.weight_qmax, cfg, p, comm) for layer in qm.layers]
        self.final_norm = torch.from_numpy(qm.final_norm)
        self.lm_head = VocabLinear(rows(qm.lm_head, [p.vocab]), qm.profile.matrix_qmax("lm_head"),
                                   comm, p.vocab_chunk, cfg.vocab_size)
        self.rope = RopeTable(cfg)

    def _init_driver(self, qm: QuantizedModel, comm: Comm) -> None:
        """The state every sharded model shares: plan, communicator, rank 0's role and cache ids."""
        self.plan = make_plan(qm.cfg, comm.rank, comm.size)
        self.comm, self.cfg, self.profile = comm, qm.cfg, qm.profile
        self.qm = qm if comm.rank == 0 else None
        self.leader = comm.rank == 0 and comm.size > 1
        self._ids, self._freed = 0, []

    # --- rank 0: every collective-bearing call is announced to the followers first -------------

    def _send(self, op: str, **args) -> None:
        if self.leader:
            free, self._freed[:] = list(self._freed), []
            self.comm.send_command({"op": op, "free": free, **args})

    def _cid(self, cache: SeqCache) -> int:
        cid = getattr(cache, "_tp_id", None)
        if cid is None:
            self._ids += 1
            cid = cache._tp_id = self._ids
            weakref.finalize(cache, self._freed.append, cid)  # followers drop theirs later
        return cid

    @torch.inference_mode()
    def forward(self, caches: list[SeqCache], tokens: list[list[int]], trace: dict | None = None,
                all_logits: bool = False, residuals: list | None = None,
                trace_attention: bool = True) -> list[torch.Tensor]:
        self._send("forward", caches=[self._cid(c) for c in caches],
                   lengths=[c.length for c in caches], tokens=tokens, trace=trace is not None,
                   all_logits=all_logits, trace_attention=trace_attention)
        return super().forward(caches, tokens, trace, all_logits, residuals, trace_attention)

    def full_cache(self, cache: SeqCache) -> SeqCache:
        """Every K/V head, gathered along the head axis in rank order (= the unsharded cache)."""
        if self.comm.size == 1:
            return cache
        self._send("gather_cache", cache=self._cid(cache))
        cat = lambda xs: [torch.cat(self.comm.gather(x), dim=1) for x in xs]
        return SeqCache(cat(cache.k), cat(cache.sk), cat(cache.v), cat(cache.sv), cache.length)

    def lm_accumulators(self, final_rows: torch.Tensor) -> torch.Tensor:
        self._send("lm", shape=list(final_rows.shape))
        self.comm.broadcast(final_rows.contiguous())
        return super().lm_accumulators(final_rows)

    def stop(self) -> None:
        self._send("stop")

    def heartbeat(self) -> None:
        """An empty command: keeps idle followers inside their collective timeout (a server
        waiting for requests calls it more often than the timeout)."""
        self._send("noop")


DETERMINISTIC = (FloatingPointError, OverflowError, ValueError)  # raised alike on every rank


def follow(model: TPModel) -> None:
    """Ranks > 0: execute rank 0's commands until it sends `stop`. A collective failure raises
    TPError; an error every rank raises alike (a non-finite row, a bad request) is skipped."""
    comm, caches = model.comm, {}
    while True:
        cmd = comm.recv_command()
        for cid in cmd.get("free", []):
            caches.pop(cid, None)
        if cmd["op"] == "stop":
            return
        try:
            _execute(model, cmd, caches)
        except DETERMINISTIC:
            continue


def _execute(model: TPModel, cmd: dict, caches: dict) -> None:
    op = cmd["op"]
    if op == "forward":
        cs = [caches.setdefault(cid, SeqCache()) for cid in cmd["caches"]]
        if [c.length for c in cs] != cmd["lengths"]:
            raise TPError(f"rank {model.comm.rank}: caches out of step with rank 0")
        trace = {} if cmd["trace"] else None
        # the forward below TPModel's in the MRO: ExactModel's, or TritonModel's (TPTritonModel)
        super(TPModel, model).forward(cs, cmd["tokens"], trace, cmd["all_logits"], None,
                                      cmd["trace_attention"])
    elif op == "gather_cache":
        model.full_cache(caches[cmd["cache"]])
    elif op == "lm":
        rows_ = model.comm.broadcast(torch.empty(cmd["shape"], dtype=torch.float32))
        super(TPModel, model).lm_accumulators(rows_)
    elif op != "noop":
        raise TPError(f"rank {model.comm.rank}: unknown command {op!r}")
