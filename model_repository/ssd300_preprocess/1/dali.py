"""The Triton DALI backend's preprocessing pipeline: `ssd_train.data.dali.inference_graph` on the
GPU (nvJPEG decode, GPU resize and normalise), serialised by the backend at load time.

Only this function may carry `@autoserialize`: the backend searches every module reachable from
this file for marked functions and wants exactly one.
"""

from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

from ssd_common.io import MAX_BATCH_SIZE
from ssd_train.data.dali import inference_graph


@autoserialize
@pipeline_def(batch_size=MAX_BATCH_SIZE, num_threads=4, device_id=0)
def ssd300_preprocess():
    return inference_graph("gpu")
