"""SSD300 v1.1 (NVIDIA DeepLearningExamples): its model, default boxes and box coding, loss and
transforms. The shared parts (data layout, checkpoints, the training loop, evaluation, serving) live
outside this package."""
