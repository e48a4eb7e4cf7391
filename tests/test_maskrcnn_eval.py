"""Mask R-CNN evaluation and prediction: COCO RLE masks, segm scoring with pycocotools, the inference
path over a tiny randomly initialised torchvision MaskRCNN, and mask drawing."""

import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from ssd_common.coco_eval import (STAT_NAMES, coco_evaluate, detection_records, instance_summary,
                                  segmentation_records, write_instance_summary)
from ssd_common.draw import save_annotated
from ssd_common.labels import LabelMap
from ssd_common.masks import decode_mask, encode_cropped_mask, encode_mask, encode_masks
from ssd_train.models.maskrcnn.inference import (ImageError, MaskPredictor, category_lookup, detect, detect_rle,
                                                 evaluate_model, result_records)

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 9, "name": "bar"}]
SIZES = {1: (50, 70), 2: (80, 40)}  # image id -> (height, width)


def square(height, width, top, left, bottom, right) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top:bottom, left:right] = True
    return mask


def ground_truth_masks() -> list[tuple[int, int, np.ndarray]]:
    """(image id, category id, mask) of every object in the annotation file."""
    return [(1, 3, square(50, 70, 5, 10, 30, 40)),
            (1, 7, square(50, 70, 20, 45, 45, 65)),
            (2, 9, square(80, 40, 30, 5, 70, 35))]


