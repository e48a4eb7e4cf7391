"""Python-backend stand-ins for the production models the CPU server cannot load (it has only the python
backend): the DALI preprocesses and the TorchScript models. They run the same artifacts: the DALI
graphs (`ssd_train.data.dali`, `ssd_train.models.maskrcnn.preprocess`) on CPU, and the exported
`model.pt` files on CPU.

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
    """`ssd300_preprocess` / `maskrcnn_preprocess` on CPU: encoded images (a zero-padded B x L uint8 tensor
    per request) -> the outputs its config lists (PREPROCESSED_IMAGE, IMAGE_SIZE; Mask R-CNN's also
    RESIZED_SIZE), from the same graph as the GPU model.

    The requests of a dynamic batch share one pipeline run. An undecodable image fails only its own
    request: after a failed run the requests are retried one by one (Preprocessor rebuilds its
    pipeline after any error, since a failed DALI pipeline object stays broken).
    """

    def initialize(self, args):
        config = json.loads(args["model_config"])
        batch_size = config.get("max_batch_size") or io.MAX_BATCH_SIZE
        num_threads = int(_parameter(config, "num_threads", "2"))
        if any(output["name"] == io.RESIZED_SIZE for output in config["output"]):
            from ssd_train.models.maskrcnn.preprocess import MaskRCNNPreprocessor, read_resize

            min_size, max_size = read_resize(Path(args["model_repository"]) / args["model_version"] / io.RESIZE_FILE)
            self.preprocess = MaskRCNNPreprocessor(min_size, max_size, batch_size, num_threads=num_threads)
            self.outputs = (io.PREPROCESSED_IMAGE, io.RESIZED_SIZE, io.IMAGE_SIZE)
        else:
            self.preprocess = Preprocessor(batch_size=batch_size, device="cpu", num_threads=num_threads)
            self.outputs = (io.PREPROCESSED_IMAGE, io.IMAGE_SIZE)

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, io.IMAGE).as_numpy() for r in requests]
        try:
            outputs = self.preprocess([row for batch in batches for row in batch])
        except ImageDecodeError:
            return [self._one(batch) for batch in batches]
        responses, start = [], 0
        for batch in batches:
            stop = start + len(batch)
            responses.append(self._response([output[start:stop] for output in outputs]))
            start = stop
        return responses

    def _one(self, batch: np.ndarray):
        try:
            return self._response(self.preprocess.run_padded(batch))
        except ImageDecodeError as err:
            return invalid_input(f"{io.IMAGE} {err}")

    def _response(self, outputs):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in zip(self.outputs, outputs)
        ])


class TorchScriptModel:
    """A `pytorch_libtorch` model on CPU: the exported `model.pt` under torch.jit.load, one forward per
    dynamic batch, inputs and outputs by position in the config (libtorch's INPUT__i / OUTPUT__i)."""

    def initialize(self, args):
        import torchvision  # noqa: F401  registers the nms / roi_align operators Mask R-CNN's graph calls

        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / io.TORCHSCRIPT_FILE
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def execute(self, requests):
        try:
            inputs = [[from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack()) for r in requests]
                      for name in self.inputs]
            with torch.inference_mode():
                outputs = self.model(*(torch.cat(tensors) for tensors in inputs))
        except Exception as err:  # a failed forward fails every request that shared it
            return [server_fault(f"model failed: {err}")] * len(requests)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        responses, start = [], 0
        for first in inputs[0]:
            rows = slice(start, start + len(first))
            start = rows.stop
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack(name, to_dlpack(output[rows].contiguous()))
                for name, output in zip(self.outputs, outputs)
            ]))
        return responses
