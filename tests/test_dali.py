"""DALI pipelines, run for real on the CPU: inference preprocessing, training and evaluation loaders."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ssd_common import io as sio
from ssd_train.data import dali
from ssd_train.data.dali import ImageDecodeError, Preprocessor

PHOTOS = ("astronaut", "chelsea", "coffee")


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def normalize_numpy(rgb: np.ndarray) -> np.ndarray:
    """The textbook computation: HWC uint8 -> CHW float32 ImageNet-normalised."""
    scaled = rgb.astype(np.float64) / 255.0
    return ((scaled - np.array(dali.MEAN)) / np.array(dali.STD)).transpose(2, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skimage.data, name)() for name in PHOTOS}


@pytest.fixture(scope="module")
def preprocessor() -> Preprocessor:
    return Preprocessor(batch_size=4)


# ---------------------------------------------------------------------------------------------
# Inference preprocessing


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_inference_pipeline_shapes_and_sizes(photos, fmt):
    pipe = dali.inference_pipeline(batch_size=len(photos))
    pipe.build()
    encoded = [np.frombuffer(encode(a, fmt), np.uint8) for a in photos.values()]
    pipe.feed_input(sio.IMAGE, encoded)
    images, sizes = (out.as_array() for out in pipe.run())
    assert images.shape == (len(photos), 3, 300, 300) and images.dtype == np.float32
    assert sizes.dtype == np.int32
    assert sizes.tolist() == [list(a.shape[:2]) for a in photos.values()]
    # Normalised ImageNet-like statistics: centred near 0, unit-ish spread, not all equal.
    assert np.all(np.abs(images.mean(axis=(1, 2, 3))) < 1.5)
    assert np.all(images.std(axis=(1, 2, 3)) > 0.2)


def test_normalisation_matches_numpy_when_resize_is_trivial(photos, preprocessor):
    rgb = photos["astronaut"][100:400, 50:350]  # exactly 300 x 300: resize is the identity
    images, sizes = preprocessor([encode(rgb, "PNG")])  # lossless
    assert sizes.tolist() == [[300, 300]]
    np.testing.assert_allclose(images[0], normalize_numpy(rgb), atol=1e-5)


def test_resize_is_antialiased_bilinear_like_torchvision(photos, preprocessor):
    """The documented choice (linear + antialias) agrees with torchvision's antialiased bilinear
    resize, which a pure-PyTorch evaluation path would use, to a fraction of a grey level."""
    import torchvision.transforms.functional as TF

    rgb = photos["coffee"]  # 400 x 600: a real downscale, anisotropic
    images, _ = preprocessor([encode(rgb, "PNG")])
    reference = TF.resize(torch.from_numpy(rgb).permute(2, 0, 1), [300, 300], antialias=True)
    expected = normalize_numpy(reference.permute(1, 2, 0).numpy())
    grey_levels = np.abs(images[0] - expected) * np.array(dali.STD)[:, None, None] * 255
    assert grey_levels.mean() < 0.25
    # Without antialiasing the same comparison is clearly worse: the option matters.
    aliased = TF.resize(torch.from_numpy(rgb).permute(2, 0, 1), [300, 300], antialias=False)
    aliased_error = np.abs(images[0] - normalize_numpy(aliased.permute(1, 2, 0).numpy()))
    assert (aliased_error * np.array(dali.STD)[:, None, None] * 255).mean() > grey_levels.mean()


def test_zero_padded_batch_gives_the_same_result(photos, preprocessor):
    encoded = [encode(photos["astronaut"], "JPEG"), encode(photos["chelsea"], "PNG")]
    rows = np.zeros((2, max(map(len, encoded)) + 1000), np.uint8)  # every row has padding
    for row, data in zip(rows, encoded):
        row[: len(data)] = np.frombuffer(data, np.uint8)
    expected_images, expected_sizes = preprocessor(encoded)
    images, sizes = preprocessor.run_padded(rows)
    np.testing.assert_array_equal(sizes, expected_sizes)
    np.testing.assert_array_equal(images, expected_images)


def test_preprocessor_chunks_larger_inputs(photos, preprocessor):
    encoded = [encode(a, "JPEG") for a in photos.values()] * 3  # 9 images, batch size 4
    images, sizes = preprocessor(encoded)
    assert images.shape == (9, 3, 300, 300) and sizes.shape == (9, 2)
    np.testing.assert_array_equal(images[0], images[3])
    np.testing.assert_array_equal(sizes[:3], sizes[6:])


def test_preprocessor_accepts_arrays_and_empty_lists(photos, preprocessor):
    data = encode(photos["chelsea"], "JPEG")
    from_bytes, _ = preprocessor([data])
    from_array, sizes = preprocessor([np.frombuffer(data, np.uint8)])
    np.testing.assert_array_equal(from_bytes, from_array)
    images, sizes = preprocessor([])
    assert images.shape == (0, 3, 300, 300) and sizes.shape == (0, 2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"", "input 1: empty"),
        (b"definitely not an image", "input 1: not a JPEG/PNG"),
        ("truncated", "input 1: cannot decode"),  # a real JPEG header, then nothing: DALI fails
        ("garbled", "input 1: cannot decode"),
    ],
)
def test_preprocessor_bad_input_then_recovers(photos, bad, message):
    preprocessor = Preprocessor(batch_size=4)
    good = encode(photos["astronaut"], "JPEG")
    expected, expected_sizes = preprocessor([good])
    if bad == "truncated":
        bad = good[:400]
    elif bad == "garbled":
        bad = good[:20] + bytes(range(256)) * 8
    with pytest.raises(ImageDecodeError, match=message) as error:
        preprocessor([good, bad, good])
    assert "\n" not in str(error.value)
    # The next call works, on a fresh pipeline object.
    images, sizes = preprocessor([good, encode(photos["coffee"], "PNG")])
    np.testing.assert_array_equal(images[0], expected[0])
    assert sizes.tolist() == [expected_sizes[0].tolist(), [400, 600]]


def test_preprocessor_rejects_wrong_types():
    with pytest.raises(ImageDecodeError, match="input 0"):
        Preprocessor()(["a string is not bytes"])
    with pytest.raises(ImageDecodeError, match="uint8"):
        Preprocessor()([np.zeros(10, np.float32)])
    with pytest.raises(ImageDecodeError, match="B x L"):
        Preprocessor().run_padded(np.zeros(10, np.uint8))


def test_gpu_graph_is_defined_without_a_gpu():
    """The serving (GPU) pipeline's graph can be defined here; building it needs CUDA."""
    pipe = dali.serving_pipeline()
    assert pipe.max_batch_size == sio.MAX_BATCH_SIZE
    pipe._build_graph()  # defines the Python graph only (what autoserialization runs first)
    specs = [str(op.spec) for op in pipe._ops]
    assert any("decoders__Image" in s and "_gpu" in s for s in specs)  # "mixed" decode to GPU
    with pytest.raises(ValueError, match="device"):
        dali.inference_pipeline(1, device="tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_preprocessor_matches_cpu(photos):
    encoded = [encode(a, "PNG") for a in photos.values()]
    cpu_images, cpu_sizes = Preprocessor(batch_size=4)(encoded)
    gpu_images, gpu_sizes = Preprocessor(batch_size=4, device="gpu")(encoded)
    np.testing.assert_array_equal(gpu_sizes, cpu_sizes)
    assert np.abs(gpu_images - cpu_images).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# Training and evaluation loaders on a generated COCO-layout dataset

TRAIN_IMAGES = 8
BATCH = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """`make-dataset shapes`, then the cases the loaders must handle: categories listed out of id
    order (DALI's own class remapping would follow that order), an image without annotations in
    each split, and a crowd annotation (dropped by both backends)."""
    import json

    from ssd_train.data.shapes import make_shapes_dataset

    root = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=TRAIN_IMAGES, val=5, seed=3)
    for split, image_id in (("train2017", 900), ("val2017", 2_000_000)):
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"].reverse()
        Image.fromarray(skimage.data.chelsea()).save(root / split / "empty.jpg")
        data["images"].insert(1, {"id": image_id, "file_name": "empty.jpg", "width": 451, "height": 300})
        first = data["annotations"][0]
        data["annotations"].append(
            {**first, "id": 10_000, "bbox": [0, 0, 50, 50], "area": 2500.0, "iscrowd": 1}
        )
        path.write_text(json.dumps(data))
    return root


