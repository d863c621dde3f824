"""Any timm model as a backbone (``features_only``), with encoder taps for MTAN.

Every feature level is one encoder tap whose gate and feature are that level's output;
``pool_after`` is set when the next level has twice the stride (MTAN then max-pools its
attention output to the next level's size). ``out_channels``/``out_stride`` are those of
the last level, which ``forward`` returns. ``pretrained`` is a local safetensors file (no
downloads): its tensors are loaded into the feature extractor; keys of the classifier head,
which ``features_only`` models do not have, are ignored, while any missing key is an error.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from torch import Tensor

from mtlkit.contracts import Backbone, Tap
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class TimmParams(Params):
    name: str
    pretrained: str | None = None  # path of a local .safetensors file
    in_channels: int = Field(3, ge=1)
    out_indices: list[int] | None = None  # which feature levels (timm's out_indices)


class TimmBackbone(Backbone):
    def __init__(self, params: TimmParams) -> None:
        super().__init__()
        import timm

        kwargs = {"features_only": True, "pretrained": False, "in_chans": params.in_channels}
        if params.out_indices is not None:
            kwargs["out_indices"] = tuple(params.out_indices)
        try:
            self.model = timm.create_model(params.name, **kwargs)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ConfigError(f"model.backbone.params.name: timm cannot build '{params.name}': {exc}") from None
        if params.pretrained is not None:
            self._load(Path(params.pretrained).expanduser())
        channels = list(self.model.feature_info.channels())
        strides = list(self.model.feature_info.reduction())
        self.feature_info = [
            Tap(f"level{i}", c, c, s, "encoder",
                pool_after=i + 1 < len(strides) and strides[i + 1] == 2 * s)
            for i, (c, s) in enumerate(zip(channels, strides))
        ]
        self.out_channels = channels[-1]
        self.out_stride = strides[-1]

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"model.backbone.params.pretrained: weights file '{path}' does not exist")
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"model.backbone.params.pretrained: cannot read '{path}': {exc}") from None
        own = self.model.state_dict()
        missing = [k for k in own if k not in weights]
        if missing:
            raise ConfigError(
                f"model.backbone.params.pretrained: '{path}' lacks {len(missing)} of the model's tensors "
                f"(first: '{missing[0]}')"
            )
        self.model.load_state_dict({k: weights[k] for k in own}, strict=True)

    def forward_taps(self, x: Tensor):
        feats = self.model(x)
        return feats[-1], [(f, f) for f in feats]


def build_timm(params: TimmParams) -> TimmBackbone:
    """Any timm model by name (features_only; local safetensors weights)."""
    return TimmBackbone(params)


@hookimpl
def register_backbones(register):
    register("timm", build_timm, params=TimmParams, tiny={"name": "test_resnet"},
             description="Any timm model by name (features_only), local safetensors weights")
