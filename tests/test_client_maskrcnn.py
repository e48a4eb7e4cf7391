"""ssd_client with the Mask R-CNN ensemble: its model check, masks parsed from COCO RLE, the refusal of shared
memory (no server), then detection, drawing and COCO box + mask evaluation through a real Triton server
(slow), held to the in-process `MaskPredictor` and `ssd-train evaluate`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from ssd_client import AsyncSSDClient, InferenceError, ModelMismatchError, SSDClient, SSDClientError
from ssd_client import protocol as wire
from ssd_client.images import encode_images, pad_batch
from ssd_client.shm import SharedMemorySlot, unique_prefix
from ssd_common import io as sio
from ssd_common.labels import LabelMap
from ssd_common.masks import decode_mask, encode_mask

DATA_DIR = Path(skimage.data.__file__).parent  # real photos shipped with scikit-image
MAX = sio.MASKRCNN_MAX_DETECTIONS
LABELS = LabelMap(((1, "circle"), (3, "square"), (7, "triangle")))


# ------------------------------------------------------------------------------------------ model checks
def mask_metadata(grpc_style: bool = False, **changes) -> dict:
    """Model metadata as Triton answers it for the Mask R-CNN ensemble (gRPC's JSON writes dims as strings);
    `changes`: {tensor: (datatype, shape) or None to drop it}."""
    dim = str if grpc_style else int
    outputs = {sio.DETECTION_BOXES: ("FP32", [-1, MAX, 4]), sio.DETECTION_SCORES: ("FP32", [-1, MAX]),
               sio.DETECTION_CLASSES: ("INT32", [-1, MAX]), sio.NUM_DETECTIONS: ("INT32", [-1, 1]),
               sio.DETECTION_MASKS: ("BYTES", [-1, MAX]), sio.IMAGE_SIZE: ("INT32", [-1, 2])}
    inputs = {sio.IMAGE: ("UINT8", [-1, -1])}
    for name, spec in changes.items():
        tensors = inputs if name in inputs else outputs
        tensors[name] = spec

    def entries(tensors: dict) -> list[dict]:
        return [{"name": name, "datatype": spec[0], "shape": [dim(s) for s in spec[1]]}
                for name, spec in tensors.items() if spec is not None]

    return {"name": sio.MASKRCNN_ENSEMBLE, "versions": ["1"], "platform": "ensemble", "inputs": entries(inputs),
            "outputs": entries(outputs)}


def mask_spec(max_batch_size: int = sio.MASKRCNN_MAX_BATCH_SIZE) -> wire.ModelSpec:
    return wire.check_model(sio.MASKRCNN_ENSEMBLE, mask_metadata(), {"max_batch_size": max_batch_size})


@pytest.mark.parametrize("grpc_style", [False, True])
def test_check_model_knows_the_mask_ensemble_by_its_masks(grpc_style):
    config = {"config": {"max_batch_size": 8}} if grpc_style else {"max_batch_size": 8}
    spec = wire.check_model(sio.MASKRCNN_ENSEMBLE, mask_metadata(grpc_style), wire.as_json(config))
    assert spec.masks and spec.max_batch_size == 8
    assert spec.output_dtypes == sio.MASKRCNN_OUTPUT_DTYPES
    assert spec.output_shapes[sio.DETECTION_MASKS] == (MAX,) and spec.output_shapes[sio.IMAGE_SIZE] == (2,)
    # Without a DETECTION_MASKS output the same tensors are SSD300's (extra outputs are not asked for).
    ssd = wire.check_model(sio.ENSEMBLE, mask_metadata(**{sio.DETECTION_MASKS: None}), {"max_batch_size": 8})
    assert not ssd.masks and ssd.output_dtypes == sio.ENSEMBLE_OUTPUT_DTYPES
    assert set(ssd.output_shapes) == set(sio.ENSEMBLE_OUTPUT_DTYPES)


@pytest.mark.parametrize("changes, config, message", [
    ({sio.DETECTION_MASKS: ("FP32", [-1, MAX, 28, 28])}, 8, "output DETECTION_MASKS is FP32, expected BYTES"),
    ({sio.IMAGE_SIZE: None}, 8, "no output IMAGE_SIZE"),
    ({sio.IMAGE_SIZE: ("INT64", [-1, 2])}, 8, "output IMAGE_SIZE is INT64, expected INT32"),
    ({sio.DETECTION_SCORES: None}, 8, "no output DETECTION_SCORES"),
    ({sio.DETECTION_MASKS: ("BYTES", [-1, 50])}, 8, r"output DETECTION_MASKS has per-image shape \[50\], "
                                                    r"expected \[100\]"),
    ({sio.IMAGE_SIZE: ("INT32", [-1, 3])}, 8, r"output IMAGE_SIZE has per-image shape \[3\], expected \[2\]"),
    ({sio.IMAGE: ("FP32", [-1, 3, 64, 64])}, 8, "input IMAGE is FP32, expected UINT8"),
    ({}, 0, "does not batch \\(max_batch_size 0\\); the Mask R-CNN ensemble 'maskrcnn' does"),
])
def test_check_model_refuses_other_mask_models_in_one_line(changes, config, message):
    with pytest.raises(ModelMismatchError, match=message) as refused:
        wire.check_model("other", mask_metadata(**changes), {"max_batch_size": config})
    assert "\n" not in str(refused.value)
    if config:
        assert str(refused.value).startswith("model 'other' is not the Mask R-CNN ensemble: ")


# ------------------------------------------------------------------------------- requests and responses
def blob_masks(rng, count: int, height: int, width: int) -> np.ndarray:
    """`count` bool masks: random rectangles with holes (several runs per column), one empty."""
    masks = np.zeros((count, height, width), bool)
    for mask in masks[1:]:
        y, x = rng.integers(0, height - 2), rng.integers(0, width - 2)
        mask[y:rng.integers(y + 1, height), x:rng.integers(x + 1, width)] = True
        mask &= rng.random((height, width)) > 0.2
    return masks


def fake_mask_outputs(sizes: list[tuple[int, int]], counts: list[int], seed: int = 0):
    """Ensemble outputs as the server lays them out (padded to MAX rows; padding masks b"") and the masks
    the RLE encodes, per image."""
    rng = np.random.default_rng(seed)
    batch = len(sizes)
    boxes = np.zeros((batch, MAX, 4), np.float32)
    scores = np.zeros((batch, MAX), np.float32)
    classes = np.zeros((batch, MAX), np.int32)
    rles = np.full((batch, MAX), b"", dtype=np.object_)
    masks = []
    for i, ((height, width), n) in enumerate(zip(sizes, counts)):
        xy = rng.uniform(0, min(height, width) / 2, (n, 2)).astype(np.float32)
        boxes[i, :n] = np.concatenate([xy, xy + rng.uniform(1, min(height, width) / 2, (n, 2))], axis=1)
        scores[i, :n] = np.sort(rng.uniform(0.05, 1, n).astype(np.float32))[::-1]
        classes[i, :n] = rng.choice(LABELS.category_ids(), n)
        masks.append(blob_masks(rng, n, height, width))
        rles[i, :n] = [encode_mask(mask)["counts"].encode() for mask in masks[-1]]
    outputs = {sio.DETECTION_BOXES: boxes, sio.DETECTION_SCORES: scores, sio.DETECTION_CLASSES: classes,
               sio.NUM_DETECTIONS: np.array(counts, np.int32).reshape(batch, 1), sio.DETECTION_MASKS: rles,
               sio.IMAGE_SIZE: np.array(sizes, np.int32)}
    return outputs, masks


def wire_bytes(name: str, array: np.ndarray) -> bytes:
    """A tensor's bytes as the server sends them (BYTES elements each behind a 4-byte length)."""
    if wire.MASK_OUTPUT_DTYPES[name] == "BYTES":
        return serialize_byte_tensor(array).item()
    return array.tobytes()


def http_result(outputs: dict[str, np.ndarray]):
    """A real tritonclient HTTP InferResult from a binary-data response body, as the server sends it."""
    header = {"model_name": sio.MASKRCNN_ENSEMBLE, "outputs": [
        {"name": name, "datatype": wire.MASK_OUTPUT_DTYPES[name], "shape": list(array.shape),
         "parameters": {"binary_data_size": len(wire_bytes(name, array))}} for name, array in outputs.items()]}
    head = json.dumps(header).encode()
    body = head + b"".join(wire_bytes(name, array) for name, array in outputs.items())
    return httpclient.InferResult.from_response_body(body, header_length=len(head))


def grpc_result(outputs: dict[str, np.ndarray]):
    response = service_pb2.ModelInferResponse(model_name=sio.MASKRCNN_ENSEMBLE)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=wire.MASK_OUTPUT_DTYPES[name], shape=list(array.shape))
        response.raw_output_contents.append(wire_bytes(name, array))
    return grpcclient.InferResult(response)


