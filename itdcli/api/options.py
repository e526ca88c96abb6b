"""`NllOptions`: every setting of `itd nll`, the one source of their defaults (the CLI reads them for its help).

No torch here, so that `itd --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from itdcli.core.kinds import (
    PAPER_SCALE_CONSTANT,
    BaseProposalKind,
    EstimatorChoice,
    PointScheme,
    PrecisionName,
    Rounding,
    Selection,
    TimeMapName,
)


class NllOptions(BaseModel):
    """Every setting of an `itd nll` run except the data, model and reference."""

    model_config = ConfigDict(extra="forbid")

    estimator: EstimatorChoice | None = None
    discrete: bool = False
    points: PositiveInt | None = None
    target_stderr: float | None = Field(None, gt=0)
    target_image_stderr: float | None = Field(None, gt=0)
    max_points: PositiveInt = 1024
    adapt: bool = True
    pilot_points: PositiveInt = 8
    pilot_images: PositiveInt = 64
    draws: PositiveInt = 1
    antithetic: bool = False
    control_variate: bool = True
    paper_clamp: bool = False
    precision: PrecisionName = "auto"
    channels_last: bool | None = None
    compile: bool = False
    seed: int = Field(0, ge=0)
    batch_size: PositiveInt | None = None
    device: str = "auto"
    limit: PositiveInt | None = None
    selection: Selection = "crossfit"
    rounding: Rounding = "soft"
    scheme: PointScheme = "stratified"
    proposal: BaseProposalKind = "logistic"
    scale_constant: float = Field(PAPER_SCALE_CONSTANT, gt=0)
    clip: float | None = Field(None, gt=0)
    logsnr_min: float | None = None
    logsnr_max: float | None = None
    loc: float | None = None
    scale: float | None = Field(None, gt=0)
    levels: int | None = Field(None, ge=2)
    time_map: TimeMapName = "exact"
    out: Path | None = None
    overwrite: bool = False
    save: bool = True


def default(name: str) -> object:
    """The default of one option, for the CLI's help."""
    return NllOptions.model_fields[name].default
