"""Run by tests/test_distributed.py under torchrun: train with `fit`, then check that every rank
ends with the same weights and write rank 0's verdict to the file named by argv[2]."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ssd_train.models.ssd300.train import FitConfig, fit


def main(data: str, out: str, save: str, epochs: int, resume: str | None) -> None:
    cfg = FitConfig(data=Path(data), save=Path(save), epochs=epochs, batch_size=4, eval_batch_size=4,
                    learning_rate=0.02, multistep=(10,), evaluation=(), backbone="resnet18",
                    pretrained_backbone=False, num_workers=0, data_backend="pytorch", channels_last=False,
                    progress=False, checkpoint=Path(resume) if resume else None)
    captured = {}
    import ssd_train.models.ssd300.train as train_module

    original = train_module.evaluate_model

    def keep_model(model, *args, **kwargs):  # the last-epoch evaluation hands us the trained model
        captured["model"] = model
        return original(model, *args, **kwargs)

    train_module.evaluate_model = keep_model
    summary = fit(cfg)
    flat = torch.cat([p.detach().flatten() for p in captured["model"].state_dict().values() if p.is_floating_point()])
    checksums = [None] * dist.get_world_size()
    dist.all_gather_object(checksums, [float(flat.sum()), float(flat.abs().sum()), float(flat[::997].sum())])
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"checksums": checksums, "world_size": dist.get_world_size(),
                                         "iterations": summary["iterations"], "mAP": summary["mAP"]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