def coco_targets(root, split="train2017"):
    """Targets computed the textbook way: annotation file -> LabelMap -> boxes.match/encode."""
    import json

    from ssd_common.labels import LabelMap
    from ssd_train.models.ssd300.boxes import encode, match

    data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    label_of = LabelMap.from_coco_categories(data["categories"]).label_of()
    images = {img["id"]: img for img in data["images"]}
    per_image: dict[int, list] = {}
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            per_image.setdefault(ann["image_id"], []).append(ann)
    offsets, labels = [], []
    for image_id in sorted(per_image):  # annotated images, in id order
        img, anns = images[image_id], per_image[image_id]
        scale = torch.tensor([img["width"], img["height"]] * 2, dtype=torch.float32)
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]) / scale
        matched, target = match(boxes.clamp(0, 1), torch.tensor([label_of[a["category_id"]] for a in anns]))
        offsets.append(encode(matched))
        labels.append(target)
    return torch.stack(offsets), torch.stack(labels)


def collect(loader):
    return [torch.cat(parts) for parts in zip(*loader)]


def test_train_loader_shapes_and_positives(dataset):
    loader = dali.build_train_loader(dataset, batch_size=BATCH, seed=0)
    assert len(loader) == TRAIN_IMAGES // BATCH
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, offsets, labels in batches:
            assert images.shape == (BATCH, 3, 300, 300) and images.dtype == torch.float32
            assert offsets.shape == (BATCH, 8732, 4) and offsets.dtype == torch.float32
            assert labels.shape == (BATCH, 8732) and labels.dtype == torch.int64
            assert ((labels > 0).sum(dim=1) > 0).all()  # every (cropped) image keeps positives
            assert labels.max() <= 3 and labels.min() >= 0
            assert torch.isfinite(offsets).all()
            assert (offsets[labels == 0] == 0).all()  # background keeps its own default box


