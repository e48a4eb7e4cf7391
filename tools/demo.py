"""`make demo`: the whole trip on a CPU in about 13 minutes -- generate a toy dataset, train SSD300
(ResNet-18 backbone, from scratch) on it until it finds the shapes, evaluate, predict, export to a
Triton model repository, serve it with a real tritonserver and query it with ssd-client. Then Mask
R-CNN on the same dataset and its instance masks, in about 6 minutes more: train (ResNet-18 FPN, from
scratch), evaluate box and mask mAP, predict with the masks drawn, export into the same repository and
score it through the server that serves both. Every step is a command a user can run; they are printed
before they run."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Sized for about 7 minutes of training on 2 idle CPU cores. A from-scratch backbone (no ImageNet
# weights offline) learns slowly, so the demo trains on the `demo` style of the shapes dataset: 300x300
# images (no resizing), plain backgrounds, objects of the sizes SSD300's default boxes cover best and one
# colour family per shape. Measured on 2 CPU cores: val mAP 0.61 after 2 epochs, 0.74 after 4, 0.87
# after 5 (the default style got ~0.003 from the same budget; random colours instead of the colour
# families 0.18 after 2 and 0.67 after 5). 160 images for 12 epochs (the same number of steps) reached
# the same 0.86: with no augmentation, 400 distinct images repeated 5 times are the safer choice. Short
# and small-batch, hence a high learning rate after a short warmup, one x0.1 drop for the last epoch,
# no augmentation and --precise-bn. Evaluating after epochs 2-5 (a few seconds each) logs the curve.
TRAIN_IMAGES, VAL_IMAGES = 400, 50
DATASET_OPTIONS = ["--style", "demo"]
FIT_OPTIONS = ["--backbone", "resnet18", "--no-pretrained-backbone", "--epochs", "5", "--bs", "8", "--lr", "0.08",
               "--warmup", "30", "--multistep", "4", "--evaluation", "1,2,3,4", "--no-augment", "--precise-bn", "10",
               "--num-workers", "2"]

# Mask R-CNN on the same images, from scratch too (ResNet-18 FPN; the trainer then trains BatchNorm and
# all 5 ResNet stages), sized for about 4 minutes of training on 2 idle CPU cores: 150 steps of 4 images
# (1.5 epochs) with the images at 192x192 (1.56 s a step; ~3.8 s at their own 300, for the same number of
# steps) and 32 RoIs per image for the box and mask heads (2-4 objects each; 64 RoIs made a step cost 2.9
# s for a slightly lower loss, 1.58 vs 1.67 after 40 steps, so that run was stopped). --lr is for a batch
# of 16: 0.04 is 0.01 for batch 4, after 30 warmup steps from 0.1, x0.1 for the last 30 steps (0.08, i.e.
# 0.02, went non-finite within 18 steps). No augmentation, as for SSD. Measured (minutes of training when
# the cores were idle; the shared machine slowed parts of these runs 3-6x): box/mask mAP 0.18/0.33 after
# 50 steps (1.3 min), 0.50/0.67 after 100 (epoch 1, 2.6 min), 0.77/0.87 after 150 (3.9 min; 4.5 in a
# whole demo run), AP50 0.999 for both; loss (mean of 10 steps) 4.65 -> 0.52. Batch 2 with the same 0.01
# (--lr 0.08) for 300 steps, x0.1 after 240, saw the same 600 images more slowly (0.9 s a step, 4.7 min)
# and reached less: 0.54/0.74 after epoch 1, 0.71/0.85 after 300 steps. The evaluation after epoch 1 (~25
# s) logs the curve; no final evaluation in `fit`, the evaluate step after it gives the final numbers.
# Predictions are drawn from score 0.7: at the default 0.3 this short run also shows boxes of 0.35-0.65
# spanning two neighbouring shapes.
MASKRCNN_FIT_OPTIONS = ["--model", "maskrcnn", "--backbone", "resnet18", "--min-size", "192", "--max-size", "192",
                        "--batch-size", "4", "--iterations", "150", "--lr", "0.04", "--warmup", "30",
                        "--warmup-factor", "0.1", "--steps", "120", "--rois-per-image", "32", "--no-augment",
                        "--eval-every-epoch", "--no-final-eval", "--log-interval", "10", "--num-workers", "2"]
MASKRCNN_PREDICT_THRESHOLD = "0.7"


def run(*command: str) -> str:
    print(f"\n$ {shlex.join(command)}", flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.exit(f"demo: step failed (exit {result.returncode}): {shlex.join(command)}")
    return result.stdout


def fresh_output_dir(out: Path) -> None:
    """Start from an empty OUT; only a previous demo's folder (it has the marker) is ever deleted."""
    marker = out / ".ssd-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            sys.exit(f"demo: {out} exists and is not a previous demo's output; choose another DEMO_DIR")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("output of tools/demo.py; deleted by the next demo run\n")


