"""The estimators, each declared once: error kinds, candidates, integrand, exact terms and tails (docs/math.md).

A unit's value per image is  exact(x) + sign·∫_{γ_L}^{γ_R} f(err) dγ + left(x) + right(x),  where err is the
per-cell error of the model's projection chosen per logSNR bin among `candidates`, and the tails are the
closed-form contributions of the model-free decoders outside the range (the Gaussian's linear denoiser below
γ_L; the identity or hard rounding of z/a above γ_R). The engine records the union of the units' `kinds`.
Adding an estimator is one entry in `UNITS` (or `SOLVERS`, with its routine in `likelihoods.py`) and its name in
`core/kinds.py` (`EstimatorChoice`, `ESTIMATOR_HELP`, which feeds `--estimator`'s help).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from itdcli.core import tails
from itdcli.core.gaussian import GaussianReference
from itdcli.evaluation import likelihoods
from itdcli.evaluation.cellerrors import Control, Projection, Reference

F64 = torch.float64
Decoder = Literal["identity", "rounding"]


@dataclass(frozen=True)
class Inputs:
    """What exact terms and tails read: the reference, the scored images (model scale, levels) and the range."""

    ref: GaussianReference
    values: Tensor
    codes: Tensor | None
    levels: int | None
    logsnr_min: float
    logsnr_max: float

    @cached_property
    def y(self) -> Tensor:
        """Eigen-coordinates of the scored images, (N, d)."""
        return self.ref.whiten(self.values)

    def with_range(self, logsnr_min: float | None = None, logsnr_max: float | None = None) -> Inputs:
        """The same images on another range, keeping their eigen-coordinates (which do not depend on it)."""
        moved = replace(
            self,
            logsnr_min=self.logsnr_min if logsnr_min is None else logsnr_min,
            logsnr_max=self.logsnr_max if logsnr_max is None else logsnr_max,
        )
        moved.__dict__["y"] = self.y  # seed the cached_property: whitening N×d images is the costly part
        return moved

    @property
    def delta(self) -> float:
        """Grid spacing 2/(L−1) (spec §2); 0 for float data."""
        return 2.0 / (self.levels - 1) if self.levels else 0.0


@dataclass(frozen=True)
class Cells:
    """Per-cell terms an integrand may read besides the chosen error: logSNR, mmse_G(x, γ) and mmse_G(γ)."""

    logsnr: Tensor
    gauss: Tensor | None
    mmse_g: Tensor


Form = Callable[[Tensor, Cells], Tensor]
Term = Callable[[Inputs], Tensor]


@dataclass(frozen=True)
class Unit:
    """One estimator: what it needs from the engine, how its integrand and value are assembled, its tails."""

    name: str
    family: str  # units of one family share the candidates and the per-bin choice
    kinds: frozenset[Projection]
    candidates: tuple[Projection, ...]  # the model's own projections; the first is used alone under selection "none"
    reference: Reference  # the Gaussian's exact error on the same cells, for the comparison with N(μ, Σ)
    controls: tuple[Control, ...]  # mean-zero control variates, in order of use: the Gaussian's error, then moments
    discrete_only: bool
    form: Form  # integrand in nats per unit logSNR, from the chosen error
    sign: float
    exact: Term
    left: Term
    right: Term
    decoder: Decoder  # the model-free decoder above γ_R, which sets the top of the range
    paper: tuple[Projection, ...] | None = None  # the projections --paper-clamp switches among, when not `candidates`

    def value(self, integral: Tensor, inp: Inputs) -> Tensor:
        """Per-image nats from the per-image integral of `form`."""
        return self.exact(inp) + self.sign * integral + self.left(inp) + self.right(inp)

    def right_bound(self, logsnr_max: float, ref: GaussianReference, levels: int | None) -> float:
        """The right tail any image can have at γ_R, in nats (for choosing the range)."""
        if self.decoder == "rounding" and levels:
            return tails.rounding_tail_bound(logsnr_max, ref.dim, levels)
        return tails.identity_tail(logsnr_max, ref.log_eigvals)


def _zero(inp: Inputs) -> Tensor:
    return torch.zeros(inp.values.shape[0], dtype=F64)


def _entropy(inp: Inputs) -> Tensor:
    return torch.full((inp.values.shape[0],), inp.ref.entropy(), dtype=F64)


def _deq_exact(inp: Inputs) -> Tensor:
    """H_G + d·log(1/δ): form (C1) on x + δ(u − ½) turned into a bound on −log P (spec §2, §7.2)."""
    return _entropy(inp) + inp.ref.dim * math.log(1 / inp.delta)


def _left_c1(inp: Inputs) -> Tensor:
    return tails.left_tail_c1(inp.logsnr_min, inp.y**2, inp.ref.eigvals)


def _left_c1_deq(inp: Inputs) -> Tensor:
    """E_u ỹ² = y² + δ²/12 for ỹ = Uᵀ(x + δ(u − ½) − μ), U orthonormal."""
    return tails.left_tail_c1(inp.logsnr_min, inp.y**2 + inp.delta**2 / 12, inp.ref.eigvals)


def _identity(inp: Inputs) -> Tensor:
    return torch.full((inp.values.shape[0],), tails.identity_tail(inp.logsnr_max, inp.ref.log_eigvals), dtype=F64)


def _rounding(inp: Inputs) -> Tensor:
    if inp.codes is None or inp.levels is None:
        raise ValueError("the rounding tail needs integer levels")
    return tails.rounding_tail(inp.logsnr_max, inp.codes, inp.levels)


def _need(t: Tensor | None) -> Tensor:
    if t is None:
        raise ValueError("this estimator needs the Gaussian's pointwise errors, which were not recorded")
    return t


MAIN_CONTROLS: tuple[Control, ...] = ("cv", "moments")
DEQ_CONTROLS: tuple[Control, ...] = ("cv_deq", "deq_moments", "moments")
# What each pass of the network (on x, on dequantized x) records: its projections, the Gaussian's errors, controls
PASS_ERRORS: dict[str, tuple[str, ...]] = {
    "main": ("gauss", "model", "round", *MAIN_CONTROLS),
    "deq": ("deq", "deq_cell", "gauss_deq", *DEQ_CONTROLS),
}

UNITS: dict[str, Unit] = {
    u.name: u
    for u in (
        Unit(
            "continuous",
            "continuous",
            frozenset({"model"}),
            ("model",),
            "gauss",
            MAIN_CONTROLS,
            False,
            lambda e, c: 0.5 * (c.mmse_g - e),
            -1.0,
            _entropy,
            _left_c1,
            _identity,
            "identity",
        ),
        Unit(
            "continuous_pointwise",
            "continuous",
            frozenset({"model"}),
            ("model",),
            "gauss",
            MAIN_CONTROLS,
            False,
            lambda e, c: 0.5 * (_need(c.gauss) - e),
            -1.0,
            lambda inp: inp.ref.nll(inp.values),
            _zero,
            lambda inp: tails.identity_tail_pointwise(inp.logsnr_max, inp.y, inp.ref.eigvals),
            "identity",
        ),
        Unit(
            "discrete",
            "discrete",
            frozenset({"model", "round"}),
            ("round", "model"),
            "gauss",
            MAIN_CONTROLS,
            True,
            lambda e, c: 0.5 * e,
            1.0,
            _zero,
            lambda inp: inp.ref.left_tail(inp.logsnr_min, inp.y),
            _rounding,
            "rounding",
        ),
        Unit(
            "dequantized",
            "dequantized",
            frozenset({"deq"}),
            ("deq", "deq_cell"),
            "gauss_deq",
            DEQ_CONTROLS,
            True,
            lambda e, c: 0.5 * (c.mmse_g - e),
            -1.0,
            _deq_exact,
            _left_c1_deq,
            _identity,
            "identity",
            ("deq",),  # the paper has no cell refinement
        ),
    )
}


@dataclass(frozen=True)
class Solver:
    """An estimator that is not an I-MMSE integral: its own routine on the same model and images (docs/math.md)."""

    name: str
    discrete_only: bool
    run: Callable[[likelihoods.SolverInputs], likelihoods.Solved]
    unit: str  # what its progress counts


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (Solver("vlb", True, likelihoods.vlb, "evaluations"), Solver("ode", False, likelihoods.ode, "images"))
}


def units(names: list[str]) -> list[Unit]:
    """The I-MMSE units among the named estimators, in order (solver estimators run apart)."""
    return [UNITS[n] for n in names if n in UNITS]


def kinds(names: list[str]) -> frozenset[Projection]:
    """The union of the error kinds the named estimators need."""
    out: frozenset[Projection] = frozenset()
    for u in units(names):
        out |= u.kinds
    return out


def tail_range(names: list[str], ref: GaussianReference, levels: int | None, limit: float) -> tuple[float, float]:
    """The narrowest [γ_L, γ_R] whose closed-form tails are each at most `limit` nats per image (docs/math.md).

    γ_L bounds the Gaussian left tail, the most any estimator's left term can hold; γ_R is the largest of
    the units' right ends (hard rounding for the discrete form, the identity decoder for the continuous ones).
    """
    if not units(names):  # solver estimators alone: the ODE starts where the identity decoder's tail is small
        names = ["dequantized"] if levels else ["continuous"]
    centre = -float(ref.log_eigvals.mean())
    lo = tails.solve_end(lambda g: tails.gaussian_left_tail(g, ref.log_eigvals), limit, centre, -1.0)
    ends = [tails.solve_end(_right(u, ref, levels), limit, centre, 1.0) for u in units(names)]
    return lo, max(ends)


def _right(unit: Unit, ref: GaussianReference, levels: int | None) -> Callable[[float], float]:
    """A unit's right-tail bound as a function of γ_R alone."""
    return lambda g: unit.right_bound(g, ref, levels)


def right_tails(names: list[str], inp: Inputs) -> dict[str, float]:
    """Per estimator, the dataset mean of its right tail term in nats per image."""
    return {u.name: float(u.right(inp).mean()) for u in units(names)}
