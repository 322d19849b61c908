"""Callbacks that trajrep configs use by short name."""

import functools

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def ema_update(ema_param: torch.Tensor, current_param: torch.Tensor, num_averaged: torch.Tensor,
               decay: float) -> torch.Tensor:
    return decay * ema_param + (1.0 - decay) * current_param


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging with a picklable update rule, so that it also works under ddp_spawn.

    Checkpoints hold the EMA weights in `state_dict` and the raw weights in `current_model_state`.

    Args:
        decay: weight of the running average at each update.
        update_every_n_steps: optimizer steps between updates.
        update_starting_at_step: first step that updates; None from the start.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None) -> None:
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)
        self._kwargs["avg_fn"] = functools.partial(ema_update, decay=decay)
