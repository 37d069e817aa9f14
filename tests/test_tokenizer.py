"""Tokenizer: built from the SmolLM2 GGUF it encodes like transformers' GGUF tokenizer and like
llama.cpp's 'smollm' pre-tokenizer; the chat template renders like transformers; HF folders load
and save; bad files fail with one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
import regex
from commitllm.engine.gguf_import import read_gguf_tokenizer
from commitllm.engine.loader import ModelNotFound, default_gguf
from commitllm.verifier.tokenizer import Tokenizer, TokenizerError, TokenizerSpec

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, didn't we? YOU'RE", "12345", "3.14159 and 2,718",
    "x1 = y22 + z333; call 555-0100", "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "<html><body>&amp;</body></html>",
    "héllo wörld ñandú", "日本語のテキスト", "Привет, мир!", "مرحبا بالعالم", "Ünïcödé ß ﬁ e\u0301",
    "a\u200bb", "😀🎉👍🏽 family: 👨\u200d👩\u200d👧", "  leading", "trailing   ", "a\t\tb\n\n\nc",
    "\r\n\r\n", "   ", "", "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>",
    "text<|im_end|>more", "<|im_start|", "The year 2024 had 365 days.",
]
# Two or more whitespace characters before a digit: llama.cpp and SmolLM2's own tokenizer.json
# split digits first ("\p{N}", then the GPT-2 regex); transformers' GGUF conversion (5.23) skips
# the digit split for pre='smollm' and cuts the whitespace run differently ("\n\n1" -> 198 198 33
# instead of 1116 33). We follow llama.cpp and the original tokenizer.
WHITESPACE_DIGITS = ["\n\n1", "a   1", "x = [1,  2,   3]", "    42", "price:\t\t100"]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats 🐱."}],
    [{"role": "user", "content": "Write code:\ndef f():\n    pass", "name": None},
     {"role": "assistant", "content": "def f():\n    pass\n", "tool_calls": None}],
]


def smollm2_gguf() -> Path:
    try:
        return default_gguf()
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def spec() -> TokenizerSpec:
    return read_gguf_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def ours(spec) -> Tokenizer:
    return Tokenizer.from_gguf(spec)


@pytest.fixture(scope="module")
def ref():
    """transformers' tokenizer built from the same GGUF: the reference."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _byte_level() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def llama_cpp_smollm_ids(tok: Tokenizer, text: str) -> list[int]:
    """llama.cpp's pipeline spelled out: split by "\\p{N}", then by the GPT-2 regex (matches and
    the gaps between them are pieces), map bytes to the byte-level alphabet, BPE each piece."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
    pieces = [text]
    for pattern in (r"\p{N}", gpt2):
        pieces = [p for piece in pieces for p in _split_isolated(piece, pattern)]
    alphabet = _byte_level()
    ids = []
    for piece in pieces:
        spelled = "".join(alphabet[b] for b in piece.encode("utf-8"))
        ids.extend(t.id for t in tok.backend.model.tokenize(spelled))
    return ids


def _split_isolated(text: str, pattern: str) -> list[str]:
    out, at = [], 0
    for m in regex.finditer(pattern, text):
        out += [text[at:m.start()], m.group()]
        at = m.end()
    return [p for p in [*out, text[at:]] if p]


# --- SmolLM2 GGUF -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t] + WHITESPACE_DIGITS)
def test_encode_matches_llama_cpp_pipeline(ours, text):
    ids = ours.encode(text)
    assert ids == llama_cpp_smollm_ids(ours, text)
    assert ours.decode(ids) == text


def test_whitespace_before_digits(ours):
    tokens = [ours.backend.id_to_token(i) for i in ours.encode("\n\n1")]
    assert tokens == ["ĊĊ", "1"]
    assert [ours.backend.id_to_token(i) for i in ours.encode("a   1")] == ["a", "ĠĠĠ", "1"]


def test_special_tokens(ours):
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert ours.decode([1, 4093, 198, 6004, 2]) == "user\nhi"
    assert ours.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"
    assert ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi", add_special_tokens=False)
    assert ours.eos_token_ids == (2,) and ours.vocab_size == 49152


@pytest.mark.parametrize("chat", CHATS, ids=["user", "system", "multi_turn", "none_fields"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(ours, ref, chat, gen):
    text = ours.apply_chat_template(chat, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True,
                                   return_dict=False)
    assert ours.encode_chat(chat, add_generation_prompt=gen) == list(want)


def test_default_system_prompt_is_added(ours):
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# --- HF folders -------------------------------------------------------------------------------

@pytest.fixture()
def folder(tmp_path, ours) -> Path:
    (tmp_path / "tok").mkdir()
    ours.save(tmp_path / "tok")
    return tmp_path / "tok"


def test_save_then_from_folder_round_trips(ours, folder):
    back = Tokenizer.from_folder(folder)
    assert back.tokenizer_hash() == ours.tokenizer_hash()
    assert back.chat_template_hash() == ours.chat_template_hash()
    assert back.eos_token_ids == ours.eos_token_ids
    for text in TEXTS + WHITESPACE_DIGITS:
        assert back.encode(text) == ours.encode(text)
    assert back.encode_chat(CHATS[2]) == ours.encode_chat(CHATS[2])


def test_transformers_loads_the_saved_folder(ours, folder):
    """The written tokenizer.json / tokenizer_config.json work with AutoTokenizer too."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + WHITESPACE_DIGITS:
        assert hf.encode(text) == ours.encode(text)
    assert hf.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=True,
                                  return_dict=False) == ours.encode_chat(CHATS[1])


