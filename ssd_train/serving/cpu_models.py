"""Python-backend stand-ins for the two production models the CPU server cannot load (it has only
the python backend): the DALI preprocess and the TorchScript SSD300. They run the same artifacts:
`ssd_train.data.dali`'s inference graph on CPU, and the exported `model.pt` on CPU.

`served_repository.py` generates each derived model's `1/model.py` as one import of a class here. This
module imports `triton_python_backend_utils`, so it only imports inside a Triton python stub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from ssd_common import io
from ssd_train.data.dali import ImageDecodeError, Preprocessor
from ssd_train.serving.responses import invalid_input, server_fault


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class DaliPreprocessModel:
    """`ssd300_preprocess` on CPU: encoded images (a zero-padded B x L uint8 tensor per request) ->
    PREPROCESSED_IMAGE, IMAGE_SIZE.

    The requests of a dynamic batch share one pipeline run. An undecodable image fails only its own
    request: after a failed run the requests are retried one by one (Preprocessor rebuilds its
    pipeline after any error, since a failed DALI pipeline object stays broken).
    """

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preprocess = Preprocessor(
            batch_size=config.get("max_batch_size") or io.MAX_BATCH_SIZE,
            device="cpu",
            num_threads=int(_parameter(config, "num_threads", "2")),
        )

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, io.IMAGE).as_numpy() for r in requests]
        try:
            images, sizes = self.preprocess([row for batch in batches for row in batch])
        except ImageDecodeError:
            return [self._one(batch) for batch in batches]
        responses, start = [], 0
        for batch in batches:
            stop = start + len(batch)
            responses.append(self._response(images[start:stop], sizes[start:stop]))
            start = stop
        return responses

    def _one(self, batch: np.ndarray):
        try:
            return self._response(*self.preprocess.run_padded(batch))
        except ImageDecodeError as err:
            return invalid_input(f"{io.IMAGE} {err}")

    @staticmethod
    def _response(images: np.ndarray, sizes: np.ndarray):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(io.PREPROCESSED_IMAGE, np.ascontiguousarray(images, dtype=np.float32)),
            pb_utils.Tensor(io.IMAGE_SIZE, np.ascontiguousarray(sizes, dtype=np.int32)),
        ])


class TorchScriptModel:
    """`ssd300_fp32` / `ssd300_fp16` on CPU: the exported `model.pt` under torch.jit.load, one forward
    per dynamic batch."""

    def initialize(self, args):
        path = Path(args["model_repository"]) / args["model_version"] / io.TORCHSCRIPT_FILE
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def execute(self, requests):
        try:
            inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, io.MODEL_INPUT).to_dlpack())
                      for r in requests]
            with torch.inference_mode():
                locs, scores = self.model(torch.cat(inputs))
        except Exception as err:  # a failed forward fails every request that shared it
            return [server_fault(f"model failed: {err}")] * len(requests)
        responses, start = [], 0
        for images in inputs:
            rows = slice(start, start + len(images))
            start = rows.stop
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack(io.MODEL_LOCS, to_dlpack(locs[rows].contiguous())),
                pb_utils.Tensor.from_dlpack(io.MODEL_SCORES, to_dlpack(scores[rows].contiguous())),
            ]))
        return responses