def test_masks_decode_to_the_masks_the_server_encoded_over_both_protocols():
    sizes, counts = [(37, 52), (64, 21), (30, 30)], [6, 0, MAX]
    outputs, masks = fake_mask_outputs(sizes, counts)
    spec = mask_spec()
    parsed = wire.parse_response(http_result(outputs), 3, spec, LABELS)
    assert parsed == wire.parse_response(grpc_result(outputs), 3, spec, LABELS)
    assert [len(found) for found in parsed] == counts  # the padding rows (b"") are not detections
    for found, image_masks, (height, width) in zip(parsed, masks, sizes):
        for det, mask in zip(found, image_masks):
            assert det.mask.dtype == bool and det.mask.shape == (height, width)
            np.testing.assert_array_equal(det.mask, mask)
            assert det.rle == encode_mask(mask)  # as the server sent it: {"size": [h, w], "counts": str}
    first = parsed[0][1]
    assert first.box == tuple(float(v) for v in outputs[sio.DETECTION_BOXES][0, 1])
    assert first.category_name == LABELS.names_by_id()[first.category_id]
    line = json.loads(json.dumps(first.to_dict()))  # JSON-able: the mask as its RLE, not the array
    assert line == {"box": list(first.box), "score": first.score, "category_id": first.category_id,
                    "category_name": first.category_name, "mask": first.rle}
    assert "mask" not in wire.Detection((0, 0, 1, 1), 0.5, 1, "circle").to_dict()  # SSD300's stay as they were


