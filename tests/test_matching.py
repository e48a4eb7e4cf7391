import torch
from torchvision.ops import box_iou

from ssd_train.models.ssd300.boxes import default_boxes, match


def test_threshold_and_labels():
    gt = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]])
    boxes, labels = match(gt, torch.tensor([3, 1]))
    ious = box_iou(gt, default_boxes(order="xyxy"))
    best_iou, best_gt = ious.max(0)
    above = best_iou >= 0.5
    assert above.sum() > 0
    # every default box above the threshold is positive, with its best ground truth's label
    assert torch.equal(labels[above], torch.tensor([3, 1])[best_gt[above]])
    # the others are background unless forced as some ground truth's best
    forced = ious.argmax(1)
    background = ~above
    background[forced] = False
    assert (labels[background] == 0).all()
    assert torch.equal(boxes[labels == 3], gt[0].expand((labels == 3).sum(), 4))


def test_best_default_box_is_forced_positive():
    # a tiny box overlaps no default box by 0.5, yet its best default box must be matched to it
    gt = torch.tensor([[0.500, 0.500, 0.505, 0.503]])
    ious = box_iou(gt, default_boxes(order="xyxy"))
    assert ious.max() < 0.5
    _, labels = match(gt, torch.tensor([2]))
    assert labels.sum() == 2 and labels[ious.argmax()] == 2


def test_no_ground_truth():
    boxes, labels = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert labels.shape == (8732,) and (labels == 0).all()
    assert torch.equal(boxes, default_boxes(order="xyxy"))
