"""Command lines: the main job on the default model, and clear failures on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from commitllm.engine.cli import app as engine_app
from commitllm.verifier.cli import app as verifier_app

runner = CliRunner()


def _json_out(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_generate_default_model_json(smollm2):
    res = runner.invoke(engine_app, ["generate", "What is 2+2?", "--max-tokens", "12", "--json"])
    out = _json_out(res)
    tok = smollm2.tokenizer
    assert out["backend"] == "exact" and out["profile"] == "w8a16"
    assert out["prompt_token_ids"] == tok.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    assert 1 <= len(out["token_ids"]) <= 12
    assert out["text"] == tok.decode(out["token_ids"])


def test_generate_batch_matches_single(smollm2, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Name a color.\n\nName a fruit.\n")
    batch = _json_out(runner.invoke(engine_app, ["generate", "--prompts-file", str(f),
                                                 "--max-tokens", "8", "--json"]))
    assert [r["prompt"] for r in batch["results"]] == ["Name a color.", "Name a fruit."]
    single = _json_out(runner.invoke(engine_app, ["generate", "Name a fruit.", "--max-tokens", "8",
                                                  "--json"]))
    assert batch["results"][1]["token_ids"] == single["token_ids"]


def test_generate_reference_backend_says_so(smollm2):
    res = runner.invoke(engine_app, ["generate", "Hi", "--max-tokens", "4",
                                     "--backend", "reference-fp32"])
    assert res.exit_code == 0, res.output
    assert "NOT the exact engine" in res.output


def test_score_json(smollm2, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    out = _json_out(runner.invoke(engine_app, ["score", str(f), "--json"]))
    n = len(out["token_ids"])
    assert len(out["argmax"]) == n and len(out["logprobs"]) == n - 1
    assert out["nll"] == pytest.approx(-sum(out["logprobs"]))  # float64 sum of the same numbers
    assert all(lp <= 0 for lp in out["logprobs"])


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["generate", "hi", "--profile", "w4a4"], "w4a4"),
    (["generate", "hi", "--top-p", "0", "--temperature", "1"], "top_p"),
    (["generate"], "at least one PROMPT"),
    (["generate", "hi", "--prompts-file", "/nonexistent/prompts.txt"], "cannot read"),
    (["score", "/nonexistent/text.txt"], "cannot read"),
])
def test_bad_input_fails_clearly(args, message):
    res = runner.invoke(engine_app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_truncated_checkpoint_fails_clearly(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    res = runner.invoke(verifier_app, ["inspect", str(bad)])
    assert res.exit_code == 2
    assert "model.safetensors" in res.output and "truncated" in res.output


def test_missing_tokenizer_fails_clearly(tiny_llama):
    res = runner.invoke(engine_app, ["generate", "hi", "--model", str(tiny_llama)])
    assert res.exit_code == 2
    assert "tokenizer" in res.output.lower()


def test_convert_refuses_non_gguf_and_leaves_nothing(tmp_path):
    src = tmp_path / "x.gguf"
    src.write_bytes(b"not a gguf file at all" * 10)
    out = tmp_path / "out"
    res = runner.invoke(engine_app, ["convert", str(src), str(out)])
    assert res.exit_code == 2 and "x.gguf" in res.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_help_explains_every_command():
    for app, cmds in ((engine_app, ["generate", "score", "convert"]),
                      (verifier_app, ["spec", "inspect"])):
        res = runner.invoke(app, ["--help"])
        assert res.exit_code == 0
        for c in cmds:
            assert c in res.output
            sub = runner.invoke(app, [c, "--help"])
            assert sub.exit_code == 0 and "Usage" in sub.output


def test_spec_json_lists_constants():
    res = runner.invoke(verifier_app, ["spec", "--json"])
    assert res.exit_code == 0
    consts = json.loads(res.stdout)
    assert consts["spec_version"] == "commitllm-numerics/3"
    assert set(consts["profiles"]) == {"w8a16", "w16a16", "a8"}


@pytest.mark.slow  # the CLI around the Triton backend (its bytes: kernels/test_triton_backend.py)
def test_generate_triton_backend_audit_accepts(tmp_path):
    """`generate --backend triton --audit`: the opening (LM-head accumulators included) is built
    on the Triton backend and verifies. A subprocess: the interpreter is chosen at import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tinymodels import make_tiny_chat_model

    model = make_tiny_chat_model(tmp_path / "tiny")
    exe = Path(sys.executable).parent / "commitllm-engine"
    res = subprocess.run([str(exe), "generate", "hi", "--model", str(model), "--backend", "triton",
                          "--max-tokens", "3", "--audit", "--json"], capture_output=True,
                         text=True, timeout=300,
                         env=dict(os.environ, COMMITLLM_CACHE=str(tmp_path / "cache")))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # one document: the generation, the audit inside
    assert [row["accepted"] for row in out["audit"]] == [True], out


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"])
def test_inspect_names_the_family_and_what_is_verified(kind, request):
    from commitllm.verifier.config import FAMILIES

    folder = request.getfixturevalue(f"tiny_{kind}")
    res = runner.invoke(verifier_app, ["inspect", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["family"] == kind and info["verified"] == FAMILIES[kind]
    assert info["config"]["model_type"] == kind
    assert info["config"].get("sliding_window") == {"mistral": 5, "mixtral": 6}.get(kind)
    if kind == "mixtral":
        conf = info["config"]
        assert (conf["num_local_experts"], conf["num_experts_per_tok"]) == (4, 2)
        assert "experts" in info["verified"]
    if kind == "qwen3_moe":
        conf = info["config"]
        assert (conf["num_experts"], conf["num_experts_per_tok"], conf["moe_intermediate_size"],
                conf["norm_topk_prob"]) == (4, 2, 48, True)
        assert "experts" in info["verified"] and "q/k norm" in info["verified"]