def test_only_kept_detections_carry_decoded_masks():
    outputs, masks = fake_mask_outputs([(40, 60)], [20], seed=1)
    scores = outputs[sio.DETECTION_SCORES][0, :20]
    threshold = float(np.median(scores))
    outputs[sio.DETECTION_MASKS][0, 19] = b"not RLE"  # the lowest score, below the threshold: never decoded
    kept = wire.parse_response(http_result(outputs), 1, mask_spec(), LABELS, threshold)[0]
    assert len(kept) == int((scores >= threshold).sum()) and all(d.score >= threshold for d in kept)
    for det, mask in zip(kept, masks[0]):
        np.testing.assert_array_equal(det.mask, mask)
    with pytest.raises(InferenceError, match="detection 19"):
        wire.parse_response(http_result(outputs), 1, mask_spec(), LABELS)


def test_without_decoding_detections_keep_the_rle_alone():
    outputs, _ = fake_mask_outputs([(40, 60), (20, 25)], [5, 3], seed=2)
    decoded = wire.parse_response(grpc_result(outputs), 2, mask_spec(), LABELS)
    kept = wire.parse_response(grpc_result(outputs), 2, mask_spec(), LABELS, decode_masks=False)
    assert all(d.mask is None and d.rle is not None for found in kept for d in found)
    assert kept == decoded  # detections compare by their RLE
    assert [d.to_dict() for found in kept for d in found] == [d.to_dict() for found in decoded for d in found]


@pytest.mark.parametrize("counts, message", [
    (b"!!", "character '!' in compressed counts"),
    (b"\xff\xfe", "counts are not ASCII"),
    (encode_mask(np.ones((5, 7), bool))["counts"].encode(), "runs cover 35 pixels, the mask has 2400"),
    (b"", "runs cover 0 pixels"),  # a padding row inside the count
])
def test_a_bad_mask_from_the_server_is_one_clear_error_naming_the_image(counts, message):
    outputs, _ = fake_mask_outputs([(30, 20), (40, 60)], [2, 4], seed=3)
    outputs[sio.DETECTION_MASKS][1, 2] = counts
    with pytest.raises(InferenceError, match=f"^the server sent a bad mask for b.jpg, detection 2: "
                                             f"malformed RLE: .*{message}") as bad:
        wire.parse_response(http_result(outputs), 2, mask_spec(), LABELS, image_names=["a.jpg", "b.jpg"])
    assert "\n" not in str(bad.value)
    with pytest.raises(InferenceError, match="^the server sent a bad mask for image 1 of the request, detection 2"):
        wire.parse_response(http_result(outputs), 2, mask_spec(), LABELS)


