"""`commitllm`: the verifier's command line. Runs on numpy alone (no torch, no triton)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from .cliutil import ProfileName, TierName, check_cache, check_out_file, expect_kind
from rich.table import Table

from . import cliutil, container, progress
from .checkpoint import CheckpointError, load_checkpoint
from .config import FAMILIES, ConfigError
from .digest import numerics_constants, weights_digest
from .numerics import get_profile
from .numerics.rope import RopeTable
from .numerics.weights import quantize_model

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="CommitLLM verifier: inspect the numerics spec and models, CPU only.")
out = Console(soft_wrap=not sys.stdout.isatty())  # a pipe gets whole lines
err = cliutil.err_console()
progress.use(err)
cliutil.hide_flag_types()


@app.callback()
def _root(version: bool = cliutil.version_option("commitllm")) -> None:
    """CommitLLM verifier: inspect the numerics spec and models, CPU only."""


@app.command()
def spec(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the numerics spec version, profiles and every constant (with table digests)."""
    consts = numerics_constants()
    if as_json:
        print(json.dumps(consts, indent=2))
        return
    table = Table("constant", "value", title=consts["spec_version"])
    for k, v in consts.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    out.print(table)


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="An HF model folder (config.json + safetensors)."),
    profile: ProfileName = typer.Option(ProfileName.w8a16, help="Numerics profile to quantize with."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Load a checkpoint with numpy, quantize it as the engine does, print its config and digests."""
    profile = profile.value
    try:
        prof = get_profile(profile)
        with err.status(f"loading {folder} ..."):
            cfg, tensors = load_checkpoint(folder)
            qm = quantize_model(cfg, tensors, prof)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)  # one plain line: no wrapping, no markup
        raise typer.Exit(2)
    info = {"folder": str(folder), "family": cfg.family, "verified": FAMILIES[cfg.family],
            "profile": prof.name, "config": cfg.to_hf_dict(),
            "parameters": int(sum(a.size for a in tensors.values())),
            "weights_blake3": weights_digest(qm), "rope_table_sha256": RopeTable(cfg).digest()}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        out.print(f"[bold]{k}[/bold]: {json.dumps(v) if isinstance(v, dict) else v}", highlight=False)


_fail = cliutil.fail  # one plain line on stderr, exit 2


def _load_json(path: Path, what: str, max_bytes: int = 256 * 1024 * 1024):
    """Outside JSON through the bounded parser (size checked before reading, depth and number
    lengths before parsing); one-line errors naming the file."""
    return cliutil.read_json_file(path, f"the {what}", max_bytes)


def _resolve_model(model: str) -> Path:
    if model != "default" and Path(model).is_dir():
        return Path(model)
    try:
        from commitllm.engine.loader import resolve_model
    except ImportError:
        _fail("--model default or a .gguf file needs the engine extra (gguf); give an HF folder")
    try:
        return resolve_model(model)
    except (OSError, ValueError) as e:
        _fail(str(e))


@app.command()
def keygen(
    model: str = typer.Option("default", help="'default', a .gguf file, or an HF folder."),
    out: Path = typer.Option(None, help="Key file to write (mode 0600; it holds the secret)."),
    profile: ProfileName = typer.Option(ProfileName.w8a16, help="Numerics profile the provider serves."),
    public: bool = typer.Option(False, "--public", help="Print the public model commitment as JSON."),
) -> None:
    """Build a key from the public checkpoint: model commitment and secret Freivalds vectors."""
    from commitllm.keys.keygen import build_key, save_key
    from .tokenizer import Tokenizer, TokenizerError

    profile = profile.value
    if out is None and not public:
        _fail("give --out KEYFILE, --public, or both")
    check_out_file(out, "--out")  # before the (slow) keygen
    if model == "default" or not Path(model).is_dir():
        check_cache()  # a GGUF is converted into the cache
    folder = _resolve_model(model)
    try:
        prof = get_profile(profile)
        from commitllm.keys.keygen import _linears

        with progress.step(f"loading and quantizing {folder} ({prof.name})"):
            cfg, tensors = load_checkpoint(folder)
            qm = quantize_model(cfg, tensors, prof)
            tok = Tokenizer.from_folder(folder)
        n = sum(1 for _ in _linears(qm))
        with progress.step(f"building the key: committing and projecting {n} matrices",
                           total=n) as advance:
            key = build_key(qm, tok, progress=lambda _label: advance())
        if out is not None:
            save_key(key, out)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, OSError) as e:
        _fail(str(e))
    if out is not None:
        err.print(f"wrote {out} (secret: keep it with the verifier)")
    if public:
        keys = ("model_commitment", "spec_version", "profile", "numerics_digest", "rope_digest",
                "tokenizer_hash", "chat_template_hash")
        print(json.dumps({k: key.meta[k] for k in keys}, indent=2))


@app.command()
def challenge(
    key: Path = typer.Option(..., help="The verifier's key file."),
    receipt: Path = typer.Option(..., help="A receipt (JSON) returned by the provider."),
    tier: TierName = typer.Option(TierName.routine, help="routine (few positions, 10 layers), full "
                                                       "(all layers), deep (every position, every layer)."),
    positions: str = typer.Option(None, help="'generated' (every decode position) or a comma list."),
    out: Path = typer.Option(..., help="Where to write the challenge (JSON)."),
) -> None:
    """Derive a fresh challenge from the key's secret, the receipt and a random nonce."""
    from commitllm.keys.keygen import load_key

    from . import challenge as ch
    from .container import ContainerError
    from .receipt import ReceiptError, check_receipt, receipt_bound

    tier = tier.value
    expect_kind(key, "--key", "a key")
    expect_kind(receipt, "--receipt", "a receipt")
    check_out_file(out, "--out")
    try:
        k = load_key(key)
        cfg = k.meta["config"]
        rec = _load_json(receipt, "receipt", receipt_bound(cfg["max_position_embeddings"]))
        check_receipt(rec, vocab_size=cfg["vocab_size"],
                      max_positions=cfg["max_position_embeddings"])
        pos = positions if positions in (None, "generated") else [int(p) for p in positions.split(",")]
        c = ch.derive(k.secret, rec, tier, positions=pos, n_layers=cfg["num_hidden_layers"])
        out.write_text(json.dumps(c, indent=1))
    except (ReceiptError, ContainerError, ValueError, OSError) as e:
        _fail(str(e))
    err.print(f"wrote {out}: {tier}, {len(c['positions'])} positions x {len(c['layers'])} layers")


@app.command()
def verify(
    key: Path = typer.Option(..., help="The verifier's key file."),
    receipt: Path = typer.Option(..., help="The receipt (JSON)."),
    challenge: Path = typer.Option(..., help="The challenge this verifier issued (JSON)."),
    opening: Path = typer.Option(..., help="The provider's opening (binary)."),
    nonce: str = typer.Option(None, help="The nonce the client sent; the receipt must carry it."),
    request: Path = typer.Option(None, help="The request body as the client sent it (JSON); "
                                            "every field is checked against the receipt "
                                            "(verifier/request.py), unknown fields refused."),
    endpoint: str = typer.Option(None, help="The path the client called: /v1/chat/completions "
                                            "or /v1/completions (the request must fit it)."),
    no_io_binding: bool = typer.Option(False, "--no-io-binding",
                                       help="Accept a key without a tokenizer: the receipt's "
                                            "request and text are then NOT bound to its token "
                                            "ids (the verdict says so)."),
    as_json: bool = typer.Option(False, "--json", help="Print every check as JSON."),
    threads: int = typer.Option(0, min=0, help="Threads replaying the challenged layers while "
                                               "the Merkle proofs are hashed; the verdict does "
                                               "not depend on it. 0 (default): every core for "
                                               "openings from 16 MiB, 1 below (where the pool "
                                               "costs more than it saves)."),
) -> None:
    """Check an opening against the receipt and the key. Exit 0 accept, 1 reject, 2 malformed."""
    from commitllm.keys.keygen import key_tokenizer, load_key

    from .container import ContainerError
    from . import native
    from .opening import OPENING_MAGIC, OPENING_UPGRADE, OPENING_VERSION
    from .receipt import receipt_bound
    from .verify import verify as run_verify

    expect_kind(key, "--key", "a key")
    expect_kind(receipt, "--receipt", "a receipt")
    expect_kind(challenge, "--challenge", "a challenge")
    expect_kind(opening, "--opening", "an opening")
    if request is not None:
        expect_kind(request, "--request", "a request")
    try:
        k = load_key(key)
    except (ContainerError, OSError, ValueError) as e:
        _fail(str(e))
    # a receipt larger than any honest one for this model is refused before it is parsed
    rec = _load_json(receipt, "receipt", receipt_bound(k.meta["config"]["max_position_embeddings"]))
    chal = _load_json(challenge, "challenge", 1 << 20)
    client_request = None if request is None else _load_json(request, "request")
    try:
        size = opening.stat().st_size
        if size < BACKGROUND_BUILD_BELOW:  # a short run: do not wait for cc
            native.build_in_background()
        if threads == 0:
            threads = native.threads() if size >= THREADS_FROM else 1
        meta, arrays = container.read(opening, OPENING_MAGIC, OPENING_VERSION, 1 << 34)
        tok = key_tokenizer(k)
    except container.ContainerVersionError as e:
        _fail(f"{opening}: {e}; {OPENING_UPGRADE}")
    except (ContainerError, OSError, ValueError) as e:
        _fail(str(e))
    v = run_verify(k, rec, chal, meta, arrays, tok, expected_nonce=nonce,
                   expected_request=client_request, expected_endpoint=endpoint,
                   io_binding=not no_io_binding, threads=threads)
    doc = v.to_json()
    ms = doc["timing_ms"]
    if {"total", "freivalds", "attention", "rest", "merkle"} <= set(ms):
        # the parts add up to the total: what is neither replay nor Merkle is "other"
        ms["other"] = round(ms["total"] - ms["freivalds"] - ms["attention"] - ms["rest"]
                            - ms["merkle"], 3)
    if as_json:
        print(json.dumps(doc, indent=1))
    else:
        for c in v.checks:
            mark = "NOT CHECKED" if c["ok"] is None else ("ok  " if c["ok"] else "FAIL")
            out.print(f"{mark} {c['check']}: {c['detail']}", highlight=False)
        if isinstance(chal, dict) and all(isinstance(chal.get(k), (list, dict)) for k in
                                          ("positions", "layers", "decode_positions")):
            out.print(f"challenge ({chal.get('tier', '?')} tier): {len(set(chal['positions']))} "
                      f"positions x {len(set(chal['layers']))} layers, "
                      f"{len(set(chal['decode_positions']))} of them decode positions",
                      highlight=False)
        if "other" in ms:
            out.print(f"time: {ms['total']:.1f} ms = Freivalds {ms['freivalds']:.1f} + attention "
                      f"{ms['attention']:.1f} + rest of the replay {ms['rest']:.1f} (LM head and "
                      f"decode policy {ms.get('decode', 0):.1f} of these) + Merkle proofs "
                      f"{ms['merkle']:.1f} + other checks {ms['other']:.1f} (receipt, manifest, "
                      f"challenge MAC, tokenizer, embedding rows)", highlight=False)
        unchecked = f" ({', '.join(v.unchecked)} NOT CHECKED)" if v.unchecked else ""
        out.print(f"ACCEPTED{unchecked}" if v.accepted else f"REJECTED ({v.reason})",
                  highlight=False)
    raise typer.Exit(0 if v.accepted else (2 if v.reason in MALFORMED else 1))


MALFORMED = {"receipt_malformed", "opening_malformed"}
# openings below this verify in well under the compiled core's one-time build (about 2 s here),
# so a first run on a new machine starts the build in the background and takes the numpy route
# (the same bits); larger ones wait for the build, which pays for itself
BACKGROUND_BUILD_BELOW = 64 << 20
# --threads 0: layer threads from this opening size (an 8B-shape routine opening at 1024
# positions, 4 layers, 26 MB: 36 -> 30 ms on 2 cores; SmolLM2's 4 MB one: 41 -> 47 ms)
THREADS_FROM = 16 << 20


@app.command()
def audit(
    server: str = typer.Option(..., help="The provider's base URL, e.g. http://127.0.0.1:8000."),
    key: Path = typer.Option(..., help="The verifier's key file (never sent to the server)."),
    receipts: Path = typer.Option(None, help="What the client saved: a JSON file or a folder of "
                                             "them, each an exchange {endpoint, request, "
                                             "response or chunks} (then the request and the "
                                             "content received are checked too), a response, "
                                             "a receipt, or a list of those. Default: the "
                                             "server's recent receipts (nothing to compare)."),
    rate: float = typer.Option(1.0, help="Fraction of the receipts to challenge, in (0, 1]."),
    tier: TierName = typer.Option(TierName.routine, help="Challenge tier."),
    limit: int = typer.Option(100, min=1, max=1000, help="How many recent receipts to list from "
                                                         "the server (without --receipts)."),
    max_receipts: int = typer.Option(10_000, min=1, max=1_000_000,
                                     help="Refuse to sample from more receipts than this."),
    max_opening_mib: int = typer.Option(512, min=1, help="Largest opening accepted (MiB)."),
    timeout: float = typer.Option(300.0, min=0.1, help="Wall-clock seconds for one exchange "
                                                       "with the server (request and whole "
                                                       "reply)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: the summary "
                                                      "and a row per receipt."),
    audit_key: str = typer.Option(None, envvar="COMMITLLM_AUDIT_KEY", show_default=False,
                                  help="The server's audit key (not a client API key), sent as "
                                       "a Bearer token (prefer the COMMITLLM_AUDIT_KEY "
                                       "environment variable: a command line is visible to "
                                       "other users)."),
) -> None:
    """Challenge a sample of receipts on a live server, fetch the openings (POST /v1/audit),
    verify each: one row per receipt. Exit 0 when every one is accepted, 1 on any rejection,
    2 when it cannot audit."""
    from commitllm.keys.keygen import key_tokenizer, load_key

    from . import audit as au
    from .challenge import TIERS

    tier = tier.value
    if tier not in TIERS:
        _fail(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if not 0 < rate <= 1:
        _fail(f"--rate must be in (0, 1], got {rate}")
    base = server.rstrip("/")
    try:
        k = load_key(key)
        tok = key_tokenizer(k)
        if receipts is not None:
            sources = au.list_sources(receipts, max_receipts)
            n, items = len(sources), au.load_items(au.sample(sources, rate))
        else:
            listed = au.server_items(base, limit, timeout, audit_key)
            n, items = len(listed), au.sample(listed, rate)
        rows = []
        with err.status(f"auditing a sample of {n} receipts ...") as status:
            for i, item in enumerate(items):
                status.update(f"auditing {i + 1} ...")
                rows.append(au.audit_item(k, tok, base, item, tier, max_opening_mib << 20,
                                          timeout, audit_key))
    except (au.AuditError, container.ContainerError, OSError, ValueError) as e:
        _fail(str(e))
    if not rows:
        _fail("no receipts to audit")
    _audit_report(rows, n, rate, tier, as_json)
    raise typer.Exit(0 if all(r.verdict.accepted for r in rows) else 1)


def _audit_report(rows, n_items: int, rate: float, tier: str, as_json: bool) -> None:
    bad = sum(not r.verdict.accepted for r in rows)
    if as_json:  # one JSON document: the summary and a row per audited receipt
        print(json.dumps({"tier": tier, "rate": rate, "receipts": n_items, "audited": len(rows),
                          "accepted": len(rows) - bad, "rejected": bad, "rows": [
                              {"receipt_id": r.receipt_id, "source": r.source,
                               "request_checked": r.request_checked,
                               "text_checked": r.text_checked, "positions": r.positions,
                               "opening_bytes": r.opening_bytes,
                               **{k: v for k, v in r.verdict.to_json().items() if k != "checks"}}
                              for r in rows]}, indent=1))
    else:
        table = Table("receipt", "source", "tokens", "positions", "opening", "request", "text",
                      "verdict", title=f"audit: {tier} tier, rate {rate}")
        for r in rows:
            v = r.verdict
            table.add_row((r.receipt_id or "?")[:16], r.source, str(r.tokens), str(r.positions),
                          f"{r.opening_bytes} B", "checked" if r.request_checked else "-",
                          "checked" if r.text_checked else "-",
                          "ACCEPTED" if v.accepted else f"REJECTED ({v.reason}: {v.detail})")
        out.print(table, markup=False, highlight=False)
    err.print(f"{len(rows)} of {n_items} receipts audited: {len(rows) - bad} accepted, "
              f"{bad} rejected", highlight=False, markup=False)


def main() -> None:
    cliutil.run_app(app)
