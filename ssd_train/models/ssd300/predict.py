"""`ssd-train predict`: encoded images -> detections, through the same DALI preprocessing as the
served model (ssd_train.data.dali.Preprocessor) and the same decode/NMS (ssd_train.models.ssd300.boxes)."""

from __future__ import annotations

import torch

from ssd_common.labels import LabelMap
from ssd_train.models.ssd300.checkpoint import load_for_inference
from ssd_train.inference import category_lookup
from ssd_train.models.ssd300.inference import detect


class Predictor:
    def __init__(self, model: torch.nn.Module, label_map: LabelMap, device: str = "cpu", amp: bool = False,
                 batch_size: int = 16):
        from ssd_train.data.dali import Preprocessor

        self.model = model.eval().to(device)
        self.label_map = label_map
        self.device = torch.device(device)
        self.amp = amp
        self.batch_size = batch_size
        self.preprocess = Preprocessor(batch_size=batch_size)
        self._category = category_lookup(label_map, "cpu")

    @classmethod
    def from_checkpoint(cls, path, backbone: str | None = None, device: str = "cpu", **kwargs) -> "Predictor":
        model, label_map, _ = load_for_inference(path, backbone)
        return cls(model, label_map, device, **kwargs)

    def detect(self, images: list[bytes]) -> list[list[dict]]:
        """Per image, its detections best first: {box [x1, y1, x2, y2] in original pixels, score,
        category_id, category_name}. Undecodable input raises ssd_train.data.dali.ImageDecodeError."""
        results: list[list[dict]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pixels, sizes = self.preprocess(chunk)
            found = detect(self.model, torch.from_numpy(pixels).to(self.device), torch.from_numpy(sizes), self.amp)
            for boxes, scores, labels in found.per_image():
                results.append([
                    {"box": box, "score": score,
                     "category_id": int(self._category[label]), "category_name": self.label_map.name(label)}
                    for box, score, label in zip(boxes.cpu().tolist(), scores.cpu().tolist(), labels.cpu().tolist())
                ])
        return results