@pytest.mark.parametrize("tc", [httpclient, grpcclient])
def test_requests_ask_for_the_masks_and_the_image_size(tc):
    batch = pad_batch(encode_images([DATA_DIR / "rocket.jpg"]))
    inputs, outputs = wire.build_request(tc, batch, mask_spec())
    assert [i.name() for i in inputs] == [sio.IMAGE]
    assert [o.name() for o in outputs] == list(sio.MASKRCNN_OUTPUT_DTYPES)


def test_shared_memory_is_refused_for_masks_before_any_region_is_made():
    prefix = unique_prefix()
    with pytest.raises(SSDClientError, match="^shared memory is not available with model 'maskrcnn': its masks "
                                             r"\(DETECTION_MASKS, BYTES\) have no fixed size; connect without it$"):
        SharedMemorySlot(mask_spec(), prefix)
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))


def test_the_table_gives_each_masks_area():
    from ssd_client.cli import format_table

    outputs, masks = fake_mask_outputs([(40, 60)], [3], seed=4)
    found = wire.parse_response(http_result(outputs), 1, mask_spec(), LABELS)
    rows = format_table(["a.jpg"], found).splitlines()
    assert rows[0].split()[-2:] == ["mask", "px"]
    assert [int(row.split()[-1]) for row in rows[1:]] == [int(mask.sum()) for mask in masks[0]]


# ------------------------------------------------------------------------------------- through a server
class Served:
    def __init__(self, server, root: Path, dataset: Path):
        self.server = server
        self.http_url, self.grpc_url = server.http_url, server.grpc_url
        self.dataset = dataset
        self.checkpoint = root / "maskrcnn.pt"
        self.labels = root / "repository" / sio.MASKRCNN_POSTPROCESS / "1" / sio.LABELS_FILE

    def url(self, protocol: str) -> str:
        return self.http_url if protocol == "http" else self.grpc_url


@pytest.fixture(scope="module")
def served(tmp_path_factory, shapes_dir, tiny_checkpoint):
    """A random-weight resnet18 Mask R-CNN for the shapes label map (min/max size 64/96), made decisive
    (`make_decisive`). (Its score threshold stays the default 0.05: a checkpoint records no
    other.) Its box regressions are zeroed, so its boxes are anchors, which overlap the shapes: box and mask
    recall are small but not 0. Saved as `fit` saves its checkpoints, exported and served beside the tiny
    SSD300 on one CPU server."""
    import torch

    from ssd_train.checkpoint import save_checkpoint, training_state
    from ssd_train.export import export_model_repository
    from ssd_train.models.maskrcnn.model import MaskRCNNSpec, build_maskrcnn, make_decisive
    from ssd_train.serving.server import TritonServer

    root = tmp_path_factory.mktemp("served_maskrcnn")
    categories = json.loads((shapes_dir / "annotations" / "instances_val2017.json").read_text())["categories"]
    label_map = LabelMap.from_coco_categories(categories)
    spec = MaskRCNNSpec("resnet18", label_map.num_classes, min_size=64, max_size=96)
    torch.manual_seed(0)
    model = make_decisive(build_maskrcnn(spec).eval())
    with torch.no_grad():
        for layer in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(root / "maskrcnn.pt", training_state(
        epoch=0, iteration=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, label_map=label_map,
        backbone=spec.backbone, settings={}, detector="maskrcnn", spec=spec.to_json()))
    export_model_repository(root / "maskrcnn.pt", root / "repository", precisions=["fp32"])
    export_model_repository(tiny_checkpoint, root / "repository", precisions=["fp32"])
    with TritonServer(root / "repository", http_port=0, grpc_port=0, metrics_port=0, flavour="cpu") as server:
        yield Served(server, root, shapes_dir)


@pytest.fixture(scope="module")
def predictor(served):
    """The in-process reference: the checkpoint's model as `ssd-train predict` runs it, one image at a time."""
    from ssd_train.models.maskrcnn.inference import MaskPredictor
    from ssd_train.models.maskrcnn.train import load_for_inference

    model, label_map, _ = load_for_inference(served.checkpoint)
    return MaskPredictor(model, label_map, batch_size=1)


def sample_images(served) -> list:
    """Two shapes (JPEG files, sent as they are) and a photo near the model's size (an array, sent as PNG)."""
    shapes = sorted((served.dataset / "val2017").glob("*.jpg"))[:2]
    return [*shapes, np.array(Image.fromarray(skimage.data.coffee()).resize((120, 80)))]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