def test_train_targets_follow_boxes_encode_and_label_map(dataset):
    """augment=False: the box encoder's targets are ssd_train.models.ssd300.boxes.encode(match(...)) with
    LabelMap's labels (ascending category id), although the file lists categories in reverse."""
    expected_offsets, expected_labels = coco_targets(dataset)
    images, offsets, labels = collect(dali.build_train_loader(dataset, batch_size=BATCH, augment=False))
    assert torch.equal(labels, expected_labels[: len(labels)])
    torch.testing.assert_close(offsets, expected_offsets[: len(offsets)], atol=1e-4, rtol=1e-4)


def test_train_without_augmentation_is_deterministic(dataset):
    loader = dali.build_train_loader(dataset, batch_size=BATCH, augment=False)
    first, second = collect(loader), collect(loader)
    other = collect(dali.build_train_loader(dataset, batch_size=BATCH, augment=False, num_threads=1))
    for a, b, c in zip(first, second, other):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_augmentation_is_random_but_seeded(dataset):
    loader = dali.build_train_loader(dataset, batch_size=BATCH, seed=7)
    epoch0, epoch1 = collect(loader), collect(loader)
    assert not torch.equal(epoch0[0], epoch1[0])  # crop/flip/jitter/shuffle change every epoch
    again = dali.build_train_loader(dataset, batch_size=BATCH, seed=7)
    for a, b in zip(epoch0, collect(again)):
        assert torch.equal(a, b)
    # A resumed run asking for epoch 5 sees the same data as any other run asking for epoch 5.
    resumed, other = (dali.build_train_loader(dataset, batch_size=BATCH, seed=7) for _ in range(2))
    resumed.set_epoch(5)
    other.set_epoch(5)
    for a, b in zip(collect(resumed), collect(other)):
        assert torch.equal(a, b)