def main(out: Path) -> None:
    started = time.perf_counter()
    fresh_output_dir(out)
    data, save, repo = out / "shapes", out / "run", out / "model_repository"
    run("ssd-train", "make-dataset", "shapes", str(data), "--train", str(TRAIN_IMAGES), "--val", str(VAL_IMAGES),
        *DATASET_OPTIONS)
    run("ssd-train", "fit", "--data", str(data), "--save", str(save), "--json-summary", str(out / "fit.json"),
        *FIT_OPTIONS)
    checkpoint = json.loads((out / "fit.json").read_text())["checkpoint"]
    run("ssd-train", "evaluate", "--data", str(data), "--checkpoint", checkpoint,
        "--json-summary", str(out / "evaluate.json"))
    images = [str(p) for p in sorted((data / "val2017").iterdir())[:3]]
    run("ssd-train", "predict", "--checkpoint", checkpoint, *images, "--output-dir", str(out / "predictions"))
    run("ssd-train", "export", "--checkpoint", checkpoint, "--model-repository", str(repo), "--precision", "fp32")

    from ssd_train.serving.server import TritonServer

    print(f"\n$ ssd-serve --model-repository {repo}   (in the background)", flush=True)
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        print(f"serving {', '.join(server.models)} ({server.flavour} flavour) at http://{server.http_url} "
              f"and grpc://{server.grpc_url}")
        labels = str(repo / "ssd300_postprocess" / "1" / "labels.json")
        run("ssd-client", "detect", *images, "--url", server.http_url, "--labels", labels,
            "--output-dir", str(out / "served"))
        run("ssd-client", "evaluate", "--data", str(data), "--url", server.grpc_url, "--protocol", "grpc",
            "--json-summary", str(out / "served_evaluate.json"))

    events = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    train_minutes = sum(e["seconds"] for e in events if e["event"] == "epoch") / 60
    curve = ", ".join(f"{e['epoch'] + 1}: {e['mAP']:.2f}" for e in events if e["event"] == "eval")
    in_process = json.loads((out / "evaluate.json").read_text())["mAP"]
    served = json.loads((out / "served_evaluate.json").read_text())["mAP"]
    ssd_minutes = (time.perf_counter() - started) / 60
    ssd_line = (f"trained SSD300 (ResNet-18, random init) on {TRAIN_IMAGES} generated images for {len(losses)} "
                f"epochs in {train_minutes:.1f} min (loss {losses[0]:.2f} -> {losses[-1]:.2f}; val mAP after epochs "
                f"{curve}); val mAP {in_process:.3f} in process, {served:.3f} through Triton. Outputs in {out}/ "
                f"(predictions/ and served/ hold annotated images).")

    maskrcnn = maskrcnn_part(out, data, images)
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo done in {minutes:.1f} min (SSD300 part {ssd_minutes:.1f} min, Mask R-CNN part "
          f"{minutes - ssd_minutes:.1f} min): {ssd_line}")
    print(f"Mask R-CNN: {maskrcnn}")


def maskrcnn_part(out: Path, data: Path, images: list[str]) -> str:
    """Train, evaluate and predict with Mask R-CNN on the demo dataset; returns the summary line."""
    save = out / "maskrcnn_run"
    run("ssd-train", "fit", "--data", str(data), "--save", str(save), "--json-summary", str(out / "maskrcnn_fit.json"),
        *MASKRCNN_FIT_OPTIONS)
    checkpoint = json.loads((out / "maskrcnn_fit.json").read_text())["checkpoint"]
    run("ssd-train", "evaluate", "--data", str(data), "--checkpoint", checkpoint,
        "--json-summary", str(out / "maskrcnn_evaluate.json"), "--results-dir", str(out / "maskrcnn_results"))
    run("ssd-train", "predict", "--checkpoint", checkpoint, *images, "--threshold", MASKRCNN_PREDICT_THRESHOLD,
        "--output-dir", str(out / "maskrcnn_predictions"))
    # Into the SSD300 part's repository: one server serves both ensembles.
    repo = out / "model_repository"
    run("ssd-train", "export", "--checkpoint", checkpoint, "--model-repository", str(repo))

    from ssd_train.serving.server import TritonServer

    print(f"\n$ ssd-serve --model-repository {repo}   (in the background)", flush=True)
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        print(f"serving {', '.join(server.ensembles)} ({server.flavour} flavour) at http://{server.http_url}")
        labels = str(repo / "maskrcnn_postprocess" / "1" / "labels.json")
        run("ssd-client", "detect", *images, "--model", "maskrcnn", "--url", server.http_url, "--labels", labels,
            "--threshold", MASKRCNN_PREDICT_THRESHOLD, "--output-dir", str(out / "maskrcnn_served"))
        run("ssd-client", "evaluate", "--data", str(data), "--model", "maskrcnn", "--url", server.grpc_url,
            "--protocol", "grpc", "--batch-size", "1", "--json-summary", str(out / "maskrcnn_served_evaluate.json"))

    events = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    end = next(e for e in events if e["event"] == "end")
    train_minutes = end["train_seconds"] / 60  # training only (fit leaves its evaluations out)
    curve = ", ".join(f"{e['bbox_mAP']:.2f}/{e['segm_mAP']:.2f} after {e['iteration']} iterations"
                      for e in events if e["event"] == "eval")
    start = next(e for e in events if e["event"] == "start")
    epochs = end["iterations"] / start["steps_per_epoch"]
    result = json.loads((out / "maskrcnn_evaluate.json").read_text())
    served = json.loads((out / "maskrcnn_served_evaluate.json").read_text())
    return (f"trained Mask R-CNN (ResNet-18 FPN, random init) on the same images for {end['iterations']} iterations "
            f"of {start['global_batch']} ({epochs:.1f} epochs) in {train_minutes:.1f} min (loss {losses[0]:.2f} -> "
            f"{losses[-1]:.2f}; val box/mask mAP {curve or 'not evaluated during training'}); val box mAP "
            f"{result['bbox_mAP']:.3f}, mask mAP {result['segm_mAP']:.3f} in process, {served['bbox_mAP']:.3f} / "
            f"{served['segm_mAP']:.3f} through Triton. Outputs in {out}/maskrcnn_* (maskrcnn_predictions/ and "
            "maskrcnn_served/ hold images with the masks drawn).")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_run"))
