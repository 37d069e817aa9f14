"""Load test of the OpenAI-compatible server, continuous against static batching in one run: for
each client count (1, 4, 16, 32 by default) N concurrent clients (the official openai client,
streaming) send a mixed workload: most requests short, every 4th one a long answer (4x max
tokens), every 4th (offset 1) a long prompt. Figures: requests/s, tokens/s, time to first token
(the first streamed text) and whole-request latency p50/p99; then every receipt is audited
against the live server with the client's request and the text it read checked. Zero lost or
rejected receipts is the pass condition (exit 1 otherwise).

The server runs as a subprocess (`commitllm-engine serve --batching B`) on a fresh SQLite store,
one per batching mode, warmed up once. --model tiny builds the tiny random test model with a
character tokenizer (tests/tinymodels.py); 'default' is SmolLM2-135M-Instruct. Results go to
OUT/serve_load.{json,md}, one entry per model, with machine, commit and the machine's load
(other processes' share of the cores just before each run, and the load average).

    python bench/serve_load.py [--model tiny|default|FOLDER] [--clients 1,4,16,32]
                               [--requests-per-client 2] [--max-tokens 16] [--temperature 0.8]
                               [--batching continuous,static] [--tier routine]
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
from bench.common import (RESULTS, md_table, others_share, provenance_md, record_model_run,
                          serving_model)

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


LONG_PROMPT = ("Summarize the following notes in one sentence. " + " ".join(
    f"Note {i}: the {w} river flows past the old mill and the market square." for i, w in
    enumerate(["north", "south", "east", "west", "upper", "lower", "quiet", "busy"] * 4)))


SYSTEM_PROMPT = ("You are a concise assistant for a public library. Answer in plain words, in at "
                 "most three sentences, and say so when you do not know.")
WORKLOADS = {
    "repeat": "every 4th request 4x max tokens, every 4th (+1) a long prompt; the 6 short prompts "
              "and the long one repeat",
    "unique": "every 4th request 4x max tokens, every 4th (+1) a long prompt; every request "
              "starts with one shared system prompt and its user turn is its own (a request "
              "number in front), so the prefix cache can only reuse the system prompt",
}


def workload(i: int, max_tokens: int, long_prompt: str, kind: str = "repeat",
             system: str = SYSTEM_PROMPT) -> tuple[list[dict], int]:
    """Request i's (messages, max_tokens): every 4th a long answer, every 4th + 1 a long prompt;
    kind 'unique': a shared system prompt, then a user turn no other request has."""
    n = max_tokens * 4 if i % 4 == 0 else max_tokens
    text = long_prompt if i % 4 == 1 else PROMPTS[i % len(PROMPTS)]
    if kind == "unique":
        return [{"role": "system", "content": system},
                {"role": "user", "content": f"Request {i}. {text}"}], n
    return [{"role": "user", "content": text}], n


def run_clients(url: str, model_id: str, clients: int, requests: int, max_tokens: int,
                temperature: float, long_prompt: str = LONG_PROMPT,
                tag: str = "load", kind: str = "repeat",
                system: str = SYSTEM_PROMPT) -> tuple[list[dict], list[str], float]:
    """(results, errors, wall seconds): `requests` streamed requests spread over `clients`
    threads; each result has the request, receipt, text read, latency and time to first text."""
    import openai

    todo, lock, results, errors = list(range(requests)), threading.Lock(), [], []

    def client() -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            messages, n = workload(i, max_tokens, long_prompt, kind, system)
            req = {"model": model_id, "messages": messages,
                   "max_tokens": n, "temperature": temperature, "seed": i,
                   "nonce": f"{tag}-{i}", "stream": True}
            t0 = time.perf_counter()
            first, parts, receipt = None, [], None
            try:
                for ch in c.chat.completions.create(
                        **{k: v for k, v in req.items() if k != "nonce"},
                        extra_body={"nonce": req["nonce"]}):
                    if ch.choices and ch.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        parts.append(ch.choices[0].delta.content)
                    receipt = getattr(ch, "receipt", None) or receipt
            except openai.APIError as e:
                with lock:
                    errors.append(f"request {i}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                if receipt is None:
                    errors.append(f"request {i}: the stream ended without a receipt")
                    continue
                results.append({"request": req, "receipt": receipt, "latency_s": dt,
                                "ttft_s": first if first is not None else dt,
                                "text": "".join(parts)})

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


def _quantiles(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"p50": percentile(xs, 0.5), "p90": percentile(xs, 0.9), "p99": percentile(xs, 0.99),
            "max": max(xs)}


MODES = {"continuous": ("--batching", "continuous"),
         "continuous-nocache": ("--batching", "continuous", "--no-prefix-cache"),
         "static": ("--batching", "static")}


def one_run(url: str, model_id: str, key: Path, clients: int, requests: int, args,
            tag: str) -> dict:
    load_before = others_share(2.0)
    loadavg = os.getloadavg()
    with urllib.request.urlopen(f"{url}/v1/stats") as resp:
        before = json.loads(resp.read())
    results, errors, wall = run_clients(url, model_id, clients, requests, args.max_tokens,
                                        args.temperature, args.long_prompt, tag=tag,
                                        kind=args.workload, system=args.system_prompt)
    with urllib.request.urlopen(f"{url}/v1/stats") as resp:
        stats = json.loads(resp.read())
    steps = stats["batches"] - before["batches"]
    rows, audit_s = audit_all(url, key, results, args.tier)
    tokens = sum(len(r["receipt"]["output_token_ids"]) for r in results)
    rejected = [f"{r.item.receipt['receipt_id'][:12]}: {r.verdict.reason} {r.verdict.detail}"
                for r in rows if not r.verdict.accepted]
    return {
        "clients": clients, "requests": requests, "completed": len(results),
        "lost": requests - len(results), "errors": errors[:10], "wall_s": wall,
        "requests_per_s": len(results) / wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "ttft_s": _quantiles([r["ttft_s"] for r in results]),
        "latency_s": _quantiles([r["latency_s"] for r in results]),
        "audited": len(rows), "accepted": len(rows) - len(rejected), "rejected": rejected,
        "audit_s": audit_s,
        "server": {"batches_or_steps": steps, "largest_batch": stats["largest_batch"],
                   "mean_batch": stats["mean_batch"], "mean_step_tokens":
                   stats.get("mean_step_tokens"), "preemptions": stats.get("preemptions"),
                   "kv_cache": stats.get("kv_cache")},
        "load": {"others_share_before": load_before, "loadavg_1_5_15": loadavg},
    }


def measure(args) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        model = serving_model(args.model, tmp)
        if args.model == "tiny":
            args.long_prompt = LONG_PROMPT[:120]  # a character tokenizer, 256 positions
            args.system_prompt = SYSTEM_PROMPT[:40]
        keygen(model, tmp / "key")
        for batching in args.batching:
            port = free_port()
            flags = MODES[batching]
            proc = start_server(model, tmp / f"store-{batching}", port, "--max-batch",
                                str(args.max_batch), "--token-budget", str(args.token_budget),
                                "--max-concurrent", "256", *flags)
            url = f"http://127.0.0.1:{port}"
            try:
                with urllib.request.urlopen(f"{url}/v1/models") as resp:
                    model_id = json.loads(resp.read())["data"][0]["id"]
                run_clients(url, model_id, 1, 2, 2, 0.0, tag="warm")  # not counted
                for n in args.clients:
                    requests = max(args.min_requests, args.requests_per_client * n)
                    print(f"{args.model} {batching} {n} clients, {requests} requests ...",
                          file=sys.stderr, flush=True)
                    # the same nonces in every mode (each has its own server and store): the
                    # same sampled answers, so the modes are compared on the same tokens
                    runs.append({"batching": batching} | one_run(
                        url, model_id, tmp / "key", n, requests, args, f"load-{n}"))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    return {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "max_batch": args.max_batch, "token_budget": args.token_budget, "tier": args.tier,
            "workload": WORKLOADS[args.workload],
            "runs": runs, "ratios": ratios(runs)}


def ratios(runs: list[dict]) -> dict:
    """Each continuous mode against static at each client count: throughput, and p99 TTFT
    (static / continuous). Keys: 'N' (continuous) and 'N nocache'."""
    by = {(r["batching"], r["clients"]): r for r in runs}
    out = {}
    for (b, n), r in by.items():
        s = by.get(("static", n))
        if b != "static" and s is not None and s["tokens_per_s"] and r["ttft_s"]:
            key = str(n) if b == "continuous" else f"{n} nocache"
            out[key] = {"mode": b, "clients": n,
                        "throughput": r["tokens_per_s"] / s["tokens_per_s"],
                        "requests_per_s": r["requests_per_s"] / s["requests_per_s"],
                        "ttft_p99_static_over_continuous":
                            s["ttft_s"]["p99"] / r["ttft_s"]["p99"]}
    return out


def markdown(data: dict) -> str:
    parts = ["# Serving load test (bench/serve_load.py)", provenance_md(data["provenance"]),
             "Each run: the server in a subprocess on a fresh SQLite store (one per batching "
             "mode), the clients are threads of one process using the official openai client "
             "(streamed chat completions, sampled, one seed per request; every 4th request asks "
             "for 4x the max tokens, every 4th + 1 sends a long prompt; with the 'repeat' workload "
             "the prompts repeat, so 'continuous' gains from the prefix cache too: "
             "'continuous-nocache' is continuous batching with the prefix cache off; the "
             "'unique prompts' sections give every request its own user turn); then every "
             "receipt is "
             "challenged and verified against the live server with the client's request and the "
             "text it read checked. TTFT: time to the first streamed text. K/V peak: the most pool "
             "blocks in use at once (cumulative over the server's runs), against the pool's "
             "size; prefix hits: the share of looked-up prompt tokens found cached. The machine is "
             "shared: 'others' CPU' is the share of all cores other processes used in the 2 s "
             "before each run."]
    for m in data["models"].values():
        rows = []
        for r in m["runs"]:
            t, lat, sv, load = r["ttft_s"] or {}, r["latency_s"] or {}, r["server"], r["load"]
            nan = float("nan")
            kv = sv.get("kv_cache") or {}
            pc = kv.get("prefix_cache") or {}
            kv_cell = (f"{kv['peak_used_blocks'] * kv['bytes'] / kv['blocks'] / 2**20:.1f} / "
                       f"{kv['bytes'] / 2**20:.0f} MiB, {pc.get('token_hit_rate', 0) * 100:.0f} %"
                       if kv else "-")
            rows.append([r["batching"], r["clients"], f"{r['completed']}/{r['requests']}",
                         f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                         f"{t.get('p50', nan):.2f} / {t.get('p99', nan):.2f}",
                         f"{lat.get('p50', nan):.2f} / {lat.get('p99', nan):.2f}",
                         f"{sv['mean_batch']:.1f} / {sv['largest_batch']}", kv_cell, r["lost"],
                         f"{r['accepted']}/{r['audited']}",
                         f"{(load['others_share_before'] or 0) * 100:.0f} %, "
                         f"{load['loadavg_1_5_15'][0]:.2f}"])
        parts.append(f"## {m['model']} (max tokens {m['max_tokens']}, max batch "
                     f"{m['max_batch']}, token budget {m['token_budget']}, {m['tier']} audit)\n\n"
                     f"Workload: {m.get('workload', WORKLOADS['repeat'])}.")
        parts.append(md_table(["batching", "clients", "completed", "req/s", "tokens/s",
                               "TTFT p50 / p99 (s)", "latency p50 / p99 (s)",
                               "batch mean / max", "K/V peak / pool, prefix hits", "lost",
                               "audited ok", "others' CPU, load"],
                              rows))
        if m["ratios"]:
            parts.append(md_table(
                ["mode", "clients", "throughput / static", "req/s / static",
                 "TTFT p99 static / this"],
                [[x.get("mode", "continuous"), x.get("clients", n), f"{x['throughput']:.2f}x",
                  f"{x['requests_per_s']:.2f}x", f"{x['ttft_p99_static_over_continuous']:.2f}x"]
                 for n, x in m["ratios"].items()]))
    return "\n\n".join(parts)


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, default, or an HF folder")
    ap.add_argument("--clients", type=_csv(int), default=[1, 4, 16, 32],
                    help="client counts, comma-separated")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8, help="fewest requests in a run")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--token-budget", type=int, default=256)
    ap.add_argument("--batching", type=_csv(str), default=["continuous", "continuous-nocache",
                                                           "static"],
                    help=f"modes, comma-separated, of {sorted(MODES)}")
    ap.add_argument("--tier", default="routine")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="repeat",
                    help="repeat: 6 short prompts and a long one, repeating (the prefix cache "
                         "hits); unique: a shared system prompt, every user turn its own "
                         "(results filed as 'MODEL, unique prompts')")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    bad = [b for b in args.batching if b not in MODES]
    if bad:
        ap.error(f"unknown --batching {bad}; known: {sorted(MODES)}")
    args.long_prompt, args.system_prompt = LONG_PROMPT, SYSTEM_PROMPT
    run = measure(args)
    key = args.model if args.workload == "repeat" else f"{args.model}, unique prompts"
    run["model"] = key
    record_model_run(args.out, "serve_load", key, run, markdown)
    print(json.dumps(run["ratios"], indent=1))
    for r in run["runs"]:
        print(f"{r['batching']:>10} {r['clients']:>3} clients: {r['tokens_per_s']:.1f} tok/s, "
              f"TTFT p99 {r['ttft_s']['p99'] if r['ttft_s'] else float('nan'):.2f} s, "
              f"lost {r['lost']}, accepted {r['accepted']}/{r['audited']}")
    ok = all(r["lost"] == 0 and not r["rejected"] and r["audited"] == r["completed"]
             for r in run["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