def test_train_loader_restarts_after_an_early_stop(dataset):
    loader = dali.build_train_loader(dataset, batch_size=2, augment=False)
    next(iter(loader))  # e.g. a benchmark that stops after some iterations
    assert len(list(loader)) == len(loader) == TRAIN_IMAGES // 2


def test_train_loader_sharding_keeps_batch_counts_equal(dataset):
    shards = [dali.build_train_loader(dataset, batch_size=2, num_shards=3, shard_id=i) for i in range(3)]
    assert [len(s) for s in shards] == [TRAIN_IMAGES // 3 // 2] * 3
    assert all(len(list(s)) == len(s) for s in shards)


def test_train_loader_checks_label_map_and_size(dataset):
    from ssd_common.labels import LabelMap
    from ssd_train.data.coco import DatasetError

    with pytest.raises(DatasetError, match="label map mismatch"):
        dali.build_train_loader(dataset, batch_size=BATCH, label_map=LabelMap.coco())
    with pytest.raises(DatasetError, match="fewer than one batch"):
        dali.build_train_loader(dataset, batch_size=64)
    with pytest.raises(DatasetError, match="missing"):
        dali.build_train_loader(dataset, split="nosuchsplit", batch_size=BATCH)


def test_same_targets_as_pytorch_backend(dataset):
    """With random ops off, both backends give the same targets for the same images. Labels are
    equal; offsets agree to float rounding (DALI computes in its own float32 order). They could
    differ where a default box's IoU with a ground truth is within rounding of 0.5, or where two
    ground truths tie for a default box -- absent from this data, which the equality shows."""
    from ssd_train.data.loaders import build_train_loader

    dali_batches = collect(build_train_loader("dali", dataset, batch_size=BATCH, augment=False))
    torch_batches = collect(
        build_train_loader("pytorch", dataset, batch_size=BATCH, augment=False, num_workers=0)
    )
    (dali_images, dali_offsets, dali_labels), (images, offsets, labels) = dali_batches, torch_batches
    assert torch.equal(dali_labels, labels)
    assert (labels > 0).sum() > 0
    torch.testing.assert_close(dali_offsets, offsets, atol=1e-4, rtol=1e-4)
    # Same decode/resize/normalise up to JPEG decoder and resize-filter rounding (< 1 grey level).
    grey_levels = (dali_images - images).abs() * torch.tensor(dali.STD)[:, None, None] * 255
    assert grey_levels.mean() < 1.0


@pytest.mark.parametrize("num_shards", [1, 2])
def test_eval_loader_covers_every_image_once(dataset, num_shards):
    import json

    data = json.loads((dataset / "annotations" / "instances_val2017.json").read_text())
    expected = {img["id"]: [img["height"], img["width"]] for img in data["images"]}
    seen: dict[int, list] = {}
    for shard_id in range(num_shards):
        loader = dali.build_eval_loader(dataset, batch_size=2, num_shards=num_shards, shard_id=shard_id)
        for passes in range(2):  # the same images every pass
            found = {}
            for images, sizes, image_ids in loader:
                assert images.shape[1:] == (3, 300, 300) and images.dtype == torch.float32
                assert sizes.dtype == torch.int32 and image_ids.dtype == torch.int64
                assert len(images) == len(sizes) == len(image_ids) <= 2
                found.update(zip(image_ids.tolist(), sizes.tolist()))
            assert passes == 0 or found == shard
            shard = found
        assert not set(shard) & set(seen)
        seen.update(shard)
    assert seen == expected  # includes the image without annotations


def test_eval_loader_preprocesses_like_the_inference_pipeline(dataset, preprocessor):
    import json

    data = json.loads((dataset / "annotations" / "instances_val2017.json").read_text())
    files = {img["id"]: dataset / "val2017" / img["file_name"] for img in data["images"]}
    images, sizes, image_ids = next(iter(dali.build_eval_loader(dataset, batch_size=3)))
    expected_images, expected_sizes = preprocessor([files[i].read_bytes() for i in image_ids.tolist()])
    np.testing.assert_array_equal(images.numpy(), expected_images)
    np.testing.assert_array_equal(sizes.numpy(), expected_sizes)


def test_gpu_training_graphs_are_defined_without_a_gpu(dataset):
    """The GPU variants' graphs (mixed decode, GPU image ops) can be defined here."""
    from nvidia.dali import pipeline_def

    for augment in (True, False):

        @pipeline_def(batch_size=2, num_threads=1, device_id=0)
        def train():
            return dali.train_graph(dataset, "train2017", [1, 3, 7], augment, 0, 1, 0, "gpu",
                                    annotations_file=dataset / "annotations" / "instances_train2017.json")

        pipe = train()
        pipe._build_graph()
        assert [node.device for node in pipe._graph_outputs] == ["gpu"] * 3

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def evaluate():
        return dali.eval_graph(dataset, "val2017", 0, 1, "gpu")

    pipe = evaluate()
    pipe._build_graph()
    assert pipe._graph_outputs[0].device == "gpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_train_loader_matches_cpu(dataset):
    cpu = collect(dali.build_train_loader(dataset, batch_size=BATCH, augment=False))
    gpu = collect(dali.build_train_loader(dataset, batch_size=BATCH, augment=False, device="gpu"))
    assert gpu[0].is_cuda
    assert torch.equal(gpu[2].cpu(), cpu[2])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])
    assert (gpu[0].cpu() - cpu[0]).abs().mean() < 0.02


