"""Triton python-backend model: SSD300's candidates (each class's 200 best boxes, decoded inside the
TorchScript model by `boxes.candidates`) -> detections in original-image pixels.

Threshold + NMS, pixel scaling and the label -> category id lookup are `ssd_train.models.ssd300.boxes.select`,
`ssd_train.models.ssd300.inference` and `ssd_train.inference`, the code `ssd-train evaluate/predict`
run. The requests of a dynamic batch go through one `postprocess` call. Inputs arrive through DLPack
where they are (GPU memory on the GPU server, `FORCE_CPU_ONLY_INPUT_TENSORS: no`), and the work runs
on this instance's device.
"""

from __future__ import annotations

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from ssd_common import io
from ssd_train.inference import category_lookup
from ssd_train.models.ssd300.boxes import select
from ssd_train.models.ssd300.inference import scale_to_pixels
from ssd_train.serving.python_models import exported_labels, instance_device
from ssd_train.serving.responses import server_fault


class TritonPythonModel:
    def initialize(self, args):
        self.device = instance_device(args)
        self.label_map = exported_labels(args)
        self.categories = category_lookup(self.label_map, self.device).to(torch.int32)

    def execute(self, requests):
        responses = [None] * len(requests)
        batch = []  # (request index, boxes, scores, sizes)
        for i, request in enumerate(requests):
            try:
                batch.append((i, *self._inputs(request)))
            except ValueError as err:  # the export's label map does not fit the model: a server fault
                responses[i] = server_fault(str(err))
        if batch:
            try:
                outputs = self._detect(batch)
            except Exception as err:  # a failure of the shared call fails each request in it
                outputs = [server_fault(f"postprocess failed: {err}")] * len(batch)
            for (i, *_), response in zip(batch, outputs):
                responses[i] = response
        return responses

    def _inputs(self, request):
        boxes, scores, sizes = (
            from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack()).to(self.device)
            for name in (io.CANDIDATE_BOXES, io.CANDIDATE_SCORES, io.IMAGE_SIZE)
        )
        if scores.shape[1] != self.label_map.num_classes - 1:
            raise ValueError(
                f"{io.CANDIDATE_SCORES} has {scores.shape[1]} classes but {io.LABELS_FILE} describes "
                f"{self.label_map.num_classes - 1} (background left out): re-run ssd-train export"
            )
        return boxes, scores, sizes

    def _detect(self, batch):
        boxes, scores, sizes = (torch.cat([item[k] for item in batch]) for k in (1, 2, 3))
        detections = scale_to_pixels(select(scores, boxes), sizes)
        classes = self.categories[detections.labels]  # label 0 (padding) -> 0
        counts = detections.counts.to(torch.int32)[:, None]
        outputs, start = [], 0
        for _, item_boxes, _, _ in batch:
            rows = slice(start, start + len(item_boxes))
            start = rows.stop
            tensors = {
                io.DETECTION_BOXES: detections.boxes[rows],
                io.DETECTION_SCORES: detections.scores[rows],
                io.DETECTION_CLASSES: classes[rows],
                io.NUM_DETECTIONS: counts[rows],
            }
            outputs.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack(name, to_dlpack(t.contiguous())) for name, t in tensors.items()
            ]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the outputs leave this process: finish writing them
        return outputs

