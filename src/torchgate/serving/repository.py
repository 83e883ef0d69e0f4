"""`ModelRepository`: reads the model folders of DESIGN.md, validates and loads them.

Only folders directly under the configured root are read, by name; resolved paths (links
included) must stay inside the root. Every problem is a `ModelLoadError` naming the file;
a loaded version is checked against its signature by `signature.check_signature`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydantic
import torch

from torchgate import problems
from torchgate.errors import ModelLoadError
from torchgate.processors.factory import (
    MAX_TOKENS,
    Preprocessor,
    ProcessorError,
    build_postprocessor,
    build_preprocessor,
)
from torchgate.processors.post import Postprocessor
from torchgate.serving import footprint
from torchgate.serving.model import LoadedModel, parameter_bytes
from torchgate.serving.model_config import MODEL_NAME, ModelConfig
from torchgate.serving.signature import cause, check_signature

log = logging.getLogger("torchgate.repository")


@dataclass(slots=True)
class Processors:
    """A model's preprocessor and postprocessor (either may be None), shared by versions."""

    pre: Preprocessor | None
    post: Postprocessor | None


@dataclass(slots=True)
class ModelFolder:
    """A model as read from disk: its config and every loaded version."""

    name: str
    config: ModelConfig
    versions: dict[int, LoadedModel]

    @property
    def default_version(self) -> int:
        if self.config.default_version == "latest":
            return max(self.versions)
        return self.config.default_version


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device", f"{spec} was asked for but no CUDA device is present")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError("device", f"{spec} does not exist")
    return device


class ModelRepository:
    """The model folders under one root directory."""

    def __init__(self, root: Path, device: str = "auto", *, max_tokens: int = MAX_TOKENS) -> None:
        self.root = root.resolve()
        self.device_spec = device
        self.max_tokens = max_tokens

    def names(self) -> list[str]:
        if not self.root.is_dir():
            raise ModelLoadError(self.root, "model repository is not a directory")
        return sorted(p.name for p in self.root.iterdir() if (p / "model.toml").is_file())

    def folder(self, name: str) -> Path:
        if not MODEL_NAME.match(name):
            raise ModelLoadError(name, "model names are [a-z0-9][a-z0-9_.-]*")
        path = self._inside(self.root / name)
        if not (path / "model.toml").is_file():
            raise ModelLoadError(path, "no model.toml")
        return path

    def read_config(self, name: str) -> ModelConfig:
        toml = self._inside(self.folder(name) / "model.toml")
        try:
            raw = tomllib.loads(toml.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ModelLoadError(toml, f"not valid TOML ({exc})") from None
        try:
            return ModelConfig.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise ModelLoadError(toml, problems.describe(exc)) from None

    def versions(self, name: str) -> list[int]:
        folder = self.folder(name)
        found = sorted(
            int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "model.pt").exists()
        )
        if not found:
            raise ModelLoadError(folder, "no version folder with a model.pt (e.g. 1/model.pt)")
        return found

    def digest(self, name: str, version: int) -> str:
        """The SHA-256 of a version's model.pt as it is on disk now (to tell whether a
        loaded version's file changed without loading it again)."""
        path = self._inside(self.folder(name) / str(version) / "model.pt")
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise ModelLoadError(path, f"cannot read ({exc.strerror})") from None

    def processors(self, name: str, config: ModelConfig) -> Processors:
        """The model's pre- and postprocessor, built from its config (and tokenizer file)."""
        try:
            pre = build_preprocessor(config, self.folder(name), max_tokens=self.max_tokens)
        except ProcessorError as exc:
            raise ModelLoadError(self._inside(exc.path), exc.problem) from None
        return Processors(pre, build_postprocessor(config))

    def load(self, name: str, *, instances: int | None = None) -> ModelFolder:
        """Read the config and load every version of one model."""
        config = self.read_config(name)
        processors = self.processors(name, config)
        loaded = {
            v: self.load_version(name, v, config, instances=instances, processors=processors)
            for v in self.versions(name)
        }
        folder = ModelFolder(name, config, loaded)
        if folder.default_version not in loaded:
            raise ModelLoadError(
                self.folder(name) / "model.toml",
                f"default_version {config.default_version} has no folder",
            )
        return folder

    def load_version(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        *,
        instances: int | None = None,
        processors: Processors | None = None,
    ) -> LoadedModel:
        path = self._inside(self.folder(name) / str(version) / "model.pt")
        processors = processors or self.processors(name, config)
        device = resolve_device(self.device_spec)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(path, f"cannot read ({exc.strerror})") from None
        digest = hashlib.sha256(data).hexdigest()
        pinned = config.sha256.get(str(version))
        if pinned is not None and pinned != digest:
            raise ModelLoadError(path, f"SHA-256 {digest} does not match the pinned {pinned}")
        # One copy per runner on a GPU so runners never share a stream; CPU runners share one.
        runners = instances or config.batching.instances
        copies = runners if device.type == "cuda" else 1
        before = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        # loaded from the very bytes that were hashed: reading the path again would let a
        # file swapped in between be served under the pinned digest
        modules = [self._jit_load(path, data, device) for _ in range(copies)]
        model = LoadedModel(
            name,
            version,
            config,
            path,
            device,
            modules,
            digest,
            preprocessor=processors.pre,
            postprocessor=processors.post,
        )
        check_signature(model)
        gpu_bytes = gpu_peak = 0
        if device.type == "cuda":
            gpu_bytes = torch.cuda.memory_allocated(device) - before
            gpu_peak = torch.cuda.max_memory_allocated(device) - before
        model.load_bytes = max(parameter_bytes(modules[0]) * copies, gpu_bytes)
        model.resident_bytes = footprint.resident_bytes(model, runners, gpu_peak)
        log.info(
            "model loaded",
            extra={
                "model": name,
                "version": version,
                "device": str(device),
                "load_bytes": model.load_bytes,
                "resident_bytes": model.resident_bytes,
            },
        )
        return model

    def estimate(self, name: str) -> dict[str, int]:
        """Bytes a load of the model would hold, by budget (device), before loading it:
        its versions' files (a TorchScript archive stores its tensors uncompressed), one
        copy per runner on a GPU. Blocking file reads: call it in a thread."""
        config = self.read_config(name)
        device = resolve_device(self.device_spec)
        copies = config.batching.instances if device.type == "cuda" else 1
        total = 0
        for version in self.versions(name):
            path = self._inside(self.folder(name) / str(version) / "model.pt")
            try:
                total += path.stat().st_size * copies
            except OSError as exc:
                raise ModelLoadError(path, f"cannot read ({exc.strerror})") from None
        return {footprint.device_key(device): total}

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ModelLoadError(path, "resolves outside the model repository")
        return resolved

    @staticmethod
    def _jit_load(path: Path, data: bytes, device: torch.device) -> torch.jit.ScriptModule:
        try:
            with warnings.catch_warnings():
                # TorchScript is the format torchgate serves; torch 2.9+ flags it deprecated
                warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated")
                module = torch.jit.load(io.BytesIO(data), map_location=device)
        except Exception as exc:  # torch raises RuntimeError, ValueError or worse on bad files
            raise ModelLoadError(
                path, f"not a loadable TorchScript archive ({cause(exc, 200)})"
            ) from None
        module.eval()
        return module
