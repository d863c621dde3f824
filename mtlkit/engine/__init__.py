"""The training engine: :class:`Trainer`, its settings and checkpoint helpers."""

from .checkpoint import load_model_weights
from .config import OptimizerConfig, OutputConfig, ScheduleConfig, TrainingConfig
from .trainer import Trainer, seed_everything

__all__ = ["Trainer", "load_model_weights", "seed_everything", "OptimizerConfig", "ScheduleConfig",
           "TrainingConfig", "OutputConfig"]