@pytest.fixture
def annotations(tmp_path):
    objects = []
    for number, (image_id, category_id, mask) in enumerate(ground_truth_masks(), 1):
        rle = encode_mask(mask)
        x, y, w, h = mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}).tolist()
        objects.append({"id": number, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
                        "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle})
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in SIZES.items()],
            "categories": CATEGORIES, "annotations": objects}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def model():
    """Untrained and tiny (ResNet-18 FPN, 64..96 px inside): with no score threshold it still detects."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=0)
    return MaskRCNN(backbone, num_classes=4, min_size=64, max_size=96, box_score_thresh=0.0).eval()


def encoded(array: np.ndarray, image_format: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=image_format)
    return out.getvalue()


def noise_image(height, width, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- RLE -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(1, 1), (7, 5), (33, 17), (64, 101)])
def test_masks_survive_an_rle_round_trip(height, width):
    """Every mask the model makes goes through RLE into results and back for drawing: nothing may change."""
    rng = np.random.default_rng(height * width)
    for mask in (rng.random((height, width)) < 0.3, np.zeros((height, width), bool), np.ones((height, width), bool)):
        rle = encode_mask(mask)
        assert rle["size"] == [height, width] and isinstance(rle["counts"], str)
        json.dumps(rle)
        assert np.array_equal(decode_mask(rle), mask)
        as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
        assert np.array_equal(decode_mask(as_bytes), mask)
        assert np.array_equal(mask_util.decode(as_bytes), mask)  # pycocotools reads what we write


def test_a_mask_encoded_from_its_crop_is_the_whole_masks_rle():
    """The served postprocess encodes each mask from its box's region: byte for byte what encoding the
    whole mask gives, for crops anywhere (borders, corners, the whole mask, empty) and any content."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = rng.integers(1, 30, 2)
        top, left = rng.integers(0, height), rng.integers(0, width)
        crop = rng.random((rng.integers(0, height - top + 1), rng.integers(0, width - left + 1))) < rng.choice(
            [0.0, 0.3, 0.9, 1.0])
        whole = np.zeros((height, width), bool)
        whole[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
        assert encode_cropped_mask(crop, top, left, height, width) == encode_masks(whole[None])[0]
    with pytest.raises(ValueError, match="does not fit"):
        encode_cropped_mask(np.ones((3, 3), bool), 2, 0, 4, 4)


def test_uncompressed_rle_decodes():
    """COCO ground truth stores crowd masks as plain run lists (column-major, zeros first)."""
    mask = decode_mask({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.dtype == bool
    assert mask.tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize("rle", [
    {"size": [5, 7], "counts": "0"},  # pycocotools itself decodes this into uninitialised memory
    {"size": [5, 7], "counts": [3, 4, 100]},
    {"size": [5, 7], "counts": [40, -5]},
    {"size": [5, 7], "counts": "a\n"},
    {"size": [5, 7], "counts": "\\"},  # a run cut off in the middle
    {"size": [5, 7], "counts": [1.5]},
    {"counts": "0"},
    {"size": "big", "counts": "0"},
    None,
])
def test_malformed_rle_is_a_one_line_value_error(rle):
    """A bad mask from a client or a file must fail cleanly, not decode garbage."""
    with pytest.raises(ValueError, match="malformed RLE") as err:
        decode_mask(rle)
    assert "\n" not in str(err.value)


# --- segm evaluation ---------------------------------------------------------------------------------

def test_ground_truth_masks_as_detections_score_segm_ap_one(annotations):
    """The segm path matches masks: giving back the ground truth is a perfect score."""
    records = []
    for image_id, category_id, mask in ground_truth_masks():
        records += segmentation_records(image_id, [encode_mask(mask)], [0.9], [category_id])
    result = coco_evaluate(annotations, records, iou_type="segm")
    assert result["mAP"] == pytest.approx(1.0)
    assert list(result["stats"]) == list(STAT_NAMES)


def test_a_shifted_mask_scores_lower_than_the_right_one(annotations):
    """Mask IoU, not just presence, decides: moving one mask by a few pixels costs AP."""
    records = []
    for image_id, category_id, mask in ground_truth_masks():
        if image_id == 1 and category_id == 3:
            mask = np.roll(mask, 6, axis=1)
        records += segmentation_records(image_id, [encode_mask(mask)], [0.9], [category_id])
    assert 0 < coco_evaluate(annotations, records, iou_type="segm")["mAP"] < 1


def test_bbox_evaluation_of_the_same_file_is_unchanged(annotations):
    """The default iou_type stays bbox: SSD and the client call it without one."""
    records = []
    for image_id, category_id, mask in ground_truth_masks():
        ys, xs = np.nonzero(mask)
        records += detection_records(image_id, [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], [0.9], [category_id])
    assert coco_evaluate(annotations, records)["mAP"] == pytest.approx(1.0)
    assert coco_evaluate(annotations, records, iou_type="bbox")["mAP"] == pytest.approx(1.0)


def test_segm_evaluation_without_ground_truth_masks_says_so(tmp_path):
    """A box-only annotation file (SSD's datasets) cannot score masks; say that, not a KeyError."""
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}], "categories": CATEGORIES,
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25,
                             "iscrowd": 0}]}
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    records = segmentation_records(1, [encode_mask(np.ones((10, 20), bool))], [0.5], [3])
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(tmp_path / "boxes.json", records, iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(tmp_path / "boxes.json", records, iou_type="keypoints")


def test_instance_summary_holds_both_scores(annotations, tmp_path):
    """One JSON summary per evaluation, box and mask stats side by side in STAT_NAMES order."""
    bbox = coco_evaluate(annotations, [])
    segm_records = segmentation_records(1, [encode_mask(ground_truth_masks()[0][2])], [0.9], [3])
    segm = coco_evaluate(annotations, segm_records, iou_type="segm")
    write_instance_summary(tmp_path / "s.json", bbox, segm, split="val2017")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved == instance_summary(bbox, segm, split="val2017")
    assert saved["bbox_mAP"] == 0 and saved["segm_mAP"] == segm["mAP"] > 0
    assert saved["stat_names"] == list(STAT_NAMES) and len(saved["bbox_stats"]) == len(saved["segm_stats"]) == 12


# --- inference -----------------------------------------------------------------------------------------

def test_detect_gives_masks_at_each_images_own_size(model):
    """torchvision resizes inside the model; masks must come back pasted at every input's size."""
    images = [torch.rand(3, *SIZES[1]), torch.rand(3, *SIZES[2])]
    found = detect(model, images)
    assert len(found) == 2
    for one, (height, width) in zip(found, SIZES.values()):
        count = len(one["scores"])
        assert count > 0
        assert one["boxes"].shape == (count, 4) and one["boxes"].dtype == torch.float32
        assert one["masks"].shape == (count, height, width) and one["masks"].dtype == torch.bool
        assert one["labels"].min() >= 1 and one["labels"].max() <= 3
        assert torch.all(one["scores"][:-1] >= one["scores"][1:])  # best first


def test_detect_rle_gives_the_detections_and_masks_of_detect_bit_for_bit(model):
    """Evaluation and predict paste and encode each mask from its box's region (`detect_rle`): the same
    boxes, scores, labels and RLE bytes as pasting every mask at its image's size (`detect`), for a batch
    of mixed sizes with an image too thin to resize."""
    images = [torch.rand(3, *SIZES[1]), torch.rand(3, 1, 3000), torch.rand(3, *SIZES[2])]
    expected, got = detect(model, images), detect_rle(model, images)
    assert [len(one["rles"]) for one in got] == [len(one["scores"]) for one in expected] == [100, 0, 100]
    assert all(one["masks"].flatten(1).any(1).any() for one in expected[::2])  # masks to compare
    for one, reference in zip(got, expected):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(one[key], reference[key])
        assert one["rles"] == encode_masks(reference["masks"].numpy())


def test_an_image_too_thin_to_resize_has_no_detections_and_fails_no_other(model):
    """torchvision cannot resize a 1 x 3000 image (its shorter side would become 0 pixels): it gets no
    detections, as the served model gives it, and the other image of its batch gets its own."""
    good = torch.rand(3, *SIZES[1])
    alone = detect(model, [good])[0]
    thin, found = detect(model, [torch.rand(3, 1, 3000), good])
    assert len(thin["scores"]) == 0 and thin["boxes"].shape == (0, 4) and thin["masks"].shape == (0, 1, 3000)
    assert len(alone["scores"]) > 0
    for key in alone:
        assert torch.equal(found[key], alone[key])
    assert len(detect(model, [torch.rand(3, 3000, 1)])[0]["scores"]) == 0


def test_detect_with_amp_returns_fp32(model):
    """bf16 autocast on the CPU: outputs are converted back so records and masks look the same."""
    found = detect(model, [torch.rand(3, 40, 56)], amp=True)[0]
    assert found["boxes"].dtype == found["scores"].dtype == torch.float32
    assert found["masks"].shape[1:] == (40, 56) and found["masks"].dtype == torch.bool
    found = detect_rle(model, [torch.rand(3, 40, 56)], amp=True)[0]
    assert found["boxes"].dtype == found["scores"].dtype == torch.float32 and len(found["rles"]) > 0
    assert decode_mask({"size": [40, 56], "counts": found["rles"][0]}).shape == (40, 56)


def test_result_records_are_accepted_by_both_evaluations(model, annotations):
    """Model output -> COCO records with dataset category ids, which pycocotools scores as bbox and segm."""
    label_map = LabelMap.from_coco_categories(CATEGORIES)
    found = detect_rle(model, [torch.rand(3, *SIZES[1])])[0]
    bbox, segm = result_records(1, found, SIZES[1], category_lookup(label_map, "cpu"))
    assert len(bbox) == len(segm) == len(found["scores"])
    assert {r["category_id"] for r in bbox} <= {3, 7, 9}
    assert decode_mask(segm[0]["segmentation"]).shape == SIZES[1]
    json.dumps(segm)
    for records, iou_type in ((bbox, "bbox"), (segm, "segm")):
        assert 0 <= coco_evaluate(annotations, records, iou_type=iou_type)["mAP"] <= 1


def test_evaluate_model_scores_and_writes_nvidias_result_files(model, annotations, tmp_path):
    """bbox.json and segm.json are what NVIDIA's scripts leave behind; both scores come back."""
    label_map = LabelMap.from_coco_categories(CATEGORIES)
    loader = [([torch.rand(3, *SIZES[1]), torch.rand(3, *SIZES[2])], [1, 2])]
    result = evaluate_model(model, loader, label_map, annotations, "cpu", progress=False, results_dir=tmp_path / "out")
    assert set(result) == {"bbox_mAP", "segm_mAP", "bbox", "segm", "summary"}
    assert result["segm_mAP"] == result["segm"]["mAP"] and "segm:" in result["summary"]
    bbox = json.loads((tmp_path / "out" / "bbox.json").read_text())
    segm = json.loads((tmp_path / "out" / "segm.json").read_text())
    assert {r["image_id"] for r in segm} == {1, 2} and len(bbox) == len(segm)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bbox.json", "segm.json"]  # no temp files left


def _evaluate_shard(rank: int, folder: str, annotation_file: str) -> None:
    """One of two gloo ranks: it evaluates one image (its shard); rank 0 writes what it gets back."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=0)
    model = MaskRCNN(backbone, num_classes=4, min_size=64, max_size=96, box_score_thresh=0.0)
    image_id = rank + 1
    loader = [([torch.rand(3, *SIZES[image_id])], [image_id])]
    result = evaluate_model(model, loader, LabelMap.from_coco_categories(CATEGORIES), annotation_file, "cpu",
                            progress=False, results_dir=f"{folder}/out")
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(None if result is None else result["segm_mAP"]))
    dist.destroy_process_group()


def test_evaluate_model_gathers_every_ranks_shard_on_rank_0(annotations, tmp_path):
    """Distributed evaluation: each rank detects its own images, rank 0 alone scores and writes all."""
    torch.multiprocessing.spawn(_evaluate_shard, args=(str(tmp_path), str(annotations)), nprocs=2)
    assert json.loads((tmp_path / "rank1.json").read_text()) is None
    assert isinstance(json.loads((tmp_path / "rank0.json").read_text()), float)
    segm = json.loads((tmp_path / "out" / "segm.json").read_text())
    assert {r["image_id"] for r in segm} == {1, 2}


def test_mask_predictor_returns_masks_at_the_original_size(model):
    """PNG and JPEG bytes in, per image detections whose RLE masks match that image's pixels."""
    predictor = MaskPredictor(model, LabelMap.from_coco_categories(CATEGORIES))
    results = predictor.detect([encoded(noise_image(50, 70), "PNG"), encoded(noise_image(80, 40, 1), "JPEG")])
    assert len(results) == 2
    for detections, (height, width) in zip(results, [(50, 70), (80, 40)]):
        assert detections and detections[0]["category_name"] in {"square", "disc", "bar"}
        assert detections[0]["score"] >= detections[-1]["score"]
        assert decode_mask(detections[0]["mask"]).shape == (height, width)
        json.dumps(detections)


def test_mask_predictor_refuses_bad_images_in_one_line(model):
    """Corrupt bytes are the caller's error (ImageError, a ValueError), and an image over the pixel cap
    is refused from its header: the truncated PNG below would fail to decode if anything tried."""
    predictor = MaskPredictor(model, LabelMap.from_coco_categories(CATEGORIES), max_image_pixels=2000)
    png = encoded(noise_image(50, 70), "PNG")
    with pytest.raises(ImageError, match="image 1: cannot decode") as err:
        predictor.detect([encoded(noise_image(20, 20), "PNG"), b"not an image"])
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    truncated = png[:len(png) // 2]
    with pytest.raises(ImageError, match=r"70x50 \(3,500 pixels\), over the limit of 2,000 pixels"):
        predictor.detect([truncated])
    with pytest.raises(ImageError, match="cannot decode"):
        MaskPredictor(model, LabelMap.from_coco_categories(CATEGORIES)).detect([truncated])


# --- drawing -------------------------------------------------------------------------------------------

def test_masks_are_drawn_as_a_translucent_overlay(tmp_path):
    """A detection's mask tints its pixels; pixels outside it, and detections without masks, are as before."""
    grey = np.full((80, 100, 3), 128, np.uint8)
    mask = square(80, 100, 40, 50, 70, 90)
    detection = {"box": [50, 40, 90, 70], "score": 0.9, "category_id": 3, "category_name": "square"}
    with_mask = np.array(Image.open(save_annotated(encoded(grey, "PNG"), [{**detection, "mask": encode_mask(mask)}],
                                                   tmp_path / "masked.png")))
    without = np.array(Image.open(save_annotated(encoded(grey, "PNG"), [detection], tmp_path / "plain.png")))
    assert not np.array_equal(with_mask[60, 70], grey[60, 70])  # inside the mask, clear of box and label
    assert np.array_equal(without[60, 70], grey[60, 70])
    assert np.array_equal(with_mask[10, 10], grey[10, 10])
    assert np.array_equal(with_mask[~mask], without[~mask])  # box and label are drawn over the mask


def test_a_photo_stored_sideways_is_decoded_upright_as_the_served_preprocess_does(tmp_path):
    """Cameras store photos sideways with an EXIF orientation. DALI's decoder (the served preprocess, and
    SSD300's predict) turns them upright, so in-process decoding and the annotated copies do too: otherwise
    boxes and masks land in another frame than the picture they are drawn on."""
    from ssd_common import io as tensor_names
    from ssd_train.models.maskrcnn.inference import decode_image
    from ssd_train.models.maskrcnn.preprocess import inference_pipeline

    orientation = Image.Exif()
    orientation[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "JPEG", exif=orientation.tobytes())
    data = buffer.getvalue()
    pipe = inference_pipeline(1, 64, 64)
    pipe.build()
    pipe.feed_input(tensor_names.IMAGE, [np.frombuffer(data, np.uint8)])
    served_size = tuple(int(v) for v in np.array(pipe.run()[2][0]))
    assert served_size == (40, 30) == tuple(decode_image(data).shape[1:])  # (height, width), upright
    drawn = save_annotated(data, [{"box": [2, 30, 28, 38], "score": 0.9, "category_id": 3, "category_name": "square"}],
                           tmp_path / "upright.png")
    assert Image.open(drawn).size == (30, 40)  # (width, height)
