"""Training settings: the ``[optimizer]``, ``[schedule]``, ``[training]`` and ``[output]``
sections of a recipe. Field descriptions feed the generated recipe reference."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..registry import Params


class OptimizerConfig(Params):
    """The optimiser of the model's (and the weighting's) parameters."""

    name: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimiser: adam, adamw or sgd.")
    lr: float = Field(1e-4, gt=0, description="Base learning rate (the schedule scales it per epoch).")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (decoupled for adamw). "
                                "Not applied to the weighting's own parameters.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (sgd only).")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only; needs momentum > 0).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW moment decay rates.")
    fused: bool = Field(False, description="torch's fused implementation: the whole update in one kernel "
                        "(fewer launches); with precision = \"fp16\" the loss scaler then checks for "
                        "overflow on the device instead of reading it back each step. Off: torch's default "
                        "(foreach) implementation.")

    @model_validator(mode="after")
    def _check(self) -> "OptimizerConfig":
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError("momentum/nesterov apply to name = \"sgd\" only")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must lie in [0, 1)")
        return self


class ScheduleConfig(Params):
    """Learning-rate schedule, applied once per epoch (before it starts)."""

    name: Literal["none", "step", "cosine"] = Field("none", description="none: constant; step: multiply by "
                                                    "gamma every step_size epochs; cosine: cosine decay to 0 "
                                                    "over training.epochs (in stages: until the schedule "
                                                    "restarts, see training.stages).")
    step_size: int = Field(100, ge=1, description="Epochs between decays (step).")
    gamma: float = Field(0.5, gt=0, description="Decay factor (step).")


class StageConfig(Params):
    """One stage of training (``[[training.stages]]``; see :mod:`mtlkit.engine.stages`)."""

    epochs: int = Field(..., ge=1, description="Epochs of this stage.")
    domains: Optional[list[str]] = Field(None, min_length=1, description="Many-to-many only: the domains "
                                         "this stage trains on (default: all). Evaluation covers every domain.")
    optimizer: Optional[OptimizerConfig] = Field(None, description="A fresh optimiser with these settings "
                                                 "at the stage start (default: the one before goes on).")
    schedule: Optional[ScheduleConfig] = Field(None, description="The schedule from the stage start (default: "
                                               "the one before; restarted if the stage has a fresh optimiser).")

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.domains is not None and len(set(self.domains)) != len(self.domains):
            raise ValueError("domains: a domain is listed twice")
        return self


class TrainingConfig(Params):
    """The training loop."""

    epochs: int = Field(10, ge=1, description="Number of epochs.")
    batch_size: int = Field(8, ge=1, description="Samples per batch (per process under torchrun).")
    drop_last: bool = Field(False, description="Drop each epoch's last incomplete batch (per domain).")
    seed: int = Field(0, ge=0, description="Seed of weights init order, data order, dropout and augmentation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu.")
    eval_interval: int = Field(1, ge=1, description="Evaluate every this many epochs (and after the last).")
    num_workers: Optional[int] = Field(None, ge=0, description="DataLoader worker processes. Default: 0 on "
                                       "the CPU (workers compete with the step for the same cores); on CUDA "
                                       "min(8, this process's CPUs - 1), the CPUs shared among local ranks.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32: no autocast; bf16 / fp16: the forward pass under torch.autocast in that "
        "dtype (losses in fp32); fp16 also scales the loss (GradScaler, its state in checkpoints); auto: bf16 "
        "on a CUDA device that supports it, else fp32.")
    compile: Union[bool, Literal["auto"]] = Field(False, description="torch.compile the network for training "
                                                  "(evaluation runs eager); auto: on CUDA devices only.")
    compile_backend: str = Field("inductor", description="torch.compile backend (\"eager\" / \"aot_eager\" "
                                 "check the capture without generating code).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (inductor only). reduce-overhead replays the compiled "
        "step as CUDA graphs: one launch instead of hundreds, for small batches whose step is bound by "
        "kernel launches; it keeps static copies of inputs and activations (more memory).")
    cuda_graph: Literal["off", "on", "auto"] = Field(
        "off", description="Replay each training step as one CUDA graph (forward, losses, backward, optimiser "
        "update in one launch): for small batches whose step is bound by launching kernels. on: a one-line "
        "error where it cannot run (not CUDA, torchrun, fp16, a compile_mode with graphs of its own, mixed "
        "domains, or a weighting that is not graph-safe); with compile in the default mode the compiled "
        "kernels are captured; auto: graphs where they can run, else the eager step. Captured anew each epoch; "
        "each graph keeps its own activations' memory.")
    channels_last: Union[bool, Literal["auto"]] = Field(
        False, description="Keep the network and its input in channels-last memory format (measure first: on "
        "CPUs 3x3 convolution backward often is slower with it); auto: on CUDA devices only.")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms and no cuDNN "
                                "autotuning: bit-identical runs and resumes on CUDA, at some speed. "
                                "Off: cuDNN picks its fastest kernels (cudnn.benchmark).")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="Cap on batches per epoch (quick runs).")
    best_metric: Optional[str] = Field(None, description="\"task/metric\" that selects the best checkpoint "
                                       "(checkpoints/best.json) "
                                       "(direction from the metric's higher_is_better).")
    domain_order: Literal["sequential", "round_robin", "proportional", "mixed"] = Field(
        "sequential", description="Many-to-many only. sequential: a full pass over each domain in turn; "
        "round_robin: one batch per domain in turn until all are exhausted; proportional: each batch's "
        "domain drawn with probability ~ size^(1/proportional_temperature); mixed: each step takes one "
        "batch of every domain (of mixed_domains), each through its own branch, and the weighting gets "
        "all their losses (gradient-level weightings too); an epoch lasts until the domain with the most "
        "batches is through, the others start new shuffled passes meanwhile.")
    mixed_domains: list[str] = Field(default_factory=list, description="domain_order = \"mixed\" only: the "
                                     "domains drawn together at each step (default: all). Each other domain "
                                     "takes steps of its own, in turn with the mixed steps (as round_robin).")
    proportional_temperature: float = Field(1.0, gt=0, description="Temperature T of domain_order = "
                                            "\"proportional\" (1: by size; large: uniform).")
    domain_batch_size: dict[str, int] = Field(default_factory=dict, description="Many-to-many only: "
                                              "batch size per domain (others use batch_size).")
    domain_loss_weight: dict[str, float] = Field(default_factory=dict, description="Many-to-many only: "
                                                 "factor on a domain's loss (default 1).")
    log_interval: int = Field(10, ge=1, description="Steps between plain-text progress lines. Also how "
                              "often per-step losses are read from the device (log records, NaN check) "
                              "and, under torchrun, how soon ranks agree to stop on Ctrl-C.")
    train_on: Literal["train", "train+val"] = Field(
        "train", description="train+val: train on each data set's train and val splits joined (the "
        "Decathlon test-server protocol; the data set must take the joined split name). There is then "
        "no validation data: no evaluation, no best checkpoint (`decathlon submit` takes the last).")
    domain_bn_stats: bool = Field(True, description="Many-to-many, with BatchNorm layers shared by several "
                                  "domains: before evaluating a domain (and in `decathlon submit`), recompute "
                                  "the shared layers' running statistics on its training data (one pass in "
                                  "train mode, no weight update), then restore training's. false: evaluate "
                                  "with the statistics training left.")
    metrics_last_n: Optional[int] = Field(None, ge=1, description="Also report the mean of the last n "
                                          "evaluations in results.json (the MTAN paper uses 10).")
    stages: list[StageConfig] = Field(default_factory=list, description="Training in stages, in order (none: "
                                      "one stage of `epochs` with [optimizer] and [schedule]). `epochs` defaults "
                                      "to the stages' sum; set, it is the run's length all the same (fewer: "
                                      "the run stops early; more: the last stage goes on).")

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if self.best_metric is not None and (self.best_metric.count("/") != 1 or
                                             not all(self.best_metric.split("/"))):
            raise ValueError("best_metric must read \"task/metric\"")
        if any(v < 1 for v in self.domain_batch_size.values()):
            raise ValueError("domain_batch_size values must be >= 1")
        if any(v < 0 for v in self.domain_loss_weight.values()):
            raise ValueError("domain_loss_weight values must be >= 0")
        if self.stages and "epochs" not in self.model_fields_set:
            self.epochs = sum(s.epochs for s in self.stages)  # the run's length: all its stages
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode = \"{self.compile_mode}\" needs compile = true")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ValueError(f"compile_mode = \"{self.compile_mode}\" needs compile_backend = \"inductor\" "
                             f"(got \"{self.compile_backend}\")")
        if self.mixed_domains and self.domain_order != "mixed":
            raise ValueError("mixed_domains applies to domain_order = \"mixed\" only")
        if len(set(self.mixed_domains)) != len(self.mixed_domains):
            raise ValueError("mixed_domains lists a domain twice")
        return self


class OutputConfig(Params):
    """Where runs go (the caller creates the run folder)."""

    dir: str = Field("runs", description="Parent folder of run folders.")
    name: Optional[str] = Field(None, description="Folder under `dir` that holds this recipe's time-stamped "
                                "run folders (default: the recipe name).")


def coerce(model: type[BaseModel], value, section: str) -> BaseModel:
    """``value`` (None, dict or instance) as ``model``; one-line ConfigError naming the section."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(dict(value or {}))
    except ValidationError as exc:
        from ..recipe.errors import format_validation_errors

        raise ConfigError("; ".join(format_validation_errors(exc, prefix=f"[{section}]", model=model))) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] must be a table of settings: {exc}") from None
