"""`admit`: the one gate a model's versions pass before they are served, at start-up and
on every load (admin, hot reload).

Each version folder is loaded, which checks its SHA-256 pin and its signature (forwards
on the declared shapes); with a `validation.npz`, each newly loaded version must reach
the accuracy floor, and the versions that will take default traffic must not drop below
the version serving before them (`lifecycle.gate`, by `validation.judge`):

- the default version: against the version serving by default now (on a reload), or, at
  start-up with `default_version = "latest"`, against the latest version below it;
- the `[canary]` version: against the default version it rolls out next to.

A version that fails is not served: it is listed as refused, with the reason. When the
default version fails, the latest version that passed serves instead (and the admission
says so); when none passes, `AdmissionRefused` says why and nothing changes. Versions
whose file and `model.toml` are unchanged since they were loaded (`current`) are kept as
they are, not loaded or judged again. A promotion recorded in `rollout_state` makes the
promoted version the default (while the record applies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torchgate.errors import ModelLoadError
from torchgate.lifecycle.gate import Gate
from torchgate.lifecycle.rollout_state import RolloutRecord
from torchgate.lifecycle.validation import FILE, ValidationError, ValidationSet
from torchgate.serving.model import LoadedModel
from torchgate.serving.model_config import ModelConfig
from torchgate.serving.repository import ModelFolder, ModelRepository

log = logging.getLogger("torchgate.admission")


@dataclass(slots=True)
class Admission:
    """What came through the gate: the versions to serve (`folder`), the default one,
    the versions refused with their reasons, and the stored decision that applies."""

    folder: ModelFolder
    default: int
    refused: dict[int, str] = field(default_factory=dict)
    record: RolloutRecord | None = None
    notes: list[str] = field(default_factory=list)  # what an operator should know

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def canary_version(self) -> int | None:
        """The version a rollout runs for: `[canary]`, or one started by hand."""
        return _canary_version(self.folder.config, self.record)


def admit(
    repository: ModelRepository,
    name: str,
    *,
    record: RolloutRecord | None = None,
    current: Mapping[int, LoadedModel] | None = None,
    serving: LoadedModel | None = None,
) -> Admission:
    """Load and judge one model's versions (blocking CPU work: call it in a thread).

    `current`: the versions served now (kept when unchanged); `serving`: the one serving
    by default now; `record`: the model's stored rollout decision, used if it applies."""
    current = current or {}
    config = repository.read_config(name)
    directory = repository.folder(name)
    numbers = repository.versions(name)
    if config.default_version != "latest" and config.default_version not in numbers:
        raise ModelLoadError(
            directory / "model.toml", f"default_version {config.default_version} has no folder"
        )
    if record is not None and not record.applies(config):
        log.info(
            "model.toml changed since the stored rollout decision: following model.toml",
            extra={"model": name, "decision": record.decision},
        )
        record = None
    loaded, fresh, failures = _load(repository, name, config, numbers, current)
    gate = Gate(repository.root, directory, config, failures)
    if not loaded:  # no version loads: that is the cause, whatever the validation set says
        raise gate.refusal(_intended(config, numbers, _canary_version(config, record)))
    try:
        gate.data = ValidationSet.read(directory, config)
    except ValidationError as exc:
        raise ModelLoadError(directory / FILE, str(exc)) from None
    for number in sorted(fresh):
        gate.check(number, loaded)
    canary = _canary_version(config, record)
    promoted = record.canary if record is not None and record.status == "promoted" else None
    notes: list[str] = []
    default = _default(config, set(loaded), promoted, canary)
    while default is not None and default in fresh:
        baseline = _predecessor(config, loaded, default, canary, serving, promoted)
        if baseline is None or gate.check(default, loaded, baseline):
            break
        default = _default(config, set(loaded), promoted, canary)
    if default is None:
        if not loaded:
            raise gate.refusal(_intended(config, numbers, canary))
        wanted = _intended(config, numbers, canary)
        keep = serving.version if serving is not None else None
        default = keep if keep in loaded else _latest(set(loaded), canary)
        notes.append(
            f"default version {wanted} is not served ({gate.reasons.get(wanted, 'no folder')}): "
            f"serving version {default} instead"
        )
        log.warning(notes[-1], extra={"model": name, "version": default})
    if canary is not None and canary in fresh and canary in loaded and canary != default:
        gate.check(canary, loaded, loaded[default])
    folder = ModelFolder(name, config, loaded)
    return Admission(folder, default, gate.reasons, record, notes)


