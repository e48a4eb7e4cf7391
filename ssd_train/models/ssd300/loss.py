"""SSD loss: Smooth L1 on the encoded boxes of positive default boxes plus cross-entropy on the
positives and the hardest negatives (3 per positive). Each image's loss is divided by its number of
positives (images without positives count zero); the batch loss is the mean over images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hard_negative_mask(conf_loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: int = 3) -> torch.Tensor:
    """The `neg_pos_ratio * positives` negatives with the highest confidence loss, per image (N, D)."""
    negative_loss = conf_loss.masked_fill(positive, 0.0)
    order = negative_loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    num_negatives = (neg_pos_ratio * positive.sum(dim=1, keepdim=True)).clamp(max=positive.shape[1])
    return (rank < num_negatives) & ~positive


class SSDLoss(nn.Module):
    def __init__(self, neg_pos_ratio: int = 3):
        super().__init__()
        self.neg_pos_ratio = neg_pos_ratio

    def forward(
        self,
        locs: torch.Tensor,  # (N, 4, D) predicted offsets
        scores: torch.Tensor,  # (N, C, D) logits
        target_offsets: torch.Tensor,  # (N, D, 4) from ssd_train.models.ssd300.boxes.encode
        target_labels: torch.Tensor,  # (N, D) int64, 0 = background
    ) -> torch.Tensor:
        locs, scores = locs.float(), scores.float()  # the loss in fp32 even under autocast
        positive = target_labels > 0
        num_positive = positive.sum(dim=1)

        box_loss = F.smooth_l1_loss(locs, target_offsets.transpose(1, 2), reduction="none").sum(dim=1)
        box_loss = (box_loss * positive).sum(dim=1)

        conf_loss = F.cross_entropy(scores, target_labels, reduction="none")  # (N, D)
        counted = positive | hard_negative_mask(conf_loss.detach(), positive, self.neg_pos_ratio)
        conf_loss = (conf_loss * counted).sum(dim=1)

        per_image = (box_loss + conf_loss) / num_positive.clamp(min=1)
        return (per_image * (num_positive > 0)).mean()
