"""fn() in a forked child, for tests whose expected or feared outcome is a crash (a read past an
array, a fault in the compiled core): the crash stays in the child and comes back as a status."""

from __future__ import annotations

import faulthandler
import os
import signal
import time

import pytest

from commitllm.verifier import native


def in_child(fn, timeout: float = 60.0) -> int:
    """Run fn() in a forked child, with one thread inside the compiled core (the parent's pools
    do not exist there) and no fault dump (a fault is the outcome some callers expect): fn's
    int as the exit status, -signal when it crashed, -SIGKILL past the timeout."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        faulthandler.disable()
        try:
            with native.thread_budget(1):
                code = int(fn())
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.02)
