"""Loops and glue: checkpoints to models, training steps, evaluation, the six-phase pipeline."""
