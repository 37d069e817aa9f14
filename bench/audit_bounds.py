"""Peak memory and wall time of `commitllm audit` and of the server's `/v1/audit` on the worst
inputs we can build (docs/ADVERSARY.md, "Bounded under hostile input"):

* audit, saved receipts: one file holding --max-receipts receipts (the cap), and one over it;
* audit, the server's list at its byte cap (64 MiB of receipts, at most --limit of them);
* audit against a server that drips its reply a byte at a time (the per-exchange deadline);
* audit against error bodies nested 100 000 deep or carrying 100 000-digit numbers;
* /v1/audit: the deep tier (every position, every layer) on a receipt filling the context, and
  an out-of-range challenge of 1 MiB (refused before re-execution).

Each audit runs in its own process; its peak RSS is that process's ru_maxrss (os.wait4). The
server's is its VmHWM before and after. The tiny model (2 layers, context 256) keeps it fast;
the bounds scale with the context and the tier, not with what the input claims.

    python bench/audit_bounds.py [--out bench/results/audit_bounds.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench.serve_load import free_port, keygen, start_server  # noqa: E402


def hostile_server(routes: dict) -> tuple[ThreadingHTTPServer, str]:
    """routes: path -> (status, body bytes, seconds between bytes or 0)."""

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body, drip = routes[self.path.split("?")[0]]
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not drip:
                    self.wfile.write(body)
                    return
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(drip)
            except (BrokenPipeError, ConnectionResetError):
                pass
        do_GET = do_POST = _answer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def run_audit(*args) -> dict:
    """`commitllm audit ARGS --json` in a child process: exit code, rows, seconds, peak RSS."""
    cmd = [sys.executable, "-c", "from commitllm.verifier.cli import app; app()", "audit",
           *map(str, args), "--json"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, errb = p.stdout.read(), p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    rows = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    return {"exit": os.waitstatus_to_exitcode(status), "rows": len(rows), "seconds": round(dt, 2),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "reasons": sorted({r["reason"] for r in rows if r["reason"]}),
            "stderr_tail": errb.decode()[-160:].strip()}


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def post(url: str, body: bytes) -> tuple[int, int, float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            n, code = len(r.read()), r.status
    except urllib.error.HTTPError as e:
        n, code = len(e.read()), e.code
    return code, n, round(time.perf_counter() - t0, 3)


def measure(tmp: Path) -> dict:
    from commitllm.keys.keygen import load_key
    from commitllm.verifier import challenge as ch
    from tinymodels import make_tiny_chat_model

    model = make_tiny_chat_model(tmp / "tiny")
    keygen(model, tmp / "key")
    key = load_key(tmp / "key")
    port = free_port()
    srv = start_server(model, tmp / "store", port)
    base = f"http://127.0.0.1:{port}"
    out = {}
    try:
        body = json.dumps({"model": "tiny", "prompt": "a" * 200, "max_tokens": 56,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            receipt = json.loads(r.read())["receipt"]
        n = receipt["trace"]["positions"]
        hwm0 = vm_hwm_mib(srv.pid)
        code, size, dt = post(base + "/v1/audit", json.dumps(
            ch.derive(key.secret, receipt, "deep")).encode())
        out["server_deep_full_context"] = {"positions": n + 1, "status": code,
                                           "opening_bytes": size, "seconds": dt,
                                           "server_vmhwm_mib_before": hwm0,
                                           "server_vmhwm_mib_after": vm_hwm_mib(srv.pid)}
        bad = ch.derive(key.secret, receipt, "routine") | {"positions": list(range(120_000))}
        code, size, dt = post(base + "/v1/audit", json.dumps(bad).encode())
        out["server_out_of_range_1mib"] = {"status": code, "seconds": dt,
                                           "server_vmhwm_mib_after": vm_hwm_mib(srv.pid)}
    finally:
        srv.terminate()
        srv.wait(30)
    small = json.dumps(receipt)
    out.update(audit_scenarios(tmp, receipt, small))
    return out


def audit_scenarios(tmp: Path, receipt: dict, small: str) -> dict:
    key, out = tmp / "key", {}
    httpd, url = hostile_server({"/v1/audit": (404, b'{"error": {"message": "no"}}', 0)})
    (tmp / "cap.json").write_text("[" + ",".join([small] * 10_000) + "]")
    out["audit_10000_saved_receipts_rate_0.01"] = run_audit(
        "--server", url, "--key", key, "--receipts", tmp / "cap.json", "--rate", "0.01") | {
        "file_mib": round((tmp / "cap.json").stat().st_size / 2**20, 1)}
    (tmp / "over.json").write_text("[" + ",".join([small] * 10_001) + "]")
    out["audit_10001_saved_receipts_refused"] = run_audit(
        "--server", url, "--key", key, "--receipts", tmp / "over.json")
    httpd.shutdown()
    pad = dict(receipt, text="x" * 60_000)  # not a valid receipt: rows reject, sizes count
    listed = json.dumps({"data": [pad] * 1000}).encode()
    httpd, url = hostile_server({"/v1/receipts": (200, listed[: 64 * 2**20], 0),
                                 "/v1/audit": (404, b"{}", 0)})
    out["audit_server_list_64mib_1000"] = run_audit(
        "--server", url, "--key", key, "--limit", "1000", "--rate", "0.01") | {
        "list_mib": round(min(len(listed), 64 * 2**20) / 2**20, 1)}
    httpd.shutdown()
    (tmp / "one").mkdir()
    for i in range(3):
        (tmp / "one" / f"{i}.json").write_text(small)
    httpd, url = hostile_server({"/v1/audit": (200, b"x" * 100_000, 0.05)})
    out["audit_slow_drip_3x_deadline_2s"] = run_audit(
        "--server", url, "--key", key, "--receipts", tmp / "one", "--timeout", "2")
    httpd.shutdown()
    for name, body in (("deep_error_body", b"[" * 100_000),
                       ("huge_number_error_body", b'{"error":{"message":1' + b"0" * 100_000
                        + b"}}")):
        httpd, url = hostile_server({"/v1/audit": (500, body, 0)})
        out[f"audit_{name}_3x"] = run_audit("--server", url, "--key", key, "--receipts",
                                            tmp / "one")
        httpd.shutdown()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit_bounds.json")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="audit-bounds-") as tmp:
        res = measure(Path(tmp))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    doc = {"machine": platform.node(), "cpus": os.cpu_count(), "loadavg_before": load,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
           "results": res}
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
