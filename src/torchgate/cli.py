"""The `torchgate` command: `serve`, with flags mapping onto `Settings` fields."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pydantic
import uvicorn

from torchgate import __version__, logs
from torchgate.config import Settings
from torchgate.errors import ModelLoadError

log = logging.getLogger("torchgate")


def _fail(message: str) -> int:
    print(f"torchgate: error: {message}", file=sys.stderr)
    return 2


def _serve_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const="off",
        help="serve without API keys (TORCHGATE_AUTH=off); for local development only",
    )


def _settings(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**given)


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


def serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        return _fail(f"setting {'.'.join(map(str, first['loc']))}: {first['msg']}")
    logs.configure(settings.log_level)
    import torch

    from torchgate.app import create_app, torch_threads  # torch is imported here, not at --help
    from torchgate.serving.repository import ModelRepository

    torch.set_num_threads(torch_threads(settings))
    try:
        models = ModelRepository(settings.models, settings.device).load_all()
    except ModelLoadError as exc:
        return _fail(str(exc))
    app = create_app(settings, models=models)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or 1,
        server_header=False,
        date_header=True,
    )
    server = _Server(config, app)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchgate", description="TorchScript model server")
    parser.add_argument("--version", action="version", version=f"torchgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "serve":
        return serve(args)
    parser.error(f"unknown command {args.command}")
    return 2
