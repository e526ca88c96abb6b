"""Typed results of `itd nll` and `itd curve`, serialised as result.json (schema `itd.nll/1`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ESTIMATOR_NAMES = ("continuous", "continuous_pointwise", "discrete", "dequantized")


class EstimateResult(BaseModel):
    """One estimator's dataset mean with its Monte Carlo standard error and its sampling standard error.

    `stderr_*` is the Monte Carlo error of the mean over the scored images (what more points shrink);
    `sampling_stderr_bpd` is std/√N over images, the error as an estimate for the data's population.
    """

    bpd: float
    stderr_bpd: float | None
    nats: float
    stderr_nats: float | None
    sampling_stderr_bpd: float | None = None


class DataInfo(BaseModel):
    """Identity of the scored data."""

    name: str
    sha256: str
    n_images: int
    shape: list[int]
    levels: int | None


class ReferenceInfo(BaseModel):
    """The Gaussian reference N(μ, Σ): where it was fitted, its entropy and spectrum summary."""

    source: str
    sha256: str | None
    entropy_nats: float
    eig_floor: float
    spectrum_loc: float
    spectrum_scale: float


class ProposalInfo(BaseModel):
    """The logSNR proposal and the integration range actually used."""

    kind: str
    loc: float
    scale: float
    scale_constant: float
    clip: float | None = None  # None: the range came from the tails (or --logsnr-min/--logsnr-max)
    logsnr_min: float
    logsnr_max: float
    scheme: str
    edges: list[float] = Field(default_factory=list)
    mass: list[float] = Field(default_factory=list)


class TailInfo(BaseModel):
    """An estimator's closed-form tails outside the logSNR range, and the most each may hold (bpd)."""

    left_bpd: float
    right_bpd: float
    limit_bpd: float


class SolverInfo(BaseModel):
    """What a solver estimator (vlb, ode) cost and how it ran: schedule, steps, solver, probes, error source."""

    evals_per_image: float
    seconds: float
    details: dict[str, str | float | int] = Field(default_factory=dict)


class NllResult(BaseModel):
    """Everything needed to read and reproduce one `itd nll` run; per-image arrays ride along in `arrays`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    schema_version: str = "itd.nll/3"
    itd_version: str
    created: str
    data: DataInfo
    model: str
    reference: ReferenceInfo
    proposal: ProposalInfo
    deq_proposal: ProposalInfo | None = None  # the dequantized pass's own proposal (same range), when fitted apart
    points: int
    deq_points: int | None = None
    seed: int
    batch_size: int
    selection: str
    rounding: str
    time_map: str = "exact"
    candidates: dict[str, list[str]] = Field(default_factory=dict)
    estimates: dict[str, EstimateResult]
    bound: str = "model"
    tails: dict[str, TailInfo] = Field(default_factory=dict)
    worse_than_reference: dict[str, list[list[float]]] = Field(default_factory=dict)
    missing_above_bpd: dict[str, float] = Field(default_factory=dict)
    evals_per_image: float  # of the I-MMSE passes (pilot included); each solver estimator's own are in `solvers`
    solvers: dict[str, SolverInfo] = Field(default_factory=dict)
    seconds: float
    device: str
    precision: str
    rounds: int = 1
    target_stderr_bpd: float | None = None
    target_image_stderr_bpd: float | None = None
    pilot_evals_per_image: float = 0.0
    draws: int = 1
    antithetic: bool = False
    stderr_method: str
    warnings: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    run_dir: str | None = None
    arrays: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)


class CurveResult(BaseModel):
    """The figure written by `itd curve` and the runs it drew."""

    path: str
    runs: list[str]
    series: list[str]
