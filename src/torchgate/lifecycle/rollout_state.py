"""`RolloutState`: each model's last rollout decision, kept where a restart (and, with
Redis, every replica) finds it.

A decision (a step, a promotion, a rollback, a weight set by hand) is written as a
`RolloutRecord`: to `rollout.json` beside the model's `model.toml`, or, when
`TORCHGATE_REDIS_URL` is set, to the Redis key `torchgate:rollout:<model>`, so that every
replica reads the same one. A record applies while `model.toml`'s `default_version` and
`[canary]` section are what they were when it was written: editing either starts over
from what `model.toml` says. Deleting the file (or the key) resets a model to its
`model.toml` at the next load or restart.

Replicas settle on one record by generation: a decision by hand starts a new generation;
an automatic one (step, promote, rollback) replaces the stored record only within its
generation, and never one that concluded it (a promotion or a rollback), so a replica that
lags cannot undo what another decided. Writes run in order on one thread of their own,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import pydantic
import redis

from torchgate.problems import first_line
from torchgate.serving.model_config import ModelConfig

log = logging.getLogger("torchgate.rollout")

FILE = "rollout.json"
REDIS_PREFIX = "torchgate:rollout:"
FINAL = ("promoted", "rolled_back")


class RolloutRecord(pydantic.BaseModel):
    """One model's last rollout decision, as stored."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    canary: int = pydantic.Field(ge=0)  # the version rolled out
    stable: int = pydantic.Field(ge=0)  # the default version it was rolled out next to
    status: Literal["active", "paused", "rolled_back", "promoted"]
    weight: float = pydantic.Field(ge=0, le=1)
    decision: str  # step, promote, rollback or manual
    reason: str = ""
    generation: int = pydantic.Field(0, ge=0)
    at: str = ""  # wall-clock time of the decision (ISO 8601, UTC), for people
    # model.toml's default_version and [canary] when the decision was made: the record
    # applies while they are unchanged
    model_toml: dict[str, Any]

    @property
    def final(self) -> bool:
        """Whether the rollout is over (promoted or rolled back)."""
        return self.status in FINAL

    def applies(self, config: ModelConfig) -> bool:
        """Whether `model.toml` still says what it said when this was decided."""
        return self.model_toml == settings_of(config)


def settings_of(config: ModelConfig) -> dict[str, Any]:
    """What of `model.toml` a rollout decision depends on, as stored."""
    canary = None if config.canary is None else config.canary.model_dump(mode="json")
    return {"default_version": config.default_version, "canary": canary}


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def settle(new: RolloutRecord, stored: RolloutRecord | None) -> RolloutRecord | None:
    """What to store when `new` is written over `stored`: `new` (a decision by hand in a
    generation of its own), or None when `stored` stands."""
    latest = new.generation if stored is None else max(new.generation, stored.generation)
    if new.decision == "manual" or (stored is not None and new.model_toml != stored.model_toml):
        return new.model_copy(update={"generation": latest + 1})
    if stored is None:
        return new
    if new.generation > stored.generation:
        return new
    if new.generation == stored.generation and not stored.final:
        return new
    return None


def parse(name: str, where: str, raw: bytes | str | None) -> RolloutRecord | None:
    """A stored record, or None (with a warning) when there is none or it is unreadable."""
    if raw is None:
        return None
    try:
        return RolloutRecord.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        log.warning(
            "rollout record unreadable: ignored",
            extra={"model": name, "where": where, "problem": first_line(exc)},
        )
        return None


class RolloutStore(Protocol):
    """Where records live: read one, and write one unless the stored one stands."""

    shared: bool  # whether other replicas read and write the same records

    def read(self, name: str) -> RolloutRecord | None: ...

    def write(self, name: str, record: RolloutRecord) -> RolloutRecord | None:
        """Store `record` as `settle` says; returns the record stored afterwards."""
        ...

    def close(self) -> None: ...


