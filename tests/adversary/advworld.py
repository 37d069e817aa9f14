"""The honest flow as a library, and the provider abstraction every cheat plugs into.

A `World` is one verifier (key built from model A) and one client request. A `Provider` is an
engine: an ExactModel plus monkeypatches that are active while it computes, during generation and
during the opening alike, so a cheating provider's commitments are internally consistent (it
re-executes its own cheat when challenged, exactly as an honest provider re-executes honestly).
Manifest overrides let a provider that computes with other weights or tables still *claim* A.

A module of its own (not conftest.py) so the bench (bench/adversary.py) can import it too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from accs import low_bytes
from commitllm.engine.exact.model import ExactModel, SeqCache
from commitllm.engine.open import _put_embed, build_opening
from commitllm.engine.receipts import generate_with_receipts, receipt_for_tokens
from commitllm.keys.keygen import build_key, key_tokenizer
from commitllm.verifier import challenge as ch
from commitllm.verifier import container
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.commitment import embed_leaves
from commitllm.verifier.merkle import MerkleTree
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.sampler import SamplingParams
from commitllm.verifier.numerics.weights import quantize_model
from commitllm.verifier import opening as opening_mod
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION, plan
from commitllm.verifier.receipt import build_receipt
from commitllm.verifier.verify import Verdict, verify

GREEDY = SamplingParams()
SAMPLED = SamplingParams(0.9, 30, 0.95, 4242)
NONCE = "client-nonce-0001"  # the client's nonce, bound into every receipt of the suite
SECRET = bytes(range(32))  # the verifier's key secret (fixed: the suite is deterministic)
CHALLENGE_NONCE = b"verifier-nonce-0"  # 16 bytes
CHAT_TEXT = "Name two rivers."  # the chat world's client request
EOS = 2  # SmolLM2's EOS id (the chat world's stop token)


def quantized(folder, profile: str = "w8a16"):
    """QuantizedModel of an HF folder under a profile (the same bits keygen commits)."""
    cfg, t = load_checkpoint(folder)
    return quantize_model(cfg, t, get_profile(profile))


@dataclass
class Served:
    """What a provider returns for one request (receipt) and keeps (transcript: seed, salt)."""

    receipt: dict
    transcript: dict

    @property
    def tokens(self) -> list[int]:
        return self.receipt["prompt_token_ids"] + self.receipt["output_token_ids"]

    @property
    def output(self) -> list[int]:
        return list(self.receipt["output_token_ids"])


@dataclass
class Provider:
    """An engine: a model, patches (obj, attribute, replacement) active while it computes, and
    manifest fields it claims regardless of what it ran (e.g. model A's commitment)."""

    model: ExactModel
    patches: tuple = ()
    claims: dict = field(default_factory=dict)

    @contextmanager
    def running(self):
        saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in self.patches]
        try:
            for obj, name, new in self.patches:
                setattr(obj, name, new)
            yield self.model
        finally:
            for obj, name, old in reversed(saved):
                if old is _MISSING:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)


_MISSING = object()


