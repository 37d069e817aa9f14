"""Shared by both command lines (`commitllm`, `commitllm-engine`): one-line errors, checks of
paths before any slow work, the --version option, consoles and help that read well.

Every user mistake ends as one line on stderr, ``error: <file or option>: <what is wrong>``, exit
code 2, no traceback. Output paths: their parent folders are created (everywhere, as
`atomic.atomic_write` does); a path that is a folder, or whose folder cannot be written, is refused
before the model loads. Standard library, typer and rich only (no torch).
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

import commitllm

KEY_MAGIC = b"CLLMKEY\x00"  # keys/keygen.py
OPENING_MAGIC = b"CLLMOPN\x00"  # verifier/opening.py


class ProfileName(str, Enum):
    w8a16 = "w8a16"
    w16a16 = "w16a16"
    a8 = "a8"


class TierName(str, Enum):
    routine = "routine"
    full = "full"
    deep = "deep"


def fail(msg: str, code: int = 2):
    """One plain line on stderr (no wrapping, no markup), then exit `code`."""
    typer.echo(f"error: {' '.join(str(msg).split())}", err=True)
    raise typer.Exit(code)


def err_console() -> Console:
    """stderr console; lines are not wrapped at 80 columns when stderr is not a terminal."""
    tty = sys.stderr.isatty()
    return Console(stderr=True, soft_wrap=not tty, width=None if tty else 10_000)


def version_option(prog: str):
    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {commitllm.__version__}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True,
                        help="Print the version and exit.")


def hide_flag_types() -> None:
    """Help shows boolean flags as flags (`--json`), without a `<bool>` type column."""
    from typer import core

    cls = getattr(core, "TyperOption", None)
    orig = getattr(cls, "display_type_rich", None)
    if orig is None or getattr(orig, "_commitllm", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else orig(self, ctx)

    display_type_rich._commitllm = True
    cls.display_type_rich = display_type_rich


def _writable_dir(folder: Path, what: str) -> None:
    """Create `folder` (and its parents) if missing; refuse one that cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        fail(f"{what}: {folder} is a file, not a folder")
    except OSError as e:
        fail(f"{what}: cannot create {folder} ({e.strerror or e})")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{what}: {folder} is not writable")


def check_out_file(path: Path | None, option: str) -> None:
    """An output file: not a folder, and its folder created and writable."""
    if path is None:
        return
    if path.is_dir():
        fail(f"{option} {path}: is a folder; give a file name")
    _writable_dir(path.parent, f"{option} {path}")


def check_out_parent(path: Path, option: str) -> None:
    """The folder `path` will be created in: created if missing, and writable."""
    _writable_dir(path.parent, f"{option} {path}")


def check_out_dir(path: Path | None, option: str, sqlite: bool = True) -> None:
    """An output folder (a transcript store): created if missing, writable, not a file (with
    `sqlite`, a .sqlite/.db store file is also taken)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        if sqlite and path.suffix in (".sqlite", ".db"):  # a SQLite store file
            _writable_dir(path.parent, f"{option} {path}")
            return
        fail(f"{option} {path}: is a file, not a folder")
    _writable_dir(path, option)


def check_cache() -> None:
    """$COMMITLLM_CACHE (or ~/.cache/commitllm) must be creatable and writable."""
    env = os.environ.get("COMMITLLM_CACHE")
    folder = Path(env) if env else Path.home() / ".cache" / "commitllm"
    what = "COMMITLLM_CACHE" if env else f"the cache folder (set COMMITLLM_CACHE to move it)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{what}: cannot create {folder} ({e.strerror or e})")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{what}: {folder} is not writable")


def looks_like(path: Path) -> str | None:
    """What a file looks like: 'a key', 'an opening', 'a receipt', 'a challenge', 'a request',
    'a folder', or None (unknown, missing or unreadable)."""
    try:
        if path.is_dir():
            return "a folder"
        with path.open("rb") as fh:
            head = fh.read(8)
        if head == KEY_MAGIC:
            return "a key"
        if head == OPENING_MAGIC:
            return "an opening"
        if path.stat().st_size > 256 << 20:
            return None
        from .safejson import JSONError, loads

        try:
            doc = loads(path.read_bytes(), max_bytes=256 << 20)
        except (JSONError, UnicodeDecodeError):
            return None
    except OSError:
        return None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]
    if not isinstance(doc, dict):
        return None
    if "receipt" in doc and isinstance(doc.get("receipt"), dict):
        doc = doc["receipt"]
    if "positions" in doc and "layers" in doc:
        return "a challenge"
    if "receipt_id" in doc and ("output_token_ids" in doc or "model_commitment" in doc):
        return "a receipt"
    if "messages" in doc or "prompt" in doc:
        return "a request"
    return None


def expect_kind(path: Path, option: str, want: str) -> None:
    """Refuse `path` given as `option` when it is clearly another kind of file (a challenge in
    the receipt's slot, ...); a missing or unknown file is left to the reader's own error."""
    if not path.exists():
        fail(f"{option} {path}: no such file")
    kind = looks_like(path)
    if kind is not None and kind != want:
        fail(f"{option} {path}: this looks like {kind}, not {want}")


def read_json_file(path: Path, what: str, max_bytes: int = 256 << 20):
    """Bounded parse of a JSON input file (safejson); one-line errors naming the file."""
    from .safejson import JSONError, loads

    try:
        if path.is_dir():
            fail(f"{path}: is a folder, not {what}")
        if path.stat().st_size > max_bytes:
            fail(f"{path}: {what} larger than {max_bytes:,} bytes")
        return loads(path.read_bytes(), max_bytes=max_bytes)
    except FileNotFoundError:
        fail(f"{path}: no such file ({what})")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})")
    except JSONError as e:
        fail(f"{path}: not valid JSON ({what}: {e})")


def dumps_one(doc) -> str:
    """Exactly one JSON document (for --json)."""
    return json.dumps(doc, indent=1)


def run_app(app) -> None:
    """Run a typer app as a console script; usage errors (unknown option, bad value, missing
    argument) are one line, ``error: <message> (see <command> --help)``, exit 2."""
    try:  # typer >= 0.25 vendors click as typer._click
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    try:
        rv = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx is not None else str(e))
        sys.exit(2)
    except cx.UsageError as e:
        where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
