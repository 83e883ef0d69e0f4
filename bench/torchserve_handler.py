"""The TorchServe handler `make bench` serves a model with (owns only itself; it runs inside
TorchServe's worker, never in torchgate): the same `{"instances": [...]}` requests and
`{"predictions": [...]}` answers as torchgate's V1, one forward per TorchServe batch."""

import json
import os

import torch
from ts.torch_handler.base_handler import BaseHandler


class Handler(BaseHandler):
    def initialize(self, context):
        torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
        model_dir = context.system_properties["model_dir"]
        self.model = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu")
        self.model.eval()
        self.initialized = True

    def preprocess(self, data):
        rows, counts = [], []
        for item in data:
            body = item.get("body") or item.get("data")
            if isinstance(body, bytes | bytearray):
                body = json.loads(body)
            rows += body["instances"]
            counts.append(len(body["instances"]))
        return torch.tensor(rows, dtype=torch.float32), counts

    def inference(self, data, *args, **kwargs):
        tensor, counts = data
        with torch.inference_mode():
            return self.model(tensor), counts

    def postprocess(self, data):
        outputs, counts = data
        answers, start = [], 0
        for n in counts:
            answers.append({"predictions": outputs[start : start + n].tolist()})
            start += n
        return answers
