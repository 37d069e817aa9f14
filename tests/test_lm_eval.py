"""lm-evaluation-harness as a real client (slow; needs the `lm_eval` command: on PATH or named by
$LM_EVAL, e.g. a venv with `pip install "lm-eval[api]" transformers`). Two local tasks against
`serve`: generate_until with stop sequences, and multiple choice (log-likelihoods: token-id
prompts with echo and logprobs). The run completes, its answers equal the same requests sent one
at a time, and `commitllm audit` accepts every receipt it produced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from test_serve import ThreadServer, _audit, model_and_key  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

ROWS = [{"q": "ab", "a": "c", "choices": ["c", "d", "e"], "label": 0},
        {"q": "ba", "a": "b", "choices": ["a", "b", "c"], "label": 1},
        {"q": "cab", "a": "a", "choices": ["b", "a", "d"], "label": 1}]


def _tasks(d) -> None:
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
              "test_split: test\ndoc_to_text: \"{{q}}\"\n")
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{a}}\"\n"
        "generation_kwargs:\n  until: [\"b\", \"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")


def test_lm_eval_run_completes_and_every_receipt_verifies(model_and_key, tmp_path):  # noqa: F811
    exe = os.environ.get("LM_EVAL") or shutil.which("lm_eval")
    if not exe:
        pytest.skip("lm_eval is not installed (set LM_EVAL to its command)")
    folder, key = model_and_key
    _tasks(tmp_path)
    srv = ThreadServer(folder, tmp_path / "store")
    try:
        args = (f"model=tiny,base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={folder},max_length=256,num_concurrent=1,max_retries=1")
        run = subprocess.run([exe, "--model", "local-completions", "--model_args", args,
                              "--include_path", str(tmp_path), "--tasks", "tiny_gen,tiny_mc",
                              "--log_samples", "--output_path", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        samples = {f.name.split("samples_")[1].rsplit("_", 1)[0]:
                   [json.loads(x) for x in f.read_text().splitlines()]
                   for f in (tmp_path / "out").rglob("samples_*.jsonl")}
        assert sorted(samples) == ["tiny_gen", "tiny_mc"]
        assert all(len(v) == len(ROWS) for v in samples.values())
        res = _audit(srv, key, "--tier", "full", "--json")
        rows = json.loads(res.stdout)["rows"]
        # 3 generations (stop sequences) + 9 log-likelihoods (echo + logprobs, token-id prompts)
        assert res.exit_code == 0 and len(rows) == 3 + 9 and all(r["accepted"] for r in rows)
        # each generation sent again alone, as lm-eval sent it (its tokenizer's ids, no BOS),
        # answers the text lm-eval recorded
        import urllib.request

        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(folder))
        for s in samples["tiny_gen"]:
            body = {"model": "tiny", "prompt": [tok.encode(s["doc"]["q"], add_special_tokens=False)],
                    "max_tokens": 8, "temperature": 0, "stop": ["b", "\n"], "seed": 1234}
            req = urllib.request.Request(srv.url + "/v1/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["choices"][0]["text"] == s["filtered_resps"][0]
    finally:
        srv.stop()


def test_bench_lm_eval_tiny_concurrency(tmp_path):
    """bench/lm_eval.py on the tiny model at 1 and 3 concurrent requests (continuous batching):
    same answers at both, every receipt accepted."""
    exe = os.environ.get("LM_EVAL") or shutil.which("lm_eval")
    if not exe:
        pytest.skip("lm_eval is not installed (set LM_EVAL to its command)")
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from bench import lm_eval as bench_lm_eval

    assert bench_lm_eval.main(["--model", "tiny", "--concurrency", "1,3", "--lm-eval", exe,
                               "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "lm_eval.json").read_text())["models"]["tiny"]["runs"]
    assert [r["concurrent"] for r in runs] == [1, 3]
    assert all(r["same_answers_as_first"] and r["audit"]["accepted"] == r["audit"]["audited"]
               for r in runs)
