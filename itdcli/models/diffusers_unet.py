"""diffusers `UNet2DModel` networks (e.g. `google/ddpm-cifar10-32`) as ε̂ = f(z, γ) denoisers (spec models.md §3)."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import torch
from torch import Tensor

from itdcli.core.kinds import VarianceKind
from itdcli.errors import ItdError
from itdcli.models.base import DiscreteTime

TimeMap = Literal["exact", "reference"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

UNET_CLASS = "UNet2DModel"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
SCHEDULER_NAME = "scheduler_config.json"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# google/ddpm-cifar10-32 (spec models.md §3.1): its UNet2DModel config (35,746,307 parameters) and scheduler.
DDPM_CIFAR10_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
DDPM_CIFAR10_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "clip_sample": True,
    "variance_type": "fixed_large",
}

REF_STEPS = 10_000
REF_BETA = (1e-5, 2e-3)
REF_STEP_SIZE = 0.1

_M = TypeVar("_M", bound=torch.nn.Module)


# --- time maps (spec models.md §3.4) -------------------------------------------------------------


def logsnr_table(alphas_cumprod: Tensor) -> Tensor:
    """λ_t = log(ᾱ_t/(1−ᾱ_t)) in float64 from a scheduler's ᾱ table, checked to fall strictly in t (§3.4)."""
    abar = alphas_cumprod.detach().to("cpu", torch.float64).reshape(-1)
    if abar.numel() < 2:
        raise ItdError("the scheduler's alphas_cumprod table has fewer than 2 steps: it cannot define a time map")
    lam = torch.log(abar) - torch.log1p(-abar)
    if not bool(torch.all(torch.diff(lam) < 0)):
        raise ItdError("the scheduler's log-SNR table is not strictly decreasing in t: it is not a diffusion schedule")
    return lam


def exact_timesteps(logsnr: Tensor, table: Tensor) -> Tensor:
    """Fractional t by linear interpolation of t over the decreasing table λ_t, clamped to [0, T−1] (§3.4)."""
    neg = (-table).to(logsnr.device)
    query = (-logsnr.to(torch.float64)).clamp(float(neg[0]), float(neg[-1]))
    upper = torch.searchsorted(neg, query, right=True).clamp(1, neg.numel() - 1)
    lower = upper - 1
    frac = (query - neg[lower]) / (neg[upper] - neg[lower])
    return lower.to(torch.float64) + frac


