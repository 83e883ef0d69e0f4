"""The `torchgate` command: `serve` (flags mapping onto `Settings` fields), `keys`, `validate`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import pydantic
import uvicorn

from torchgate import __version__, logs, problems
from torchgate.config import RATE_PATTERN, Settings
from torchgate.errors import ModelLoadError
from torchgate.keys import KeyFileError, KeyStore, is_key_name, key_file_entry, new_key

if TYPE_CHECKING:
    from torchgate.lifecycle.validation import GateResult
    from torchgate.serving.model_config import ValidationConfig

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


def serve(args: argparse.Namespace) -> int:
    problem = _plain_key_problem(args.plain_keys or [])
    if problem:
        return _fail(problem)
    try:
        settings = _settings(args)
    except pydantic.ValidationError as exc:
        return _fail(f"settings: {problems.describe(exc)}")
    logs.configure(settings.log_level)
    if settings.auth == "on":
        try:
            keys = KeyStore.load(settings.api_keys_file, settings.plain_api_keys())
        except KeyFileError as exc:
            return _fail(str(exc))
        if not len(keys):
            return _fail(
                "no API keys configured: set TORCHGATE_API_KEYS_FILE (see `torchgate keys new`), "
                "or for development pass --api-key KEY (or TORCHGATE_API_KEYS) or --no-auth"
            )
    try:
        listener = _listen(settings.host, settings.port)
    except OSError as exc:
        return _fail(_bind_problem(settings.host, settings.port, exc))
    try:
        return _run(settings, listener)
    finally:
        listener.close()


def _run(settings: Settings, listener: socket.socket) -> int:
    """Load the models, then serve on `listener` until a signal stops the server."""
    import torch

    from torchgate.app import create_app, torch_threads  # torch is imported here, not at --help
    from torchgate.lifecycle.rollout_state import RolloutState, open_store
    from torchgate.protocol import BoundedHttpTools
    from torchgate.serving.admission import admit_all
    from torchgate.serving.repository import ModelRepository

    torch.set_num_threads(torch_threads(settings))
    repository = ModelRepository(settings.models, settings.device, max_tokens=settings.max_tokens)
    # every version through the gate, with the recorded rollout decisions, before binding
    state = RolloutState(open_store(repository.root, settings.redis_url))
    try:
        models = admit_all(repository, state.read)
    except ModelLoadError as exc:
        return _fail(str(exc))
    finally:
        state.close()
    app = create_app(settings, models=models)
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
        proxy_headers=False,  # client addresses are the peer's; ingress headers are not trusted
        date_header=True,
    )
    server = _Server(config, app)
    server.run(sockets=[listener])
    return 0 if server.started else 1


def _keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage API keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a new random key once, and its keys-file entry")
    new.add_argument("--name", required=True, help="who the key is for (shown in logs)")
    new.add_argument(
        "--scope", action="append", choices=["infer", "admin"], help="repeatable; default infer"
    )
    new.add_argument("--rate-limit", help="this key's own limit, e.g. 1000/minute")
    new.add_argument("--key-file", type=Path, help="also write the key itself here (mode 600)")
    new.add_argument("--keys-file", type=Path, help="append the entry to this keys file")


def keys(args: argparse.Namespace) -> int:
    if not is_key_name(args.name):
        return _fail("--name: letters, digits and _.@- only, at most 64")
    if args.rate_limit and not re.match(RATE_PATTERN, args.rate_limit):
        return _fail("--rate-limit must read like '1000/minute'")
    key = new_key()
    entry = key_file_entry(args.name, key, sorted(set(args.scope or ["infer"])), args.rate_limit)
    if args.key_file:
        args.key_file.touch(mode=0o600)
        args.key_file.write_text(key + "\n")
    if args.keys_file:
        with args.keys_file.open("a") as out:
            out.write(("\n" if args.keys_file.stat().st_size else "") + entry)
        args.keys_file.chmod(0o600)
    print(f"key (shown once, store it now): {key}")
    print("keys-file entry (TORCHGATE_API_KEYS_FILE):")
    print(entry, end="")
    return 0


def _validate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check a model version's accuracy on its validation.npz (exit 1: fail)"
    )
    p.add_argument("folder", type=Path, help="a model folder, e.g. models/digits")
    p.add_argument("--version", type=int, help="the version to check (default: the default one)")
    p.add_argument(
        "--min-accuracy", type=float, help="lowest passing accuracy ([validation], 0.95)"
    )
    p.add_argument(
        "--max-drop", type=float, help="largest drop below the default version ([validation], 0.01)"
    )
    p.add_argument(
        "--allow-missing-data",
        action="store_true",
        help="a model without validation.npz: check only that the version loads (its SHA-256 pin "
        "and signature) instead of exiting 2",
    )


def validate(args: argparse.Namespace) -> int:
    """Run one version on its model's validation rows, on CPU; 0 pass, 1 fail, 2 misuse."""
    from torchgate.lifecycle import validation
    from torchgate.serving.model_config import ValidationConfig
    from torchgate.serving.repository import ModelRepository

    folder: Path = args.folder.resolve()
    repository = ModelRepository(folder.parent, "cpu")
    name = folder.name
    try:
        config = repository.read_config(name)
        versions = repository.versions(name)
        data = validation.ValidationSet.read(folder, config)
    except ModelLoadError as exc:
        return _fail(str(exc))
    except validation.ValidationError as exc:
        return _fail(f"{folder}: {exc}")
    if data is None and not args.allow_missing_data:
        return _fail(f"{folder} has no {validation.FILE} (held-out x and y) to validate against")
    default = max(versions) if config.default_version == "latest" else config.default_version
    version = default if args.version is None else args.version
    if version not in versions:
        return _fail(f"{folder} has no version {version} (it has {', '.join(map(str, versions))})")
    bounds = config.validation.model_dump()
    given = {"min_accuracy": args.min_accuracy, "max_drop": args.max_drop}
    try:
        limits = ValidationConfig(**(bounds | {k: v for k, v in given.items() if v is not None}))
    except pydantic.ValidationError as exc:
        return _fail(problems.describe(exc, lambda key: "--" + key.replace("_", "-")))
    against = None if data is None else validation.baseline_version(config, versions, version)
    try:
        candidate = repository.load_version(name, version, config)
        baseline = None if against is None else repository.load_version(name, against, config)
    except ModelLoadError as exc:
        print(f"{name} version {version}: FAIL: {exc}")
        return 1
    if data is None:
        print(f"{name} version {version}: PASS (loads; no {validation.FILE}, accuracy unchecked)")
        return 0
    result = validation.gate(candidate, data, limits, baseline)
    _report(name, result, limits, config.max_batch_size)
    return 0 if result.passed else 1


