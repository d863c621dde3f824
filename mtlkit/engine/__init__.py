"""The training engine: :class:`Trainer`, its settings and checkpoint helpers."""

from .checkpoint import load_model_weights
from .config import OptimizerConfig, OutputConfig, ScheduleConfig, TrainingConfig
from .sampling import seed_everything
from .trainer import Trainer

__all__ = ["Trainer", "load_model_weights", "seed_everything", "OptimizerConfig", "ScheduleConfig",
           "TrainingConfig", "OutputConfig"]
