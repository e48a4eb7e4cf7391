"""DALI input pipelines: inference/serving preprocessing, training and evaluation loaders.

One definition of each graph, run on CPU (`device="cpu"`, works without a GPU) or on GPU
(`device="gpu"`: nvJPEG "mixed" decode, GPU resize/normalise). The inference graph is THE image
preprocessing of the project: `ssd-train predict/evaluate`, the Triton preprocess model (GPU `dali`
backend and the CPU-flavour python model) and the evaluation loader all build it here.

The preprocessing half needs only DALI and numpy (torch is imported inside the loader builders),
so the Triton DALI backend's autoserialization of a `dali.py` calling `inference_graph` does not
need torch -- as long as the `ssd_train.data` package itself does not import it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math

from ssd_common import io
from ssd_common.layout import DatasetError
from ssd_train.data import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SIZE = io.INPUT_SIZE
# DALI normalises uint8 pixels, hence the x255 below.
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD

# Leading bytes of the formats DALI's decoder reads (a cheap check before a pipeline sees an input:
# one undecodable image breaks a DALI pipeline object for good).
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
    b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6",  # PNM family
)


class ImageDecodeError(ValueError):
    """An input that is empty or cannot be decoded as an image."""


# ----------------------------------------------------------------------------------------------
# Shared graph pieces


def resize(images, device: str):
    """HWC images -> 300x300, aspect ratio not kept (SSD300's recipe). Linear interpolation with
    antialiasing when shrinking: the filter of PIL's / torchvision's antialiased bilinear resize that
    the reference's evaluation transform uses (agrees to a fraction of a grey level), and it keeps
    aliasing of large photos out of the small input."""
    return fn.resize(
        images.gpu() if device == "gpu" else images,
        resize_x=IMAGE_SIZE,
        resize_y=IMAGE_SIZE,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )


def normalize(images):
    """uint8 HWC -> float32 CHW, ImageNet mean/std on the [0, 1] scale."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in MEAN],
        std=[255.0 * s for s in STD],
    )


def resize_normalize(images, device: str):
    """uint8 HWC images -> float32 CHW 3x300x300, ImageNet-normalised."""
    return normalize(resize(images, device))


def decode_preprocess(encoded, device: str):
    """Encoded image bytes -> (normalised float32 CHW 3x300x300, original size int32 [h, w]).

    The one decode -> resize -> normalise of the project (inference, serving, evaluation).
    Trailing zero bytes after the image's end marker (batch padding) are ignored by the decoder.
    """
    decoded = fn.decoders.image(
        encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
    )
    # Read from the header on the CPU (cheap, and the same with either decoder); EXIF orientation
    # is applied as by the decoder.
    size = fn.peek_image_shape(encoded, dtype=types.INT32)[0:2]
    return resize_normalize(decoded, device), size


def check_device(device: str) -> None:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")


# ----------------------------------------------------------------------------------------------
# Inference and serving


def inference_graph(device: str = "cpu"):
    """The inference graph, for use inside a `pipeline_def`: input `IMAGE` (uint8, 1-D encoded
    bytes per sample), outputs (PREPROCESSED_IMAGE, IMAGE_SIZE)."""
    check_device(device)
    encoded = fn.external_source(name=io.IMAGE, dtype=types.UINT8, ndim=1, device="cpu")
    return decode_preprocess(encoded, device)


def inference_pipeline(
    batch_size: int,
    device: str = "cpu",
    num_threads: int = 2,
    device_id: int | None = None,
    prefetch_queue_depth: int = 1,
):
    """A (not yet built) DALI pipeline running `inference_graph`: feed `io.IMAGE`, run, get
    (images float32 N x 3 x 300 x 300, sizes int32 N x 2). Batches may hold fewer than
    `batch_size` samples."""
    check_device(device)
    if device == "gpu" and device_id is None:
        device_id = 0
    if device == "cpu":
        device_id = None  # a CPU-only pipeline needs no CUDA at all

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def ssd300_preprocess():
        return inference_graph(device)

    return ssd300_preprocess()


