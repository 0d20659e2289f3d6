"""Training: the state of a distillation run, its pruner, its micro-step and its timing probe.
The loop that drives them is `compressor.distill`."""
