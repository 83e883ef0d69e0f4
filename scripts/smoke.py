"""Smoke check of a running torchgate: wait until it is ready, then one prediction.

    python scripts/smoke.py http://127.0.0.1:8000 [--key-file .dev-key] [--timeout 300]

The pipeline runs it after each deploy (`make smoke-k8s`); `make smoke` runs it against a
local `make serve`. The API key comes from $TORCHGATE_API_KEY, else from --key-file (a
key on the command line would show in `ps`); with neither, no key is sent. Exit 0: ready,
and the prediction answered 200 with one prediction per instance; 1 otherwise.
Standard library only, so it runs wherever Python does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "digits" / "example.json"


def get_status(url: str) -> int | None:
    """The answer's status, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_ready(base: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = get_status(base + "/health/ready")
        if last == 200:
            return True
        time.sleep(1)
    print(f"smoke: FAIL: {base}/health/ready not 200 within {timeout:g} s (last: {last})")
    return False


def predict(base: str, path: str, body: bytes, key: str | None) -> bool:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        print(f"smoke: FAIL: POST {path}: {exc}")
        return False
    ms = (time.monotonic() - started) * 1000
    if status != 200:
        text = answer[:300].decode(errors="replace")
        print(f"smoke: FAIL: POST {path} answered {status}: {text}")
        return False
    try:
        result = json.loads(answer)
        rows = len(json.loads(body)["instances"])
        ok = isinstance(result["predictions"], list) and len(result["predictions"]) == rows
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"smoke: FAIL: POST {path} answered 200 without one prediction per instance")
        return False
    labels = f", labels {result['labels']}" if "labels" in result else ""
    print(
        f"smoke: PASS: POST {path} answered 200 in {ms:.0f} ms: {result.get('model_name')} "
        f"version {result.get('model_version')}{labels}"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key-file", type=Path, help="a file holding the API key")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for ready")
    parser.add_argument("--path", default="/predict", help="the prediction route")
    parser.add_argument("--example", type=Path, default=EXAMPLE, help="the request body")
    args = parser.parse_args(argv)
    key = os.environ.get("TORCHGATE_API_KEY")
    if not key and args.key_file is not None:
        key = args.key_file.read_text().strip()
    base = args.url.rstrip("/")
    if not wait_ready(base, args.timeout):
        return 1
    return 0 if predict(base, args.path, args.example.read_bytes(), key) else 1


if __name__ == "__main__":
    sys.exit(main())
