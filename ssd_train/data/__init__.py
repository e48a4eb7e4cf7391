"""Datasets and input pipelines. Import the submodules: `loaders` (both backends behind one
interface), `coco`, `transforms`, `dali`, `shapes`. Importing this package loads nothing, so the
Triton preprocess model can import `ssd_train.data.dali` without torch."""

# Input normalisation of the model (ImageNet statistics on the [0, 1] scale), shared by the PyTorch
# transforms and the DALI pipelines.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
