"""Every user mistake on either command line: one line on stderr naming the file or option and
what is wrong, exit 2, no traceback and no temporary-file paths; checked before any model loads
(the model given is one that does not exist, so a check made after loading would report the
model instead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commitllm.engine.cli import app as engine_app
from commitllm.verifier.cli import app as verifier_app
from commitllm.verifier.cliutil import KEY_MAGIC, OPENING_MAGIC

runner = CliRunner()
NO_MODEL = "/nonexistent/model-never-loaded"


def _one_line(res, *parts: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in res.output and ".tmp" not in line
    for p in parts:
        assert p in line, (p, line)
    assert NO_MODEL not in line  # refused before the model was looked at
    return line


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """One file of each kind, by its first bytes or fields (what the CLIs sniff)."""
    f = {"key": tmp_path / "v.key", "opening": tmp_path / "o.bin", "receipt": tmp_path / "r.json",
         "challenge": tmp_path / "c.json", "request": tmp_path / "q.json"}
    f["key"].write_bytes(KEY_MAGIC + b"\0" * 64)
    f["opening"].write_bytes(OPENING_MAGIC + b"\0" * 64)
    f["receipt"].write_text(json.dumps({"receipt_id": "ab" * 32, "output_token_ids": [1]}))
    f["challenge"].write_text(json.dumps({"receipt_id": "ab" * 32, "positions": [1], "layers": [0]}))
    f["request"].write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    return f


def test_generate_store_is_a_file(tmp_path):
    st = tmp_path / "store"
    st.write_text("x")
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--store", str(st)])
    _one_line(res, "--store", str(st), "is a file")


def test_generate_store_cannot_be_created(tmp_path):
    (tmp_path / "f").write_text("x")
    st = tmp_path / "f" / "store"  # under a file: cannot be created, even as root
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--store", str(st)])
    _one_line(res, "--store", "cannot create")


def test_generate_receipt_is_a_folder(tmp_path):
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--receipt",
                                     str(tmp_path)])
    _one_line(res, "--receipt", str(tmp_path), "is a folder")


def test_generate_receipt_parent_folders_are_created(tmp_path):
    """Output paths: parent folders are created everywhere (then the missing model is reported)."""
    out = tmp_path / "a" / "b" / "r.json"
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--receipt", str(out)])
    assert res.exit_code == 2 and NO_MODEL in res.stderr
    assert out.parent.is_dir()


def test_top_p_zero():
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--top-p", "0",
                                     "--temperature", "1"])
    _one_line(res, "--top-p", "(0, 1]")


def test_max_tokens_zero_with_audit():
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--max-tokens", "0",
                                     "--audit"])
    _one_line(res, "--audit", "--max-tokens")


def test_read_only_cache_names_the_variable(tmp_path, monkeypatch):
    blocked = tmp_path / "cache-file"
    blocked.write_text("x")  # a file where the cache folder should be: never writable
    monkeypatch.setenv("COMMITLLM_CACHE", str(blocked / "sub"))
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL])
    _one_line(res, "COMMITLLM_CACHE")
    res = runner.invoke(verifier_app, ["keygen", "--model", NO_MODEL + ".gguf", "--public"])
    _one_line(res, "COMMITLLM_CACHE")


def test_keygen_out_is_a_folder(tmp_path):
    res = runner.invoke(verifier_app, ["keygen", "--model", NO_MODEL, "--out", str(tmp_path)])
    _one_line(res, "--out", "is a folder")


def test_convert_non_empty_target_names_the_flag(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(engine_app, ["convert", str(src), str(out)])
    _one_line(res, str(out), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_open_store_missing(tmp_path, files):
    res = runner.invoke(engine_app, ["open", "--store", str(tmp_path / "nope"), "--challenge",
                                     str(files["challenge"]), "--out", str(tmp_path / "o.bin")])
    _one_line(res, "--store", "no such folder")
    assert not (tmp_path / "nope").exists()  # not created by the attempt


def test_open_challenge_in_the_wrong_slot(tmp_path, files):
    (tmp_path / "st").mkdir()
    res = runner.invoke(engine_app, ["open", "--store", str(tmp_path / "st"), "--challenge",
                                     str(files["receipt"]), "--out", str(tmp_path / "o2.bin")])
    _one_line(res, "--challenge", str(files["receipt"]), "looks like a receipt")


def test_open_out_is_a_folder(tmp_path, files):
    (tmp_path / "st").mkdir()
    res = runner.invoke(engine_app, ["open", "--store", str(tmp_path / "st"), "--challenge",
                                     str(files["challenge"]), "--out", str(tmp_path)])
    _one_line(res, "--out", "is a folder")


@pytest.mark.parametrize("slot, given, looks", [
    ("--receipt", "challenge", "a challenge"), ("--challenge", "receipt", "a receipt"),
    ("--opening", "receipt", "a receipt"), ("--receipt", "opening", "an opening"),
    ("--key", "opening", "an opening"), ("--request", "receipt", "a receipt"),
])
def test_verify_wrong_slot(files, slot, given, looks):
    args = {"--key": files["key"], "--receipt": files["receipt"],
            "--challenge": files["challenge"], "--opening": files["opening"],
            "--request": files["request"]}
    args[slot] = files[given]
    argv = ["verify"] + [x for k, v in args.items() for x in (k, str(v))]
    _one_line(runner.invoke(verifier_app, argv), slot, str(files[given]), f"looks like {looks}")


def test_challenge_wrong_slot_and_out_folder(tmp_path, files):
    res = runner.invoke(verifier_app, ["challenge", "--key", str(files["receipt"]), "--receipt",
                                       str(files["receipt"]), "--out", str(tmp_path / "c2.json")])
    _one_line(res, "--key", "looks like a receipt")
    res = runner.invoke(verifier_app, ["challenge", "--key", str(files["key"]), "--receipt",
                                       str(files["receipt"]), "--out", str(tmp_path)])
    _one_line(res, "--out", "is a folder")


def test_tier_and_profile_choices_listed():
    res = runner.invoke(verifier_app, ["challenge", "--help"], env={"COLUMNS": "200"})
    assert "routine|full|deep" in res.output
    res = runner.invoke(engine_app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert "w8a16|w16a16|a8" in res.output
    assert "<bool>" not in res.output and "--no-audit" not in res.output and "--json" in res.output
    res = runner.invoke(verifier_app, ["verify", "--help"], env={"COLUMNS": "200"})
    assert "<bool>" not in res.output


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.parametrize("prog", ["commitllm", "commitllm-engine"])
def test_version_and_usage_errors_as_console_scripts(prog, tmp_path):
    import commitllm

    proc = subprocess.run([_script(prog), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{prog} {commitllm.__version__}"
    sub = "verify" if prog == "commitllm" else "generate"
    proc = subprocess.run([_script(prog), sub, "--bogus-flag"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--bogus-flag" in lines[0]
    assert f"{prog} {sub} --help" in lines[0]


def test_stderr_not_wrapped_when_not_a_terminal(tmp_path):
    """A long stderr line from the rich console stays one line when stderr is a pipe."""
    code = ("from commitllm.verifier.cliutil import err_console; "
            "err_console().print('x' * 300, highlight=False)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert proc.stderr == "x" * 300 + "\n"


def test_verify_summary_counts_and_times(tmp_path, monkeypatch):
    """`commitllm verify` labels its counts as the challenge does (challenged positions vs K/V
    sample rows) and its times add up to the total; --json is one document with the same."""
    from tinymodels import make_tiny_chat_model

    monkeypatch.setenv("COMMITLLM_CACHE", str(tmp_path / "cache"))
    model = str(make_tiny_chat_model(tmp_path / "tiny"))
    d = {n: str(tmp_path / n) for n in ("k.key", "r.json", "st", "c.json", "o.bin")}
    for app, argv in [
        (verifier_app, ["keygen", "--model", model, "--out", d["k.key"]]),
        (engine_app, ["generate", "hello", "--model", model, "--max-tokens", "5", "--receipt",
                      d["r.json"], "--store", d["st"]]),
        (verifier_app, ["challenge", "--key", d["k.key"], "--receipt", d["r.json"], "--tier",
                        "routine", "--out", d["c.json"]]),
        (engine_app, ["open", "--store", d["st"], "--challenge", d["c.json"], "--out", d["o.bin"]]),
    ]:
        res = runner.invoke(app, argv)
        assert res.exit_code == 0, res.output
    chal = json.loads(Path(d["c.json"]).read_text())
    argv = ["verify", "--key", d["k.key"], "--receipt", d["r.json"], "--challenge", d["c.json"],
            "--opening", d["o.bin"]]
    res = runner.invoke(verifier_app, argv)
    assert res.exit_code == 0, res.output
    n, layers = len(set(chal["positions"])), len(set(chal["layers"]))
    assert f"{layers} layers x {n} challenged positions replayed" in res.stdout
    assert (f"challenge (routine tier): {n} positions x {layers} layers, "
            f"{len(set(chal['decode_positions']))} of them decode positions") in res.stdout
    assert f"{len(set(chal['decode_positions']))} decode steps" in res.stdout
    assert "time: " in res.stdout and "other checks" in res.stdout
    res = runner.invoke(verifier_app, argv + ["--json"])
    doc = json.loads(res.stdout)  # one document
    ms = doc["timing_ms"]
    parts = ms["freivalds"] + ms["attention"] + ms["rest"] + ms["merkle"] + ms["other"]
    assert abs(parts - ms["total"]) < 0.01  # rounding of the five parts only


def test_open_unknown_receipt_is_one_line(tmp_path, files):
    (tmp_path / "st").mkdir()
    res = runner.invoke(engine_app, ["open", "--store", str(tmp_path / "st"), "--challenge",
                                     str(files["challenge"]), "--out", str(tmp_path / "o3.bin")])
    line = _one_line(res, "--store", "no transcript for receipt")
    assert "KeyError" not in line and "'" not in line.split("receipt", 1)[1][:3]


def test_generate_store_sqlite_file_is_refused(tmp_path):
    st = tmp_path / "transcripts.sqlite"
    st.write_bytes(b"")
    res = runner.invoke(engine_app, ["generate", "hi", "--model", NO_MODEL, "--store", str(st)])
    _one_line(res, "--store", "is a file")
