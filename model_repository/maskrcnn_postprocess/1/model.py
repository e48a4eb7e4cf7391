"""Triton python-backend model: the served Mask R-CNN's outputs -> detections in original-image pixels with
masks at the original size as COCO compressed RLE.

Pasting, thresholding and RLE are `ssd_train.models.maskrcnn.export.postprocess_rle`: the masks of the
torch reference `postprocess` (which `ssd-train predict` is tested against), bit for bit, each pasted and
encoded from its box's region only. Inputs arrive through DLPack where they are (GPU memory on the GPU
server): the masks are pasted on this instance's device. Each request is done on its own (its images have
their own sizes), so a failure fails only its own request.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from ssd_common import io
from ssd_train.inference import category_lookup
from ssd_train.models.maskrcnn.export import postprocess_rle
from ssd_train.serving.python_models import exported_labels, instance_device
from ssd_train.serving.responses import server_fault

INPUTS = (*io.MASKRCNN_MODEL_OUTPUTS, io.RESIZED_SIZE, io.IMAGE_SIZE)


class TritonPythonModel:
    def initialize(self, args):
        self.device = instance_device(args)
        self.label_map = exported_labels(args)
        self.categories = category_lookup(self.label_map, "cpu").to(torch.int32).numpy()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._detect(request))
            except Exception as err:  # our fault, not the caller's
                responses.append(server_fault(f"postprocess failed: {type(err).__name__}: {err}"))
        return responses

    def _detect(self, request):
        boxes, scores, labels, masks, counts, resized, sizes = (
            from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack()).to(self.device)
            for name in INPUTS
        )
        if int(labels.max()) >= self.label_map.num_classes:
            raise ValueError(f"the model gives label {int(labels.max())} but {io.LABELS_FILE} describes "
                             f"{self.label_map.num_classes} classes (background included): re-run ssd-train export")
        found = postprocess_rle(boxes, scores, labels, masks, counts, resized, sizes.tolist())
        n, k = len(found), io.MASKRCNN_MAX_DETECTIONS
        out_boxes = np.zeros((n, k, 4), np.float32)
        out_scores = np.zeros((n, k), np.float32)
        out_classes = np.zeros((n, k), np.int32)
        out_counts = np.zeros((n, 1), np.int32)
        out_masks = np.full((n, k), b"", dtype=np.object_)
        for i, image in enumerate(found):
            count = len(image["scores"])
            out_boxes[i, :count] = image["boxes"].numpy()
            out_scores[i, :count] = image["scores"].numpy()
            out_classes[i, :count] = self.categories[image["labels"].numpy()]
            out_counts[i, 0] = count
            out_masks[i, :count] = image["rles"]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(io.DETECTION_BOXES, out_boxes),
            pb_utils.Tensor(io.DETECTION_SCORES, out_scores),
            pb_utils.Tensor(io.DETECTION_CLASSES, out_classes),
            pb_utils.Tensor(io.NUM_DETECTIONS, out_counts),
            pb_utils.Tensor(io.DETECTION_MASKS, out_masks),
        ])
