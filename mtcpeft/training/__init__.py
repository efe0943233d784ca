"""From a run config to trained adaptors: model and dataset builders, the accelerate / DeepSpeed trainer, joint
fine-tuning and precision choice."""