def reference_alphas_cumprod() -> Tensor:
    """The reference wrapper's fine table ᾱ′ = cumprod(1 − linspace(1e-5, 2e-3, 10 000)) in float64 (§3.4)."""
    betas = torch.linspace(REF_BETA[0], REF_BETA[1], REF_STEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def reference_timesteps(logsnr: Tensor, fine_abar: Tensor) -> Tensor:
    """The ITD reference's map t = 0.1·argmin_k |ᾱ′_k − σ(γ)| (first k on ties), for reproducing the paper (§3.4)."""
    abar = fine_abar.to(logsnr.device)
    target = torch.sigmoid(logsnr.to(torch.float64))
    above = torch.searchsorted(-abar, -target).clamp(0, abar.numel() - 1)
    below = (above - 1).clamp(min=0)
    pick_below = (abar[below] - target).abs() <= (abar[above] - target).abs()
    return torch.where(pick_below, below, above).to(torch.float64) * REF_STEP_SIZE


def channel_gains(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """a = √σ(γ), b = √σ(−γ) in float64 (math.md §3)."""
    gamma = logsnr.to(torch.float64)
    return torch.sigmoid(gamma).sqrt(), torch.sigmoid(-gamma).sqrt()


def to_epsilon(out: Tensor, z: Tensor, logsnr: Tensor, prediction_type: str) -> Tensor:
    """ε̂ from an ε-, v- (v = aε − bx, so ε = a·v + b·z) or x-prediction (ε = (z − a·x̂)/b), in float64 (math.md §3)."""
    if prediction_type == "epsilon":
        return out
    a, b = (g.to(z.device).view(-1, *([1] * (z.dim() - 1))) for g in channel_gains(logsnr))
    pred, noisy = out.to(torch.float64), z.to(torch.float64)
    if prediction_type == "v_prediction":
        return (a * pred + b * noisy).to(out.dtype)
    return ((noisy - a * pred) / b).to(out.dtype)


# --- the adapter (spec models.md §1, §3) ---------------------------------------------------------


def _config_value(config: Any, key: str) -> Any:
    """A key of a diffusers config, read as an attribute (FrozenDict and namespaces) or an item."""
    if hasattr(config, key):
        return getattr(config, key)
    return config[key]


def _input_shape(config: Any) -> tuple[int, int, int]:
    """(C, H, W) from a UNet config's in_channels and sample_size (an int or an (H, W) pair) (§3.1)."""
    size = _config_value(config, "sample_size")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return int(_config_value(config, "in_channels")), int(height), int(width)


class DiffusersDenoiser(torch.nn.Module):
    """ε̂(z, γ) from a diffusers UNet2DModel and its scheduler's ᾱ table, always in eval mode (spec models.md §1, §3)."""

    family = "diffusers"

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: Tensor,
        *,
        prediction_type: str = "epsilon",
        time_map: TimeMap = "exact",
        variance: str = "fixed_small",
    ) -> None:
        """Keep the UNet, the float64 log-SNR table λ_t and the chosen time map; check the options (§3.4)."""
        super().__init__()
        if prediction_type not in get_args(PredictionType):
            raise ItdError(f"unsupported prediction_type '{prediction_type}': use epsilon, v_prediction or sample")
        if time_map not in get_args(TimeMap):
            raise ItdError(f"unknown time map '{time_map}': use 'exact' (default) or 'reference'")
        if variance not in get_args(VarianceKind):
            raise ItdError(f"unsupported variance_type '{variance}': itd knows {', '.join(get_args(VarianceKind))}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.variance: VarianceKind = cast(VarianceKind, variance)
        self.time_map: TimeMap = time_map
        self.logsnr_table = logsnr_table(alphas_cumprod)
        self.fine_abar = reference_alphas_cumprod() if time_map == "reference" else None
        self.input_shape = _input_shape(cast(Any, unet).config)
        self.trained_logsnr = (float(self.logsnr_table[-1]), float(self.logsnr_table[0]))
        self.eval()

    def train(self: _M, mode: bool = True) -> _M:
        """Stay in eval mode whatever is asked (spec models.md §1)."""
        return torch.nn.Module.train(self, False)

    def timesteps(self, logsnr: Tensor) -> Tensor:
        """The network's float64 time input for each γ under the chosen map (§3.4)."""
        gamma = logsnr.detach().to(torch.float64).reshape(-1)
        if self.fine_abar is not None:
            return reference_timesteps(gamma, self.fine_abar)
        return exact_timesteps(gamma, self.logsnr_table)

    @property
    def discrete_time(self) -> DiscreteTime:
        """The scheduler's ᾱ table and its variance_type, for the variational bound."""
        abar = torch.sigmoid(self.logsnr_table)
        return DiscreteTime(abar, self.variance, f"diffusers scheduler, T = {abar.numel()}, {self.variance}")

    def outputs(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor | None]:
        """ε̂ and, for a learned-variance UNet (twice the input's channels), the interpolation channels v."""
        gamma = logsnr.detach().to(torch.float64).reshape(-1).expand(z.shape[0])
        t = self.timesteps(gamma).to(device=z.device, dtype=torch.float32)
        out: Tensor = self.unet(z, t).sample
        v = None
        if out.shape[1] == 2 * z.shape[1]:
            out, v = out[:, : z.shape[1]], out[:, z.shape[1] :]
        return to_epsilon(out, z, gamma, self.prediction_type), v

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """ε̂ for z (B, C, H, W) on the [−1, 1] scale and one logSNR per sample (B,) (spec models.md §1)."""
        return self.outputs(z, logsnr)[0]

    def out_of_range(self, lo: float, hi: float) -> str | None:
        """One line for the integrator to print when [lo, hi] leaves the trained logSNR range (§3.4)."""
        low, high = self.trained_logsnr
        if lo >= low and hi <= high:
            return None
        return (
            f"logSNR range [{lo:.3f}, {hi:.3f}] goes beyond this diffusers model's trained range "
            f"[{low:.3f}, {high:.3f}]: there the timestep is clamped to the schedule's end and the network "
            "extrapolates, so the integrand is the model's clamped behaviour (the estimate stays a valid upper "
            "bound, but a looser one)"
        )


# --- folders and weights (spec models.md §3.1, §3.3) ---------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from disk, or a one-line error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ItdError(f"cannot read '{path}' as JSON ({_first_line(exc)}): re-download or re-save the model") from exc
    if not isinstance(data, dict):
        raise ItdError(f"'{path}' is not a JSON object: re-download or re-save the model")
    return data


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _class_name(config_path: Path) -> str | None:
    """The `_class_name` of a diffusers config, or None when unreadable."""
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def is_diffusers_dir(path: str | os.PathLike[str]) -> bool:
    """A folder whose config.json names UNet2DModel, or a pipeline folder with unet/config.json (§3.1)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    return _class_name(folder / "config.json") == UNET_CLASS or (folder / "unet" / "config.json").is_file()


def _unet_dir(root: Path) -> Path:
    """The folder holding the UNet's config.json: the root (flat layout) or root/unet (pipeline layout)."""
    if (root / "config.json").is_file():
        return root
    if (root / "unet" / "config.json").is_file():
        return root / "unet"
    raise ItdError(
        f"'{root}' is not a diffusers model folder: it has no config.json (expected config.json with "
        f"{SAFETENSORS_NAME} and {SCHEDULER_NAME}, or a pipeline folder with unet/ and scheduler/)"
    )


def _check_unet_class(unet_dir: Path) -> None:
    """Refuse configs of any class other than UNet2DModel (§3.1)."""
    name = _read_json(unet_dir / "config.json").get("_class_name")
    if name != UNET_CLASS:
        raise ItdError(
            f"'{unet_dir / 'config.json'}' describes a {name or 'model of unknown class'}, not a {UNET_CLASS}: "
            "itd's diffusers loader takes unconditional UNet2DModel networks only"
        )


def _scheduler_dir(root: Path, unet_dir: Path) -> Path:
    """The folder holding scheduler_config.json: beside the UNet config, or root/scheduler (§3.1)."""
    for folder in (unet_dir, root, root / "scheduler"):
        if (folder / SCHEDULER_NAME).is_file():
            return folder
    raise ItdError(
        f"'{root}' has no scheduler config: put the training scheduler's {SCHEDULER_NAME} beside config.json "
        "(e.g. DDPMScheduler(...).save_pretrained(folder)) or in a scheduler/ subfolder"
    )


def _bin_shards(unet_dir: Path) -> list[Path]:
    """The pickled weight files: diffusion_pytorch_model.bin, or the shards its index lists."""
    single = unet_dir / BIN_NAME
    if single.is_file():
        return [single]
    index = unet_dir / f"{BIN_NAME}.index.json"
    if not index.is_file():
        return []
    weight_map = _read_json(index).get("weight_map", {})
    return sorted({unet_dir / str(name) for name in weight_map.values()})


def _has_safetensors(unet_dir: Path) -> bool:
    """Whether safetensors weights (single file or sharded index) are present."""
    return (unet_dir / SAFETENSORS_NAME).is_file() or (unet_dir / f"{SAFETENSORS_NAME}.index.json").is_file()


def _check_safetensors(unet_dir: Path) -> None:
    """Read the safetensors header, so a corrupt file gets a clear error before diffusers touches it."""
    from safetensors import safe_open

    path = unet_dir / SAFETENSORS_NAME
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:
        raise ItdError(
            f"weights file '{path}' is corrupt or truncated ({_first_line(exc)}): download it again"
        ) from exc


def _check_bin(path: Path) -> None:
    """Unpickle a .bin with weights_only=True (memory-mapped when possible): refuse anything beyond tensors."""
    mmap = zipfile.is_zipfile(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        if "Unsupported global" in str(exc):
            raise ItdError(
                f"weights file '{path}' needs unsafe unpickling (it stores Python objects, not only tensors) and itd "
                "refuses to run it: convert it to diffusion_pytorch_model.safetensors with a tool you trust"
            ) from exc
        raise ItdError(
            f"weights file '{path}' is corrupt or truncated ({_first_line(exc)}): download it again"
        ) from exc


def _check_weights(unet_dir: Path) -> bool:
    """Check the weights safely before diffusers loads them; True when they are safetensors (§3.3)."""
    if _has_safetensors(unet_dir):
        _check_safetensors(unet_dir)
        return True
    shards = _bin_shards(unet_dir)
    if not shards:
        raise ItdError(f"'{unet_dir}' has no weights: expected {SAFETENSORS_NAME} (or {BIN_NAME}) beside config.json")
    for shard in shards:
        if not shard.is_file():
            raise ItdError(f"weights shard '{shard}' is missing: download the model again")
        _check_bin(shard)
    return False


# --- loading (spec models.md §3.3) ---------------------------------------------------------------


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' informational warnings (accelerate, safetensors fallback) while loading."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _load_unet(unet_dir: Path) -> torch.nn.Module:
    """UNet2DModel.from_pretrained on a checked local folder, with failures as one-line errors (§3.3)."""
    from diffusers import UNet2DModel

    loader: Any = UNet2DModel.from_pretrained
    use_safetensors = _check_weights(unet_dir)
    try:
        with _quiet_diffusers():
            unet = loader(str(unet_dir), use_safetensors=use_safetensors, local_files_only=True)
    except Exception as exc:
        raise ItdError(
            f"cannot load the UNet from '{unet_dir}' ({_first_line(exc)}): check that the weights match config.json"
        ) from exc
    return cast(torch.nn.Module, unet)


def _load_scheduler(sched_dir: Path) -> tuple[Tensor, str, str]:
    """The ᾱ table, prediction_type and variance_type of whatever diffusers scheduler class the config names."""
    import diffusers

    name = str(_read_json(sched_dir / SCHEDULER_NAME).get("_class_name", ""))
    cls: Any = getattr(diffusers, name, None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ItdError(f"'{sched_dir / SCHEDULER_NAME}' names an unknown scheduler class '{name}': use DDPMScheduler")
    try:
        with _quiet_diffusers():
            scheduler = cls.from_pretrained(str(sched_dir), local_files_only=True)
    except Exception as exc:
        raise ItdError(f"cannot build {name} from '{sched_dir / SCHEDULER_NAME}' ({_first_line(exc)})") from exc
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, Tensor):
        raise ItdError(f"scheduler {name} has no alphas_cumprod table: itd needs a DDPM-style (VP) scheduler")
    config = scheduler.config
    return abar, str(config.get("prediction_type", "epsilon")), str(config.get("variance_type", "fixed_small"))


def _resolve_folder(path_or_repo: str | os.PathLike[str], local_files_only: bool) -> Path:
    """A local folder as is; an `owner/name` Hub id through the Hugging Face cache (§3.3)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(path_or_repo)
    if path.exists() or not REPO_ID.match(text):
        raise ItdError(f"'{text}' is not a diffusers model folder (nor an owner/name Hugging Face repo id)")
    return _snapshot(text, local_files_only)


def _snapshot(repo_id: str, local_files_only: bool) -> Path:
    """The snapshot folder of a Hub repo: from the cache only, unless local_files_only=False (§3.3)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=local_files_only, allow_patterns=patterns))
        if not local_files_only and not _has_weights_somewhere(folder):
            folder = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "*.bin"]))
    except Exception as exc:
        raise _snapshot_error(repo_id, local_files_only, exc) from exc
    return folder


