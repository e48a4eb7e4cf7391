"""`make demo`: the whole trip on a CPU in about 15 minutes -- generate a toy dataset, train SSD300
(ResNet-18 backbone) on it, evaluate, predict, export to a Triton model repository, serve it with a
real tritonserver and query it with ssd-client. Every step is a command a user can run; they are
printed before they run."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Sized for about 7 minutes of training on 2 idle CPU cores. A from-scratch backbone (no ImageNet
# weights offline) learns slowly: expect a low mAP here; raise --epochs (and train on a GPU) for more.
# Short and small-batch, hence a high learning rate, no augmentation and --precise-bn.
TRAIN_IMAGES, VAL_IMAGES = 160, 40
FIT_OPTIONS = ["--backbone", "resnet18", "--no-pretrained-backbone", "--epochs", "10", "--bs", "8", "--lr", "0.04",
               "--warmup", "20", "--multistep", "8", "--evaluation", "9", "--no-augment", "--precise-bn", "10",
               "--num-workers", "2"]


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
    run("ssd-train", "make-dataset", "shapes", str(data), "--train", str(TRAIN_IMAGES), "--val", str(VAL_IMAGES))
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

    losses = [json.loads(line)["loss"] for line in (save / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    in_process = json.loads((out / "evaluate.json").read_text())["mAP"]
    served = json.loads((out / "served_evaluate.json").read_text())["mAP"]
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo done in {minutes:.1f} min: trained SSD300 (ResNet-18, random init) on {TRAIN_IMAGES} generated "
          f"images for {len(losses)} epochs (loss {losses[0]:.2f} -> {losses[-1]:.2f}); val mAP {in_process:.3f} "
          f"in process, {served:.3f} through Triton (minutes of CPU training from scratch: expect a low mAP). "
          f"Outputs in {out}/ (predictions/ and served/ hold annotated images).")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_run"))
