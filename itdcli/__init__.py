"""itd: exact-as-possible diffusion likelihoods through the information-theoretic MMSE integral.

The public API is imported lazily so that `itd --help` never pays for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from itdcli.api.curve import curve
    from itdcli.api.ensemble import EnsembleResult, ensemble
    from itdcli.api.finetune import FinetuneOptions, FinetuneResult, finetune
    from itdcli.api.nll import nll
    from itdcli.api.options import NllOptions
    from itdcli.api.results import CurveResult, NllResult
    from itdcli.core.gaussian import GaussianReference
    from itdcli.data import Dataset, load_data
    from itdcli.errors import ItdError
    from itdcli.models import Denoiser, load_model

_EXPORTS = {
    "nll": "itdcli.api.nll",
    "NllOptions": "itdcli.api.options",
    "curve": "itdcli.api.curve",
    "ensemble": "itdcli.api.ensemble",
    "EnsembleResult": "itdcli.api.ensemble",
    "finetune": "itdcli.api.finetune",
    "FinetuneOptions": "itdcli.api.finetune",
    "FinetuneResult": "itdcli.api.finetune",
    "NllResult": "itdcli.api.results",
    "CurveResult": "itdcli.api.results",
    "GaussianReference": "itdcli.core.gaussian",
    "Dataset": "itdcli.data",
    "load_data": "itdcli.data",
    "ItdError": "itdcli.errors",
    "Denoiser": "itdcli.models",
    "load_model": "itdcli.models",
}
__all__ = [
    "CurveResult",
    "Dataset",
    "Denoiser",
    "EnsembleResult",
    "FinetuneOptions",
    "FinetuneResult",
    "GaussianReference",
    "ItdError",
    "NllOptions",
    "NllResult",
    "curve",
    "ensemble",
    "finetune",
    "load_data",
    "load_model",
    "nll",
]


def __getattr__(name: str) -> Any:
    """Import public names on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'itdcli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
