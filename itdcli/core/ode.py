"""Per-image log-likelihood from the VP probability-flow ODE in logSNR (docs/math.md, 'Probability-flow ODE').

For z = a x + b ε with a² = σ(γ), b² = σ(−γ), Song et al. 2021 (App. D.2) written in γ instead of t is
dz/dγ = ½ b² z − ½ b ε̂(z, γ), i.e. d(z/a)/dγ = −½ e^{−γ/2} ε̂: the field moves z/a only through ε̂.
Along a solution, d log p_γ(z)/dγ = −∇·f with ∇·f = ½ b² d − ½ b tr ∂ε̂/∂z; the ½ b² d part integrates in
closed form to d log(a_lo/a_hi), so only −½ b tr ∂ε̂/∂z is carried by the solver.
The density of x is that of z_hi/a_hi, i.e. log p(x) = log p_{γ_hi}(a_hi x) + d log a_hi, which gives
log p(x) = log prior(z_lo) + ∫_{γ_hi}^{γ_lo} −½ b tr ∂ε̂/∂z dγ + d log a_lo.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint  # type: ignore[import-untyped]

from itdcli.errors import ItdError, ItdOptionError
from itdcli.models.base import Denoiser

F64 = torch.float64
Prior = Callable[[Tensor], Tensor]
State = tuple[Tensor, Tensor]
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_SOLVER_FAILURES = ("underflow in dt", "max_num_steps exceeded", "non-finite values")


class SolverError(ItdError):
    """The probability-flow ODE could not be solved; `logsnr_reached` is the last logSNR the field was evaluated at."""

    def __init__(self, message: str, logsnr_reached: float, failure: str | None = None) -> None:
        """Keep the logSNR reached (and the solver's own failure, when it gave up) beside the one-line message."""
        super().__init__(message)
        self.logsnr_reached, self.failure = logsnr_reached, failure


@dataclass(frozen=True)
class FlowLikelihood:
    """log p(x) in nats per image (mean over probes), its probe standard error (0 if exact), NFE per image, range."""

    log_density: Tensor
    probe_se: Tensor
    nfe: int
    logsnr_lo: float
    logsnr_hi: float


def log_gain(logsnr: float) -> float:
    """log a_γ = ½ log σ(γ) = −½ softplus(−γ), stable for any γ (spec §1)."""
    u = -logsnr
    return -0.5 * (max(u, 0.0) + math.log1p(math.exp(-abs(u))))


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) per image in float64, the prior at low logSNR (docs/math.md, 'Probability-flow ODE')."""
    flat = z.reshape(z.shape[0], -1).to(F64)
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def rademacher(probes: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """P Rademacher (±1) probes per image, (P, B, ...) float32, fixed for the whole solve (Grathwohl et al. 2019)."""
    device = generator.device if generator is not None else like.device
    bits = torch.randint(0, 2, (probes, *like.shape), generator=generator, device=device)
    return (2 * bits - 1).to(device=like.device, dtype=torch.float32)


def exact_divergence(eps: Tensor, z: Tensor) -> Tensor:
    """tr ∂ε̂/∂z per image, (B, 1) float64, one backward pass per dimension (images must not interact)."""
    flat = eps.reshape(eps.shape[0], -1)
    diag = []
    for i in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, i].sum(), z, retain_graph=True, allow_unused=True)
        diag.append(torch.zeros_like(flat[:, i]) if grad is None else grad.reshape(flat.shape)[:, i])
    return torch.stack(diag, 1).to(F64).sum(1, keepdim=True)


def hutchinson_divergence(eps: Tensor, z: Tensor, probes: Tensor) -> Tensor:
    """vᵀ(∂ε̂/∂z)v per image and probe, (B, P) float64, one vector-Jacobian product per probe (FFJORD)."""
    out = []
    for p, v in enumerate(probes):
        last = p == probes.shape[0] - 1
        (vjp,) = torch.autograd.grad(eps, z, v.to(eps.dtype), retain_graph=not last, allow_unused=True)
        zero = torch.zeros(z.shape[0], dtype=F64, device=z.device)
        out.append(zero if vjp is None else (vjp.to(F64) * v).flatten(1).sum(1))
    return torch.stack(out, 1)


def _range_text(lo: float, hi: float) -> str:
    """The logSNR range as written in messages."""
    return f"[{lo:g}, {hi:g}]"


class _Field:
    """Augmented field (dz/dγ, dℓ/dγ) = (½ b² z − ½ b ε̂, −½ b tr ∂ε̂/∂z), counting calls (Song et al. 2021, D.2)."""

    def __init__(self, denoiser: Denoiser, probes: Tensor | None, lo: float, hi: float) -> None:
        """Hold the denoiser, the fixed probes (None: exact trace) and the range for messages."""
        self.denoiser, self.probes, self.lo, self.hi = denoiser, probes, lo, hi
        self.calls = 0
        self.last_logsnr = hi

    def __call__(self, t: Tensor, state: State) -> State:
        """Evaluate the field at logSNR t, one denoiser forward for the whole batch."""
        z = state[0]
        self.last_logsnr = float(t)
        with torch.enable_grad():
            zin = z.detach().to(torch.float32).requires_grad_(True)
            eps = self.denoiser(zin, t.to(F64).reshape(1).expand(z.shape[0]))
            self.calls += 1
            self._check_output(eps, zin)
            div = exact_divergence(eps, zin) if self.probes is None else hutchinson_divergence(eps, zin, self.probes)
        b = torch.sigmoid(-t.to(F64)).sqrt()
        dz, dacc = 0.5 * b**2 * z - 0.5 * b * eps.detach().to(F64), -0.5 * b * div
        if not bool(torch.isfinite(dacc).all()):
            self._fail("the divergence of the denoiser is not finite")
        return dz, dacc

    def _check_output(self, eps: Tensor, z: Tensor) -> None:
        """Refuse an output of the wrong shape, without an autograd graph, or not finite."""
        if eps.shape != z.shape:
            self._fail(f"the denoiser returned shape {tuple(eps.shape)} for z of shape {tuple(z.shape)}")
        if eps.grad_fn is None:
            self._fail(
                "the denoiser is not differentiable in z (its output has no autograd graph: "
                "torch.no_grad, inference_mode, numpy or .detach() inside it?)"
            )
        if not bool(torch.isfinite(eps).all()):
            self._fail("the denoiser returned non-finite values")

    def _fail(self, problem: str) -> None:
        """Raise a one-line SolverError naming the logSNR reached."""
        raise SolverError(
            f"probability-flow ODE: {problem} at logSNR {self.last_logsnr:.3g} of {_range_text(self.lo, self.hi)}",
            self.last_logsnr,
        )


def _validate(x: Tensor, logsnr_hi: float, logsnr_lo: float, probes: int | None, method: str) -> None:
    """Refuse options the solve cannot honour."""
    if x.dim() < 2 or x.shape[0] == 0:
        raise ItdOptionError(
            "x", f"needs a batch (B, ...) with B ≥ 1 and at least one data dimension, got {tuple(x.shape)}"
        )
    if not (math.isfinite(logsnr_lo) and math.isfinite(logsnr_hi) and logsnr_lo < logsnr_hi):
        raise ItdOptionError("logsnr", f"needs finite logsnr_lo < logsnr_hi, got {_range_text(logsnr_lo, logsnr_hi)}")
    if probes is not None and probes < 2:
        raise ItdOptionError(
            "probes", f"needs at least 2 probes for a standard error (or None for exact), got {probes}"
        )
    if method not in ADAPTIVE_METHODS:
        raise ItdOptionError(
            "method", f"must be an adaptive solver, one of {', '.join(ADAPTIVE_METHODS)}; got {method!r}"
        )


def _solve(
    field: _Field, y0: State, t: Tensor, rtol: float, atol: float, method: str, options: dict[str, int]
) -> State:
    """Run torchdiffeq from γ_hi to γ_lo and turn its failures into a SolverError naming the logSNR reached."""
    try:
        z_path, acc_path = odeint(field, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as err:
        reason = next((r for r in _SOLVER_FAILURES if str(err).startswith(r)), None)
        if reason is None:
            raise
        raise SolverError(
            f"the probability-flow ODE did not converge ({reason}): stopped at logSNR {field.last_logsnr:.3g} of "
            f"{_range_text(field.lo, field.hi)}; loosen rtol/atol, raise max_steps or narrow the logSNR range",
            field.last_logsnr,
            reason,
        ) from None
    return z_path[-1], acc_path[-1]


def _summarise(log_p: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over probes and its standard error sd/√P per image (0 for a single exact column)."""
    if log_p.shape[1] == 1:
        return log_p[:, 0], torch.zeros_like(log_p[:, 0])
    return log_p.mean(1), log_p.std(1) / math.sqrt(log_p.shape[1])


