"""Train NVIDIA's SSD300 v1.1 detector and serve it on Triton.

Importing the package is cheap (no torch). What the client shares with it (Triton names, label maps,
the COCO layout and evaluation) lives in `ssd_common`, part of the client distribution.
"""

__version__ = "0.1.0"
