"""The Mask R-CNN ensemble served by a real tritonserver (CPU flavour) beside SSD300's from one repository:
its detections and masks equal `ssd-train predict`'s (MaskPredictor) over HTTP and gRPC, one image per
request and in a mixed-size batch predicted as the same batch; a corrupt image fails only its own
request; exporting one detector keeps the other's export."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ssd_common import io
from ssd_common.masks import decode_mask
from ssd_train.export import export_model_repository
from ssd_train.serving.manifest import MANIFEST_FILE, verify_repository
from ssd_train.serving.server import TritonServer

from test_serving import CORRUPT, encode, padded

pytestmark = pytest.mark.slow


def images(shapes_dir: Path) -> list[bytes]:
    """A shapes-dataset JPEG and two photos, JPEG and PNG, of other sizes and aspect ratios."""
    shapes = sorted((shapes_dir / "val2017").iterdir())[0].read_bytes()
    return [shapes, encode(skimage.data.chelsea()[::2, ::2], "JPEG"), encode(skimage.data.coffee()[:300:2, :200:2], "PNG")]


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tiny_maskrcnn_checkpoint, tmp_path_factory) -> Path:
    """One repository, both detectors exported into it, Mask R-CNN second."""
    repository = tmp_path_factory.mktemp("serving_maskrcnn") / "repository"
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    export_model_repository(tiny_maskrcnn_checkpoint, repository, precisions=["fp32"])
    return repository


@pytest.fixture(scope="module")
def predictor(tiny_maskrcnn_checkpoint):
    from ssd_train.models.maskrcnn.inference import MaskPredictor
    from ssd_train.models.maskrcnn.train import load_for_inference

    model, label_map, _ = load_for_inference(tiny_maskrcnn_checkpoint)
    return MaskPredictor(model, label_map, batch_size=1)


@pytest.fixture(scope="module")
def server(repository):
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, flavour="cpu") as server:
        yield server


def infer(module, url: str, batch: list[bytes]) -> dict:
    image = module.InferInput(io.IMAGE, [len(batch), max(map(len, batch))], "UINT8")
    image.set_data_from_numpy(padded(batch))
    with module.InferenceServerClient(url) as client:
        result = client.infer(io.MASKRCNN_ENSEMBLE, [image])
    return {name: result.as_numpy(name) for name in io.MASKRCNN_OUTPUTS}


def assert_same(outputs: dict, expected: list[list[dict]]) -> None:
    """Served outputs of a request == MaskPredictor.detect of the same images: the same detections in the
    same order, boxes within 1e-3 relative, each mask's IoU with predict's above 0.99."""
    for i, wanted in enumerate(expected):
        count = int(outputs[io.NUM_DETECTIONS][i, 0])
        assert count == len(wanted)
        size = outputs[io.IMAGE_SIZE][i].tolist()
        np.testing.assert_array_equal(outputs[io.DETECTION_CLASSES][i, :count], [d["category_id"] for d in wanted])
        np.testing.assert_allclose(outputs[io.DETECTION_BOXES][i, :count],
                                   np.array([d["box"] for d in wanted]).reshape(-1, 4), rtol=1e-3, atol=1e-2)
        np.testing.assert_allclose(outputs[io.DETECTION_SCORES][i, :count], [d["score"] for d in wanted],
                                   rtol=1e-3, atol=1e-4)
        for served, want in zip(outputs[io.DETECTION_MASKS][i, :count], wanted):
            mask, reference = decode_mask({"size": size, "counts": served}), decode_mask(want["mask"])
            assert mask.shape == reference.shape == tuple(size)
            union = (mask | reference).sum()
            assert union == 0 or (mask & reference).sum() / union > 0.99  # both empty: a box under a pixel
        # zero padding, and no mask for the padding rows
        assert not outputs[io.DETECTION_SCORES][i, count:].any() and not outputs[io.DETECTION_CLASSES][i, count:].any()
        assert all(rle == b"" for rle in outputs[io.DETECTION_MASKS][i, count:])


def test_one_repository_serves_both_detectors(repository, server):
    manifest = verify_repository(repository)
    assert sorted(manifest["exports"]) == ["maskrcnn", "ssd300"]  # the second export kept the first's
    assert f"{io.MODEL_FP32}/1/{io.TORCHSCRIPT_FILE}" in manifest["files"]
    assert f"{io.MASKRCNN_MODEL}/1/{io.TORCHSCRIPT_FILE}" in manifest["files"]
    assert server.ensembles == [io.ENSEMBLE, io.MASKRCNN_ENSEMBLE]
    assert server.models[-2:] == [io.ENSEMBLE, io.MASKRCNN_ENSEMBLE]


def test_one_image_per_request_matches_predict_over_http_and_grpc(server, predictor, shapes_dir):
    photos = images(shapes_dir)
    expected = predictor.detect(photos)
    assert all(expected), "the test checkpoint must detect something to compare"
    for image, wanted in zip(photos, expected):
        assert_same(infer(httpclient, server.http_url, [image]), [wanted])
    assert_same(infer(grpcclient, server.grpc_url, photos[:1]), expected[:1])


def test_a_mixed_size_batch_matches_predict_of_the_same_batch(server, predictor, shapes_dir):
    """torchvision pads a batch to its largest image, which moves results near the borders a little: the
    server pads a request's batch the same way, so it equals predict given the same batch."""
    photos = images(shapes_dir)[1:]
    predictor.batch_size = len(photos)
    try:
        expected = predictor.detect(photos)
    finally:
        predictor.batch_size = 1
    assert_same(infer(grpcclient, server.grpc_url, photos), expected)