def serving_pipeline(num_threads: int = 4, device_id: int = 0):
    """The GPU preprocess pipeline of the Triton `dali` backend (batch = io.MAX_BATCH_SIZE)."""
    return inference_pipeline(
        io.MAX_BATCH_SIZE, device="gpu", num_threads=num_threads, device_id=device_id
    )


def _to_numpy(output) -> np.ndarray:
    if hasattr(output, "as_cpu"):
        output = output.as_cpu()
    return output.as_array()


def check_encoded(data, index: int = 0) -> np.ndarray:
    """Bytes or a uint8 array of an encoded image -> a 1-D uint8 view; ImageDecodeError if it is
    empty or does not start like an image format the decoder reads."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        array = np.frombuffer(data, dtype=np.uint8)
    elif isinstance(data, np.ndarray):
        array = data.reshape(-1)
        if array.dtype != np.uint8:
            raise ImageDecodeError(f"input {index}: expected encoded image bytes (uint8), got {data.dtype}")
    else:
        raise ImageDecodeError(f"input {index}: expected encoded image bytes, got {type(data).__name__}")
    if array.size == 0:
        raise ImageDecodeError(f"input {index}: empty image data")
    head = array[:12].tobytes()
    if not any(head.startswith(sig) for sig in _SIGNATURES) and not _is_webp(head):
        raise ImageDecodeError(f"input {index}: not a JPEG/PNG (or other supported) image")
    return array


def _is_webp(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (the line after "encountered:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line == "encountered:":
            return lines[i + 1][:200]
    return (lines[0] if lines else type(err).__name__)[:200]


class Preprocessor:
    """Runs the inference pipeline on lists of encoded images (CPU by default).

    A failed decode leaves a DALI pipeline object unusable, so after any failure the pipeline is
    rebuilt: only the bad call fails, and it raises ImageDecodeError naming the input.
    """

    def __init__(
        self,
        batch_size: int = io.MAX_BATCH_SIZE,
        device: str = "cpu",
        num_threads: int = 2,
        device_id: int | None = None,
    ):
        check_device(device)
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self.device_id = device_id
        self._pipe = None

    def _build_pipeline(self):
        """The pipeline to run (subclasses run another graph with the same checks and recovery)."""
        return inference_pipeline(self.batch_size, self.device, self.num_threads, self.device_id)

    def _pipeline(self):
        if self._pipe is None:
            pipe = self._build_pipeline()
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def reset(self) -> None:
        """Drop the pipeline object; the next call builds a fresh one."""
        self._pipe = None

    def __call__(self, images: Sequence[bytes | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Encoded images -> (float32 N x 3 x 300 x 300, int32 N x 2 original (h, w))."""
        arrays = [check_encoded(image, i) for i, image in enumerate(images)]
        return self._run_chunks(arrays)

    def run_padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A B x L uint8 array of zero-padded encoded images (the Triton input tensor) -> as
        `__call__`. The array goes to DALI as one dense batch (chunks are views): no per-row
        copies; the decoder ignores each row's trailing zeros."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.dtype != np.uint8:
            raise ImageDecodeError(
                f"expected a B x L uint8 array of encoded images, got {rows.dtype} {rows.shape}"
            )
        for i, row in enumerate(rows):
            check_encoded(row, i)
        rows = np.ascontiguousarray(rows)
        return self._run_chunks(rows)

    def _run_chunks(self, samples) -> tuple[np.ndarray, np.ndarray]:
        n = len(samples)
        if n == 0:
            empty = np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
            return empty, np.zeros((0, 2), np.int32)
        images, sizes = [], []
        for start in range(0, n, self.batch_size):
            chunk = samples[start : start + self.batch_size]
            chunk_images, chunk_sizes = self._run_batch(chunk, start)
            images.append(chunk_images)
            sizes.append(chunk_sizes)
        if len(images) == 1:
            return images[0], sizes[0]
        return np.concatenate(images), np.concatenate(sizes)

    def _run_batch(self, samples, offset: int) -> tuple[np.ndarray, ...]:
        try:
            return self._run_once(samples)
        except Exception as err:  # DALI raises RuntimeError; the object is now unusable
            self.reset()
            bad = self._find_bad(samples)
            self.reset()
            where = f"input {offset + bad}" if bad is not None else "a batch"
            raise ImageDecodeError(f"{where}: cannot decode image ({_dali_reason(err)})") from None

    def _run_once(self, samples) -> tuple[np.ndarray, ...]:
        pipe = self._pipeline()
        pipe.feed_input(io.IMAGE, samples)
        return tuple(_to_numpy(output) for output in pipe.run())

    def _find_bad(self, samples) -> int | None:
        """Which sample breaks the pipeline (error path only: one fresh run per sample until one
        fails)."""
        for i in range(len(samples)):
            try:
                self._run_once(samples[i : i + 1])
            except Exception:
                return i
        return None


