import math

import pytest
import torch

from ssd_train.models.ssd300.boxes import SSD300, default_boxes, xywh_to_xyxy


def test_count_and_layout():
    boxes = default_boxes()
    assert boxes.shape == (8732, 4)
    assert SSD300.boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert SSD300.num_boxes == 38 * 38 * 4 + 19 * 19 * 6 + 10 * 10 * 6 + 5 * 5 * 6 + 3 * 3 * 4 + 4
    assert boxes.min() >= 0 and boxes.max() <= 1


@pytest.mark.parametrize("index, expected", [
    # level 0, first (smallest) square box at row 0, column 0: centre 0.5 / (300 / 8), side 21 / 300
    (0, (0.5 / 37.5, 0.5 / 37.5, 0.07, 0.07)),
    # column varies fastest, then row
    (1, (1.5 / 37.5, 0.5 / 37.5, 0.07, 0.07)),
    (38, (0.5 / 37.5, 1.5 / 37.5, 0.07, 0.07)),
    # level 0, second size: sqrt(21 * 45) / 300
    (38 * 38, (0.5 / 37.5, 0.5 / 37.5, math.sqrt(21 * 45) / 300, math.sqrt(21 * 45) / 300)),
    # level 0, aspect ratio 2: (s * sqrt 2, s / sqrt 2), then the transposed box
    (2 * 38 * 38, (0.5 / 37.5, 0.5 / 37.5, 0.07 * math.sqrt(2), 0.07 / math.sqrt(2))),
    (3 * 38 * 38, (0.5 / 37.5, 0.5 / 37.5, 0.07 / math.sqrt(2), 0.07 * math.sqrt(2))),
    # first box of level 1 (19x19, step 16, side 45 / 300)
    (4 * 38 * 38, (0.5 / 18.75, 0.5 / 18.75, 0.15, 0.15)),
    # the very last box: 1x1 map, aspect 1/2 of 261 / 300, height clamped to 1
    (8731, (0.5, 0.5, 0.87 / math.sqrt(2), 1.0)),
])
def test_hand_computed_boxes(index, expected):
    assert default_boxes()[index].tolist() == pytest.approx(expected, abs=1e-6)


def test_xyxy_order_matches_xywh():
    assert torch.allclose(default_boxes(order="xyxy"), xywh_to_xyxy(default_boxes()))


def test_device_copy_is_equal():
    assert torch.equal(default_boxes(device="cpu"), default_boxes())


def test_bad_order():
    with pytest.raises(ValueError):
        default_boxes(order="cxcy")


def test_serving_input_size_is_the_box_spec_figure_size():
    """The Triton preprocess (serving.io, torch-free) and the default boxes agree on the input size."""
    from ssd_common import io

    assert io.INPUT_SIZE == SSD300.fig_size
