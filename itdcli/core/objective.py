"""The information-theoretic fine-tuning objective, one logSNR per image (Kong et al. 2023; spec §8)."""

from __future__ import annotations

from torch import Tensor


def itd_loss_terms(
    eps: Tensor, eps_hat: Tensor, weight: Tensor, mmse_g: Tensor, entropy: float
) -> tuple[Tensor, Tensor]:
    """(surrogate, value): ½·mean(w‖ε − ε̂‖²) to differentiate, and H_G + ½·mean(w(‖ε − ε̂‖² − mmse_G(γ))) in nats.

    The value is an unbiased estimate of the truncated integral (C1) over the batch; its gradient equals the
    surrogate's, since H_G and mmse_G carry none. No clamp of any kind is applied (spec §8).
    """
    mse = ((eps - eps_hat) ** 2).flatten(1).sum(1)
    w = weight.to(mse.dtype)
    surrogate = 0.5 * (w * mse).mean()
    value = entropy + 0.5 * (weight * (mse.detach().double() - mmse_g)).mean()
    return surrogate, value
