"""`torchgate serve`: its flags (mapping onto `Settings` fields), the listening socket bound
before any model loads, the models admitted through the gate, then uvicorn until a signal."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pydantic
import uvicorn

from torchgate import logs, problems
from torchgate.cli.fail import fail
from torchgate.config import Settings
from torchgate.errors import ModelLoadError
from torchgate.keys import KeyFileError, KeyStore

log = logging.getLogger("torchgate")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP")
    p.add_argument("--models", type=Path, help="model repository (TORCHGATE_MODELS)")
    p.add_argument("--host", help="address to bind (TORCHGATE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (TORCHGATE_PORT, default 8000)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (TORCHGATE_DEVICE)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--default-model", help="model behind POST /predict")
    p.add_argument("--torch-threads", type=int, help="intra-op threads on CPU")
    p.add_argument("--max-delay-ms", type=float, help="batching delay for every model")
    p.add_argument("--max-queue-rows", type=int, help="queue bound for every model")
    p.add_argument("--batch-timeout-ms", type=float, help="queue deadline for every model")
    p.add_argument("--drain-timeout-s", type=float, help="grace period on SIGTERM")
    p.add_argument("--api-keys-file", type=Path, help="TOML keys file (TORCHGATE_API_KEYS_FILE)")
    p.add_argument(
        "--api-key",
        action="append",
        dest="plain_keys",
        metavar="KEY",
        help="a plain key with scope infer, for development (repeatable; never logged, but "
        "visible in the process list: use a keys file in production); as TORCHGATE_API_KEYS",
    )
    p.add_argument("--rate-limit", help="per-key limit, e.g. 100/minute, or off")
    p.add_argument("--redis-url", help="shared limits and cache, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--model-control", choices=["none", "explicit"], help="allow load/unload")
    p.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const="off",
        help="serve without API keys (TORCHGATE_AUTH=off); for local development only",
    )


def _settings(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    if args.plain_keys:
        given["api_keys"] = ",".join(args.plain_keys)
    return Settings(**given)


def _plain_key_problem(keys: list[str]) -> str | None:
    for key in keys:
        if not key.strip() or "," in key or key != key.strip():
            return "--api-key: a key must be non-empty, without commas or surrounding blanks"
    return None


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before any model is loaded: a port in use is
    found in a second, not after minutes of loading. uvicorn serves on this very socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the port is in use by another process; "
            "stop it or pick another port (--port or TORCHGATE_PORT)"
        )
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports under 1024 need privileges)"
    reason = exc.strerror or str(exc)
    return f"cannot listen on {where}: {reason} (check --host or TORCHGATE_HOST)"


class _Server(uvicorn.Server):
    """uvicorn's server, but readiness turns 503 the moment SIGTERM/SIGINT arrives, and a
    drained shutdown exits 0 (uvicorn would re-raise the signal and die by it)."""

    def __init__(self, config: uvicorn.Config, app: object) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._app.state  # type: ignore[attr-defined]
        if not state.draining:
            state.draining = True
            log.info("shutdown requested, draining", extra={"signal": signal.Signals(sig).name})
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    problem = _plain_key_problem(args.plain_keys or [])
    if problem:
        return fail(problem)
    try:
        settings = _settings(args)
    except pydantic.ValidationError as exc:
        return fail(f"settings: {problems.describe(exc)}")
    logs.configure(settings.log_level)
    keys = None
    if settings.auth == "on":
        try:
            keys = KeyStore.load(settings.api_keys_file, settings.plain_api_keys())
        except KeyFileError as exc:
            return fail(str(exc))
        if not len(keys):
            return fail(
                "no API keys configured: set TORCHGATE_API_KEYS_FILE (see `torchgate keys new`), "
                "or for development pass --api-key KEY (or TORCHGATE_API_KEYS) or --no-auth"
            )
    try:
        listener = _listen(settings.host, settings.port)
    except OSError as exc:
        return fail(_bind_problem(settings.host, settings.port, exc))
    try:
        return _run(settings, listener, keys)
    finally:
        listener.close()


def _run(settings: Settings, listener: socket.socket, keys: KeyStore | None) -> int:
    """Load the models, then serve on `listener` until a signal stops the server."""
    from torchgate.app import create_app  # torch is imported here, not at --help
    from torchgate.lifecycle.rollout_state import RolloutState, open_store
    from torchgate.process import ProcessTuning
    from torchgate.protocol import BoundedHttpTools
    from torchgate.serving.admission import admit_all
    from torchgate.serving.repository import ModelRepository

    with ProcessTuning(settings):  # loads and warm-ups run as serving will
        repository = ModelRepository(
            settings.models, settings.device, max_tokens=settings.max_tokens
        )
        # every version through the gate, with the recorded rollout decisions, before binding
        state = RolloutState(open_store(repository.root, settings.redis_url))
        try:
            models = admit_all(repository, state.read)
        except ModelLoadError as exc:
            return fail(str(exc))
        finally:
            state.close()
        app = create_app(settings, models=models, keys=keys)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.drain_timeout_s) or 1,
            server_header=False,
            http=BoundedHttpTools.limited(
                max_head_bytes=settings.max_header_bytes, max_headers=settings.max_headers
            ),
            proxy_headers=False,  # client addresses are the peer's; ingress headers untrusted
            date_header=True,
        )
        server = _Server(config, app)
        server.run(sockets=[listener])
        return 0 if server.started else 1