def _report(name: str, result: GateResult, limits: ValidationConfig, batch: int) -> None:
    evaluation = result.evaluation
    if evaluation is not None:
        print(f"{name} version {result.version} on {evaluation.rows} validation rows (cpu)")
        if evaluation.cosine is not None:
            print(f"  cosine        {evaluation.cosine:.6f} lowest  (min {limits.min_cosine})")
            print(f"  latency       {evaluation.ms_per_row:.4f} ms/row (batches of {batch})")
    if evaluation is not None and evaluation.cosine is None:
        print(f"  accuracy      {evaluation.accuracy:.4f}  (min {limits.min_accuracy})")
        if result.baseline is not None:
            drop = result.baseline.accuracy - evaluation.accuracy
            print(
                f"  version {result.baseline.version:<5} {result.baseline.accuracy:.4f}  "
                f"(drop {drop:+.4f}, max {limits.max_drop})"
            )
        print(f"  latency       {evaluation.ms_per_row:.4f} ms/row (batches of {batch or 1})")
        print(f"  model size    {evaluation.model_bytes:,} bytes (parameters and buffers)")
        recall = "  ".join(f"{k}:{v:.3f}" for k, v in evaluation.recall.items())
        print(f"  recall        {recall}")
    verdict = "PASS" if result.passed else "FAIL: " + "; ".join(result.problems)
    print(f"{name} version {result.version}: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchgate", description="TorchScript model server")
    parser.add_argument("--version", action="version", version=f"torchgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _keys_parser(sub)
    _validate_parser(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "serve":
        return serve(args)
    if args.command == "keys":
        return keys(args)
    if args.command == "validate":
        return validate(args)
    parser.error(f"unknown command {args.command}")
    return 2