def _has_weights_somewhere(folder: Path) -> bool:
    """Whether a downloaded snapshot has safetensors weights, flat or under unet/."""
    return _has_safetensors(folder) or _has_safetensors(folder / "unet")


def _snapshot_error(repo_id: str, local_files_only: bool, exc: Exception) -> ItdError:
    """The one-line error for a Hub id that could not be resolved (offline cache miss or download failure)."""
    if local_files_only:
        return ItdError(
            f"'{repo_id}' is not a local folder and no Hugging Face repo of that id is in the local cache "
            f"({_first_line(exc)}): check the path, or download the repo first (loading is offline)"
        )
    return ItdError(f"cannot download Hugging Face repo '{repo_id}' ({_first_line(exc)}): check the id and network")


def load_diffusers(
    path_or_repo: str | os.PathLike[str],
    *,
    time_map: TimeMap = "exact",
    local_files_only: bool = True,
) -> DiffusersDenoiser:
    """A DiffusersDenoiser from a flat or pipeline folder, or a cached Hub id like google/ddpm-cifar10-32 (§3.3)."""
    root = _resolve_folder(path_or_repo, local_files_only)
    unet_dir = _unet_dir(root)
    _check_unet_class(unet_dir)
    sched_dir = _scheduler_dir(root, unet_dir)
    abar, prediction_type, variance = _load_scheduler(sched_dir)
    unet = _load_unet(unet_dir)
    return DiffusersDenoiser(unet, abar, prediction_type=prediction_type, time_map=time_map, variance=variance)
