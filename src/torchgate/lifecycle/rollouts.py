"""`Rollouts`: each served model's canary, made for `[canary]` or by hand, recorded after
every decision and taken back from the record at start-up and on reload.

Every decision a `Canary` makes (or an operator makes through it) is written to the
`RolloutState` store; a decision that could not be written is kept here, so that at least
a reload of this process does not forget it. With a store the replicas share (Redis),
the stored records are read every `FOLLOW_S` seconds and a newer decision another replica
made is adopted (`follow`): a later generation (a decision by hand), or, within one, a
promotion or rollback, or a step further.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from torchgate.errors import ModelNotFound
from torchgate.lifecycle.canary import Canary, CanaryStatus
from torchgate.lifecycle.rollout_state import RolloutRecord, RolloutState, settings_of
from torchgate.metrics import Metrics
from torchgate.periodic import Periodic
from torchgate.serving.admission import Admission
from torchgate.serving.model_config import CanaryConfig, ModelConfig

if TYPE_CHECKING:
    from torchgate.serving.served import ServedModel

log = logging.getLogger("torchgate.rollouts")

FOLLOW_S = 2.0  # how often a shared store is read for other replicas' decisions
FINAL = (CanaryStatus.PROMOTED, CanaryStatus.ROLLED_BACK)


class Rollouts:
    """The canaries of the models `lookup` finds by name."""

    def __init__(
        self,
        state: RolloutState,
        metrics: Metrics,
        lookup: Callable[[str], ServedModel | None],
        names: Callable[[], list[str]],
    ) -> None:
        self.state = state
        self.metrics = metrics
        self._lookup = lookup
        self._names = names
        self._unsaved: dict[str, RolloutRecord] = {}
        self._follower = Periodic("rollout-follower", FOLLOW_S, self.follow_stored)

    def start(self) -> None:
        """Follow the decisions other replicas store (when the store is shared)."""
        if self.state.shared:
            self._follower.start()

    async def aclose(self) -> None:
        await self._follower.aclose()
        await self.state.aclose()

    async def recall(self, name: str) -> RolloutRecord | None:
        """The model's stored decision; one this process could not store, failing that."""
        stored = await self.state.aread(name)
        return stored if stored is not None else self._unsaved.get(name)

    def canary_for(
        self, served: ServedModel, admission: Admission, old: ServedModel | None
    ) -> Canary | None:
        """The model's canary: the running one when nothing it depends on changed (its
        record included), else one for `[canary]` (or for the rollout a stored decision
        started by hand), taking the stored decision back when it is about this rollout."""
        number = admission.canary_version
        if number is None:
            return None
        default = served.default_version
        if number not in served.versions or number == default:
            log.warning(
                "canary version is not served: no canary",
                extra={"model": served.name, "version": number},
            )
            return None
        configured = served.config.canary
        policy = configured if configured is not None else CanaryConfig(version=number, weight=0)
        previous = None if old is None else old.canary
        record = admission.record
        if (
            previous is not None
            and old is not None
            # a decision whose record is gone was reset by hand: model.toml rules again
            and (record is not None or previous.last is None)
            and previous.policy == policy
            and previous.version == number
            and previous.rolled_from == default
            and all(
                n in old.versions and old.versions[n] is served.versions[n]
                for n in (number, default)
            )
        ):
            return previous
        canary = self._make(served.name, default, policy)
        if record is not None:
            if record.stable == default and record.canary == number:
                canary.adopt(record)
            else:
                log.info(
                    "stored rollout decision is about other versions: ignored",
                    extra={"model": served.name, "version": record.canary},
                )
        return canary

    def set(self, served: ServedModel, weight: float, version: int | None = None) -> Canary:
        """An operator sets a model's canary weight (and version); starts one if none."""
        name = served.name
        number = version if version is not None else getattr(served.canary, "version", None)
        if number is None:
            raise ValueError(f"model {name} has no canary: name a version")
        if number not in served.versions:
            raise ModelNotFound(f"model {name} has no version {number}")
        if number == served.default_version:
            raise ValueError(f"version {number} is the default version already; name another")
        if served.canary is None:
            policy = served.config.canary or CanaryConfig(version=number, weight=0)
            served.canary = self._make(name, served.default_version, policy)
        served.canary.set(weight, number)
        return served.canary

    def _make(self, name: str, stable: int, policy: CanaryConfig) -> Canary:
        def promoted(version: int) -> None:
            served = self._lookup(name)
            if served is not None and version in served.versions:
                served.default_version = version

        def decided(canary: Canary) -> None:
            served = self._lookup(name)
            if served is not None and served.canary is canary:
                record = _record(served.config, canary)
                self._unsaved[name] = record
                self.state.write(name, record, self._stored)

        return Canary(
            name, stable, policy, metrics=self.metrics, on_promote=promoted, on_decision=decided
        )

    def _stored(self, name: str, stored: RolloutRecord | None) -> None:
        self._unsaved.pop(name, None)
        self.follow(name, stored)

    async def follow_stored(self) -> None:
        """Take up the decisions other replicas stored since the last look."""
        for name in self._names():
            self.follow(name, await self.state.aread(name))

    def follow(self, name: str, record: RolloutRecord | None) -> None:
        """Adopt a stored decision newer than what this server knows: one by hand (a later
        generation), or, within a generation, one that concluded the rollout or stepped it
        further. Its own decisions, read back, only bring the generation up to date."""
        served = self._lookup(name)
        if served is None or record is None or not record.applies(served.config):
            return
        canary = served.canary
        if record.canary not in served.versions:
            return
        if canary is None:
            if record.final or record.stable != served.default_version:
                return
            policy = served.config.canary or CanaryConfig(version=record.canary, weight=0)
            served.canary = self._make(name, served.default_version, policy)
            served.canary.adopt(record)
            return
        if record.stable != canary.rolled_from:
            return
        mine = (canary.version, canary.status.value, canary.weight)
        if record.generation > canary.generation:
            if (record.canary, record.status, record.weight) == mine:
                canary.generation = record.generation
            else:
                canary.adopt(record)
        elif record.generation == canary.generation and record.canary == canary.version:
            concluded = record.final and canary.status not in FINAL
            further = record.status == "active" == mine[1] and record.weight > canary.weight
            if concluded or further:
                canary.adopt(record)


def _record(config: ModelConfig, canary: Canary) -> RolloutRecord:
    """A canary's last decision as stored."""
    last = canary.last
    assert last is not None
    return RolloutRecord(
        canary=canary.version,
        stable=canary.rolled_from,
        status=canary.status.value,
        weight=canary.weight,
        decision=last.decision,
        reason=last.reason[:1000],
        generation=canary.generation,
        at=last.when,
        model_toml=settings_of(config),
    )