AUTOSERIALIZED_MODEL = '''
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

from ssd_common.io import MAX_BATCH_SIZE
from ssd_train.data.dali import inference_graph


@autoserialize
@pipeline_def(batch_size=MAX_BATCH_SIZE, num_threads=1, device_id=None)
def ssd300_preprocess():
    return inference_graph(device="cpu")
'''


def test_triton_autoserialization_of_the_inference_graph(tmp_path, photos, preprocessor):
    """What the Triton DALI backend does with a model version's `dali.py` (CPU flavour here; the
    served file says device="gpu", device_id=0): import it, find the one @autoserialize pipeline
    (this module must not add a second), serialise; the result runs like the Preprocessor."""
    import importlib.util
    import sys

    from nvidia.dali import Pipeline
    from nvidia.dali._utils.autoserialize import invoke_autoserialize

    source = tmp_path / "dali.py"
    source.write_text(AUTOSERIALIZED_MODEL)
    spec = importlib.util.spec_from_file_location("autoserialize_mod", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoserialize_mod"] = module
    try:
        spec.loader.exec_module(module)
        invoke_autoserialize(module, str(tmp_path / "model.dali"))
    finally:
        del sys.modules["autoserialize_mod"]
    pipe = Pipeline.deserialize(filename=str(tmp_path / "model.dali"), device_id=None)
    pipe.build()
    encoded = [encode(a, "JPEG") for a in photos.values()]
    pipe.feed_input(sio.IMAGE, [np.frombuffer(e, np.uint8) for e in encoded])
    images, sizes = (out.as_array() for out in pipe.run())
    expected_images, expected_sizes = preprocessor(encoded)
    np.testing.assert_array_equal(sizes, expected_sizes)
    np.testing.assert_array_equal(images, expected_images)
