"""What every dynamoe model declares, so the trainer and the evals never probe a model for it."""

from __future__ import annotations

from torch import nn

from dynamoe.layers.moe_layer import MoELayer


class DynamoeModel(nn.Module):
    """Base of every model ``build_model`` returns.

    ``exit_phase`` is set by the trainer: ``joint``, or two-stage exit training's ``backbone``
    then ``exits``. Models without early exits ignore it.
    """

    exit_phase: str = "joint"

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order (load statistics, the aux-loss-free bias update)."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def early_exit_parameters(self) -> list[nn.Parameter]:
        """The parameters of the early exits, the final head excluded (two-stage training's second
        stage trains these alone)."""
        return []

    def set_depth_progress(self, fraction: float) -> None:
        """Training progress in [0, 1], for schedules inside the depth units (Gumbel temperature)."""

    def set_training_step(self, step: int, steps: int) -> None:
        """The optimizer step about to run, of ``steps`` (schedules by step: the exit curriculum)."""

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none``, ``blocks`` or ``moe_blocks``: which blocks keep only their inputs for backward
        (training only; the block runs again in backward)."""
        if mode != "none":
            raise ValueError(f"{type(self).__name__} has no activation checkpointing")

    @property
    def num_exits(self) -> int:
        """Exits whose losses ``ModelOutput.exit_losses`` reports, the final head included; 0 without exits."""
        return 0
