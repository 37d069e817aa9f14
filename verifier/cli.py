"""`commitllm`: the verifier's command line. Runs on numpy alone (no torch, no triton)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .digest import numerics_constants, weights_digest
from .numerics import get_profile
from .numerics.rope import RopeTable
from .numerics.weights import quantize_model

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="CommitLLM verifier: inspect the numerics spec and models, CPU only.")
out = Console()
err = Console(stderr=True)


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
    profile: str = typer.Option("w8a16", help="Numerics profile to quantize with."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Load a checkpoint with numpy, quantize it as the engine does, print its config and digests."""
    try:
        prof = get_profile(profile)
        with err.status(f"loading {folder} ..."):
            cfg, tensors = load_checkpoint(folder)
            qm = quantize_model(cfg, tensors, prof)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)  # one plain line: no wrapping, no markup
        raise typer.Exit(2)
    info = {"folder": str(folder), "profile": prof.name, "config": cfg.to_hf_dict(),
            "parameters": int(sum(a.size for a in tensors.values())),
            "weights_blake3": weights_digest(qm), "rope_table_sha256": RopeTable(cfg).digest()}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        out.print(f"[bold]{k}[/bold]: {json.dumps(v) if isinstance(v, dict) else v}", highlight=False)


def main() -> None:
    app()
