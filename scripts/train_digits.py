"""Train the bundled `digits` model and write its model folder.

A small CNN on scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn, no
download). Seeded and deterministic: the same run writes the same weights. Writes
`models/digits/1/model.pt` (TorchScript, takes raw pixel values 0..16 as FP32 [N, 1, 8, 8]
and returns 10 logits), `validation.npz` (the held-out split, `x` and `y`) and
`reference.npz` (per-feature quantile bins of the training inputs, for drift scores).

    python scripts/train_digits.py [--out models/digits] [--epochs 60]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 20261129


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x / 16.0))


def reference_bins(x: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per-feature quantile edges of the training inputs and the share in each bin."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    edges = np.quantile(flat, np.linspace(0, 1, bins + 1), axis=0).T  # [features, bins+1]
    shares = np.empty((flat.shape[1], bins))
    for f in range(flat.shape[1]):
        inner = np.unique(edges[f, 1:-1])
        counts = np.bincount(np.searchsorted(inner, flat[:, f], side="right"), minlength=bins)
        shares[f] = counts[:bins] / len(flat)
    return {"edges": edges, "shares": shares, "mean": flat.mean(0), "std": flat.std(0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/digits"))
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_val)).argmax(1).numpy()
    accuracy = float((predicted == y_val).mean())
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_val)} rows")
    if accuracy < 0.95:
        raise SystemExit("accuracy under 0.95: not writing the model")

    (args.out / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(args.out / "1" / "model.pt"))
    np.savez_compressed(args.out / "validation.npz", x=x_val, y=y_val)
    np.savez_compressed(args.out / "reference.npz", **reference_bins(x_train))
    print(f"wrote {args.out}/1/model.pt, validation.npz, reference.npz")


if __name__ == "__main__":
    main()
