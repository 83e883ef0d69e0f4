"""`make serve` as a newcomer runs it: its development key has a generous limit (a first
loop of a few hundred requests is not 429s), and `DEV_RATE_LIMIT` changes the limit while
the key stays the same."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support import MODELS, ROOT, free_port

pytestmark = pytest.mark.slow  # every test here takes a second or more

EXAMPLE = (MODELS / "digits" / "example.json").read_bytes()


@contextmanager
def make_serve(tmp: Path, *args: str) -> Iterator[tuple[str, str]]:
    """`make serve` with the key files in `tmp` on a free port; its output, its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    env = {k: v for k, v in env.items() if not k.startswith("TORCHGATE_")}
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "serve", f"PORT={port}"]
            + [f"DEV_KEY={tmp / 'key'}", f"DEV_KEYS={tmp / 'keys.toml'}", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # make and the server it starts: one group to stop
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    raise AssertionError(f"make serve exited {proc.returncode}: {out.read()}")
                try:
                    if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "make serve did not come up"
                time.sleep(0.2)  # pacing: a poll
            out.seek(0)
            yield out.read(), url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def test_the_development_key_takes_a_first_loop_without_429(tmp_path: Path):
    with make_serve(tmp_path) as (printed, url):
        key = (tmp_path / "key").read_text().strip()
        assert "admin scope and a limit of 100000/minute" in printed
        assert "DEV_RATE_LIMIT" in printed
        auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        with httpx.Client(base_url=url, headers=auth) as client:
            codes = [client.post("/predict", content=EXAMPLE).status_code for _ in range(300)]
            policy = client.post("/predict", content=EXAMPLE).headers["RateLimit-Policy"]
    assert codes == [200] * 300
    assert "q=100000" in policy

    with make_serve(tmp_path, "DEV_RATE_LIMIT=5/minute") as (printed, url):
        assert (tmp_path / "key").read_text().strip() == key  # the same key
        assert "a limit of 5/minute" in printed
        auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        with httpx.Client(base_url=url, headers=auth) as client:
            codes = [client.post("/predict", content=EXAMPLE).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