def test_hashes(ours, folder):
    assert ours.chat_template_hash() == blake3.blake3(ours.chat_template.encode()).hexdigest()
    path = folder / "tokenizer.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(raw, indent=4))  # formatting does not change the hash
    assert Tokenizer.from_folder(folder).tokenizer_hash() == ours.tokenizer_hash()
    raw["model"]["merges"] = raw["model"]["merges"][:-1]
    path.write_text(json.dumps(raw))
    assert Tokenizer.from_folder(folder).tokenizer_hash() != ours.tokenizer_hash()


def test_config_variants(folder):
    """AddedToken dicts, a template list, chat_template.jinja winning, generation_config eos."""
    cfg_path = folder / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    config["chat_template"] = [{"name": "default", "template": "A{{ eos_token }}"},
                               {"name": "tool_use", "template": "B"}]
    cfg_path.write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 7]}))
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template([]) == "A<|endoftext|>" and tok.eos_token_ids == (0, 2, 7)
    (folder / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user"}]) == "J1"


def test_chat_template_gets_no_clock(folder):
    (folder / "chat_template.jinja").write_text(
        "{% if strftime_now is defined %}clock{% else %}{{ date_string | default('fixed') }}"
        "{% endif %}")
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template([]) == "fixed"
    assert tok.apply_chat_template([], date_string="26 Jul 2024") == "26 Jul 2024"


# --- errors -----------------------------------------------------------------------------------

def _one_line_naming(e: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_corrupt_files(tmp_path, folder):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_folder(tmp_path / "nowhere")
    _one_line_naming(e, tmp_path / "nowhere" / "tokenizer.json")
    for name, content in [("tokenizer.json", '{"model": '), ("tokenizer.json", '{"a": 1}'),
                          ("tokenizer.json", "[1, 2]"), ("tokenizer_config.json", "{oops"),
                          ("generation_config.json", '{"eos_token_id": "x"}'),
                          ("chat_template.jinja", "{% for %}")]:
        bad = tmp_path / f"bad_{len(content)}"
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / name).write_text(content)
        with pytest.raises(TokenizerError) as e:
            Tokenizer.from_folder(bad)
        _one_line_naming(e, bad / name)


def test_template_errors(folder):
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    tok = Tokenizer.from_folder(folder)
    with pytest.raises(TokenizerError, match="no system role"):
        tok.encode_chat([{"role": "system", "content": "x"}])
    (folder / "chat_template.jinja").unlink()
    cfg_path = folder / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    del config["chat_template"]
    cfg_path.write_text(json.dumps(config))
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_template_hash() is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


# --- GGUF tokenizer variants on a toy byte-level vocabulary -----------------------------------

def toy_spec(**kw) -> TokenizerSpec:
    alphabet = _byte_level()
    tokens = [alphabet[b] for b in range(256)] + ["<s>", "</s>", "<tool>"]  # id = byte value
    types = [1] * 256 + [3, 3, 4]
    base = {"model": "gpt2", "pre": "gpt-2", "tokens": tuple(tokens), "token_types": tuple(types),
            "merges": (), "bos_id": 256, "eos_ids": (257,), "unk_id": None, "pad_id": None,
            "add_bos": False, "add_eos": False,
            "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}
    return TokenizerSpec(**{**base, **kw})


@pytest.mark.parametrize("pre,split", [
    ("qwen2", (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
    ("llama-bpe", (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
])
def test_split_pre_tokenizers_follow_their_regex(pre, split):
    tok = Tokenizer.from_gguf(toy_spec(pre=pre))
    alphabet = _byte_level()
    for text in TEXTS[:16] + WHITESPACE_DIGITS + ["I'M HERE 1234567 \n\n  x"]:
        want = ["".join(alphabet[b] for b in p.encode()) for p in regex.findall(split, text)]
        assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)] == want
    model = json.loads(tok.backend.to_str())["model"]
    assert model["ignore_merges"] is (pre == "llama-bpe")  # as Llama 3's tokenizer.json


def test_bos_added_when_the_file_says_so():
    tok = Tokenizer.from_gguf(toy_spec(add_bos=True))
    assert tok.encode("hi") == [256, 104, 105]
    assert tok.encode("hi", add_special_tokens=False) == [104, 105]
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == [256, 104, 105]  # once
    assert tok.encode("a<tool>b</s>") == [256, 97, 258, 98, 257]
    assert tok.decode([256, 97, 258, 98, 257]) == "a<tool>b"  # user-defined tokens are kept


@pytest.mark.parametrize("change,field", [
    ({"model": "llama"}, "tokenizer.ggml.model"), ({"pre": "default"}, "tokenizer.ggml.pre"),
    ({"pre": None}, "tokenizer.ggml.pre"), ({"pre": "deepseek-llm"}, "tokenizer.ggml.pre"),
    ({"merges": ("a b c",)}, "tokenizer.ggml.merges"),
    ({"token_types": (1,)}, "tokenizer.ggml.token_type"),
    ({"add_eos": True, "eos_ids": ()}, "tokenizer.ggml"),
])
def test_unsupported_gguf_tokenizers_are_refused(change, field):
    with pytest.raises(TokenizerError, match=field.replace(".", r"\.")):
        Tokenizer.from_gguf(replace(toy_spec(), **change))


def test_spec_needs_a_vocabulary():
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        TokenizerSpec.from_metadata({"general.architecture": "llama"})
