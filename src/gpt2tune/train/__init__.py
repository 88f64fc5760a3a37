"""The train stage: the training loop, its step, optimizers, devices, the run folder."""
