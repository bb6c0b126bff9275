"""Training: the epoch loop, write and read phases, controls' readers, the row-wise optimizer, torchrun."""
