import torch

from ssd_train.models.ssd300.boxes import encode, match
from ssd_train.models.ssd300.loss import SSDLoss, hard_negative_mask


def test_hard_negative_count_and_choice():
    torch.manual_seed(0)
    conf_loss = torch.rand(2, 100)
    positive = torch.zeros(2, 100, dtype=torch.bool)
    positive[0, :5] = True  # 5 positives -> 15 negatives
    positive[1, :40] = True  # 40 positives -> 120, clamped to the 60 negatives there are
    negatives = hard_negative_mask(conf_loss, positive)
    assert negatives[0].sum() == 15 and negatives[1].sum() == 60
    assert not (negatives & positive).any()
    # they are the highest-loss negatives
    chosen = conf_loss[0][negatives[0]]
    others = conf_loss[0][~negatives[0] & ~positive[0]]
    assert chosen.min() > others.max()


def _targets(n):
    gt = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]])
    boxes, labels = match(gt, torch.tensor([1, 2]))
    return encode(boxes).expand(n, -1, -1), labels.expand(n, -1)


def test_perfect_prediction_has_small_loss():
    offsets, labels = _targets(2)
    scores = torch.full((2, 3, 8732), -20.0)
    scores.scatter_(1, labels.unsqueeze(1), 20.0)
    loss = SSDLoss()(offsets.transpose(1, 2), scores, offsets, labels)
    assert loss < 1e-6


def test_loss_is_mean_over_images_normalised_by_positives():
    offsets, labels = _targets(1)
    torch.manual_seed(1)
    locs, scores = torch.randn(1, 4, 8732), torch.randn(1, 3, 8732)
    single = SSDLoss()(locs, scores, offsets, labels)
    # a second image without positives contributes zero, halving the batch mean
    empty_labels = torch.zeros_like(labels)
    pair = SSDLoss()(torch.cat([locs, locs]), torch.cat([scores, scores]), torch.cat([offsets, offsets]),
                     torch.cat([labels, empty_labels]))
    assert torch.allclose(pair, single / 2)
    assert single > 0


def test_gradients_flow():
    offsets, labels = _targets(2)
    locs = torch.zeros(2, 4, 8732, requires_grad=True)
    scores = torch.zeros(2, 3, 8732, requires_grad=True)
    SSDLoss()(locs, scores, offsets, labels).backward()
    assert locs.grad.abs().sum() > 0 and scores.grad.abs().sum() > 0