CUT, MARGIN = 0.5, 0.01  # compared: detections scoring over CUT; those within MARGIN of it may fall either side


def assert_same_detections(found: list[list[wire.Detection]], expected: list[list[dict]]) -> None:
    """Each detection scoring clearly over CUT has its twin on the other side (same category, the nearest
    box): boxes within 1e-3 relative, scores within 1e-4, masks with IoU > 0.99."""
    assert len(found) == len(expected)
    compared = 0
    for got, want in zip(found, expected):
        clear = [d for d in want if d["score"] >= CUT + MARGIN]
        assert sum(d.score >= CUT + MARGIN for d in got) == len(clear)
        for d in clear:
            twin = min((g for g in got if g.category_id == d["category_id"]),
                       key=lambda g: np.abs(np.subtract(g.box, d["box"])).max(), default=None)
            assert twin is not None, d
            np.testing.assert_allclose(twin.box, d["box"], rtol=1e-3, atol=1e-3)
            assert twin.score == pytest.approx(d["score"], abs=1e-4)
            assert mask_iou(twin.mask, decode_mask(d["mask"])) > 0.99
        compared += len(clear)
    assert compared > 0  # not just nothing == nothing


def detect_async(url: str, protocol: str, images, threshold: float = 0.0, **options):
    async def run():
        async with AsyncSSDClient(url, protocol, **options) as client:
            return await client.detect(images, threshold)
    return asyncio.run(run())


@pytest.mark.slow
def test_one_server_serves_both_kinds_and_mask_models_refuse_shared_memory(served):
    with SSDClient(served.http_url, model=sio.MASKRCNN_ENSEMBLE) as client:
        assert client.spec.masks and client.spec.max_batch_size == sio.MASKRCNN_MAX_BATCH_SIZE
        assert client.batch_size == sio.MASKRCNN_MAX_BATCH_SIZE
    with SSDClient(served.grpc_url, "grpc") as client:
        assert not client.spec.masks and client.spec.name == sio.ENSEMBLE
    refusal = "^shared memory is not available with model 'maskrcnn'"
    with pytest.raises(SSDClientError, match=refusal):
        SSDClient(served.http_url, model=sio.MASKRCNN_ENSEMBLE, shared_memory=True)
    with pytest.raises(SSDClientError, match=refusal):
        detect_async(served.grpc_url, "grpc", DATA_DIR / "rocket.jpg", model=sio.MASKRCNN_ENSEMBLE,
                     shared_memory=True)
    # The postprocess step has masks among its outputs, so it is checked (and refused) as the mask kind.
    with pytest.raises(ModelMismatchError, match=f"model '{sio.MASKRCNN_POSTPROCESS}' is not the Mask R-CNN "
                                                 "ensemble: no input IMAGE"):
        SSDClient(served.http_url, model=sio.MASKRCNN_POSTPROCESS)


@pytest.mark.slow
def test_detect_gives_the_in_process_masks_over_http_grpc_sync_and_async(served, predictor):
    """One image per request (a batch pads its images to the largest, which moves the features near the
    edges), as the reference runs them."""
    images = sample_images(served)
    options = {"model": sio.MASKRCNN_ENSEMBLE, "label_map": served.labels, "batch_size": 1}
    reference = None
    for protocol in ("http", "grpc"):
        with SSDClient(served.url(protocol), protocol, **options) as client:
            found = client.detect(images, CUT - MARGIN)
        found_async = detect_async(served.url(protocol), protocol, images, CUT - MARGIN, concurrency=1, **options)
        reference = reference or found
        assert found == reference, (protocol, "sync")
        assert found_async == reference, (protocol, "async")  # detections compare by their RLE
    expected = predictor.detect([encoded.data for encoded in encode_images(images)])
    assert_same_detections(reference, expected)
    names = LabelMap.load(served.labels).names_by_id()
    assert all(d.category_name == names[d.category_id] for found in reference for d in found)


