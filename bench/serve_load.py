"""Load test of the OpenAI-compatible server: N concurrent clients (the official openai client)
send a fixed number of requests; throughput and latency percentiles; then every receipt is
audited against the live server (the client's request checked too). Zero lost or unverifiable
receipts is the pass condition (exit 1 otherwise).

The server runs as a subprocess (`commitllm-engine serve`) on a fresh SQLite store. --model tiny
builds the tiny random test model with a character tokenizer (tests/tinymodels.py); 'default' is
SmolLM2-135M-Instruct. Results go to OUT/serve_load.{json,md}, one entry per model, with machine,
commit and the machine's load (other processes' share of the cores just before the run, and the
load average).

    python bench/serve_load.py [--model tiny|default|FOLDER] [--clients 4] [--requests 32]
                               [--max-tokens 16] [--temperature 0.8] [--tier routine]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import RESULTS, md_table, others_share, provenance, provenance_md, write_results

PROMPTS = ["Name three rivers.", "What is a prime number?", "Write a haiku about rain.",
           "Explain gravity to a child.", "List two colours.", "Why is the sky blue?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, store, port: int, *extra: str) -> subprocess.Popen:
    """`commitllm-engine serve` in a subprocess; returns once /v1/models answers."""
    cmd = [sys.executable, "-c", "from commitllm.engine.cli import app; app()", "serve",
           "--model", str(model), "--store", str(store), "--port", str(port), *extra]
    # stderr to a file, not a pipe: the server logs one line per request, and a pipe nobody
    # reads would fill and block it.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def keygen(model, out: Path) -> None:
    subprocess.run([sys.executable, "-c", "from commitllm.verifier.cli import app; app()",
                    "keygen", "--model", str(model), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)


def run_clients(url: str, model_id: str, clients: int, requests: int, max_tokens: int,
                temperature: float) -> tuple[list[dict], list[str], float]:
    """(results, errors, wall seconds): `requests` requests spread over `clients` threads."""
    import openai

    todo, lock, results, errors = list(range(requests)), threading.Lock(), [], []

    def client() -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            req = {"model": model_id, "messages": [{"role": "user",
                                                    "content": PROMPTS[i % len(PROMPTS)]}],
                   "max_tokens": max_tokens, "temperature": temperature, "seed": i,
                   "nonce": f"load-{i}"}
            t0 = time.perf_counter()
            try:
                r = c.chat.completions.create(**{k: v for k, v in req.items() if k != "nonce"},
                                              extra_body={"nonce": req["nonce"]})
            except openai.APIError as e:
                with lock:
                    errors.append(f"request {i}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                results.append({"request": req, "receipt": r.receipt, "latency_s": dt,
                                "text": r.choices[0].message.content})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - t0


def audit_all(url: str, key_path: Path, results: list[dict], tier: str) -> tuple[list, float]:
    from commitllm.keys.keygen import key_tokenizer, load_key
    from commitllm.verifier.audit import Item, audit_item
    from commitllm.verifier.client import Exchange

    key = load_key(key_path)
    tok = key_tokenizer(key)
    t0 = time.perf_counter()
    rows = [audit_item(key, tok, url, Item("load", Exchange(r["receipt"], r["request"], "/v1/chat/completions", r["text"])), tier, 1 << 30, 600)
            for r in results]
    return rows, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model == "tiny":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tinymodels import make_tiny_chat_model

            model = make_tiny_chat_model(tmp / "tiny")
        keygen(model, tmp / "key")
        port = free_port()
        load_before = others_share(2.0)
        proc = start_server(model, tmp / "store", port, "--max-batch", str(args.max_batch))
        url = f"http://127.0.0.1:{port}"
        try:
            with urllib.request.urlopen(f"{url}/v1/models") as resp:
                model_id = json.loads(resp.read())["data"][0]["id"]
            run_clients(url, model_id, 1, 1, 2, 0.0)  # warm-up (not counted)
            loadavg = os.getloadavg()
            results, errors, wall = run_clients(url, model_id, args.clients, args.requests,
                                                args.max_tokens, args.temperature)
            with urllib.request.urlopen(f"{url}/v1/stats") as resp:
                stats = json.loads(resp.read())  # includes the warm-up's batch of one
            rows, audit_s = audit_all(url, tmp / "key", results, args.tier)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lat = [r["latency_s"] for r in results]
    tokens = sum(len(r["receipt"]["output_token_ids"]) for r in results)
    rejected = [f"{r.item.receipt['receipt_id'][:12]}: {r.verdict.reason} {r.verdict.detail}"
                for r in rows if not r.verdict.accepted]
    return {
        "model": args.model, "clients": args.clients, "requests": args.requests,
        "max_tokens": args.max_tokens, "temperature": args.temperature,
        "max_batch": args.max_batch, "tier": args.tier,
        "completed": len(results), "lost": args.requests - len(results), "errors": errors[:10],
        "wall_s": wall, "requests_per_s": len(results) / wall, "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "latency_s": {"p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9),
                      "p99": percentile(lat, 0.99), "max": max(lat)} if lat else None,
        "audited": len(rows), "accepted": len(rows) - len(rejected), "rejected": rejected,
        "audit_s": audit_s, "server_batches": stats,
        "load": {"others_share_before": load_before, "loadavg_1_5_15": loadavg},
    }


def markdown(data: dict) -> str:
    rows = []
    for r in data["runs"].values():
        lat = r["latency_s"] or {}
        load, sb = r["load"], r.get("server_batches") or {}
        rows.append([r["model"], r["clients"], f"{r['completed']}/{r['requests']}",
                     r["max_tokens"], f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                     " / ".join(f"{lat.get(k, float('nan')):.2f}" for k in ("p50", "p90", "p99")),
                     f"{sb.get('mean_batch', float('nan')):.1f} / {sb.get('largest_batch', '?')}",
                     r["lost"], f"{r['accepted']}/{r['audited']}", f"{r['audit_s']:.1f}",
                     (f"{(load['others_share_before'] or 0) * 100:.0f} %, "
                      f"{load['loadavg_1_5_15'][0]:.2f}")])
    table = md_table(["model", "clients", "completed", "max tokens", "req/s", "tokens/s",
                      "latency p50 / p90 / p99 (s)", "batch mean / max", "lost", "audited ok", "audit (s)",
                      "others' CPU before, loadavg"], rows)
    about = ("Each run: the server in a subprocess on a fresh SQLite store, the clients are "
             "threads of one process using the official openai client (chat completions, "
             "sampled, one seed per request); then every receipt is challenged and verified "
             "against the live server with the client's request checked. Latency is per request "
             "(whole response); the machine is shared, so 'others' CPU before' is the share of "
             "all cores other processes used in the 2 s before the run.")
    return "\n\n".join(["# Serving load test (bench/serve_load.py)",
                        provenance_md(data["provenance"]), about, table])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, default, or an HF folder")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--tier", default="routine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    run = measure(args)
    path = args.out / "serve_load.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"runs": {}}
    data["runs"][args.model] = run | {"provenance": provenance()}
    data["provenance"] = provenance()
    write_results(args.out, "serve_load", data, markdown(data))
    print(json.dumps({k: v for k, v in run.items() if k != "errors"}, indent=1))
    ok = run["lost"] == 0 and not run["rejected"] and run["audited"] == run["completed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
