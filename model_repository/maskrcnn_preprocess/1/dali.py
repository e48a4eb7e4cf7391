"""The Triton DALI backend's preprocessing pipeline for Mask R-CNN: `ssd_train.models.maskrcnn.preprocess`
on the GPU, with the min/max size `ssd-train export` wrote beside this file, serialised by the backend
at load time. Only this function may carry `@autoserialize`."""

from pathlib import Path

from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

from ssd_common.io import MASKRCNN_MAX_BATCH_SIZE, RESIZE_FILE
from ssd_train.models.maskrcnn.preprocess import inference_graph, read_resize

MIN_SIZE, MAX_SIZE = read_resize(Path(__file__).parent / RESIZE_FILE)


@autoserialize
@pipeline_def(batch_size=MASKRCNN_MAX_BATCH_SIZE, num_threads=4, device_id=0)
def maskrcnn_preprocess():
    return inference_graph(MIN_SIZE, MAX_SIZE, "gpu")
