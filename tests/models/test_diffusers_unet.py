"""The diffusers UNet2DModel adapter: sizes, time maps, conversions, loading and errors (spec models.md §3-§5)."""

from __future__ import annotations

import fractions
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from standins import DDPM_SCHEDULER, DDPM_SMALL
from torch import Tensor

from itdcli.errors import ItdError
from itdcli.models.diffusers_unet import (
    DDPM_CIFAR10_UNET,
    DiffusersDenoiser,
    is_diffusers_dir,
    load_diffusers,
    logsnr_table,
    reference_alphas_cumprod,
    reference_timesteps,
)

FULL_DDPM = {"_class_name": "UNet2DModel", **DDPM_CIFAR10_UNET}

SMALL_DDPM, SCHEDULER = DDPM_SMALL, DDPM_SCHEDULER


def _scheduler() -> Any:
    """The spec §3.1 DDPMScheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)


@pytest.fixture(scope="module")
def small_unet() -> Any:
    """The DDPM-small stand-in (spec §5) with a fixed seed, in eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**SMALL_DDPM).eval()


@pytest.fixture(scope="module")
def folders(small_unet: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stand-in saved flat as safetensors, flat as .bin, and in a pipeline layout."""
    root = tmp_path_factory.mktemp("ddpm-small")
    flat_st, flat_bin, pipe = root / "st", root / "bin", root / "pipe"
    small_unet.save_pretrained(flat_st)
    small_unet.save_pretrained(flat_bin, safe_serialization=False)
    small_unet.save_pretrained(pipe / "unet")
    for folder in (flat_st, flat_bin, pipe / "scheduler"):
        _scheduler().save_pretrained(folder)
    return {"st": flat_st, "bin": flat_bin, "pipe": pipe}


@pytest.fixture(scope="module")
def table() -> Tensor:
    """λ_t of the spec scheduler in float64."""
    return logsnr_table(_scheduler().alphas_cumprod)


@pytest.fixture(scope="module")
def standin(small_unet: Any) -> DiffusersDenoiser:
    """The adapter around the in-memory stand-in."""
    return DiffusersDenoiser(small_unet, _scheduler().alphas_cumprod)


def _copy(src: Path, dst: Path) -> Path:
    """A private copy of a saved folder for a test to break."""
    return Path(shutil.copytree(src, dst))


# --- sizes and loading ---------------------------------------------------------------------------


def test_full_size_ddpm_config_has_spec_parameter_count() -> None:
    from diffusers import UNet2DModel

    with torch.device("meta"):
        model = UNet2DModel.from_config(FULL_DDPM)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 35_746_307
    assert len(params) == 328


def test_standin_loads_identically_from_safetensors_bin_and_pipeline(folders: dict[str, Path], small_unet: Any) -> None:
    assert sum(p.numel() for p in small_unet.parameters()) == 702_499
    assert (folders["st"] / "diffusion_pytorch_model.safetensors").is_file()
    assert (folders["bin"] / "diffusion_pytorch_model.bin").is_file()
    models = [load_diffusers(folders[k]) for k in ("st", "bin", "pipe")]
    z = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([-4.0, 0.5, 7.0], dtype=torch.float64)
    with torch.no_grad():
        outs = [m(z, gamma) for m in models]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert outs[0].shape == z.shape and outs[0].std() > 0.05
    first = models[0]
    assert (first.family, first.prediction_type, first.input_shape) == ("diffusers", "epsilon", (3, 32, 32))
    assert not first.training and not first.train().training


def test_is_diffusers_dir(folders: dict[str, Path], tmp_path: Path) -> None:
    assert is_diffusers_dir(folders["st"]) and is_diffusers_dir(str(folders["pipe"]))
    assert not is_diffusers_dir(tmp_path)
    assert not is_diffusers_dir(folders["st"] / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert not is_diffusers_dir(tmp_path)


def test_hub_id_loads_from_the_local_cache_only(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--itd-test--ddpm-small"
    commit = "0" * 40
    shutil.copytree(folders["st"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_diffusers("itd-test/ddpm-small")
    assert model.input_shape == (3, 32, 32)


# --- time maps -----------------------------------------------------------------------------------


def test_trained_logsnr_is_scheduler_range(standin: DiffusersDenoiser) -> None:
    low, high = standin.trained_logsnr
    assert low == pytest.approx(-10.1177, abs=1e-4) and high == pytest.approx(9.2101, abs=1e-4)


def test_exact_map_is_monotone_and_hits_integer_steps(standin: DiffusersDenoiser, table: Tensor) -> None:
    grid = torch.linspace(-14.0, 14.0, 4001, dtype=torch.float64)
    t = standin.timesteps(grid)
    assert bool(torch.all(torch.diff(t) <= 0)) and t.min() == 0 and t.max() == 999
    assert torch.equal(standin.timesteps(table), torch.arange(1000, dtype=torch.float64))


@pytest.mark.parametrize(
    ("gamma", "expected"), [(-6.129, 777.04), (0.0, 258.09), (6.261, 9.04), (9.2102, 0.0), (18.65, 0.0)]
)
def test_exact_map_spec_examples(standin: DiffusersDenoiser, gamma: float, expected: float) -> None:
    t = standin.timesteps(torch.tensor([gamma], dtype=torch.float64))
    assert float(t[0]) == pytest.approx(expected, abs=0.01)


def test_adapter_equals_raw_unet_at_table_logsnrs(standin: DiffusersDenoiser, small_unet: Any, table: Tensor) -> None:
    steps = torch.tensor([0, 1, 137, 500, 998, 999])
    z = torch.randn(len(steps), 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = standin(z, table[steps])
        raw = small_unet(z, steps.to(torch.float32)).sample
    torch.testing.assert_close(ours, raw, rtol=0, atol=1e-6)


def test_batch_of_distinct_logsnrs_equals_per_sample(standin: DiffusersDenoiser) -> None:
    gamma = torch.tensor([-9.0, -2.5, 0.0, 3.3, 8.0], dtype=torch.float64)
    z = torch.randn(len(gamma), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = standin(z, gamma)
        single = torch.cat([standin(z[i : i + 1], gamma[i : i + 1]) for i in range(len(gamma))])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)
    assert (batch[0] - batch[-1]).abs().max() > 1e-3


def test_reference_map_offsets_and_brute_force(table: Tensor) -> None:
    fine = reference_alphas_cumprod()
    steps = torch.tensor([0, 100, 500, 900])
    offsets = reference_timesteps(table[steps], fine) - steps
    torch.testing.assert_close(offsets, torch.tensor([0.8, 0.5, 1.4, 3.3], dtype=torch.float64), rtol=0, atol=1e-9)
    gamma = torch.linspace(-12.0, 13.0, 501, dtype=torch.float64)
    brute = torch.argmin((fine[None, :] - torch.sigmoid(gamma)[:, None]).abs(), dim=1).to(torch.float64) * 0.1
    assert torch.equal(reference_timesteps(gamma, fine), brute)


# --- prediction-type conversions with a network that knows the truth -----------------------------


class _Truth(torch.nn.Module):
    """A fake UNet that returns the true ε, v or x for a known (x, ε, γ), optionally with variance channels."""

    def __init__(self, x: Tensor, eps: Tensor, gamma: Tensor, kind: str, learned_variance: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=3, sample_size=[8, 8], out_channels=6 if learned_variance else 3)
        a, b = (torch.sigmoid(s * gamma).sqrt().view(-1, 1, 1, 1) for s in (1.0, -1.0))
        truth = {"epsilon": eps, "v_prediction": a * eps - b * x, "sample": x}[kind]
        self.truth = truth.to(torch.float32)
        self.learned_variance = learned_variance
        self.seen: list[Tensor] = []

    def forward(self, z: Tensor, t: Tensor) -> SimpleNamespace:
        self.seen.append(t)
        out = torch.cat([self.truth, torch.full_like(self.truth, 7.0)], 1) if self.learned_variance else self.truth
        return SimpleNamespace(sample=out)


def _channel_case() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Known x, ε, γ (one per sample) and z = a x + b ε, with z rounded to float32."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    gamma = torch.tensor([-5.0, -1.0, 2.0, 5.0], dtype=torch.float64)
    a, b = (torch.sigmoid(s * gamma).sqrt().view(-1, 1, 1, 1) for s in (1.0, -1.0))
    return x, eps, gamma, (a * x + b * eps).to(torch.float32)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_prediction_types_convert_to_epsilon(kind: str, learned_variance: bool) -> None:
    x, eps, gamma, z = _channel_case()
    net = _Truth(x, eps, gamma, kind, learned_variance)
    abar = _scheduler().alphas_cumprod
    denoiser = DiffusersDenoiser(net, abar, prediction_type=kind)
    eps_hat = denoiser(z, gamma)
    assert eps_hat.dtype == torch.float32 and eps_hat.shape == z.shape
    torch.testing.assert_close(eps_hat.to(torch.float64), eps, rtol=0, atol=2e-5)
    (t,) = net.seen
    assert t.dtype == torch.float32 and t.shape == (4,) and denoiser.input_shape == (3, 8, 8)


def test_reference_time_map_feeds_fine_grid_steps(table: Tensor) -> None:
    x, eps, _, _ = _channel_case()
    steps = torch.tensor([0, 100, 500, 900])
    net = _Truth(x, eps, table[steps], "epsilon")
    denoiser = DiffusersDenoiser(net, _scheduler().alphas_cumprod, time_map="reference")
    denoiser(torch.zeros(4, 3, 8, 8), table[steps])
    expected = torch.tensor([0.8, 100.5, 501.4, 903.3])
    torch.testing.assert_close(net.seen[0], expected, rtol=0, atol=1e-4)


def test_out_of_range_message(standin: DiffusersDenoiser) -> None:
    assert standin.out_of_range(-9.0, 9.0) is None
    message = standin.out_of_range(-6.13, 18.65)
    assert message is not None and "\n" not in message
    assert "clamped" in message and "extrapolat" in message and "upper bound" in message


def test_bad_options_raise() -> None:
    abar = _scheduler().alphas_cumprod
    x, eps, gamma, _ = _channel_case()
    with pytest.raises(ItdError, match="prediction_type"):
        DiffusersDenoiser(_Truth(x, eps, gamma, "epsilon"), abar, prediction_type="flow")


# --- errors --------------------------------------------------------------------------------------


def test_missing_config_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ItdError, match=r"no config\.json"):
        load_diffusers(tmp_path)


def test_missing_path_and_uncached_repo_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ItdError, match="not a diffusers model folder"):
        load_diffusers(tmp_path / "nowhere" / "deep" / "x")
    with pytest.raises(ItdError, match=r"not a local folder.*download the repo first"):
        load_diffusers("itd-test-nobody/no-such-model-4f2a")


def test_wrong_class_is_explained(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["st"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ItdError, match="not a UNet2DModel"):
        load_diffusers(folder)


def test_missing_scheduler_is_explained(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["st"], tmp_path / "m")
    (folder / "scheduler_config.json").unlink()
    with pytest.raises(ItdError, match="no scheduler config"):
        load_diffusers(folder)


@pytest.mark.parametrize("source", ["st", "bin"])
def test_garbage_weights_are_explained(folders: dict[str, Path], tmp_path: Path, source: str) -> None:
    folder = _copy(folders[source], tmp_path / "m")
    weights = next(folder.glob("diffusion_pytorch_model.*"))
    weights.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ItdError, match="corrupt or truncated"):
        load_diffusers(folder)


def test_missing_weights_are_explained(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["st"], tmp_path / "m")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ItdError, match="no weights"):
        load_diffusers(folder)


def test_bin_needing_unsafe_unpickling_is_refused(folders: dict[str, Path], small_unet: Any, tmp_path: Path) -> None:
    folder = _copy(folders["bin"], tmp_path / "m")
    payload = {**small_unet.state_dict(), "note": fractions.Fraction(1, 3)}
    torch.save(payload, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ItdError, match="unsafe unpickling"):
        load_diffusers(folder)


def test_weights_not_matching_config_are_explained(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["st"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 64]}))
    with pytest.raises(ItdError, match="cannot load the UNet"):
        load_diffusers(folder)
