"""`torchgate validate`: one model version run on its validation rows, on CPU, and the
gate's verdict (exit 0 pass, 1 fail, 2 misuse)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic

from torchgate import problems
from torchgate.cli.fail import fail
from torchgate.errors import ModelLoadError

if TYPE_CHECKING:
    from torchgate.lifecycle.validation import GateResult
    from torchgate.serving.model_config import ValidationConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def run(args: argparse.Namespace) -> int:
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
        return fail(str(exc))
    except validation.ValidationError as exc:
        return fail(f"{folder}: {exc}")
    if data is None and not args.allow_missing_data:
        return fail(f"{folder} has no {validation.FILE} (held-out x and y) to validate against")
    default = max(versions) if config.default_version == "latest" else config.default_version
    version = default if args.version is None else args.version
    if version not in versions:
        return fail(f"{folder} has no version {version} (it has {', '.join(map(str, versions))})")
    bounds = config.validation.model_dump()
    given = {"min_accuracy": args.min_accuracy, "max_drop": args.max_drop}
    try:
        limits = ValidationConfig(**(bounds | {k: v for k, v in given.items() if v is not None}))
    except pydantic.ValidationError as exc:
        return fail(problems.describe(exc, lambda key: "--" + key.replace("_", "-")))
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