def admit_all(
    repository: ModelRepository, recall: Callable[[str], RolloutRecord | None]
) -> dict[str, Admission]:
    """Every model of the repository loaded at start-up through the gate: each whose
    `model.toml` says `load = "startup"` (the default) or `"pinned"`; `recall` reads a
    model's stored rollout decision. Every `model.toml` is read, so that a broken one
    stops the start-up even when its model loads on demand."""
    names = repository.names()
    if not names:
        raise ModelLoadError(repository.root, "no model folders (each needs a model.toml)")
    startup = [name for name in names if repository.read_config(name).load != "on_demand"]
    return {name: admit(repository, name, record=recall(name)) for name in startup}


def _load(
    repository: ModelRepository,
    name: str,
    config: ModelConfig,
    numbers: list[int],
    current: Mapping[int, LoadedModel],
) -> tuple[dict[int, LoadedModel], set[int], dict[int, ModelLoadError]]:
    """Each version: kept from `current` when unchanged, else loaded (pin and signature
    checked). Returns the versions, which of them are newly loaded, and the failures."""
    loaded: dict[int, LoadedModel] = {}
    failures: dict[int, ModelLoadError] = {}
    fresh: list[int] = []
    for number in numbers:
        old = current.get(number)
        try:
            if (
                old is not None
                and old.config == config
                and repository.digest(name, number) == old.sha256
            ):
                loaded[number] = old
                continue
        except ModelLoadError as exc:
            failures[number] = exc
            continue
        fresh.append(number)
    if fresh:
        processors = repository.processors(name, config)  # a broken one fails the model
        for number in fresh:
            try:
                loaded[number] = repository.load_version(
                    name, number, config, processors=processors
                )
            except ModelLoadError as exc:
                failures[number] = exc
    return loaded, {n for n in fresh if n in loaded}, failures


def _canary_version(config: ModelConfig, record: RolloutRecord | None) -> int | None:
    """The version rolled out: the stored decision's (None once promoted), else `[canary]`'s."""
    if record is not None:
        return None if record.status == "promoted" else record.canary
    return None if config.canary is None else config.canary.version


def _latest(available: set[int], canary: int | None) -> int | None:
    pool = available - {canary} or available
    return max(pool) if pool else None


def _default(
    config: ModelConfig, available: set[int], promoted: int | None, canary: int | None
) -> int | None:
    """The version to serve by default among `available` (None: the configured one is
    not available): a promoted one, else model.toml's (with "latest", the latest that is
    not a canary)."""
    if promoted in available:
        return promoted
    if config.default_version != "latest":
        return config.default_version if config.default_version in available else None
    return _latest(available, canary)


def _intended(config: ModelConfig, numbers: list[int], canary: int | None) -> int | None:
    """The default version model.toml asks for, passed or not."""
    if config.default_version != "latest":
        return config.default_version
    return _latest(set(numbers), canary)


def _predecessor(
    config: ModelConfig,
    loaded: dict[int, LoadedModel],
    default: int,
    canary: int | None,
    serving: LoadedModel | None,
    promoted: int | None,
) -> LoadedModel | None:
    """What a newly loaded default version is compared against: the version serving by
    default now; at start-up with "latest", the latest version below it; else nothing
    (model.toml named it, or a rollout promoted it)."""
    if serving is not None:
        return serving if loaded[default] is not serving else None
    if config.default_version != "latest" or default == promoted:
        return None
    below = [n for n in loaded if n < default and n != canary]
    return loaded[max(below)] if below else None
