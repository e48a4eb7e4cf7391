"""Names, types and shapes of the Triton models: the one source for export, the model repository
configs (checked by tests), the launcher, the client and the perf tools. Pure Python."""

from __future__ import annotations

# Models of the repository.
ENSEMBLE = "ssd300"  # the public entry point: encoded image bytes in, detections out
VALIDATE = "ssd300_validate"  # python: format, structure and size checks before any decoding
PREPROCESS = "ssd300_preprocess"  # DALI: decode, resize 300x300, normalise
MODEL_FP32 = "ssd300_fp32"  # TorchScript SSD300
MODEL_FP16 = "ssd300_fp16"
POSTPROCESS = "ssd300_postprocess"  # python: threshold + per-class NMS of the model's candidates (boxes.select)
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
# TorchScript model tensors (libtorch's positional naming convention). The model ends with the first half
# of the postprocess (ssd_train.models.ssd300.boxes.candidates: softmax, each class's 200 best boxes,
# decoded), so 1/9 of the raw outputs' bytes cross to the Python step: 320 KB per image for COCO's 81
# classes instead of 2.8 MB of all 8732 x 81 scores.
MODEL_INPUT = "INPUT__0"  # FP32 [3, 300, 300] for both precisions (the fp16 model casts inside)
MODEL_BOXES = "OUTPUT__0"  # FP32 [num_classes - 1, 200, 4]: xyxy in [0, 1], each class's best first
MODEL_SCORES = "OUTPUT__1"  # FP32 [num_classes - 1, 200]: their scores, descending
# Postprocess inputs (and the ensemble's tensors between the model and the postprocess step).
CANDIDATE_BOXES = "CANDIDATE_BOXES"  # MODEL_BOXES
CANDIDATE_SCORES = "CANDIDATE_SCORES"  # MODEL_SCORES
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

# ------------------------------------------------------------------------------------------------
# Mask R-CNN: a second ensemble beside SSD300's, with the same public conventions (IMAGE in; boxes in
# original pixels, scores, dataset category ids and a count out, zero-padded) plus instance masks.
MASKRCNN_ENSEMBLE = "maskrcnn"
MASKRCNN_PREPROCESS = "maskrcnn_preprocess"  # DALI: decode, resize keeping the aspect ratio, normalise, pad
MASKRCNN_MODEL = "maskrcnn_fp32"  # TorchScript ServedMaskRCNN (ssd_train.models.maskrcnn.export)
MASKRCNN_POSTPROCESS = "maskrcnn_postprocess"  # python: boxes to original pixels, masks pasted, RLE
# The image check (VALIDATE) is shared: the same limits guard both ensembles.
MASKRCNN_MODELS = (VALIDATE, MASKRCNN_PREPROCESS, MASKRCNN_MODEL, MASKRCNN_POSTPROCESS, MASKRCNN_ENSEMBLE)
MASKRCNN_MAX_BATCH_SIZE = 8  # NVIDIA's Mask R-CNN inference batch per GPU
MASKRCNN_MAX_DETECTIONS = 100  # detections per image (the RoI heads' detections_per_img)
MASKRCNN_MASK_SIZE = 28  # the mask head's resolution

# Preprocess outputs (IMAGE_SIZE as SSD300's: the original INT32 (height, width)).
RESIZED_SIZE = "RESIZED_SIZE"  # INT64 [2]: (height, width) after the resize, before padding
# PREPROCESSED_IMAGE: FP32 [3, H, W], the batch zero-padded to its largest height and width rounded up
# to multiples of 32 (as torchvision batches), so a dynamic batch shares one shape.
RESIZE_FILE = "resize.json"  # in the preprocess model's version folder: the checkpoint's min/max size
# The served model's tensors, in order; TorchScript takes and returns them by position (libtorch's
# INPUT__i / OUTPUT__i in its config), ONNX by these names.
MASKRCNN_MODEL_INPUTS = ("IMAGES", "IMAGE_SIZES")  # FP32 [N, 3, H, W]; INT64 [N, 2] (RESIZED_SIZE)
# boxes FP32 [N, 100, 4] resized pixels, scores FP32 [N, 100], labels INT64 [N, 100] contiguous,
# masks FP32 [N, 100, 28, 28] probabilities (not pasted), counts INT64 [N, 1]
MASKRCNN_MODEL_OUTPUTS = ("BOXES", "SCORES", "LABELS", "MASKS", "COUNTS")
MASKRCNN_LIBTORCH_INPUTS = ("INPUT__0", "INPUT__1")
MASKRCNN_LIBTORCH_OUTPUTS = tuple(f"OUTPUT__{i}" for i in range(len(MASKRCNN_MODEL_OUTPUTS)))
# The postprocess step takes the model's outputs under MASKRCNN_MODEL_OUTPUTS' names, RESIZED_SIZE and
# IMAGE_SIZE, and gives (best score first) DETECTION_BOXES [100, 4], DETECTION_SCORES [100], DETECTION_CLASSES [100],
# NUM_DETECTIONS [1] (as SSD300's, 100 rows) and:
DETECTION_MASKS = "DETECTION_MASKS"  # BYTES [100]: each detection's mask at the original image size as
# COCO compressed RLE counts (the string pycocotools writes; size = IMAGE_SIZE), b"" for padding.
MASKRCNN_OUTPUTS = (*DETECTION_OUTPUTS, DETECTION_MASKS, IMAGE_SIZE)  # the ensemble's outputs
MASKRCNN_OUTPUT_DTYPES = {**ENSEMBLE_OUTPUT_DTYPES, DETECTION_MASKS: "BYTES", IMAGE_SIZE: "INT32"}

# Every ensemble of the repository: its public name -> the models it needs (the ensemble last).
ENSEMBLES = {ENSEMBLE: MODELS, MASKRCNN_ENSEMBLE: MASKRCNN_MODELS}
ALL_MODELS = tuple(dict.fromkeys(name for models in ENSEMBLES.values() for name in models))