class World:
    """One verifier (key for model A, secret SECRET) and one client request served honestly."""

    def __init__(self, qm, tokenizer=None, params: SamplingParams = SAMPLED, prompt=None,
                 max_tokens: int = 16, eos=(), request: dict | None = None):
        self.qm, self.tokenizer, self.params = qm, tokenizer, params
        self.max_tokens, self.eos = max_tokens, tuple(eos)
        self.request = request or {"prompt": "x"}
        rng = np.random.default_rng(1)
        self.prompt = [int(t) for t in (prompt or rng.integers(3, qm.cfg.vocab_size, 9))]
        self.honest = Provider(ExactModel(qm))
        self.key = build_key(qm, tokenizer, secret=SECRET)
        self.vtok = key_tokenizer(self.key)  # what the verifier re-tokenizes with
        self.served = self.serve()

    def other_prompt(self, seed: int = 2) -> list[int]:
        """A different prompt of the same length (another client's request)."""
        rng = np.random.default_rng(seed)
        return [int(t) for t in rng.integers(3, self.qm.cfg.vocab_size, len(self.prompt))]

    @property
    def n_positions(self) -> int:
        return self.served.receipt["trace"]["positions"]

    @property
    def first_decode(self) -> int:
        return len(self.prompt) - 1

    # --- provider side -----------------------------------------------------------------------

    def serve(self, provider: Provider | None = None, *, prompt=None, params=None,
              max_tokens=None, eos=None, request=None, nonce: str = NONCE) -> Served:
        """Generate with receipts on `provider` (the honest one by default)."""
        p = provider or self.honest
        params = params or self.params
        with p.running() as model:
            s = generate_with_receipts(model, self.tokenizer, [request or self.request],
                                       [prompt or self.prompt], params,
                                       max_tokens or self.max_tokens,
                                       self.eos if eos is None else tuple(eos), nonce)
        return self.claim(Served(s.receipts[0], s.transcripts[0]), **p.claims)

    def computes_otherwise(self, provider: Provider) -> bool:
        """Whether `provider` computes anything other than the honest engine on the prompt plus
        one decode step (residual streams or logits): a cheat that changes nothing is honest,
        and a test that expects it to be rejected would be vacuous."""
        def run(p):
            out = []
            with p.running() as model:
                cache = SeqCache()
                for toks in (self.prompt, self.prompt[:1]):
                    resid = []
                    out += model.forward([cache], [list(toks)], residuals=resid, all_logits=True)
                    out += resid
            return out
        a, b = run(self.honest), run(provider)
        return len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x, y)
                                       for x, y in zip(a, b))

    def commit(self, output_ids, provider: Provider | None = None, *, prompt=None, params=None,
               max_tokens=None, eos=None, request=None, nonce: str = NONCE) -> Served:
        """A consistent receipt for chosen output tokens, computed by `provider`."""
        p = provider or self.honest
        params = params or self.params
        salt = os.urandom(16)
        with p.running() as model:
            r = receipt_for_tokens(model, self.tokenizer, request or self.request, nonce,
                                   params, salt, max_tokens or self.max_tokens,
                                   self.eos if eos is None else tuple(eos),
                                   list(prompt or self.prompt), list(output_ids))
        return self.claim(Served(r, {"receipt": r, "seed": params.seed, "salt": salt.hex()}),
                          **p.claims)

    @staticmethod
    def claim(served: Served, **manifest) -> Served:
        """The receipt with manifest fields replaced, every hash recomputed (a provider that
        lies about what it ran but seals its receipt properly)."""
        if not manifest:
            return served
        r = served.receipt
        new = build_receipt({**r["manifest"], **manifest}, r["request"], r["nonce"],
                            r["prompt_token_ids"], r["output_token_ids"], r["text"], r["trace"],
                            r["logprobs"])
        return Served(new, {**served.transcript, "receipt": new})

    @staticmethod
    def shadow(computed: Served, claimed_prompt) -> Served:
        """A receipt claiming `claimed_prompt` over the trace of `computed` (a run on other prompt
        tokens of the same length); the provider opens from what it really ran."""
        r = computed.receipt
        new = build_receipt(r["manifest"], r["request"], r["nonce"], list(claimed_prompt),
                            r["output_token_ids"], r["text"], r["trace"])
        ran = {**new, "prompt_token_ids": r["prompt_token_ids"]}  # re-executed, never sent
        return Served(new, {**computed.transcript, "receipt": ran})

    def open(self, served: Served, challenge: dict, provider: Provider | None = None):
        """(meta, arrays) of the provider's opening, through the container bytes; the arrays
        are writable copies so tests can tamper with them."""
        p = provider or self.honest
        with p.running() as model, _wrapping_packer():
            meta, arrays = build_opening(model, served.transcript, challenge,
                                         self._embed_tree(model.qm))
            ran = served.transcript["receipt"]["prompt_token_ids"]
            if ran != served.receipt["prompt_token_ids"]:  # a shadow: show the claimed rows
                ids = [served.tokens[t] for t in plan(challenge, model.cfg.num_layers).embed]
                _put_embed(arrays, model, ids, None)
        data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
        meta, arrays = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
        return meta, {k: np.array(v) for k, v in arrays.items()}

    def _embed_tree(self, qm) -> MerkleTree:
        """The embedding tree of qm, built once per embedding (49152 leaves take a second)."""
        trees = self.__dict__.setdefault("_trees", {})
        if id(qm.embed) not in trees:
            trees[id(qm.embed)] = (qm.embed, MerkleTree(embed_leaves(qm)))
        return trees[id(qm.embed)][1]

    # --- verifier side -----------------------------------------------------------------------

    def challenge(self, served: Served | dict, tier: str = "deep", positions=None,
                  nonce: bytes = CHALLENGE_NONCE) -> dict:
        r = served.receipt if isinstance(served, Served) else served
        return ch.derive(self.key.secret, r, tier, nonce=nonce, positions=positions)

    def client_request(self) -> dict:
        """The request exactly as the client sent it, with the decode settings it fixed."""
        p = self.params
        return {**self.request, "max_tokens": self.max_tokens, "temperature": p.temperature,
                "top_k": p.top_k, "top_p": p.top_p, "seed": p.seed}

    def verify(self, served: Served | dict, challenge: dict, meta: dict, arrays: dict,
               expected_nonce: str | None = NONCE, expected_request: dict | None = None,
               **kw) -> Verdict:
        """kw: verify()'s other client-side inputs (expected_endpoint, expected_text)."""
        r = served.receipt if isinstance(served, Served) else served
        return verify(self.key, r, challenge, meta, arrays, self.vtok, expected_nonce,
                      expected_request, io_binding=self.vtok is not None, **kw)

    def audit(self, served: Served, provider: Provider | None = None, tier: str = "deep",
              positions=None, expected_nonce: str | None = NONCE,
              expected_request: dict | None = None, **kw) -> Verdict:
        """Challenge, open (by `provider`), verify."""
        c = self.challenge(served, tier, positions)
        return self.verify(served, c, *self.open(served, c, provider), expected_nonce,
                           expected_request, **kw)


