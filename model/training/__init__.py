"""Training: settings and presets, the plan of a run, its budget, data, optimizers, evaluation, the trainer, torchrun."""
