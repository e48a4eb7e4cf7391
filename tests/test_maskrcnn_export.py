"""Mask R-CNN for serving (`ssd_train.models.maskrcnn.export`): the served network between a preprocess
and a postprocess gives what `inference.detect` gives; its TorchScript and ONNX files are verified
against it before they are written, and a file that disagrees is never written."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import skimage.data
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchvision.models.detection.transform import _resize_image_and_masks

from ssd_common.masks import encode_masks
from ssd_train.data import IMAGENET_MEAN, IMAGENET_STD
from ssd_train.models.maskrcnn.export import (ExportError, ServedMaskRCNN, export_onnx, export_torchscript,
                                              postprocess, postprocess_rle, preprocess, resized_size, sizes_of)
from ssd_train.models.maskrcnn.inference import detect
from ssd_train.models.maskrcnn.model import (DETECTIONS_PER_IMAGE, MASK_SIZE, MaskRCNNSpec, build_maskrcnn,
                                             make_decisive)

SPEC = MaskRCNNSpec("resnet18", num_classes=4, min_size=64, max_size=96)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")  # torch 2.9+ deprecation notes


def rgb(pixels: np.ndarray, width: int, height: int) -> Tensor:
    pixels = np.array(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)


def shapes_image(width: int = 56, height: int = 44) -> np.ndarray:
    """A generated picture: an ellipse, a rectangle and a triangle on a gradient."""
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 90)], -1)
    image = Image.fromarray(gradient.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 6, 26, 30], fill=(230, 40, 40))
    draw.rectangle([30, 4, 52, 20], fill=(40, 200, 60))
    draw.polygon([(30, 40), (52, 40), (41, 24)], fill=(250, 240, 30))
    return np.array(image)


@pytest.fixture(scope="module")
def images() -> list[Tensor]:
    """Real photos downscaled (mixed sizes and aspect ratios) and a generated image smaller than
    min_size (so the resize both shrinks and enlarges)."""
    return [rgb(skimage.data.coffee(), 180, 120), rgb(skimage.data.chelsea(), 150, 200),
            rgb(skimage.data.astronaut(), 128, 128), rgb(shapes_image(), 56, 44)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A random tiny Mask R-CNN, made decisive (`make_decisive`). A score threshold of 0.8 keeps a number of
    detections that varies per image (zero included), so padding and counts are exercised and the mask head stays
    cheap; fewer proposals keep the box head cheap too."""
    torch.manual_seed(0)
    model = build_maskrcnn(SPEC).eval()
    model.rpn._pre_nms_top_n["testing"] = 200
    model.rpn._post_nms_top_n["testing"] = 100
    model.roi_heads.score_thresh = 0.8
    return make_decisive(model)


@pytest.fixture(scope="module")
def expected(model, images) -> list[dict]:
    return detect(model, images)


@pytest.fixture(scope="module")
def served(model, images) -> tuple[tuple[Tensor, ...], Tensor]:
    """The eager wrapper's outputs on the preprocessed images, and their resized sizes."""
    batch, sizes = preprocess(images, SPEC)
    with torch.no_grad():
        return ServedMaskRCNN(model)(batch, sizes), sizes


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1), b.flatten(1)
    union = (a | b).sum(1)
    return torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), torch.ones_like(union, dtype=torch.float))


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    """boxes within 1e-3 relative, same scores order and labels, each mask's IoU > 0.99."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-3, atol=1e-4)
        assert g["masks"].shape == e["masks"].shape and g["masks"].dtype == torch.bool
        assert (mask_iou(g["masks"], e["masks"]) > 0.99).all()


def test_the_reference_preprocess_is_torchvisions_transform_bit_for_bit(model, images):
    """The served preprocess (DALI) is tested against this reference, so it must be exactly the
    resize, normalisation and padding that the model's own GeneralizedRCNNTransform does."""
    batch, sizes = preprocess(images, SPEC)
    image_list, _ = model.transform(images)
    assert torch.equal(batch, image_list.tensors)
    assert [tuple(size) for size in sizes.tolist()] == image_list.image_sizes
    assert sizes.dtype == torch.int64 and batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    assert list(IMAGENET_MEAN) == model.transform.image_mean
    assert list(IMAGENET_STD) == model.transform.image_std
    # The size rule, including sides where side * scale lands just under an integer (floor, not round).
    spec = MaskRCNNSpec("resnet18", num_classes=4, min_size=800, max_size=1333)
    for height, width in ((480, 640), (427, 640), (333, 500), (1000, 49), (7, 7), (612, 612)):
        image = torch.zeros(3, height, width)
        assert resized_size(height, width, 800, 1333) == tuple(preprocess([image], spec)[1][0].tolist())
        assert resized_size(height, width, 800, 1333) == tuple(_resize_image_and_masks(image, 800, 1333)[0].shape[1:])


