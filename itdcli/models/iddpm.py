"""IDDPM (improved-diffusion) checkpoints as ε̂ = f(z, γ): cosine schedule, logSNR → time maps, safe loading (§2)."""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from itdcli.core.kinds import VarianceKind
from itdcli.errors import ItdError
from itdcli.models.base import DEFAULT_DISCRETE_TIME, DiscreteTime
from itdcli.models.iddpm_unet import IDDPMConfig, IDDPMUNet

__all__ = [
    "TRAINED_LOGSNR",
    "IDDPMConfig",
    "IDDPMDenoiser",
    "IDDPMUNet",
    "TimeMap",
    "cosine_alphas_cumprod",
    "infer_config",
    "is_iddpm_checkpoint",
    "load_iddpm",
    "read_state_dict",
    "t_net_exact",
    "t_net_reference",
]

TimeMap = Literal["exact", "reference", "logsnr"]
STEPS = 4000
COSINE_S = 0.008
MAX_BETA = 0.999
T_NET_MAX = 1000.0 * (STEPS - 1) / STEPS
SUFFIXES = (".pt", ".pth")
OTHER_NETWORKS = "itd loads openai/improved-diffusion UNet checkpoints; wrap other networks as module.path:attribute"
F64 = torch.float64


def _cosine_f(tau: Tensor, s: float = COSINE_S) -> Tensor:
    """f(τ) = cos²(((τ + s)/(1 + s))·π/2), the cosine schedule's ᾱ before normalisation (spec §2.3)."""
    return torch.cos((tau + s) / (1 + s) * (math.pi / 2)) ** 2


def cosine_alphas_cumprod(steps: int = STEPS) -> Tensor:
    """ᾱ_i = Π_{j≤i}(1 − β_j), β_i = min(1 − f((i+1)/T)/f(i/T), 0.999), in float64 (spec §2.3)."""
    f = _cosine_f(torch.arange(steps + 1, dtype=F64) / steps)
    betas = torch.clamp(1 - f[1:] / f[:-1], max=MAX_BETA)
    return torch.cumprod(1 - betas, dim=0)


def _trained_range() -> tuple[float, float]:
    """logSNR of the last unclipped step (i = T−2) and of the first step (i = 0) (spec §2.3)."""
    logsnr = torch.logit(cosine_alphas_cumprod())
    return float(logsnr[STEPS - 2]), float(logsnr[0])


TRAINED_LOGSNR: tuple[float, float] = _trained_range()


def _tau_c(logsnr: Tensor) -> Tensor:
    """Continuous time τ with f(τ)/f(0) = σ(γ), via arccos x = 2·arcsin√((1−x)/2) without cancellation (spec §2.3)."""
    g = torch.as_tensor(logsnr).to(F64)
    half = COSINE_S / (1 + COSINE_S) * (math.pi / 2)
    root = torch.sigmoid(g).sqrt()
    one_minus_x = 2 * math.sin(half / 2) ** 2 + math.cos(half) * torch.sigmoid(-g) / (1 + root)
    angle = 2 * torch.arcsin(torch.sqrt(one_minus_x / 2))
    return 2 * (1 + COSINE_S) / math.pi * angle - COSINE_S


def t_net_exact(logsnr: Tensor) -> Tensor:
    """Trained time input 1000·τ_c(γ) − 0.25, clamped to [0, 999.75], float64 per sample (spec §2.3)."""
    return torch.clamp(1000 * _tau_c(logsnr) - 1000 / STEPS, 0.0, T_NET_MAX)


def t_net_reference(logsnr: Tensor) -> Tensor:
    """The ITD reference's time input 1000·τ_c(γ), 0.25 later than the trained one (spec §2.3, §4 #1)."""
    return torch.clamp(1000 * _tau_c(logsnr), 0.0, 1000.0)


def t_net_logsnr(logsnr: Tensor) -> Tensor:
    """Unclamped affine time input 500 − 40γ for networks trained by itd on logSNR directly (no schedule)."""
    return 500.0 - 40.0 * torch.as_tensor(logsnr).to(F64)


