"""The named choices of the estimators and the runtime, as types (no torch: the CLI reads them for its help)."""

from __future__ import annotations

import math
from typing import Literal

PAPER_SCALE_CONSTANT = 3 / math.pi  # c in scale = √(1 + c·Var log λ), the reference code's (spec §6.2)

Selection = Literal["crossfit", "same", "none"]
PointScheme = Literal["stratified", "iid"]
BaseProposalKind = Literal["logistic", "uniform"]
ProposalKind = Literal["logistic", "uniform", "adaptive"]
PrecisionName = Literal["auto", "fp32", "policy", "bf16"]
Rounding = Literal["soft", "hard"]
EstimatorChoice = Literal["continuous", "discrete", "dequantized", "vlb", "ode", "immse", "all"]
# What --estimator offers, in the order of its help, with a gloss where the name alone does not say it
ESTIMATOR_HELP: dict[str, str] = {
    "continuous": "",
    "discrete": "",
    "dequantized": "",
    "vlb": "variational bound",
    "ode": "probability-flow ODE",
    "immse": "every I-MMSE one",
    "all": "",
}
VarianceKind = Literal["learned_range", "fixed_large", "fixed_small"]  # a discrete-time model's p(x_{t−1}|x_t)
TimeMapName = Literal["exact", "reference"]
# The registered model names (`REGISTRY` in models/registry.py), in the order of --model's help
MODEL_NAMES = ("gaussian", "digits", "iddpm", "iddpm-hybrid", "ddpm")
