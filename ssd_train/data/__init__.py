"""Datasets and input pipelines. Import the submodules: `loaders` (SSD300's two backends behind one
interface), `coco`, `annotations`, `seeding`, `dali`, `shapes`. Importing this package loads
nothing, so the Triton preprocess model can import `ssd_train.data.dali` without torch."""

# Input normalisation of the model (ImageNet statistics on the [0, 1] scale), shared by the PyTorch
# transforms and the DALI pipelines.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_workers() -> int:
    """Data loading workers when not given: one per core, at most 4."""
    import os

    return min(4, os.cpu_count() or 1)