TIME_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "exact": t_net_exact,
    "reference": t_net_reference,
    "logsnr": t_net_logsnr,
}


class IDDPMDenoiser(nn.Module):
    """ε̂ = f(z, γ) for an improved-diffusion UNet: per-sample float64 time map, ε channels only (spec §1, §2, §4)."""

    family = "iddpm"

    def __init__(self, unet: IDDPMUNet, time_map: TimeMap = "exact") -> None:
        """Wrap the network, pick the time map, and switch to eval mode (dropout 0.3, spec §2.4)."""
        super().__init__()
        if time_map not in TIME_MAPS:
            raise ItdError(f"unknown IDDPM time map '{time_map}': use one of {', '.join(get_args(TimeMap))}")
        cfg = unet.config
        self.unet = unet
        self.time_map: TimeMap = time_map
        self.input_shape: tuple[int, int, int] = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.trained_logsnr: tuple[float, float] = TRAINED_LOGSNR
        self.eval()

    def network_time(self, logsnr: Tensor) -> Tensor:
        """The time input the network receives for each logSNR, in float64."""
        return TIME_MAPS[self.time_map](logsnr)

    @property
    def discrete_time(self) -> DiscreteTime:
        """The checkpoint's cosine schedule (T = 4000); learned variance when the network has the extra channels.

        A network trained by itd on logSNR itself (time map `logsnr`) has no schedule of its own: the default.
        """
        if self.time_map not in ("exact", "reference"):
            return DEFAULT_DISCRETE_TIME
        learned = self.unet.config.out_channels == 2 * self.input_shape[0]
        variance: VarianceKind = "learned_range" if learned else "fixed_large"
        return DiscreteTime(cosine_alphas_cumprod(STEPS), variance, f"IDDPM cosine, T = {STEPS}, {variance}")

    def outputs(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor | None]:
        """ε̂ and, for a learned-variance checkpoint, the interpolation channels v (improved-diffusion's layout)."""
        channels = self.input_shape[0]
        if z.dim() != 4 or z.shape[1] != channels:
            raise ItdError(f"IDDPM model expects images shaped (B, {channels}, H, W), got {tuple(z.shape)}")
        dtype = next(self.unet.parameters()).dtype
        t = self.network_time(logsnr).to(device=z.device, dtype=torch.promote_types(dtype, torch.float32))
        out: Tensor = self.unet(z.to(dtype), t)
        if out.shape[1] != 2 * channels:
            return out.to(z.dtype), None
        return out[:, :channels].to(z.dtype), out[:, channels:].to(z.dtype)

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """ε̂ shaped and typed like z; channels split off only when the output has twice the input's (spec §4 #2)."""
        return self.outputs(z, logsnr)[0]


def is_iddpm_checkpoint(path: str | Path) -> bool:
    """Cheap routing test: does the name end in .pt or .pth."""
    return Path(path).suffix.lower() in SUFFIXES


def _convert_hint(path: Path) -> str:
    """How to turn a pickled model into a plain state_dict, to run only on a trusted file."""
    return (
        f"if you trust the file, load it yourself with torch.load('{path}', weights_only=False) "
        "and re-save model.state_dict() with torch.save"
    )


