"""The fuzz harness's one door into the verifier.

It builds an honest world (a tiny Llama with a small byte-level BPE tokenizer and a chat template,
so prompt and output binding run), and it reads outside bytes exactly as `commitllm verify` does:
the receipt, the challenge and the client's request through the bounded JSON reader, the opening
through the container reader, then `verify()`. Only this module calls verifier APIs: when an API
changes, the fuzzers are adapted here, once.

The contract every target checks (fuzz_targets.py):
* parsing outside bytes raises only the parser's own error (JSONError, ContainerError);
* `verify()` returns a Verdict and raises nothing, whatever it is given;
* a Verdict that accepts is for artifacts equal to the honest ones (same JSON values with the same
  JSON types, same arrays with the same names, dtypes, shapes and bytes, the same received text;
  the client's request the same, or one that verifier/request.py reads as the same computation).
  Anything else accepted is a forgery.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):  # advworld (tests/adversary), tinymodels (tests)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MAX_JSON_BYTES = 1 << 22  # the fuzz inputs stay far below what the CLI allows
MAX_OPENING_BYTES = 1 << 26
PROFILES = ("w8a16", "a8", "w16a16")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS_TEXT = ("Name two rivers. The Nile and the Amazon are rivers. Rivers flow to the sea. "
               "A river has a source and a mouth. Lakes, seas and oceans hold water. ") * 20
VOCAB = 320
ENDPOINT = "/v1/chat/completions"


def _tokenizer_folder(folder: Path) -> Path:
    """A byte-level BPE tokenizer trained on a fixed text (deterministic), with specials 0..5
    (</s> = 2 = the tiny model's EOS) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS_TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE}))
    return folder


@dataclass
class Honest:
    """One honest exchange: the key, and the artifacts as bytes and as parsed values."""

    profile: str
    tier: str
    key: object
    vtok: object
    nonce: str
    request: dict  # what the client sent (the verifier's --request)
    endpoint: str  # the path the client called
    text: str  # the content the client received
    receipt: dict
    challenge: dict
    meta: dict
    arrays: dict
    receipt_bytes: bytes
    challenge_bytes: bytes
    request_bytes: bytes
    opening_bytes: bytes


def build(profile: str = "w8a16", tier: str = "full", workdir: str | None = None) -> Honest:
    """An honest chat exchange on a tiny Llama under `profile`, challenged at `tier`."""
    import dataclasses

    from advworld import NONCE, SAMPLED, World
    from commitllm.verifier import container
    from commitllm.verifier.checkpoint import load_checkpoint
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.weights import quantize_model
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
    from commitllm.verifier.tokenizer import Tokenizer
    from tinymodels import make_tiny_checkpoint

    root = Path(workdir or tempfile.mkdtemp(prefix="commitllm-fuzz-"))
    model_dir = root / "model"
    if not (model_dir / "model.safetensors").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        make_tiny_checkpoint(model_dir, "llama", overrides={"vocab_size": VOCAB})
    tok_dir = root / "tok"
    tok_dir.mkdir(exist_ok=True)
    tok = Tokenizer.from_folder(_tokenizer_folder(tok_dir))
    cfg, tensors = load_checkpoint(model_dir)
    cfg = dataclasses.replace(cfg, eos_token_ids=(2,))
    qm = quantize_model(cfg, tensors, get_profile(profile))
    messages = [{"role": "user", "content": "Name two rivers."}]
    prompt = tok.encode_chat(messages)
    w = World(qm, tok, SAMPLED, prompt, max_tokens=8, eos=(2,), request={"messages": messages})
    c = w.challenge(w.served, tier)
    meta, arrays = w.open(w.served, c)
    opening = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    meta, arrays = parse_opening(opening)
    request = w.client_request()
    h = Honest(profile, tier, w.key, w.vtok, NONCE, request, ENDPOINT, w.served.receipt["text"],
               w.served.receipt, c, meta, arrays, _dump(w.served.receipt), _dump(c),
               _dump(request), opening)
    v = verify(h, h.receipt, h.challenge, h.meta, h.arrays, h.request, h.text)
    assert v.accepted, f"the honest exchange is rejected: {v.reason} {v.detail}"
    return h


def _dump(doc) -> bytes:
    return json.dumps(doc).encode()


def parse_json(data: bytes):
    """Outside JSON as the CLI reads it; raises JSONError only."""
    from commitllm.verifier.safejson import loads

    return loads(data, max_bytes=MAX_JSON_BYTES)


def parse_opening(data: bytes) -> tuple[dict, dict]:
    """An opening container as the CLI reads it; raises ContainerError only."""
    from commitllm.verifier import container
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION

    return container.loads(data, OPENING_MAGIC, OPENING_VERSION, MAX_OPENING_BYTES)


PARSE_ERRORS: tuple = ()


def parse_errors() -> tuple:
    """The exceptions the parsers are documented to raise."""
    from commitllm.verifier.container import ContainerError
    from commitllm.verifier.safejson import JSONError

    return (JSONError, ContainerError)


def verify(h: Honest, receipt, challenge, meta, arrays, request, text):
    """verify() as the auditor calls it on a saved exchange (the key's tokenizer: prompt and
    output binding on; the client's nonce, request, endpoint and received text). Returns the
    Verdict."""
    from commitllm.verifier.verify import verify as run

    return run(h.key, receipt, challenge, meta, arrays, h.vtok, expected_nonce=h.nonce,
               expected_request=request, expected_endpoint=h.endpoint, expected_text=text)


def resealed(receipt):
    """A receipt with every hash recomputed (a provider sealing its edit), or None."""
    from advworld import resealed as reseal

    return reseal(receipt) if isinstance(receipt, dict) else None


def same_json(a, b) -> bool:
    """Equal as JSON documents, types included (1, 1.0 and true differ)."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def same_arrays(a: dict, b: dict) -> bool:
    if not isinstance(a, dict) or set(a) != set(b):
        return False
    for k, x in a.items():
        y = b[k]
        if (not isinstance(x, np.ndarray) or x.dtype.str != y.dtype.str or x.shape != y.shape
                or x.tobytes() != y.tobytes()):
            return False
    return True


def is_honest(h: Honest, receipt, challenge, meta, arrays, request, text) -> bool:
    """Nothing the verifier relies on changed. A request or text of None is the client giving
    none (verify() then does not check it), not an edit: accepting it forges nothing."""
    return (same_json(receipt, h.receipt) and same_json(challenge, h.challenge)
            and same_json(meta, h.meta) and same_arrays(arrays, h.arrays)
            and (request is None or same_request(request, h.request, h.endpoint))
            and (text is None or same_json(text, h.text)))


def same_request(a, b, endpoint: str) -> bool:
    """The same request as JSON, or one that obliges the engine to exactly the same computation
    under verifier/request.py's rules (a neutral field such as `logprobs: null` spelled out)."""
    from commitllm.verifier.request import RequestError, parse

    if same_json(a, b):
        return True
    try:
        return parse(a, endpoint=endpoint) == parse(b, endpoint=endpoint)
    except (RequestError, TypeError, ValueError):
        return False


def environment() -> None:
    """What the harness needs before the first import (offline transformers, a private cache)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not os.environ.get("COMMITLLM_CACHE"):
        os.environ["COMMITLLM_CACHE"] = tempfile.mkdtemp(prefix="commitllm-fuzz-cache-")
