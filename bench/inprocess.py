"""The in-process cost of one request (owns this measurement): torchgate's ASGI app driven
directly, no sockets, with many requests in flight so that batches form.

The app is built as `torchgate serve` builds it (auth on, rate limiting on, metrics on,
access log at info, to a discarded stream), its lifespan run, and `--requests` digits
requests sent by `--concurrency` tasks through ASGI `receive`/`send` on one event loop.
The cost is the event loop thread's CPU time per request (`time.thread_time`), which is
what bounds a server on one loop: the forward runs in the runner thread. A miss sends a
unique row each time; a hit repeats one row; a refusal is a request its model has no
room for (its admission limit set to 0), answered 503 before its body is read.
`--profile` breaks the loop's time down by step (the modules of the request path), from
cProfile's own time per function.

    .venv/bin/python bench/inprocess.py [--requests 20000] [--concurrency 64] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEY = "tg_bench_" + "k" * 40

# the step a function's own time is counted under, by the first match on its file path
STEPS = [
    ("middleware/context", "edge: context, access log"),
    ("torchgate/logs", "edge: context, access log"),
    ("logging/", "edge: context, access log"),
    ("middleware/metrics", "edge: metrics"),
    ("prometheus_client", "edge: metrics"),
    ("middleware/auth", "edge: auth"),
    ("torchgate/keys", "edge: auth"),
    ("middleware/ratelimit", "edge: rate limit"),
    ("middleware/body", "edge: body limit"),
    ("api/routes", "routing"),
    ("api/hot", "routing"),
    ("torchgate/edge", "edge"),
    ("api/codec", "codec"),
    ("api/v1", "codec"),
    ("orjson", "codec"),
    ("numpy", "codec"),
    ("api/inference", "request path"),
    ("api/deps", "request path"),
    ("serving/service", "request path"),
    ("serving/cache", "cache"),
    ("cachetools", "cache"),
    ("hashlib", "cache"),
    ("serving/breaker", "breaker"),
    ("serving/batching", "batcher"),
    ("serving/runner", "batcher"),
    ("serving/scores", "batcher"),
    ("starlette", "responses (starlette)"),
    ("asyncio", "event loop"),
]


def step_of(filename: str) -> str:
    for fragment, step in STEPS:
        if fragment in filename:
            return step
    return "other"


def body_for(row: np.ndarray) -> bytes:
    return json.dumps({"instances": [row.tolist()]}).encode()


async def one(app, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {KEY}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False
    forever = asyncio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()
        return {"type": "http.disconnect"}

    status = 0

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def drive(
    app, bodies: list[bytes], concurrency: int, expect: int = 200
) -> tuple[float, float, int]:
    """(loop CPU seconds, wall seconds, answers other than `expect`) for every body."""
    queue = list(reversed(bodies))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while queue:
            if await one(app, queue.pop()) != expect:
                failures += 1

    cpu, wall = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.thread_time() - cpu, time.perf_counter() - wall, failures


async def measure(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from torchgate import logs
    from torchgate.app import create_app
    from torchgate.config import Settings

    logs.configure("info")
    logging.getLogger().handlers[0].setStream(io.StringIO())  # formatted, then discarded
    settings = Settings(
        models=ROOT / "models",
        default_model="digits",
        device="cpu",
        api_keys=KEY,
        rate_limit="100000000/minute",
        torch_threads=1,
    )
    app = create_app(settings)
    x = np.load(ROOT / "models" / "digits" / "validation.npz")["x"]
    rng = np.random.default_rng(0)
    async with app.router.lifespan_context(app):
        stack = app
        warm = [body_for(x[i % len(x)] + rng.random() * 1e-3) for i in range(2000)]
        await drive(stack, warm, args.concurrency)

        def bodies(label: str) -> list[bytes]:
            if label in ("hit", "refused"):
                return [body_for(x[0])] * args.requests
            return [body_for(x[i % len(x)] + rng.random()) for i in range(args.requests)]

        for label in ("miss", "hit", "refused"):
            if label == "refused":
                for served in app.state.registry.versions():
                    served.limit.limit = 0.0  # no room: every request is refused
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            # the best of a few runs: the loop's CPU time moves with what else the machine
            # does and with the batch sizes that happen to form
            expect = 503 if label == "refused" else 200
            runs = [
                await drive(stack, bodies(label), args.concurrency, expect)
                for _ in range(args.repeat)
            ]
            cpu, wall, failures = min(runs)
            if profiler:
                profiler.disable()
            n = args.requests
            outcome = "not 503" if label == "refused" else "not 200"
            print(
                f"{label}: {cpu / n * 1e6:6.1f} us of event-loop CPU per request, "
                f"{n / wall:,.0f} requests/s in process, {failures} {outcome}",
                flush=True,
            )
            if profiler:
                breakdown(profiler, n)


def breakdown(profiler: cProfile.Profile, n: int) -> None:
    stats = pstats.Stats(profiler)
    by_step: dict[str, float] = defaultdict(float)
    total = 0.0
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        by_step[step_of(filename)] += tottime
        total += tottime
    for step, seconds in sorted(by_step.items(), key=lambda kv: -kv[1]):
        print(f"    {step:<28} {seconds / n * 1e6:6.1f} us  ({seconds / total:4.0%})")
    print("    (cProfile's own overhead inflates these; compare steps, not totals)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
