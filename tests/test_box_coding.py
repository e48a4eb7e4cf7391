import torch

from ssd_train.models.ssd300.boxes import decode, default_boxes, encode, match, xywh_to_xyxy, xyxy_to_xywh


def test_encode_decode_round_trip():
    torch.manual_seed(0)
    centre = torch.rand(8732, 2) * 0.8 + 0.1
    size = torch.rand(8732, 2) * 0.3 + 0.05
    boxes = xywh_to_xyxy(torch.cat([centre, size], 1))
    offsets = encode(boxes)
    assert offsets.shape == (8732, 4)
    decoded = decode(offsets.T.unsqueeze(0))[0]
    assert torch.allclose(decoded, boxes, atol=1e-5)


def test_default_box_encodes_to_zero():
    offsets = encode(default_boxes(order="xyxy"))
    assert offsets.abs().max() < 1e-5


def test_variances():
    """A box shifted by 10% of a default box's width encodes to 1 (scale_xy 0.1); twice as wide to
    log(2) / 0.2 (scale_wh 0.2)."""
    d = default_boxes()[100]
    shifted = torch.tensor([[d[0] + 0.1 * d[2], d[1], 2 * d[2], d[3]]])
    matched = default_boxes(order="xyxy").clone()
    matched[100] = xywh_to_xyxy(shifted)[0]
    offsets = encode(matched)[100]
    expected = torch.tensor([1.0, 0.0, torch.log(torch.tensor(2.0)) / 0.2, 0.0])
    assert torch.allclose(offsets, expected, atol=1e-4)


def test_conversions_invert():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    assert torch.allclose(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes)


def test_matched_targets_decode_to_ground_truth():
    gt = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]])
    boxes, labels = match(gt, torch.tensor([1, 2]))
    decoded = decode(encode(boxes).T.unsqueeze(0))[0]
    for label, box in ((1, gt[0]), (2, gt[1])):
        assert torch.allclose(decoded[labels == label], box.expand((labels == label).sum(), 4), atol=1e-5)