def test_served_model_between_reference_pre_and_postprocess_gives_what_detect_gives(served, images, expected):
    """The split the ensemble serves (preprocess -> network -> postprocess at the original size) must
    not change a single detection compared with the one-piece model."""
    outputs, sizes = served
    assert_same_detections(postprocess(*outputs, sizes, sizes_of(images)), expected)
    counts = [len(found["boxes"]) for found in expected]
    assert sum(counts) > 0 and len(set(counts)) > 1  # detections, and a number that varies per image
    assert all(found["masks"].flatten(1).any(1).all() for found in expected)  # no empty masks


def test_the_served_postprocess_gives_the_reference_masks_rle_bit_for_bit():
    """postprocess_rle pastes and encodes each mask from its box's region: the same RLE bytes as encoding
    the reference postprocess's whole-image masks, and the same boxes, scores and labels, for boxes of any
    size, at the borders and past them, and images with no detection."""
    torch.manual_seed(0)
    n, k, resized, original = 3, 40, (160, 213), (120, 160)
    boxes = torch.rand(n, k, 4) * torch.tensor([213, 160, 213, 160]) - 10
    scale = torch.tensor([1.0, 5.0, 80.0])[torch.randint(3, (n, k, 1))]  # tiny, small and large boxes
    boxes[..., 2:] = boxes[..., :2] + torch.rand(n, k, 2) * scale
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, 213)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, 160)  # the RoI heads clip boxes to the (resized) image
    outputs = (boxes, torch.rand(n, k), torch.randint(1, 4, (n, k)), torch.rand(n, k, MASK_SIZE, MASK_SIZE),
               torch.tensor([[k], [7], [0]]))
    sizes = torch.tensor([resized] * n)
    expected = postprocess(*outputs, sizes, [original] * n)
    got = postprocess_rle(*outputs, sizes, [original] * n)
    assert [len(image["rles"]) for image in got] == [k, 7, 0]
    for image, reference in zip(got, expected):
        assert image["rles"] == encode_masks(reference["masks"].numpy())
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(image[key], reference[key])


def test_served_outputs_are_fixed_size_zero_padded_and_unpasted(served, images):
    """Triton needs fixed shapes: K = the model's detections per image rows, zeros past counts, and
    28x28 mask probabilities (the postprocess pastes them at the original resolution)."""
    (boxes, scores, labels, masks, counts), sizes = served
    n, k = len(images), DETECTIONS_PER_IMAGE
    assert boxes.shape == (n, k, 4) and scores.shape == (n, k) and labels.shape == (n, k)
    assert masks.shape == (n, k, MASK_SIZE, MASK_SIZE) and counts.shape == (n, 1)  # Triton: one value per image
    assert (boxes.dtype, scores.dtype, labels.dtype, masks.dtype, counts.dtype) == (
        torch.float32, torch.float32, torch.int64, torch.float32, torch.int64)
    for i, count in enumerate(counts[:, 0].tolist()):
        assert (scores[i, :count] > 0).all() and (labels[i, :count] >= 1).all()
        assert not boxes[i, count:].any() and not scores[i, count:].any() and not labels[i, count:].any()
        assert not masks[i, count:].any()
        assert ((0 <= masks[i, :count]) & (masks[i, :count] <= 1)).all()
        # boxes in resized-image pixels: inside the image before padding
        assert (boxes[i, :count, 2] <= sizes[i, 1]).all() and (boxes[i, :count, 3] <= sizes[i, 0]).all()