class FileStore:
    """`rollout.json` beside each model's `model.toml` (one server's own)."""

    shared = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name / FILE

    def read(self, name: str) -> RolloutRecord | None:
        path = self._path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("rollout record unreadable", extra={"model": name, "problem": str(exc)})
            return None
        return parse(name, FILE, raw)

    def write(self, name: str, record: RolloutRecord) -> RolloutRecord | None:
        stored = self.read(name)
        chosen = settle(record, stored)
        if chosen is None:
            return stored
        folder = self._path(name).parent
        # a temporary file renamed over the old one: a crash never leaves half a record
        fd, temporary = tempfile.mkstemp(prefix=".rollout-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(chosen.model_dump_json(indent=2) + "\n")
            os.replace(temporary, self._path(name))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return chosen

    def close(self) -> None:
        pass


class RedisStore:
    """The key `torchgate:rollout:<model>` in the Redis every replica shares."""

    shared = True

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)

    def read(self, name: str) -> RolloutRecord | None:
        return parse(name, "redis", self.client.get(REDIS_PREFIX + name))

    def write(self, name: str, record: RolloutRecord) -> RolloutRecord | None:
        key = REDIS_PREFIX + name
        with self.client.pipeline() as pipe:
            while True:
                try:
                    # compare and set: another replica's write in between starts it over
                    pipe.watch(key)
                    stored = parse(name, "redis", pipe.get(key))
                    chosen = settle(record, stored)
                    if chosen is None:
                        pipe.unwatch()
                        return stored
                    pipe.multi()
                    pipe.set(key, chosen.model_dump_json())
                    pipe.execute()
                    return chosen
                except redis.WatchError:
                    continue

    def close(self) -> None:
        self.client.close()


def open_store(root: Path, redis_url: str | None) -> RolloutStore:
    """Redis when the replicas share one, else files in the model repository `root`."""
    return RedisStore(redis_url) if redis_url else FileStore(root)


class RolloutState:
    """The records of a server: read in threads, written in order on one thread of their
    own, never on the event loop."""

    def __init__(self, store: RolloutStore) -> None:
        self.store = store
        self._writer: ThreadPoolExecutor | None = None
        self._pending: set[asyncio.Future[RolloutRecord | None]] = set()
        self._unreachable = False  # said once, not at every look while it lasts

    @property
    def shared(self) -> bool:
        return self.store.shared

    def read(self, name: str) -> RolloutRecord | None:
        """The model's record (blocking: call it in a thread). A store that cannot be
        reached counts as none, with a warning: model.toml rules until it answers."""
        try:
            record = self.store.read(name)
        except (OSError, redis.RedisError) as exc:
            if not self._unreachable:
                self._unreachable = True
                log.warning(
                    "rollout records unreachable", extra={"model": name, "problem": str(exc)}
                )
            return None
        if self._unreachable:
            self._unreachable = False
            log.info("rollout records reachable again")
        return record

    async def aread(self, name: str) -> RolloutRecord | None:
        """`read`, after the writes queued before it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread(), self.read, name)

    def write(
        self,
        name: str,
        record: RolloutRecord,
        on_stored: Callable[[str, RolloutRecord | None], None],
    ) -> None:
        """Queue a write (from the event loop; returns at once). `on_stored(name, stored)`
        runs on the loop once it is written, with the record stored afterwards: this one,
        or another replica's that stood. A failed write is logged, and not retried."""
        loop = asyncio.get_running_loop()
        future = asyncio.ensure_future(
            loop.run_in_executor(self._thread(), self.store.write, name, record)
        )

        def done(finished: asyncio.Future[RolloutRecord | None]) -> None:
            self._pending.discard(finished)
            if finished.cancelled():
                return
            exc = finished.exception()
            if exc is not None:
                log.warning(
                    "rollout decision not recorded: it will not outlive this process",
                    extra={"model": name, "decision": record.decision, "problem": str(exc)},
                )
                return
            on_stored(name, finished.result())

        self._pending.add(future)
        future.add_done_callback(done)

    def _thread(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-state")
        return self._writer

    async def aclose(self) -> None:
        """Finish the queued writes, then close the store."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        self.store.close()
