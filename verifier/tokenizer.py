"""Text <-> token ids: a ``tokenizers.Tokenizer`` plus the chat template.

Built either from an HF folder (``tokenizer.json`` + ``tokenizer_config.json``) or from the
``tokenizer.*`` metadata of a GGUF file (byte-level BPE only). The chat template is rendered the way
transformers renders it (sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
a ``tojson`` that does not escape HTML), minus ``strftime_now``: a prompt must not depend on the
clock, so a template that wants a date gets its own default or a ``date_string`` argument.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import blake3
import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)

# Split regexes of the original tokenizer.json files (llama.cpp spells the same ones out by case).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3")
SUPPORTED_PRE = ("smollm", "gpt-2", "gpt2", "qwen2", *_LLAMA3_NAMES)


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt, or describes something unsupported."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a GGUF file's ``tokenizer.*`` metadata says."""

    model: str  # tokenizer.ggml.model: "gpt2" is byte-level BPE
    pre: str | None  # tokenizer.ggml.pre: how text is split before BPE
    tokens: tuple[str, ...]  # the vocabulary, by id, spelled in the byte-level alphabet
    token_types: tuple[int, ...]  # llama.cpp type per token (3 control, 4 user-defined)
    merges: tuple[str, ...]  # "left right", best first
    bos_id: int | None  # beginning-of-sequence token
    eos_ids: tuple[int, ...]  # eos, then end-of-turn / end-of-message tokens when distinct
    unk_id: int | None  # unknown token
    pad_id: int | None  # padding token
    add_bos: bool  # encode() prepends BOS
    add_eos: bool  # encode() appends EOS
    chat_template: str | None  # jinja2 source

    @classmethod
    def from_metadata(cls, meta: dict) -> TokenizerSpec:
        """Read the ``tokenizer.*`` keys of GGUF metadata (plain Python values)."""
        if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
            raise TokenizerError("no tokenizer in the file (fields 'tokenizer.ggml.model', "
                                 "'tokenizer.ggml.tokens')")
        tokens = tuple(meta["tokenizer.ggml.tokens"])
        g = lambda key: meta.get(f"tokenizer.ggml.{key}")
        eos = [g(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id") if g(k) is not None]
        return cls(
            model=str(meta["tokenizer.ggml.model"]), pre=g("pre"), tokens=tokens,
            token_types=tuple(g("token_type") or (1,) * len(tokens)),
            merges=tuple(g("merges") or ()), bos_id=g("bos_token_id"),
            eos_ids=tuple(dict.fromkeys(int(e) for e in eos)), unk_id=g("unknown_token_id"),
            pad_id=g("padding_token_id"), add_bos=bool(g("add_bos_token") or False),
            add_eos=bool(g("add_eos_token") or False),
            chat_template=meta.get("tokenizer.chat_template"))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp applies for ``tokenizer.ggml.pre``, as tokenizers objects."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":  # llama.cpp: "\p{N}" first, then the GPT-2 regex (as SmolLM's tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in ("gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = {"qwen2": _QWEN2_SPLIT, **dict.fromkeys(_LLAMA3_NAMES, _LLAMA3_SPLIT)}.get(pre)
    if split is None:
        raise TokenizerError(f"pre-tokenizer {pre!r} is not supported (field 'tokenizer.ggml.pre'); "
                             f"supported: {', '.join(SUPPORTED_PRE)}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    byte_level])


def _merge_pairs(merges: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise TokenizerError(f"malformed merge {bad!r} (field 'tokenizer.ggml.merges')")
    return pairs


def _post_processor(spec: TokenizerSpec) -> processors.PostProcessor | None:
    """BOS/EOS added by ``encode(add_special_tokens=True)``, as llama.cpp adds them."""
    single, special = ["$A"], []
    for flag, tid, at_end in ((spec.add_bos, spec.bos_id, False),
                              (spec.add_eos, spec.eos_ids[0] if spec.eos_ids else None, True)):
        if not flag:
            continue
        if tid is None or not 0 <= tid < len(spec.tokens):
            raise TokenizerError("add_bos_token/add_eos_token is set but the token id is missing "
                                 "or out of range (fields 'tokenizer.ggml.*_token_id')")
        single.insert(len(single) if at_end else 0, spec.tokens[tid])
        special.append((spec.tokens[tid], tid))
    return processors.TemplateProcessing(single=single, special_tokens=special) if special else None


def build_gguf_tokenizer(spec: TokenizerSpec) -> tokenizers.Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF tokenizer metadata."""
    if spec.model != "gpt2":
        raise TokenizerError(f"tokenizer model {spec.model!r} is not supported (field "
                             "'tokenizer.ggml.model'); only 'gpt2' (byte-level BPE)")
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    if len(vocab) != len(spec.tokens) or len(spec.token_types) != len(spec.tokens):
        raise TokenizerError("duplicate tokens, or token_type and tokens differ in length "
                             "(fields 'tokenizer.ggml.tokens', 'tokenizer.ggml.token_type')")
    # Llama 3's tokenizer.json sets ignore_merges, and llama.cpp does the same for these pre types.
    model = BPE(vocab=vocab, merges=_merge_pairs(spec.merges), fuse_unk=False,
                byte_fallback=False, ignore_merges=spec.pre in _LLAMA3_NAMES)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer(spec.pre)
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(spec.tokens, spec.token_types))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in typed if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in typed if ty == _USER_DEFINED])
    tok.post_processor = _post_processor(spec)
    return tok


def canonical_json(text: str) -> bytes:
    """Key-sorted, whitespace-free UTF-8 JSON: the bytes that get hashed."""
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def compile_chat_template(source: str, where: str) -> jinja2.Template:
    """Compile in a sandbox with the helpers HF chat templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: chat template does not compile ({e})") from None


def _read_json(path: Path) -> tuple[dict, str]:
    """(object, text) of a JSON file, or one clear error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return raw, text


def _load_backend(path: Path) -> tuple[tokenizers.Tokenizer, str]:
    _, text = _read_json(path)
    try:
        return tokenizers.Tokenizer.from_str(text), text
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None


def _token_content(value, path: Path, key: str) -> str | None:
    """A special token given as a string or as a serialized AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: field {key!r} must be a string or an AddedToken object")


def _template_from_config(config: dict, path: Path) -> str | None:
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is not None and not isinstance(tpl, str):
        raise TokenizerError(f"{path}: field 'chat_template' must be a string")
    return tpl


class Tokenizer:
    """A ``tokenizers.Tokenizer``, its special tokens and its chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, tokenizer_json: str,
                 config: dict, chat_template: str | None, eos_token_ids: tuple[int, ...],
                 where: str = "<memory>"):
        self.backend = backend
        self._json = tokenizer_json  # the tokenizer.json text this was built from
        self.config = config  # tokenizer_config.json fields, special tokens as strings
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids  # generation stops on any of these
        self._template = compile_chat_template(chat_template, where) if chat_template else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json`` (optional), ``chat_template.jinja``
        (optional, wins over the config's template) and ``generation_config.json`` (optional)."""
        folder = Path(folder)
        backend, text = _load_backend(folder / "tokenizer.json")
        cfg_path = folder / "tokenizer_config.json"
        raw = _read_json(cfg_path)[0] if cfg_path.exists() else {}
        config = {k: _token_content(raw.get(k), cfg_path, k) for k in _SPECIAL_NAMES}
        config.update({k: v for k, v in raw.items() if k not in _SPECIAL_NAMES
                       and k != "chat_template" and not k.startswith("added_tokens")})
        template, where = _template_from_config(raw, cfg_path), str(cfg_path)
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.exists():
            template, where = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
        eos = _eos_ids(backend, config.get("eos_token"), folder / "generation_config.json")
        return cls(backend, text, config, template, eos, where)

    @classmethod
    def from_gguf(cls, spec: TokenizerSpec) -> Tokenizer:
        """Build from GGUF tokenizer metadata."""
        backend = build_gguf_tokenizer(spec)
        name = lambda i: spec.tokens[i] if i is not None and 0 <= i < len(spec.tokens) else None
        config = {"bos_token": name(spec.bos_id),
                  "eos_token": name(spec.eos_ids[0]) if spec.eos_ids else None,
                  "unk_token": name(spec.unk_id), "pad_token": name(spec.pad_id),
                  "add_bos_token": spec.add_bos, "add_eos_token": spec.add_eos,
                  "clean_up_tokenization_spaces": False,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        return cls(backend, backend.to_str(), config, spec.chat_template, spec.eos_ids, "GGUF")

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into an existing folder."""
        folder = Path(folder)
        (folder / "tokenizer.json").write_text(self._json, encoding="utf-8")
        config = {**self.config, "chat_template": self.chat_template}
        config = {k: v for k, v in config.items() if v is not None}
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS/EOS as tokenizer.json's post-processor says)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra) -> str:
        """Render a conversation to the prompt string (``extra`` reaches the template)."""
        if self._template is None:
            raise TokenizerError("this tokenizer has no chat template")
        # Like transformers: keys whose value is None are dropped (templates test `is defined`).
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        specials = {k: v for k in _SPECIAL_NAMES if (v := self.config.get(k)) is not None}
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**specials, **extra})
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **extra) -> list[int]:
        """Render, then tokenize without adding BOS/EOS: the template writes its own."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)

    def tokenizer_hash(self) -> str:
        """blake3 hex of the canonical JSON of tokenizer.json."""
        return blake3.blake3(canonical_json(self._json)).hexdigest()

    def chat_template_hash(self) -> str | None:
        """blake3 hex of the chat template's UTF-8 source, or None without a template."""
        if self.chat_template is None:
            return None
        return blake3.blake3(self.chat_template.encode("utf-8")).hexdigest()


def _eos_ids(backend: tokenizers.Tokenizer, eos_token: str | None, gen_path: Path) -> tuple:
    """The eos token's id, then generation_config.json's eos_token_id(s)."""
    ids = []
    if eos_token is not None and (tid := backend.token_to_id(eos_token)) is not None:
        ids.append(tid)
    if gen_path.exists():
        eos = _read_json(gen_path)[0].get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{gen_path}: field 'eos_token_id' must be integers")
    return tuple(dict.fromkeys(ids))
