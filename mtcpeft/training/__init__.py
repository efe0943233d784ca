"""From a run config to trained adaptors: model and dataset builders, the accelerate / DeepSpeed trainer, joint
fine-tuning, precision choice and the shared start and end of a training run (:mod:`.run`)."""
