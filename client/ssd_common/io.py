"""Names, types and shapes of the Triton models: the one source for export, the model repository
configs (checked by tests), the launcher, the client and the perf tools. Pure Python."""

from __future__ import annotations

# Models of the repository.
ENSEMBLE = "ssd300"  # the public entry point: encoded image bytes in, detections out
VALIDATE = "ssd300_validate"  # python: format, structure and size checks before any decoding
PREPROCESS = "ssd300_preprocess"  # DALI: decode, resize 300x300, normalise
MODEL_FP32 = "ssd300_fp32"  # TorchScript SSD300
MODEL_FP16 = "ssd300_fp16"
POSTPROCESS = "ssd300_postprocess"  # python: decode boxes + batched NMS (ssd_train.models.ssd300.boxes)
MODELS = (VALIDATE, PREPROCESS, MODEL_FP32, MODEL_FP16, POSTPROCESS, ENSEMBLE)


def model_name(precision: str) -> str:
    return {"fp32": MODEL_FP32, "fp16": MODEL_FP16}[precision]


MAX_BATCH_SIZE = 64

# Ensemble and preprocess input: encoded JPEG/PNG bytes, zero-padded to a common length in a batch.
IMAGE = "IMAGE"
# Validate output: the same bytes, passed on once checked (the preprocess step's IMAGE).
VALID_IMAGE = "VALID_IMAGE"
# Preprocess outputs.
PREPROCESSED_IMAGE = "PREPROCESSED_IMAGE"  # FP32 [3, 300, 300], ImageNet-normalised
IMAGE_SIZE = "IMAGE_SIZE"  # INT32 [2]: original (height, width)
# TorchScript model tensors (libtorch's positional naming convention).
MODEL_INPUT = "INPUT__0"  # FP32 [3, 300, 300] for both precisions (the fp16 model casts inside)
MODEL_LOCS = "OUTPUT__0"  # FP32 [4, 8732]
MODEL_SCORES = "OUTPUT__1"  # FP32 [num_classes, 8732]
# Postprocess inputs (and the ensemble's tensors between the model and the postprocess step).
LOCS = "LOCS"  # FP32 [4, 8732]: MODEL_LOCS
SCORES = "SCORES"  # FP32 [num_classes, 8732]: MODEL_SCORES
# Postprocess / ensemble outputs.
DETECTION_BOXES = "DETECTION_BOXES"  # FP32 [200, 4] xyxy in original-image pixels
DETECTION_SCORES = "DETECTION_SCORES"  # FP32 [200]
DETECTION_CLASSES = "DETECTION_CLASSES"  # INT32 [200] dataset category ids (COCO ids), 0 = padding
NUM_DETECTIONS = "NUM_DETECTIONS"  # INT32 [1]
DETECTION_OUTPUTS = (DETECTION_BOXES, DETECTION_SCORES, DETECTION_CLASSES, NUM_DETECTIONS)
# Triton data types of the ensemble's public tensors (what a client sends and reads).
ENSEMBLE_INPUT_DTYPES = {IMAGE: "UINT8"}
ENSEMBLE_OUTPUT_DTYPES = {
    DETECTION_BOXES: "FP32",
    DETECTION_SCORES: "FP32",
    DETECTION_CLASSES: "INT32",
    NUM_DETECTIONS: "INT32",
}

INPUT_SIZE = 300
# Artifacts `ssd-train export` writes (never committed).
TORCHSCRIPT_FILE = "model.pt"
ONNX_FILE = "model.onnx"
DALI_FILE = "model.dali"
LABELS_FILE = "labels.json"  # in the postprocess model's version folder

# Mask R-CNN's served model (ssd_train.models.maskrcnn.export.ServedMaskRCNN; its ensemble is still to
# come): its input and output tensors, in order, as the ONNX export names them.
MASKRCNN_MODEL_INPUTS = ("IMAGES", "IMAGE_SIZES")  # FP32 [N, 3, H, W] resized + normalised; INT64 [N, 2]
MASKRCNN_MODEL_OUTPUTS = ("BOXES", "SCORES", "LABELS", "MASKS", "COUNTS")  # masks FP32 [N, 100, 28, 28]