def _load_file(path: Path) -> Any:
    """torch.load with weights_only=True; unreadable or unsafe files become ItdError."""
    if not path.is_file():
        raise ItdError(f"checkpoint '{path}' does not exist or is not a file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ItdError(f"'{path}' is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ItdError(
            f"'{path}' holds pickled Python objects that need unsafe loading; itd refuses to unpickle "
            f"arbitrary objects for safety: {_convert_hint(path)}"
        ) from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        raise ItdError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(exc).__name__}: {first}); "
            "it may be truncated or corrupt: download or save it again"
        ) from exc


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The flat name → tensor mapping, looking inside a top-level 'state_dict' or 'model' entry."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ItdError(f"'{path}' holds {type(obj).__name__}, not a state_dict: save model.state_dict() instead")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ItdError(
            f"'{path}' is not a flat state_dict of tensors (entries {', '.join(bad[:3])}); save model.state_dict()"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Safely read a flat state_dict from a .pt/.pth file, stripping a DataParallel 'module.' prefix."""
    p = Path(path)
    return _unwrap(_load_file(p), p)


def _input_block_kinds(state: Mapping[str, Tensor]) -> list[tuple[str, int, bool]]:
    """(kind, width, has attention) of input blocks 1, 2, …: kind is 'res' or 'down'."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    kinds: list[tuple[str, int, bool]] = []
    for i in indices[1:]:
        res, down = state.get(f"input_blocks.{i}.0.out_layers.3.weight"), f"input_blocks.{i}.0.op.weight"
        if down in state:
            kinds.append(("down", int(state[down].shape[0]), False))
        elif res is not None:
            kinds.append(("res", int(res.shape[0]), f"input_blocks.{i}.1.qkv.weight" in state))
        else:
            raise ItdError(f"input_blocks.{i} is neither a residual block nor a downsample; {OTHER_NETWORKS}")
    return kinds


def _levels(kinds: list[tuple[str, int, bool]]) -> list[list[tuple[str, int, bool]]]:
    """Split the input blocks into resolution levels at each downsample."""
    levels: list[list[tuple[str, int, bool]]] = [[]]
    for kind in kinds:
        if kind[0] == "down":
            levels.append([])
        else:
            levels[-1].append(kind)
    return levels


def _require(state: Mapping[str, Tensor], key: str) -> Tensor:
    """A tensor every improved-diffusion UNet has, or ItdError naming it."""
    if key not in state:
        raise ItdError(f"state_dict has no '{key}', so it is not an improved-diffusion UNet; {OTHER_NETWORKS}")
    return state[key]


def infer_config(state: Mapping[str, Tensor], image_size: int = 32, num_heads: int = 4) -> IDDPMConfig:
    """The IDDPMConfig whose UNet has this state_dict's layout; image size and heads are not stored (spec §2.2, §5)."""
    stem, head = _require(state, "input_blocks.0.0.weight"), _require(state, "out.2.weight")
    mc = int(stem.shape[0])
    levels = _levels(_input_block_kinds(state))
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise ItdError(f"residual blocks per level {[len(lv) for lv in levels]} are uneven; {OTHER_NETWORKS}")
    widths = [level[0][1] for level in levels]
    if any(w % mc for w in widths):
        raise ItdError(f"level widths {widths} are not multiples of the base width {mc}; {OTHER_NETWORKS}")
    rates = tuple(2**n for n, level in enumerate(levels) if level[0][2])
    return IDDPMConfig(
        image_size=image_size,
        in_channels=int(stem.shape[1]),
        model_channels=mc,
        out_channels=int(head.shape[0]),
        num_res_blocks=counts.pop(),
        attention_resolutions=rates,
        channel_mult=tuple(w // mc for w in widths),
        num_heads=num_heads,
    )


def _mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str | None:
    """A one-line description of missing, unexpected or mis-shaped keys, or None when the layouts agree."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{label} {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if items
    ]
    return "; ".join(parts) or None


def build_unet(state: Mapping[str, Tensor], config: IDDPMConfig, path: str | Path = "state_dict") -> IDDPMUNet:
    """An IDDPMUNet holding exactly these weights (float32), or ItdError naming the keys that do not fit."""
    with torch.device("meta"):
        unet = IDDPMUNet(config)
    problem = _mismatch(unet.state_dict(), state)
    if problem:
        raise ItdError(f"'{path}' does not fit the improved-diffusion UNet layout: {problem}; {OTHER_NETWORKS}")
    weights = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    unet.load_state_dict(weights, strict=True, assign=True)
    return unet


def load_iddpm(
    path: str | Path, image_size: int = 32, time_map: TimeMap = "exact", num_heads: int = 4
) -> IDDPMDenoiser:
    """Load an improved-diffusion checkpoint safely and strictly as an eval-mode ε̂ = f(z, γ) (spec §2)."""
    state = read_state_dict(path)
    unet = build_unet(state, infer_config(state, image_size, num_heads), path)
    return IDDPMDenoiser(unet, time_map).eval()
