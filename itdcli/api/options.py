"""`NllOptions`: every setting of `itd nll`, the one source of their defaults (the CLI reads them for its help).

No torch here, so that `itd --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

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
from itdcli.errors import ItdOptionError

Count = Annotated[StrictInt, Field(gt=0)]  # True is no count: booleans are refused for integers


class NllOptions(BaseModel):
    """Every setting of an `itd nll` run except the data, model and reference."""

    model_config = ConfigDict(extra="forbid")

    estimator: EstimatorChoice | None = None
    discrete: bool = False
    points: Count | None = None
    target_stderr: float | None = Field(None, gt=0)
    target_image_stderr: float | None = Field(None, gt=0)
    max_points: Count = 1024
    adapt: bool = True
    pilot_points: Count = 8
    pilot_images: Count = 64
    draws: Count = 1
    antithetic: bool = False
    control_variate: bool = True
    paper_clamp: bool = False
    precision: PrecisionName = "auto"
    channels_last: bool | None = None
    compile: bool = False
    seed: StrictInt = Field(0, ge=0)
    batch_size: Count | None = None
    device: str = "auto"
    limit: Count | None = None
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
    levels: StrictInt | None = Field(None, ge=2)
    time_map: TimeMapName = "exact"
    vlb_full: bool = False  # the variational bound over every step, as calc_bpd_loop (else stratified steps)
    probes: Annotated[StrictInt, Field(ge=2)] = 4  # Hutchinson probes per image for the ODE's divergence
    rtol: float = Field(1e-5, gt=0)
    atol: float = Field(1e-5, gt=0)
    ode_max_steps: Count = 10_000  # accepted ODE solver steps per batch of images before it gives up
    out: Path | None = None
    overwrite: bool = False
    save: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> NllOptions:
        """Refuse options that contradict each other."""
        if self.out is not None and not self.save:
            raise ValueError("out is given but save is False: drop one of them")
        return self


Options = TypeVar("Options", bound=BaseModel)


def parse_as(kind: type[Options], options: dict[str, Any]) -> Options:
    """Validated options of `kind`; an invalid one raises ItdOptionError naming its field."""
    try:
        return kind(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "options"
        raise ItdOptionError(field, first["msg"].removeprefix("Value error, ")) from None


def parse(options: dict[str, Any]) -> NllOptions:
    """Validated `itd nll` options (ItdOptionError naming the field of an invalid one)."""
    return parse_as(NllOptions, options)


def default(name: str) -> object:
    """The default of one option, for the CLI's help."""
    return NllOptions.model_fields[name].default