class CheatAccepted(AssertionError):
    """The verifier accepted a cheat (what an xfail for a known gap expects)."""


class WrongReason(AssertionError):
    """The verifier rejected, but not with the check that should catch the cheat."""


@contextmanager
def _wrapping_packer():
    """build_opening packing accumulators as a cheating provider would: a value its matrix's
    width cannot hold (a provider that computed with z + P, say) goes out as its low w bytes,
    the most the version-2 format lets it say (the engine itself refuses to pack such a value).
    Honest values pack the same either way."""
    import commitllm.engine.open as engine_open

    def wrapping(arrays, cfg, profile):
        out = {}
        for name, a in arrays.items():
            m = opening_mod._acc_matrix(name)
            w = None if m is None else opening_mod.acc_width(cfg, profile, m)
            out[name] = a if w is None else low_bytes(a, w)
        return out
    before = engine_open.pack_accumulators
    engine_open.pack_accumulators = wrapping
    try:
        yield
    finally:
        engine_open.pack_accumulators = before


def assert_rejected(v: Verdict, code: str) -> None:
    """The verifier refused, and for the expected reason."""
    if v.accepted:
        raise CheatAccepted(f"cheat ACCEPTED (expected rejection {code!r})")
    if v.reason != code:
        raise WrongReason(f"rejected for {v.reason!r} ({v.detail}), expected {code!r}")


def assert_refused(v: Verdict) -> None:
    """Malformed input: a Verdict that rejects with some reason code (never an exception)."""
    assert isinstance(v, Verdict), v
    assert not v.accepted and isinstance(v.reason, str) and v.reason, v


# --- editing JSON documents (receipts, challenges) -----------------------------------------


def json_paths(node, prefix=()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices), containers included."""
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for k, v in items:
        out += json_paths(v, prefix + (k,))
    return out


def edited(doc, path: tuple, value, delete: bool = False):
    """A deep copy of doc with the value at `path` replaced (or deleted)."""
    import copy

    out = copy.deepcopy(doc)
    node = out
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def resealed(r: dict) -> dict | None:
    """The receipt with every hash recomputed (a provider sealing an edit), None if it cannot."""
    try:
        return build_receipt(r["manifest"], r["request"], r["nonce"], r["prompt_token_ids"],
                             r["output_token_ids"], r["text"], r["trace"])
    except Exception:  # noqa: BLE001  (whatever the edit broke, the provider cannot seal it)
        return None
