"""Make `digits` version 2: a dynamically quantized (int8 Linear layers) copy of version 1.

The cost demo of "Memory: quantization": rebuilds the eager `DigitsCNN` of
`scripts/train_digits.py`, loads version 1's weights from its TorchScript file, quantizes
its Linear layers to int8 with `torch.ao.quantization.quantize_dynamic`, scripts it and
writes `<models>/digits/<version>/model.pt`. Then prints the size drop (file bytes, and
parameter bytes as `ai_model_load_bytes` reports them) and runs the accuracy gate
(`torchgate validate`) on both versions.

Dynamically quantized layers run on CPU only: serve version 2 with `--device cpu`.
The written folder is not committed (.gitignore), so `make serve` keeps serving version 1.

    python scripts/quantize_digits.py [--models models] [--version 2]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_digits import DigitsCNN  # noqa: E402

from torchgate import cli  # noqa: E402
from torchgate.serving.model import parameter_bytes  # noqa: E402

# torch flags TorchScript and torch.ao.quantization as deprecated; both are what this
# demo is about, so exactly those warnings are silenced, nothing else.
QUIET = (
    (DeprecationWarning, r"`torch\.jit\.(script|load|save)` is deprecated"),
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel"),
)


def quantize(original: torch.jit.ScriptModule, target: Path) -> torch.jit.ScriptModule:
    """Write the int8 copy of a TorchScript `DigitsCNN` to `target`; returns it as loaded."""
    model = DigitsCNN()
    model.load_state_dict(original.state_dict())
    model.eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(quantized).save(str(target))
    return torch.jit.load(str(target), map_location="cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--version", type=int, default=2)
    args = parser.parse_args()
    if args.version == 1:
        parser.error("version 1 is the source; pick another --version")
    folder = args.models / "digits"
    source, target = folder / "1" / "model.pt", folder / str(args.version) / "model.pt"
    with warnings.catch_warnings():
        for category, message in QUIET:
            warnings.filterwarnings("ignore", message, category)
        original = torch.jit.load(str(source), map_location="cpu")
        quantized = quantize(original, target)
    print(f"wrote {target}")
    for what, old, new in (
        ("file bytes", source.stat().st_size, target.stat().st_size),
        ("parameter bytes", parameter_bytes(original), parameter_bytes(quantized)),
    ):
        print(f"  {what:<16} {old:>9,} -> {new:>9,} ({new / old:.0%})")
    codes = [cli.main(["validate", str(folder), "--version", str(v)]) for v in (1, args.version)]
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