def test_torchscript_export_reloads_and_gives_what_detect_gives_on_a_mixed_size_batch(model, images, expected,
                                                                                        tmp_path):
    """The served file, loaded on its own (as the server does), on images of different sizes padded
    into one batch, gives the eager model's detections; no temp file is left behind."""
    path = export_torchscript(model, SPEC, tmp_path / "model.pt", images)
    assert path == tmp_path / "model.pt" and sorted(tmp_path.iterdir()) == [path]
    loaded = torch.jit.load(str(path))
    batch, sizes = preprocess(images, SPEC)
    with torch.no_grad():
        outputs = loaded(batch, sizes)
    assert_same_detections(postprocess(*outputs, sizes, sizes_of(images)), expected)


class ScriptedOnlyShift(nn.Module):
    """A box predictor that moves every box only when scripted: the kind of eager/TorchScript
    divergence (torchvision has is_scripting branches) that verification must catch."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = self.predictor(x)
        if torch.jit.is_scripting():
            deltas = deltas + 0.5
        return scores, deltas


def test_a_torchscript_file_that_disagrees_with_eager_is_refused_and_nothing_is_written(model, images, tmp_path):
    """A served model that is not the trained one must never reach the repository: the check runs on
    the saved file before the rename, and the temp file goes too."""
    divergent = copy.deepcopy(model)
    divergent.roi_heads.box_predictor = ScriptedOnlyShift(divergent.roi_heads.box_predictor)
    with pytest.raises(ExportError, match="TorchScript file disagrees with eager.*nothing was written"):
        export_torchscript(divergent, SPEC, tmp_path / "model.pt", images)
    assert list(tmp_path.iterdir()) == []


def test_fp16_is_refused_on_the_cpu_with_the_reason(model, images, tmp_path):
    """Half-precision convolutions are slower than fp32 on CPUs: an fp16 file made here would be slow
    and unverified where it runs, so the export says so instead."""
    with pytest.raises(ExportError, match="fp16.*CPU.*slower"):
        export_torchscript(model, SPEC, tmp_path / "model.pt", images, precision="fp16")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_with_a_fixed_batch_and_dynamic_size_runs_in_onnxruntime_like_detect(model, images, tmp_path):
    """The ONNX hand-off artifact (opset 17) works at other image sizes than it was traced at: the
    export verifies each sample image; here a portrait image (traced on a landscape one) goes through
    onnxruntime and the reference postprocess and must give detect's detections (of that image alone:
    a batch pads its images to a common size, which moves features near the borders)."""
    path = export_onnx(model, SPEC, tmp_path / "model.onnx", images, batch_size=1)
    assert sorted(tmp_path.iterdir()) == [path]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    portrait = images[1:2]
    batch, sizes = preprocess(portrait, SPEC)
    outputs = session.run(None, {"IMAGES": batch.numpy(), "IMAGE_SIZES": sizes.numpy()})
    expected = detect(model, portrait)
    assert_same_detections(postprocess(*map(torch.from_numpy, outputs), sizes, sizes_of(portrait)), expected)
    assert len(expected[0]["boxes"]) > 0


@pytest.mark.xfail(strict=True, raises=ExportError,
                   reason="torch.onnx's TorchScript-based exporter traces: the per-image loops of torchvision's "
                          "RPN and RoI heads (and the split of IMAGE_SIZES) are unrolled to the traced batch, so "
                          "onnxruntime fails on another batch size (Split node)")
def test_onnx_export_with_a_dynamic_batch_runs_any_batch_size(model, images, tmp_path):
    """Would let Triton batch ONNX requests dynamically; the export verifies on another batch size."""
    export_onnx(model, SPEC, tmp_path / "model.onnx", images, batch_size=None)