# ----------------------------------------------------------------------------------------------
# Training and evaluation loaders (COCO layout: DIR/annotations/instances_{split}.json, DIR/{split}/)

READER = "coco"  # the reader's name, for the iterators' epoch bookkeeping
# SSD random crop of the reference recipe.
CROP_IOU_THRESHOLDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
CROP_SCALING = (0.3, 1.0)
CROP_ASPECT_RATIO = (0.5, 2.0)
CROP_ATTEMPTS = 50  # per threshold, as in the PyTorch path (ssd_train.models.ssd300.transforms)
# Colour jitter, the ranges of torchvision's ColorJitter(brightness=.125, contrast=.5,
# saturation=.5, hue=.05) that the PyTorch path uses; DALI's hue is in degrees (0.05 turn = 18).
BRIGHTNESS = (0.875, 1.125)
CONTRAST = (0.5, 1.5)
SATURATION = (0.5, 1.5)
HUE_DEGREES = (-18.0, 18.0)


def _coco_reader(data_dir, split: str, shard_id: int, num_shards: int, annotations_file=None, **kwargs):
    return fn.readers.coco(
        file_root=f"{data_dir}/{split}",
        annotations_file=str(annotations_file or f"{data_dir}/annotations/instances_{split}.json"),
        shard_id=shard_id,
        num_shards=num_shards,
        name=READER,
        **kwargs,
    )


def _jitter(images):
    """HSV and brightness/contrast jitter of uint8 HWC images (hue/saturation in float so the
    intermediate result is neither clipped nor quantised)."""
    images = fn.hsv(
        images,
        hue=fn.random.uniform(range=HUE_DEGREES),
        saturation=fn.random.uniform(range=SATURATION),
        dtype=types.FLOAT,
    )
    return fn.brightness_contrast(
        images,
        brightness=fn.random.uniform(range=BRIGHTNESS),
        contrast=fn.random.uniform(range=CONTRAST),
        contrast_center=128,  # mid-grey of the [0, 255] range
        dtype=types.UINT8,
    )


def train_graph(
    data_dir,
    split: str,
    category_ids: list[int],
    augment: bool,
    shard_id: int,
    num_shards: int,
    shuffle_seed: int,
    device: str,
    shuffle: bool | None = None,
    *,
    annotations_file,
):
    """Reader -> [SSD crop, decode of the crop, flip] -> resize -> [jitter] -> normalise, and the
    boxes -> box encoder. Outputs (image float32 CHW, offsets float32 D x 4, labels int32 D).
    `shuffle` defaults to `augment`. `annotations_file` holds the boxes to train on (what
    ssd_train.data.annotations keeps of the split's file: the reader takes every box it finds)."""
    decoder_device = "mixed" if device == "gpu" else "cpu"
    shuffle = augment if shuffle is None else shuffle
    shuffle = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed} if shuffle else {}
    encoded, boxes, category = _coco_reader(
        data_dir,
        split,
        shard_id,
        num_shards,
        annotations_file,
        ltrb=True,
        ratio=True,
        skip_empty=True,
        avoid_class_remapping=True,  # DALI's own remapping follows the file's category order
        pad_last_batch=True,
        **shuffle,
    )
    # Category id -> contiguous label (ascending category id -> 1..K, LabelMap's convention).
    labels = fn.lookup_table(
        category,
        keys=category_ids,
        values=list(range(1, len(category_ids) + 1)),
        default_value=0,
        dtype=types.INT32,
    )
    boxes = dali_math.clamp(boxes, 0.0, 1.0)  # x + w may round past the image edge
    if augment:
        crop_begin, crop_size, boxes, labels = fn.random_bbox_crop(
            boxes,
            labels,
            bbox_layout="xyXY",
            thresholds=list(CROP_IOU_THRESHOLDS),
            scaling=list(CROP_SCALING),
            aspect_ratio=list(CROP_ASPECT_RATIO),
            allow_no_crop=True,
            num_attempts=CROP_ATTEMPTS,
        )
        images = fn.decoders.image_slice(
            encoded, crop_begin, crop_size, device=decoder_device, output_type=types.RGB
        )
        flip = fn.random.coin_flip(probability=0.5)
        images = fn.flip(images, horizontal=flip)
        boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
        images = normalize(_jitter(resize(images, device)))
    else:
        images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
        images = resize_normalize(images, device)
    offsets, labels = fn.box_encoder(boxes, labels, offset=True, **_box_coding())
    if device == "gpu":
        offsets, labels = offsets.gpu(), labels.gpu()
    return images, offsets, labels