def test_an_image_too_thin_to_resize_gets_no_detections_and_its_neighbour_its_own(server, predictor, shapes_dir):
    """A 3000 x 1 image resizes to 0 pixels high: served, like predict, it has no detections and fails
    nothing; the photo beside it in the batch (which sets the batch's padding) gets predict's detections."""
    photo, thin = images(shapes_dir)[1], encode(np.full((1, 3000, 3), 128, np.uint8), "PNG")
    expected = predictor.detect([photo, thin])
    assert expected[0] and not expected[1]
    outputs = infer(httpclient, server.http_url, [photo, thin])
    assert_same(outputs, expected)
    assert outputs[io.IMAGE_SIZE][1].tolist() == [1, 3000]


def test_masks_are_compact(server, shapes_dir):
    """COCO RLE of the masks at the original size: bytes per image, against the raw masks' size."""
    outputs = infer(httpclient, server.http_url, images(shapes_dir)[:1])
    count = int(outputs[io.NUM_DETECTIONS][0, 0])
    height, width = outputs[io.IMAGE_SIZE][0].tolist()
    encoded = sum(len(rle) for rle in outputs[io.DETECTION_MASKS][0])
    assert 0 < encoded < count * height * width / 8  # smaller than the masks as packed bits


def test_a_corrupt_image_fails_only_its_own_request(server, predictor, shapes_dir):
    """The good requests are one image twice: should the server batch them, each is padded as alone."""
    photo = images(shapes_dir)[0]

    async def run():
        import tritonclient.grpc.aio as aioclient

        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            async def one(image):
                tensor = aioclient.InferInput(io.IMAGE, [1, len(image)], "UINT8")
                tensor.set_data_from_numpy(padded([image]))
                return await client.infer(io.MASKRCNN_ENSEMBLE, [tensor])

            return await asyncio.gather(*(one(image) for image in [photo, CORRUPT, photo]),
                                        return_exceptions=True)

    good, bad, also_good = asyncio.run(run())
    assert isinstance(bad, InferenceServerException) and "cannot decode image" in str(bad)
    assert str(bad.status()) == "StatusCode.INVALID_ARGUMENT"
    for result in (good, also_good):
        assert_same({name: result.as_numpy(name) for name in io.MASKRCNN_OUTPUTS}, predictor.detect([photo]))


def test_ssd300_is_served_beside_it(server, tiny_checkpoint, shapes_dir):
    from ssd_train.models.ssd300.predict import Predictor

    photo = images(shapes_dir)[1:2]
    image = httpclient.InferInput(io.IMAGE, [1, len(photo[0])], "UINT8")
    image.set_data_from_numpy(padded(photo))
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer(io.ENSEMBLE, [image])
    (expected,) = Predictor.from_checkpoint(tiny_checkpoint).detect(photo)
    assert int(result.as_numpy(io.NUM_DETECTIONS)[0, 0]) == len(expected)


def test_the_soak_tool_soaks_it(server, tmp_path):
    """tools/soak.py --model maskrcnn: corrupt and oversized images among photos, two clients at once; each
    bad image is refused as bad input and no photo fails beside it."""
    summary_file = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "soak.py"),
                          "--url", server.grpc_url, "--protocol", "grpc", "--model", io.MASKRCNN_ENSEMBLE,
                          "--clients", "2", "--requests", "4", "--corrupt-every", "2", "--oversized-every", "3",
                          "--warmup", "1", "--json-summary", str(summary_file)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(summary_file.read_text())
    # Requests 1..8: 3 and 6 oversized, 2, 4 and 8 corrupt, the other 3 photos.
    assert (summary["model"], summary["good_requests"], summary["answered"]) == (io.MASKRCNN_ENSEMBLE, 3, 3)
    assert (summary["bad_requests"], summary["rejected"]) == (5, 5)
    assert summary["collateral_failures"] == summary["bad_answered"] == 0


def test_each_ensemble_reports_the_counters_the_autoscaler_reads(server, shapes_dir):
    """deploy/'s PrometheusRule divides the queue time of each ensemble's steps by the ensemble's successful
    requests: a real server reports both counters for both ensembles once each has served a request."""
    photo = images(shapes_dir)[:1]
    with httpclient.InferenceServerClient(server.http_url) as client:
        for ensemble in io.ENSEMBLES:
            image = httpclient.InferInput(io.IMAGE, [1, len(photo[0])], "UINT8")
            image.set_data_from_numpy(padded(photo))
            client.infer(ensemble, [image])
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        metrics = response.read().decode()

    def counter(name: str, model: str) -> float:
        values = re.findall(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', metrics, re.MULTILINE)
        assert values, f"no {name} for {model}"
        return sum(map(float, values))

    for ensemble in io.ENSEMBLES:
        assert counter("nv_inference_request_success", ensemble) >= 1
        assert counter("nv_inference_queue_duration_us", ensemble) > 0


def test_exporting_ssd300_again_keeps_the_maskrcnn_export(repository, tiny_checkpoint, tmp_path):
    """Runs last in this file: it re-exports into the served repository's source."""
    before = json.loads((repository / MANIFEST_FILE).read_text())
    export_model_repository(tiny_checkpoint, repository, precisions=["fp32"])
    after = verify_repository(repository)
    maskrcnn = {rel: entry for rel, entry in before["files"].items() if rel.startswith("maskrcnn")}
    assert maskrcnn and all(after["files"][rel] == entry for rel, entry in maskrcnn.items())
    assert after["exports"]["maskrcnn"] == before["exports"]["maskrcnn"]
