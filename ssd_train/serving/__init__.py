"""Triton serving: model names and tensors (`io`), the `ssd-serve` launcher, the CPU flavour."""
