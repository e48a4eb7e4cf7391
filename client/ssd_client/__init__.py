"""Client for the detectors served on Triton, SSD300 and Mask R-CNN (`model="maskrcnn"`: detections with
instance masks): `SSDClient` (sync), `AsyncSSDClient` (asyncio) and the `ssd-client` CLI. Tensor names and
the label map come from `ssd_common`, torch-free.

    from ssd_client import SSDClient
    with SSDClient("localhost:8000") as client:
        for detection in client.detect("photo.jpg")[0]:
            print(detection.category_name, detection.score, detection.box)
"""

from ssd_client.aio import AsyncSSDClient
from ssd_client.client import SSDClient
from ssd_client.errors import (ImageError, InferenceError, ModelMismatchError, ModelNotFoundError,
                               ServerUnavailableError, SSDClientError)
from ssd_client.protocol import Detection

__all__ = [
    "AsyncSSDClient", "Detection", "ImageError", "InferenceError", "ModelMismatchError", "ModelNotFoundError",
    "SSDClient", "SSDClientError", "ServerUnavailableError",
]
