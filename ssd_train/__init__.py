"""Train NVIDIA's SSD300 v1.1 detector and serve it on Triton.

Importing the package is cheap (no torch): the client imports its pure-Python modules
(`ssd_train.labels`, `ssd_train.serving.io`).
"""

__version__ = "0.1.0"
