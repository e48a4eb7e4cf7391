"""Batched decode + NMS against a straightforward per-image, per-class torchvision reference."""

import torch
from torchvision.ops import nms

from ssd_train.models.ssd300.boxes import _nms_group_slices, _nms_one_call, decode, postprocess


def reference(locs, scores, threshold=0.05, topk=200, iou=0.5, max_det=200):
    boxes = decode(locs).clamp(0, 1)
    probs = torch.softmax(scores, 1)
    results = []
    for i in range(len(locs)):
        found = []
        for c in range(1, scores.shape[1]):
            s, idx = probs[i, c].topk(topk)
            keep = s > threshold
            s, idx = s[keep], idx[keep]
            kept = nms(boxes[i, idx], s, iou)
            found += [(float(s[k]), c, boxes[i, idx[k]]) for k in kept]
        found.sort(key=lambda f: -f[0])
        results.append(found[:max_det])
    return results


def _outputs(n=3, classes=6, seed=0):
    torch.manual_seed(seed)
    # peaky scores so that many boxes pass the threshold and NMS has work to do
    return torch.randn(n, 4, 8732) * 0.5, torch.randn(n, classes, 8732) * 3


def test_matches_reference():
    locs, scores = _outputs()
    out = postprocess(locs, scores)
    ref = reference(locs, scores)
    for i, (boxes, s, labels) in enumerate(out.per_image()):
        assert len(s) == len(ref[i]) == out.counts[i]
        assert torch.allclose(s, torch.tensor([r[0] for r in ref[i]]), atol=1e-6)
        assert labels.tolist() == [r[1] for r in ref[i]]
        assert torch.allclose(boxes, torch.stack([r[2] for r in ref[i]]), atol=1e-6)


def test_padding_and_limits():
    locs, scores = _outputs(n=2, classes=3, seed=1)
    out = postprocess(locs, scores, max_detections=50)
    assert out.boxes.shape == (2, 50, 4) and out.scores.shape == (2, 50)
    assert (out.counts <= 50).all()
    for i, n in enumerate(out.counts.tolist()):
        assert (out.scores[i, n:] == 0).all() and (out.labels[i, n:] == 0).all()
        assert (out.scores[i, :n].diff() <= 0).all()  # best first


def test_confident_background_gives_nothing():
    scores = torch.zeros(2, 4, 8732)
    scores[:, 0] = 10.0
    out = postprocess(torch.zeros(2, 4, 8732), scores)
    assert out.counts.tolist() == [0, 0]


def test_identical_boxes_of_different_classes_both_kept():
    locs = torch.zeros(1, 4, 8732)
    scores = torch.full((1, 3, 8732), -10.0)
    scores[0, 0] = 10.0  # background everywhere but at box 100
    scores[0, 0, 100] = -10.0
    scores[0, 1, 100] = 10.0
    scores[0, 2, 100] = 10.0
    out = postprocess(locs, scores)
    assert out.counts.item() == 2 and sorted(out.labels[0, :2].tolist()) == [1, 2]


def test_gpu_and_cpu_strategies_keep_the_same_boxes():
    """The one-call NMS used on CUDA and the per-group slices used on CPU agree (run here on CPU)."""
    torch.manual_seed(2)
    group = torch.sort(torch.randint(0, 30, (3000,))).values
    low = torch.rand(3000, 2) * 0.8
    boxes = torch.cat([low, low + 0.05 + torch.rand(3000, 2) * 0.2], 1).clamp(0, 1)
    scores = torch.rand(3000)
    # each group's boxes best first, as postprocess hands them over
    order = torch.argsort(group * 2 - scores, stable=True)
    boxes, scores = boxes[order], scores[order]
    one_call = set(_nms_one_call(boxes, scores, group, 0.5).tolist())
    slices = set(_nms_group_slices(boxes, scores, group, 0.5).tolist())
    assert one_call == slices and 0 < len(slices) < 3000