def eval_graph(data_dir, split: str, shard_id: int, num_shards: int, device: str):
    """Every image of the split (annotated or not) -> (image, original size (h, w), image id),
    through the inference preprocessing."""
    encoded, _, _, image_ids = _coco_reader(
        data_dir, split, shard_id, num_shards,
        skip_empty=False, image_ids=True, pad_last_batch=True,
        stick_to_shard=True,  # the same images every pass (DALI rotates shards by default)
    )
    images, sizes = decode_preprocess(encoded, device)
    return images, sizes, image_ids


def _box_coding() -> dict:
    """box_encoder arguments from ssd_train.models.ssd300.boxes: its default boxes (ltrb), matching IoU and
    variances, so DALI's offsets are boxes.encode(boxes.match(...)) (imported here: torch)."""
    from ssd_train.models.ssd300.boxes import MATCH_IOU, SSD300, default_boxes

    return {
        "anchors": default_boxes(SSD300, order="xyxy").reshape(-1).tolist(),
        "criteria": MATCH_IOU,
        "stds": [SSD300.scale_xy, SSD300.scale_xy, SSD300.scale_wh, SSD300.scale_wh],
    }


class DaliLoader:
    """A re-iterable loader over a DALI pipeline: each `for` over it is one epoch of torch tensor
    tuples (on the GPU for device="gpu"). `len()` = batches per epoch (equal on every shard).

    `set_epoch(e)`: epochs of one pipeline follow the reader's seeded per-epoch shuffle, so an
    uninterrupted run is reproducible; asking for an epoch other than the next one (a resumed run)
    rebuilds the pipeline with a shuffle and augmentation seed derived from (seed, e) -- also
    reproducible, though not the uninterrupted run's order (DALI readers cannot seek).
    """

    def __init__(self, make_pipeline, output_names, last_batch_policy, convert, annotations=None):
        self._make_pipeline = make_pipeline  # epoch -> pipeline
        self.annotations = annotations  # training: ssd_train.data.annotations.SplitBoxes
        self._output_names = output_names
        self._policy = last_batch_policy
        self._convert = convert
        self._iterator = None
        self._next_epoch = 0
        self._wanted_epoch = 0
        self._in_epoch = False  # an epoch was left unfinished (the consumer stopped early)
        self._build(0)

    def _build(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._iterator = None  # release the old pipeline first
        pipe = self._make_pipeline(epoch)
        pipe.build()
        with _reading_errors():  # the iterator reads its first batch at once
            self._iterator = DALIGenericIterator(
                pipe,
                self._output_names,
                reader_name=READER,
                last_batch_policy=self._policy,
                auto_reset=True,
            )
        self._next_epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self._wanted_epoch = epoch

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self):
        if self._in_epoch or self._wanted_epoch != self._next_epoch:
            self._build(self._wanted_epoch)  # DALI iterators cannot restart mid-epoch
        self._next_epoch += 1
        self._wanted_epoch = self._next_epoch
        self._in_epoch = True
        batches = iter(self._iterator)
        while True:
            with _reading_errors():
                batch = next(batches, None)
            if batch is None:
                break
            yield self._convert(batch[0])
        self._in_epoch = False


