"""Bias of the paper's clamp (a per-logSNR switch to N(μ, Σ)) chosen on the same data, held out, and the model alone.

A Gaussian mixture with an exact density is scored with its exact posterior-mean denoiser; the reference is
fitted on separate training draws. Prints the mean error of the continuous estimate against the exact
−log p(x) over repetitions, in bits/dim, with its standard error. Run: python benchmarks/selection_bias.py
"""

from __future__ import annotations

import json
import math
import sys

import torch

import itdcli

F64 = torch.float64


class Mixture:
    """x ~ Σ_k π_k N(m_k, diag v_k); exact −log p(x) and posterior-mean ε̂ (independent of itdcli's core)."""

    def __init__(self, d: int, k: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.means = torch.randn(k, d, generator=g, dtype=F64)
        self.vars = 0.05 + 0.3 * torch.rand(k, d, generator=g, dtype=F64)
        self.log_w = torch.full((k,), -math.log(k), dtype=F64)

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, self.means.shape[0], (n,), generator=g)
        return self.means[idx] + self.vars[idx].sqrt() * torch.randn(n, self.means.shape[1], generator=g, dtype=F64)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        comp = -0.5 * ((x[:, None] - self.means) ** 2 / self.vars + (2 * math.pi * self.vars).log()).sum(-1)
        return -torch.logsumexp(self.log_w + comp, -1)

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        g = logsnr.to(F64)[:, None, None]
        a, b2 = torch.sigmoid(g).sqrt(), torch.sigmoid(-g)
        var = a**2 * self.vars + b2
        diff = z.to(F64)[:, None] - a * self.means
        log_r = self.log_w - 0.5 * (diff**2 / var + var.log()).sum(-1)
        post = self.means + a * self.vars / var * diff
        xm = (torch.softmax(log_r, -1)[..., None] * post).sum(1)
        return ((z.to(F64) - a[:, 0] * xm) / b2[:, 0].sqrt()).to(z.dtype)


def main(reps: int = 10, n: int = 300, points: int = 256, d: int = 8) -> None:
    """Table of mean (estimate − exact) per selection rule."""
    mix = Mixture(d, 4, 0)
    # (selection, paper clamp): the paper's same-data switch, the switch held out, the model's own bound
    rules = {"same": ("same", True), "crossfit": ("crossfit", True), "none": ("crossfit", False)}
    rows: dict[str, list[float]] = {rule: [] for rule in rules}
    for rep in range(reps):
        g = torch.Generator().manual_seed(100 + rep)
        x, train = mix.sample(n, g), mix.sample(4000, g)
        exact = float(mix.nll(x).mean()) / (d * math.log(2))
        for rule, (selection, clamp) in rules.items():
            r = itdcli.nll(
                x.float(),
                mix,
                reference=train.float(),
                points=points,
                seed=rep,
                selection=selection,
                paper_clamp=clamp,
                logsnr_min=-12.0,
                logsnr_max=16.0,
                proposal="uniform",
                device="cpu",  # the mixture's exact denoiser lives on the CPU
                save=False,
            )
            rows[rule].append(r.estimates["continuous_paper_clamp" if clamp else "continuous"].bpd - exact)
    print(
        f"{'selection':<10} {'mean error (bpd)':>18} {'stderr':>8}   ({reps} repetitions, {n} images, {points} points)"
    )
    out = {}
    for rule, errs in rows.items():
        t = torch.tensor(errs)
        mean, se = float(t.mean()), float(t.std() / math.sqrt(len(errs)))
        out[rule] = {"mean_error_bpd": mean, "stderr_bpd": se}
        print(f"{rule:<10} {mean:>18.4f} {se:>8.4f}")
    json.dump(out, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
