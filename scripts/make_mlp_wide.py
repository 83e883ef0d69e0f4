"""Write the `mlp_wide` benchmark model folder (owns `models/mlp_wide/`, which git ignores).

A wide MLP with random (seeded) weights: FP32 [512] -> 2048 -> 2048 -> 2048 -> [10] with
ReLU between the layers. It is heavy enough per row that batching pays on a CPU, which is
what `bench/run.py` measures with it; it is never trained. Writes `1/model.pt`
(TorchScript, FP32 [N, 512] in, [N, 10] logits out) and `model.toml`.

    python scripts/make_mlp_wide.py [--out models/mlp_wide]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

SEED = 20261129
WIDTH = 2048
IN_FEATURES = 512
OUT_FEATURES = 10

MODEL_TOML = f"""\
# A benchmark model with random weights: a wide MLP, written by scripts/make_mlp_wide.py.
# Input: any FP32 vector of {IN_FEATURES}; output: {OUT_FEATURES} logits without meaning.
platform = "torchscript"
max_batch_size = 64
default_version = "latest"

[[inputs]]
name = "input"
datatype = "FP32"
shape = [{IN_FEATURES}]

[[outputs]]
name = "logits"
datatype = "FP32"
shape = [{OUT_FEATURES}]

[batching]
max_delay_ms = 0
max_queue_rows = 2048
timeout_ms = 10000
instances = 1

[cache]
ttl_s = 300
max_entries = 10000
"""


class WideMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(IN_FEATURES, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, OUT_FEATURES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/mlp_wide"))
    args = parser.parse_args()

    torch.manual_seed(SEED)
    model = WideMLP().eval()
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript, but TorchScript is the format torchgate serves
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        scripted = torch.jit.script(model)
    (args.out / "1").mkdir(parents=True, exist_ok=True)
    scripted.save(str(args.out / "1" / "model.pt"))
    (args.out / "model.toml").write_text(MODEL_TOML, encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}/1/model.pt ({params / 1e6:.1f} M parameters) and model.toml")


if __name__ == "__main__":
    main()