@contextmanager
def _reading_errors():
    """A file the reader cannot decode (a truncated JPEG) is one line, not DALI's page of C++ frames."""
    try:
        yield
    except RuntimeError as err:
        raise DatasetError(f"cannot read the dataset: {_dali_reason(err)}") from None


def _epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 31-bit seed from (seed, epoch, salt), stable across runs and processes."""
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0] % (2**31 - 1))


def _pipeline_device_id(device: str, device_id: int | None) -> int | None:
    check_device(device)
    if device == "cpu":
        return None
    if device_id is not None:
        return device_id
    import torch

    return torch.cuda.current_device()


def build_train_loader(
    data_dir,
    split: str = "train2017",
    batch_size: int = 32,
    label_map=None,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    device: str = "cpu",
    num_threads: int = 2,
    augment: bool = True,
    device_id: int | None = None,
    shuffle: bool | None = None,
) -> DaliLoader:
    """Training batches (images float32 N x 3 x 300 x 300, target_offsets float32 N x 8732 x 4,
    target_labels int64 N x 8732): the SSD recipe, encoded with ssd_train.models.ssd300.boxes' default boxes.
    `augment=False` turns every random op off (no crop, flip, jitter; no shuffle unless `shuffle`).
    Incomplete last batches are dropped, like the PyTorch path."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    from ssd_train.data.annotations import check_enough_images, read_boxes
    from ssd_train.data.coco import CocoSplit, dataset_label_map, load_annotations

    coco = CocoSplit(Path(data_dir), split)
    data = load_annotations(coco)
    label_map = dataset_label_map(data, label_map, coco.annotation_file)
    annotations = read_boxes(coco, data, skip_empty=True)
    check_enough_images(split, len(annotations.images), batch_size, num_shards)
    # The reader takes a file: give it one with only the boxes to train on. The pipeline builder
    # below refers to the directory, which keeps it (deleted when the loader is) as long as needed.
    workdir = tempfile.TemporaryDirectory(prefix="ssd_train_dali_")
    Path(workdir.name, coco.annotation_file.name).write_text(json.dumps(annotations.to_coco(data["categories"])))
    device_id = _pipeline_device_id(device, device_id)

    def make_pipeline(epoch: int):
        @pipeline_def(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=_epoch_seed(seed, epoch, 1 + shard_id),  # augmentation differs per shard
        )
        def ssd300_train():
            return train_graph(
                str(coco.root), split, label_map.category_ids(), augment,
                shard_id, num_shards, _epoch_seed(seed, epoch), device, shuffle,
                annotations_file=Path(workdir.name, coco.annotation_file.name),
            )

        return ssd300_train()

    def convert(batch):
        return batch["images"], batch["offsets"], batch["labels"].long()

    return DaliLoader(
        make_pipeline, ["images", "offsets", "labels"], LastBatchPolicy.DROP, convert, annotations
    )


def build_eval_loader(
    data_dir,
    split: str = "val2017",
    batch_size: int = 32,
    device: str = "cpu",
    num_threads: int = 2,
    shard_id: int = 0,
    num_shards: int = 1,
    device_id: int | None = None,
) -> DaliLoader:
    """Evaluation batches (images float32 N x 3 x 300 x 300, sizes int32 N x 2 (h, w), image_ids
    int64 N) over every image of the split, each once across the shards, preprocessed exactly as by
    the inference pipeline and the served model."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    from ssd_train.data.coco import CocoSplit

    coco = CocoSplit(Path(data_dir), split).check()
    device_id = _pipeline_device_id(device, device_id)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def ssd300_eval():
        return eval_graph(str(coco.root), split, shard_id, num_shards, device)

    def convert(batch):
        return batch["images"], batch["sizes"].cpu(), batch["image_ids"].reshape(-1).long().cpu()

    # PARTIAL: the padding that evens out the shards is cut off, so no image counts twice.
    return DaliLoader(
        lambda epoch: ssd300_eval(), ["images", "sizes", "image_ids"], LastBatchPolicy.PARTIAL, convert
    )
