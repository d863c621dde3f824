"""The recipe: a TOML file that names every component and its parameters.

Every section is a :class:`~mtlkit.registry.Params` (unknown keys are errors, floats are
finite). Component ``params`` are checked later against the plugin's own params model
(:mod:`mtlkit.recipe.loader`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field, ValidationInfo, field_validator

from ..engine.config import OptimizerConfig, OutputConfig, ScheduleConfig, TrainingConfig
from ..registry import Params
from ..rundir import folder_name_problem


class ComponentRef(Params):
    """A registered component and its parameters."""

    name: str = Field(..., description="registered name (see `mtlkit list KIND`)")
    params: dict[str, Any] = Field(default_factory=dict, description="validated against the plugin's params model")


class DataRef(ComponentRef):
    """A data set plugin; ``synthetic`` names a stand-in that needs no download."""

    train_split: str = Field("train", description="split used for training")
    val_split: Optional[str] = Field("val", description="split used for evaluation (none: no evaluation)")
    synthetic: Optional[ComponentRef] = Field(
        None, description="stand-in data set used with `mtlkit run --synthetic` (no download)"
    )


class InitFrom(Params):
    """Initialise (part of) the model from a safetensors checkpoint."""

    path: str = Field(..., description="a .safetensors file or a run folder (its best, else last, checkpoint)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of parameter names to load")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of parameter names to skip")


class ModelSection(Params):
    """How the network is composed from parts."""

    backbone: ComponentRef = Field(..., description="the shared feature extractor")
    attention: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="split"),
        description="how tasks share or attend to the backbone (split, mtan, dense, cross_stitch, single)",
    )
    head: Optional[ComponentRef] = Field(None, description="head for every task (default: each task's default head)")
    heads: dict[str, ComponentRef] = Field(default_factory=dict, description="per-task head, overriding `head`")
    init_from: Optional[InitFrom] = Field(None, description="load weights before training")
    freeze_shared: bool = Field(False, description="freeze every shared parameter (the 'feature' baseline)")


class TaskSection(ComponentRef):
    """A task plugin; in the many-to-many setting each task also names its own data set."""

    data: Optional[DataRef] = Field(None, description="this task's own data set (many-to-many setting)")


class PaperReference(Params):
    """Numbers the paper reports for this recipe, printed next to ours."""

    architecture: str = Field("", description="the paper's name for the architecture")
    params_ratio: Optional[float] = Field(None, gt=0, description="the paper's #P column")
    params_base: str = Field(
        "single_task", description="'single_task': #P relative to the first task's split network; "
        "'backbone': relative to the backbone alone"
    )
    params_base_backbone: dict[str, Any] = Field(
        default_factory=dict, description="params of the backbone the #P unit is built from (default: the "
        "backbone's own defaults), e.g. { adapter = 'none' }: Rebuffi et al.'s plain ResNet-26")
    params_heads: bool = Field(
        True, description="whether the paper's #P counts the task heads (the Decathlon baselines of "
        "Rebuffi et al. count the feature extractor only)")
    params_runs: int = Field(
        1, ge=1, description="how many runs of this recipe the paper's #P counts (Finetune: one per domain, 10)")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict, description="{task: {metric: value}}")
    # A run may swap the weighting (--set weighting.name=dwa); the quoted row keeps its own.
    weighting: str = Field("", validate_default=True, description="the weighting the quoted `metrics` were trained with, e.g. 'equal' "
                           "(needed with `metrics`; `mtlkit compare` labels the paper's row with it)")
    # The paper's numbers are only comparable under the evaluation rules that produced them
    # (e.g. the MTAN paper's NYUv2 mIoU is per image, 2019 code), so the block says which.
    protocol: Union[str, dict[str, str]] = Field(
        "", description="the evaluation protocol behind `metrics`: one name for every task, or {task: name} "
        "(the task plugins' protocol names, e.g. segmentation = 'per_image_2019')")


    @field_validator("weighting")
    @classmethod
    def _metrics_name_their_weighting(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("metrics") and not value:
            raise ValueError("give the weighting the quoted metrics were trained with (e.g. 'equal')")
        return value


class Recipe(Params):
    """A whole experiment."""

    name: Optional[str] = Field(None, description="run name (default: the recipe file's stem)")
    description: str = Field("", description="free text")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules or .py files to load")
    model: ModelSection
    tasks: dict[str, TaskSection] = Field(..., min_length=1, description="task name -> task plugin")
    data: Optional[DataRef] = Field(None, description="one data set with every task's targets (one-to-many)")
    weighting: ComponentRef = Field(default_factory=lambda: ComponentRef(name="equal"))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    loggers: list[ComponentRef] = Field(
        default_factory=lambda: [ComponentRef(name="jsonl")],
        description="[[loggers]] tables: where records go (`mtlkit list logger`; `mtlkit run --logger NAME` adds "
        "one). log.jsonl is always written: jsonl is implicit. Not part of a checkpoint's recipe identity: a "
        "resumed run may add loggers",
    )
    synthetic_overrides: list[str] = Field(
        default_factory=list,
        description="KEY.PATH=VALUE overrides applied with --synthetic (e.g. fewer epochs for the stand-in data)",
    )
    paper: Optional["PaperReference"] = Field(None, description="what the paper reports for this recipe")
    baselines: dict[str, Union[dict[str, float], str]] = Field(
        default_factory=dict,
        description="single-task results for Delta_m: {task: {metric: value}}, or {task: 'RUN_DIR'} "
        "(that run's results.json: the mean of its last n evaluations if recorded, else its final one)",
    )

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v: Optional[str]) -> Optional[str]:
        problem = folder_name_problem(v) if v else None  # "" or absent: the file's stem
        if problem:
            raise ValueError(problem)
        return v

    @property
    def many_to_many(self) -> bool:
        return self.data is None
