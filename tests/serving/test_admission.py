"""`admit`: the one gate, on the bundled digits model and broken versions of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.lifecycle.test_validation import Constant, FailsOnRealInput, add_version
from tests.support import MODELS, copy_digits
from torchgate.errors import ModelLoadError
from torchgate.lifecycle.gate import AdmissionRefused
from torchgate.lifecycle.rollout_state import RolloutRecord, settings_of
from torchgate.serving.admission import admit, admit_all
from torchgate.serving.repository import ModelRepository


def setup(
    tmp_path: Path, sections: str = "", default: int | None = None
) -> tuple[ModelRepository, Path]:
    """digits with `sections` appended to its model.toml (and another default version)."""
    folder = copy_digits(tmp_path)
    toml = folder / "model.toml"
    text = toml.read_text()
    if default is not None:
        text = text.replace('default_version = "latest"', f"default_version = {default}")
    toml.write_text(text + sections)
    return ModelRepository(tmp_path, "cpu"), folder


def good_copy(folder: Path, version: int) -> None:
    shutil.copytree(MODELS / "digits" / "1", folder / str(version))


def test_a_latest_version_that_fails_is_refused_and_the_one_before_serves(tmp_path: Path):
    repository, folder = setup(tmp_path)
    add_version(folder, 2, Constant())
    admission = admit(repository, "digits")
    assert admission.default == 1 and sorted(admission.folder.versions) == [1]
    assert admission.refused == {
        2: "digits/2: version 2 failed the accuracy gate: accuracy 0.1022 is under 0.95"
    }
    assert admission.notes == []  # "latest" means the latest that passes


def test_a_pinned_default_that_fails_gives_way_and_says_so(tmp_path: Path):
    repository, folder = setup(tmp_path, default=2)
    add_version(folder, 2, FailsOnRealInput())
    admission = admit(repository, "digits")
    assert admission.default == 1 and 2 in admission.refused
    assert "forward failed on the validation rows" in admission.refused[2]
    assert admission.notes == [
        f"default version 2 is not served ({admission.refused[2]}): serving version 1 instead"
    ]


def test_nothing_that_passes_refuses_the_model_with_the_reason(tmp_path: Path):
    repository, folder = setup(tmp_path)
    add_version(folder, 2, Constant())
    shutil.rmtree(folder / "1")
    with pytest.raises(AdmissionRefused) as caught:
        admit(repository, "digits")
    assert caught.value.problem.startswith("version 2 failed the accuracy gate: accuracy 0.1")
    assert caught.value.path == folder / "2" and list(caught.value.refused) == [2]


def test_a_version_off_its_pin_is_refused_alone(tmp_path: Path):
    repository, folder = setup(tmp_path, f'[sha256]\n2 = "{"0" * 64}"\n')
    good_copy(folder, 2)
    admission = admit(repository, "digits")
    assert admission.default == 1 and "does not match the pinned" in admission.refused[2]
    assert admission.refused[2].startswith("digits/2/model.pt: SHA-256 ")


def test_the_drop_is_judged_for_versions_that_take_default_traffic(tmp_path: Path):
    # a floor Constant passes, so only the drop against the serving version can refuse it
    repository, folder = setup(tmp_path, "[validation]\nmin_accuracy = 0.05\n")
    add_version(folder, 2, Constant())
    latest = admit(repository, "digits")
    assert latest.default == 1 and "below version 1's 0.98" in latest.refused[2]
    # an older version than the default: explicit calls only, held to the floor alone
    shutil.copytree(folder / "1", folder / "3")
    older = admit(repository, "digits")
    assert older.default == 3 and sorted(older.folder.versions) == [1, 2, 3]


def test_a_canary_version_is_judged_against_the_stable_one(tmp_path: Path):
    toml = "[validation]\nmin_accuracy = 0.05\n[canary]\nversion = 2\n"
    repository, folder = setup(tmp_path, toml)
    add_version(folder, 2, Constant())
    admission = admit(repository, "digits")
    assert admission.default == 1 and "below version 1's" in admission.refused[2]


def test_unchanged_versions_are_kept_as_they_are(tmp_path: Path):
    repository, folder = setup(tmp_path)
    good_copy(folder, 2)
    first = admit(repository, "digits")
    current = first.folder.versions
    again = admit(repository, "digits", current=current, serving=current[2])
    assert all(again.folder.versions[n] is current[n] for n in (1, 2))
    shutil.copy(folder / "2" / "model.pt", folder / "1" / "model.pt")  # the same bytes: kept
    assert admit(repository, "digits", current=current).folder.versions[1] is current[1]
    shutil.rmtree(folder / "2")
    add_version(folder, 2, Constant())  # changed: loaded again, judged against the serving one
    changed = admit(repository, "digits", current=current, serving=current[2])
    assert changed.default == 1 and 2 in changed.refused
    assert changed.folder.versions[1] is current[1]


def test_a_promotion_on_record_is_the_default(tmp_path: Path):
    repository, folder = setup(tmp_path, "[canary]\nversion = 3\n", default=1)
    good_copy(folder, 3)
    config = repository.read_config("digits")
    record = RolloutRecord(
        canary=3,
        stable=1,
        status="promoted",
        weight=1.0,
        decision="promote",
        model_toml=settings_of(config),
    )
    promoted = admit(repository, "digits", record=record)
    assert promoted.default == 3 and promoted.canary_version is None
    assert promoted.record == record
    active = record.model_copy(update={"status": "active", "weight": 0.5, "decision": "step"})
    assert admit(repository, "digits", record=active).canary_version == 3
    edited = config.model_copy(update={"default_version": 3})
    stale = record.model_copy(update={"model_toml": settings_of(edited)})
    ignored = admit(repository, "digits", record=stale)  # model.toml moved on: it rules
    assert ignored.default == 1 and ignored.record is None and ignored.canary_version == 3


def test_every_model_of_the_repository(tmp_path: Path):
    repository, _ = setup(tmp_path)
    admitted = admit_all(repository, lambda name: None)
    assert list(admitted) == ["digits"] and admitted["digits"].default == 1
    with pytest.raises(ModelLoadError, match="no model folders"):
        admit_all(ModelRepository(tmp_path / "digits" / "1", "cpu"), lambda name: None)
