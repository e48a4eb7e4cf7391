"""Triton python-backend model: the ensemble's image check (`ssd_train.serving.image_check`).

Each request is checked on its own: a bad image fails its request with INVALID_ARG and a message
naming the input and the limit; good requests pass their IMAGE tensor on unchanged as VALID_IMAGE.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from ssd_common import io
from ssd_train.serving.image_check import ImageLimits, ImageRejected, check_request
from ssd_train.serving.responses import invalid_input, server_fault


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.limits = ImageLimits.from_parameters(config.get("parameters", {}))

    def execute(self, requests):
        return [self._check(request) for request in requests]

    def _check(self, request):
        try:
            images = pb_utils.get_input_tensor_by_name(request, io.IMAGE).as_numpy()
            check_request(images, self.limits)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(io.VALID_IMAGE, images)])
        except ImageRejected as err:
            return invalid_input(f"{io.IMAGE} {err}")
        except Exception as err:  # our fault, not the caller's
            return server_fault(f"image check failed: {type(err).__name__}: {err}")
