"""Key generation (numpy only): the verifier's secret Freivalds vectors and the public data the
replay needs (norm weights, channel scales, biases), bound to the model commitment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..verifier import container
from ..verifier.commitment import commit_model
from ..verifier.digest import numerics_constants
from ..verifier.commitment import canonical_json
from ..verifier.freivalds import SCHEME, Prepared, prepare, project, secret_vector
from ..verifier.numerics import SPEC_VERSION
from ..verifier.numerics.rope import RopeTable
from ..verifier.numerics.weights import QuantizedModel

KEY_MAGIC = b"CLLMKEY\x00"
KEY_VERSION = 4  # 4: one Freivalds row modulo 2^61 - 1; 3: a keyed MAC over every field;
#                 2: Freivalds rows modulo two primes
MAC_CONTEXT = "commitllm 2026 key file mac v1"  # blake3 derive_key context for the MAC key
MAX_KEY_BYTES = 1 << 34


@dataclass
class Key:
    """A loaded key: metadata (JSON) and arrays (secret, projections, public replay data)."""

    meta: dict
    arrays: dict
    _limbs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def secret(self) -> bytes:
        return bytes(self.arrays["secret"])

    def r(self, label: str) -> np.ndarray:
        """The secret row of matrix `label` (recomputed from the secret, never stored)."""
        return secret_vector(self.secret, label, self.meta["rows"][label])

    def v(self, label: str) -> np.ndarray:
        return self.arrays[f"{label}.v"]

    def prepared(self, label: str) -> tuple[Prepared, Prepared]:
        """(r, v) of matrix `label` as freivalds.check takes them: derived on first use and kept
        in memory with the key (the secret stream costs more than the check itself)."""
        got = self._limbs.get(label)
        if got is None:
            got = self._limbs[label] = (prepare(self.r(label)), prepare(self.v(label)))
        return got


def _linears(qm: QuantizedModel):
    for i, layer in enumerate(qm.layers):
        yield from layer.linears(i)  # a Mixtral layer: its router and every expert's matrices
    yield "lm_head", qm.lm_head


def build_key(qm: QuantizedModel, tokenizer, secret: bytes | None = None, progress=None) -> Key:
    """Commit to the model and project every matrix with fresh secret vectors."""
    secret = os.urandom(32) if secret is None else secret
    com = commit_model(qm)
    arrays: dict[str, np.ndarray] = {"secret": np.frombuffer(secret, dtype=np.uint8).copy()}
    rows = {}
    for label, lin in _linears(qm):
        r = secret_vector(secret, label, lin.q.shape[0])
        arrays[f"{label}.v"] = project(r, lin.q)
        arrays[f"{label}.s"] = lin.s
        if lin.bias is not None:
            arrays[f"{label}.bias"] = lin.bias
        rows[label] = int(lin.q.shape[0])
        if progress:
            progress(label)
    for i, layer in enumerate(qm.layers):
        arrays[f"layers.{i}.attn_norm"] = layer.attn_norm
        arrays[f"layers.{i}.mlp_norm"] = layer.mlp_norm
        if qm.cfg.qk_norm:
            arrays[f"layers.{i}.q_norm"] = layer.q_norm
            arrays[f"layers.{i}.k_norm"] = layer.k_norm
    arrays["final_norm"] = qm.final_norm
    meta = {
        "spec_version": SPEC_VERSION,
        "profile": qm.profile.manifest(),
        "config": qm.cfg.to_hf_dict(),
        "model_commitment": com["commitment"].hex(),
        "embed_root": com["embed_root"].hex(),
        "tensors_root": com["tensors_root"].hex(),
        "config_digest": com["config_digest"].hex(),
        "rope_digest": RopeTable(qm.cfg).digest(),
        "numerics_digest": numerics_digest(),
        "freivalds": dict(SCHEME),
        "rows": rows,
        "tokenizer_hash": tokenizer.tokenizer_hash() if tokenizer else None,
        "chat_template_hash": tokenizer.chat_template_hash() if tokenizer else None,
        "tokenizer": None if tokenizer is None else {
            "json": tokenizer._json, "config": tokenizer.config,
            "chat_template": tokenizer.chat_template, "eos_token_ids": list(tokenizer.eos_token_ids)},
    }
    meta["mac"] = key_mac(meta, arrays)
    return Key(meta, arrays)


def key_mac(meta: dict, arrays: dict) -> str:
    """blake3, keyed by a key derived from the key's own secret, over the canonical JSON of every
    metadata field but the MAC (config, profile, commitments, tokenizer and chat template
    included) and every array (name, dtype, shape, bytes little-endian), in name order. A key
    file edited by anyone without its secret (the tokenizer swapped, a scale moved) fails it."""
    import blake3

    secret = bytes(np.asarray(arrays["secret"], dtype=np.uint8))
    mac_key = blake3.blake3(secret, derive_key_context=MAC_CONTEXT).digest()
    h = blake3.blake3(key=mac_key)
    body = canonical_json({k: v for k, v in meta.items() if k != "mac"})
    h.update(len(body).to_bytes(8, "little") + body)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        head = canonical_json([name, a.dtype.newbyteorder("<").str, list(a.shape)])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        h.update(len(head).to_bytes(8, "little") + head + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def numerics_digest() -> str:
    import blake3

    return blake3.blake3(canonical_json(numerics_constants())).hexdigest()


def key_tokenizer(key: Key):
    """The tokenizer the key was built with (for input and output binding), or None."""
    import tokenizers

    from ..verifier.tokenizer import Tokenizer

    t = key.meta["tokenizer"]
    if t is None:
        return None
    backend = tokenizers.Tokenizer.from_str(t["json"])
    return Tokenizer(backend, t["json"], t["config"], t["chat_template"],
                     tuple(t["eos_token_ids"]), "key")


def save_key(key: Key, path: Path) -> None:
    """Write with mode 0600: the key holds the verifier's secret."""
    container.write(Path(path), KEY_MAGIC, KEY_VERSION, key.meta, key.arrays, mode=0o600)


def load_key(path: Path) -> Key:
    """The key at `path`, refused (ContainerError, one line saying why) when others can read it,
    when it was written in another key format (build it again), or when its MAC fails."""
    import hmac
    import os
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise container.ContainerError(f"{path}: cannot read ({e.strerror or e})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise container.ContainerError(
            f"{path}: the key holds the verifier's secret but its mode is {stat.S_IMODE(mode):o} "
            f"(group or others have access); run `chmod 600 {path}`")
    try:
        meta, arrays = container.read(path, KEY_MAGIC, KEY_VERSION, MAX_KEY_BYTES)
    except container.ContainerVersionError as e:
        raise container.ContainerVersionError(
            f"{e}: a key from an older release; run `commitllm keygen` again") from None
    sec = arrays.get("secret")
    if sec is None or sec.shape != (32,) or sec.dtype != np.uint8:
        raise container.ContainerError(f"{path}: key without a 32-byte secret")
    if not isinstance(meta.get("mac"), str) or not hmac.compare_digest(
            meta["mac"].encode("utf-8", "replace"), key_mac(meta, arrays).encode()):
        raise container.ContainerError(f"{path}: the key's MAC does not verify (the file was "
                                       f"altered or damaged); run `commitllm keygen` again")
    if meta.get("freivalds") != SCHEME:
        raise container.ContainerError(f"{path}: key built for another Freivalds scheme; rebuild it")
    return Key(meta, arrays)
