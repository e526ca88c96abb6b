"""Unit conversions: nats per image to bits per dimension (spec §1, §2)."""

import math


def bits_per_dim(nats: float, dim: int) -> float:
    """bits/dim = nats / (d ln 2)."""
    return nats / (dim * math.log(2))


def log2_inverse_bin(levels: int) -> float:
    """log₂(1/δ) with δ = 2/(L−1): the continuous-to-discrete offset in bits/dim (spec §2)."""
    return math.log2((levels - 1) / 2)
