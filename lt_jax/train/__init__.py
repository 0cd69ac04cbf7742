"""LightTransfer-Train: the light fine-tune of a fixed hybrid plan (docs/design.md §13)."""
from lt_jax.train.step import (IGNORE, TrainSettings, TrainState, init_state, loss_fn, make_step, optimizer,
                               train_step)

__all__ = ["IGNORE", "TrainSettings", "TrainState", "init_state", "loss_fn", "make_step", "optimizer", "train_step"]
