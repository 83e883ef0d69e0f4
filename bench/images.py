"""The image cell of `bench/run.py` (owns it): digits from JPEGs at 64 connections.

torchgate serves the bundled digits model with its cache off (every request sends the
same picture: with the cache on it would decode it once), wrk POSTs
`models/digits/examples/2.jpg` as a raw `image/jpeg` body, and a thread probes `/health`
every 10 ms meanwhile. Decoding runs in threads, so the event loop must keep answering:
the target is a `/health` p99 under 20 ms. Reports images/s (one image per request).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from cells import Plan, drive, server_env
from load import Cell
from report import Target
from servers import Server, ServerError, free_port, post, torchgate_command

IMAGE = Path(__file__).resolve().parent.parent / "models" / "digits" / "examples" / "2.jpg"
CONCURRENCY = 64
HEALTH_P99_MS = 20.0


class HealthProbe:
    """`GET /health` every 10 ms from a thread; its latencies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    answer.read()
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
            except OSError:
                self.failures += 1
            self._stop.wait(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def p99_ms(self) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def measure_images(plan: Plan, repository: Path) -> tuple[list[Cell], list[Target]]:
    cell = Cell("torchgate", "digits", "images-jpeg", CONCURRENCY, 1)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/models/digits:predict"
    log = plan.results / "torchgate-digits-images.log"
    command = torchgate_command(repository, port, plan.threads, plan.log_level)
    print(f"-- torchgate digits images: starting (log {log.name})", flush=True)
    body = IMAGE.read_bytes()
    headers = {"Content-Type": "image/jpeg"}
    try:
        with Server(
            command,
            env=server_env(TORCHGATE_CACHE_TTL_S="0"),
            log_path=log,
            probe_url=url,
            probe_body=body,
            probe_type="image/jpeg",
        ):
            status, _, answer = post(url, body, headers)
            label_ok = status == 200 and b'"labels":["2"]' in answer
            checks = [
                Target(
                    "torchgate digits images: 2.jpg answers the label 2",
                    "PASS" if label_ok else "FAIL",
                    f"status {status}: {answer[:120]!r}",
                )
            ]
            with HealthProbe(base + "/health") as probe:
                drive(plan, url, cell, [f"body={IMAGE}", "ctype=image/jpeg"])
    except ServerError as exc:
        cell.status = f"error: {exc}"
        return [cell], [Target("torchgate digits images: starts", "FAIL", str(exc))]
    p99 = probe.p99_ms()
    print(
        f"   images c={CONCURRENCY}: {cell.rps or 0:,.1f} images/s, p99 {cell.p99_ms or 0:.1f} ms;"
        f" /health p99 {p99 if p99 is not None else float('nan'):.1f} ms"
        f" over {len(probe.latencies_ms)} probes ({probe.failures} failed)",
        flush=True,
    )
    passed = p99 is not None and p99 < HEALTH_P99_MS and not probe.failures
    checks.append(
        Target(
            f"image cell: /health p99 under {HEALTH_P99_MS:g} ms while decoding JPEGs at "
            f"c={CONCURRENCY}",
            "PASS" if passed else "FAIL",
            f"/health p99 {p99 if p99 is not None else float('nan'):.1f} ms over "
            f"{len(probe.latencies_ms)} probes, {probe.failures} failed; "
            f"{cell.rps or 0:,.1f} images/s",
        )
    )
    return [cell], checks