def flow_log_density(
    denoiser: Denoiser,
    x: Tensor,
    logsnr_hi: float,
    logsnr_lo: float,
    *,
    probes: int | None = 4,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
    prior: Prior | None = None,
    max_steps: int | None = None,
) -> FlowLikelihood:
    """log p(x) = log prior(z_lo) + ∫_{γ_hi}^{γ_lo} −½ b tr ∂ε̂/∂z dγ + d log a_lo, z_hi = a_hi x (Song et al. 2021 D.2).

    The density of x is defined as that of z_hi/a_hi, log p(x) = log p_{γ_hi}(a_hi x) + d log a_hi (Score SDE
    starts at the data at a small t the same way). `probes` Rademacher probes per image stay fixed along the
    solve (FFJORD); None takes the exact trace, one backward pass per dimension. `prior` maps z_lo (B, ...)
    float64 to log densities (B,), default N(0, I). Images are batched into one state and share step sizes,
    so the denoiser must treat them independently.
    """
    hi, lo = float(logsnr_hi), float(logsnr_lo)
    _validate(x, hi, lo, probes, method)
    with torch.inference_mode(False), torch.no_grad():
        z_hi = math.exp(log_gain(hi)) * x.detach().to(F64)
        vs = None if probes is None else rademacher(probes, x, generator)
        field = _Field(denoiser, vs, lo, hi)
        y0 = (z_hi, torch.zeros(x.shape[0], 1 if probes is None else probes, dtype=F64, device=x.device))
        t = torch.tensor([hi, lo], dtype=F64, device=x.device)
        options = {} if max_steps is None else {"max_num_steps": max_steps}
        z_lo, acc = _solve(field, y0, t, rtol, atol, method, options)
        prior_lp = (standard_normal_log_density if prior is None else prior)(z_lo).to(F64)
        if prior_lp.shape != (x.shape[0],):
            raise ItdOptionError("prior", f"must return one log-density per image, got shape {tuple(prior_lp.shape)}")
        dim = math.prod(x.shape[1:])
        mean, se = _summarise(prior_lp[:, None] + acc + dim * log_gain(lo))
        if not bool(torch.isfinite(mean).all()):
            raise SolverError(f"probability-flow ODE: the log-density at logSNR {lo:.3g} is not finite", lo)
    return FlowLikelihood(mean, se, field.calls, lo, hi)