# ------------------------------------------------------------------------------------------------ the CLI
def run_cli(main, *args):
    from click.testing import CliRunner

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_cli_detect_prints_the_masks_and_draws_them(served, tmp_path):
    from ssd_client.cli import cli
    from ssd_common.draw import save_annotated

    paths = sample_images(served)[:2]
    with SSDClient(served.grpc_url, "grpc", model=sio.MASKRCNN_ENSEMBLE, label_map=served.labels) as client:
        expected = client.detect(paths, threshold=0.3)
    assert all(expected)
    common = ("--model", sio.MASKRCNN_ENSEMBLE, "--labels", served.labels)
    result = run_cli(cli, "detect", *paths, *common, "--url", served.grpc_url, "--protocol", "grpc", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines == [{"image": str(path), **d.to_dict()} for path, found in zip(paths, expected) for d in found]
    assert all(set(line["mask"]) == {"size", "counts"} for line in lines)

    out = tmp_path / "annotated"
    result = run_cli(cli, "detect", *paths, *common, "--url", served.http_url, "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert "mask px" in result.output.splitlines()[0]
    rows = [line for line in result.output.splitlines() if line.startswith(str(paths[0].parent))]
    assert [int(row.split()[-1]) for row in rows] == [int(d.mask.sum()) for found in expected for d in found]
    for path, found in zip(paths, expected):
        drawn = (out / path.name).read_bytes()
        with_masks = save_annotated(path.read_bytes(), [d.to_dict() for d in found], tmp_path / "with" / path.name)
        boxes_only = save_annotated(path.read_bytes(), [{**d.to_dict(), "mask": None} for d in found],
                                    tmp_path / "without" / path.name)
        assert drawn == with_masks.read_bytes() != boxes_only.read_bytes()


@pytest.mark.slow
def test_cli_detect_reports_the_good_image_and_names_the_bad_one(served, tmp_path):
    """A truncated JPEG (the server refuses it) beside a good one: the good one's masks are printed, the bad
    one is one line on stderr and the exit status is 1."""
    from ssd_client.cli import cli

    good = sample_images(served)[0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with SSDClient(served.http_url, model=sio.MASKRCNN_ENSEMBLE, label_map=served.labels) as client:
        expected = client.detect(good, threshold=0.3)[0]
    assert expected
    result = run_cli(cli, "detect", truncated, good, "--model", sio.MASKRCNN_ENSEMBLE, "--labels", served.labels,
                     "--url", served.http_url, "--json")
    assert result.exit_code == 1
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"image": str(good), **d.to_dict()}
                                                                         for d in expected]
    assert result.stderr.splitlines() == [
        f"Error: {truncated}: Triton server at {served.http_url} (http) refused the input while detecting in {truncated}: "
        f"in ensemble '{sio.MASKRCNN_ENSEMBLE}', IMAGE input 0: cannot decode image: truncated JPEG (no "
        "end-of-image marker)"]


@pytest.mark.slow
def test_cli_evaluate_gives_the_box_and_mask_scores_of_ssd_train_evaluate(served, tmp_path):
    """Both one image at a time (`ssd-train evaluate`'s default batch for Mask R-CNN is 1)."""
    from ssd_client.cli import cli
    from ssd_common.coco_eval import STAT_NAMES
    from ssd_train.cli import cli as train_cli

    result = run_cli(train_cli, "evaluate", "--model", "maskrcnn", "--data", served.dataset, "--checkpoint",
                     served.checkpoint, "--json-summary", tmp_path / "in_process.json")
    assert result.exit_code == 0, result.output
    result = run_cli(cli, "evaluate", "--model", sio.MASKRCNN_ENSEMBLE, "--data", served.dataset, "--url",
                     served.grpc_url, "--protocol", "grpc", "--batch-size", 1, "--concurrency", 1, "--no-progress",
                     "--json-summary", tmp_path / "served.json")
    assert result.exit_code == 0, result.output
    assert "bbox:\n" in result.output and "segm:\n" in result.output and "bbox mAP " in result.output
    in_process = json.loads((tmp_path / "in_process.json").read_text())
    through_server = json.loads((tmp_path / "served.json").read_text())
    assert set(in_process) - {"checkpoint", "iteration"} <= set(through_server)
    assert through_server["stat_names"] == list(STAT_NAMES) and through_server["images"] == 8
    for kind in ("bbox", "segm"):
        assert through_server[f"{kind}_mAP"] == pytest.approx(in_process[f"{kind}_mAP"], abs=1e-3), kind
        np.testing.assert_allclose(through_server[f"{kind}_stats"], in_process[f"{kind}_stats"], atol=1e-3,
                                   err_msg=kind)
    # Not just 0 == 0: some boxes and masks overlap the shapes at IoU >= 0.5.
    assert through_server["bbox_stats"][STAT_NAMES.index("AR100")] > 0.01
    assert through_server["segm_stats"][STAT_NAMES.index("AR100")] > 0
