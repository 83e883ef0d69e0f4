"""`Gate`: the accuracy checks of one admission (`serving.admission`), each version
evaluated at most once, and what a refused model says (`AdmissionRefused`, `describe`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torchgate.errors import ModelLoadError
from torchgate.lifecycle.validation import (
    Evaluation,
    ValidationSet,
    evaluate,
    forward_failed,
    judge,
)
from torchgate.serving.model import LoadedModel
from torchgate.serving.model_config import ModelConfig

log = logging.getLogger("torchgate.admission")


class AdmissionRefused(ModelLoadError):
    """No version of the model can serve; `refused` says why for each."""

    def __init__(self, path: object, problem: str, refused: dict[int, str]) -> None:
        super().__init__(path, problem)
        self.refused = refused


def describe(exc: ModelLoadError, root: Path) -> str:
    """A load problem without the server's own paths: relative to the repository root."""
    path = exc.path
    if isinstance(path, Path):
        if not path.is_relative_to(root):
            return exc.problem
        return f"{path.relative_to(root)}: {exc.problem}"
    return f"{path}: {exc.problem}"


class Gate:
    """The accuracy checks of one admission, each version evaluated at most once."""

    def __init__(
        self,
        root: Path,
        directory: Path,
        config: ModelConfig,
        failures: dict[int, ModelLoadError],
    ) -> None:
        self.root = root
        self.directory = directory
        self.config = config
        self.data: ValidationSet | None = None
        self.failures = failures
        self.reasons = {n: describe(exc, root) for n, exc in failures.items()}
        self._evaluations: dict[int, Evaluation | str] = {}  # by id() of the model

    def _evaluate(self, model: LoadedModel) -> Evaluation | str:
        assert self.data is not None
        key = id(model)
        if key not in self._evaluations:
            try:
                self._evaluations[key] = evaluate(model, self.data)
            except Exception as exc:  # a broken version: whatever its forward raises
                self._evaluations[key] = forward_failed(exc)
        return self._evaluations[key]

    def check(
        self,
        number: int,
        loaded: dict[int, LoadedModel],
        baseline: LoadedModel | None = None,
    ) -> bool:
        """Hold a version to the floor (and, given a baseline, the drop); one that fails
        is taken out of `loaded` and its reason noted. Returns whether it passed."""
        if self.data is None:
            return True
        evaluation = self._evaluate(loaded[number])
        against = None if baseline is None else self._evaluate(baseline)
        fields: dict[str, object] = {"model": self.directory.name, "version": number}
        if isinstance(evaluation, str):
            problems = [evaluation]
        else:
            fields["accuracy"] = round(evaluation.accuracy, 4)
            baseline_evaluation = against if isinstance(against, Evaluation) else None
            problems = judge(evaluation, self.config.validation, baseline_evaluation)
        if not problems:
            log.info("version passed the accuracy gate", extra=fields)
            return True
        summary = f"version {number} failed the accuracy gate: {'; '.join(problems)}"
        log.warning(f"{summary}: not serving it", extra=fields)
        exc = ModelLoadError(self.directory / str(number), summary)
        self.failures[number] = exc
        self.reasons[number] = describe(exc, self.root)
        del loaded[number]
        return False

    def refusal(self, wanted: int | None) -> AdmissionRefused:
        """Why nothing can serve: the intended default's failure, else the first."""
        number = wanted if wanted in self.failures else min(self.failures)
        exc = self.failures[number]
        return AdmissionRefused(exc.path, exc.problem, dict(self.reasons))
