"""IDDPM UNet layout, time maps and safe loading against the numbers of spec models.md §2, §4, §5."""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itdcli.errors import ItdError
from itdcli.models.iddpm import (
    TRAINED_LOGSNR,
    IDDPMDenoiser,
    cosine_alphas_cumprod,
    infer_config,
    is_iddpm_checkpoint,
    load_iddpm,
    t_net_exact,
    t_net_reference,
)
from itdcli.models.iddpm_unet import (
    AttentionBlock,
    GroupNorm32,
    IDDPMConfig,
    IDDPMUNet,
    ResBlock,
    timestep_embedding,
)

F64 = torch.float64
SMALL = IDDPMConfig(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,))
TINY = IDDPMConfig(image_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2))


pytestmark = pytest.mark.usefixtures("single_thread")


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised output layers small normal weights so that the network computes something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_layers.3.weight", "proj_out.weight", "out.2.weight")):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("out_layers.3.bias", "proj_out.bias", "out.2.bias")):
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _unet(config: IDDPMConfig = TINY, seed: int = 0) -> IDDPMUNet:
    torch.manual_seed(seed)
    unet = IDDPMUNet(config)
    _randomise(unet, seed)
    return unet


def _saved(tmp_path: Path, unet: IDDPMUNet, name: str = "x.pt") -> Path:
    path = tmp_path / name
    torch.save(unet.state_dict(), path)
    return path


def _inputs(n: int = 3, seed: int = 1, size: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.linspace(-5.0, 9.0, n, dtype=F64)


@pytest.fixture(scope="module")
def cifar_state() -> dict[str, Tensor]:
    """The full-size CIFAR-10 layout on the meta device: shapes without memory."""
    with torch.device("meta"):
        return IDDPMUNet(IDDPMConfig.cifar10()).state_dict()


def _block_params(state: dict[str, Tensor], prefix: str) -> int:
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix + "."))


# --- layout: spec §2.2 and §5 ---------------------------------------------------------------------------------


def test_full_size_has_446_tensors_and_52_546_438_parameters(cifar_state: dict[str, Tensor]) -> None:
    assert len(cifar_state) == 446
    assert sum(v.numel() for v in cifar_state.values()) == 52_546_438


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("time_embed.0.weight", (512, 128)),
        ("time_embed.2.weight", (512, 512)),
        ("input_blocks.0.0.weight", (128, 3, 3, 3)),
        ("input_blocks.1.0.in_layers.0.weight", (128,)),
        ("input_blocks.1.0.in_layers.2.weight", (128, 128, 3, 3)),
        ("input_blocks.1.0.emb_layers.1.weight", (256, 512)),
        ("input_blocks.1.0.out_layers.0.weight", (128,)),
        ("input_blocks.1.0.out_layers.3.weight", (128, 128, 3, 3)),
        ("input_blocks.4.0.op.weight", (128, 128, 3, 3)),
        ("input_blocks.5.0.skip_connection.weight", (256, 128, 1, 1)),
        ("input_blocks.5.0.emb_layers.1.weight", (512, 512)),
        ("input_blocks.5.1.norm.weight", (256,)),
        ("input_blocks.5.1.qkv.weight", (768, 256, 1)),
        ("input_blocks.5.1.qkv.bias", (768,)),
        ("input_blocks.5.1.proj_out.weight", (256, 256, 1)),
        ("middle_block.1.qkv.weight", (768, 256, 1)),
        ("middle_block.2.out_layers.3.weight", (256, 256, 3, 3)),
        ("output_blocks.0.0.in_layers.0.weight", (512,)),
        ("output_blocks.0.0.in_layers.2.weight", (256, 512, 3, 3)),
        ("output_blocks.0.0.skip_connection.weight", (256, 512, 1, 1)),
        ("output_blocks.3.1.conv.weight", (256, 256, 3, 3)),
        ("output_blocks.7.2.conv.weight", (256, 256, 3, 3)),
        ("output_blocks.11.2.conv.weight", (256, 256, 3, 3)),
        ("output_blocks.11.0.in_layers.2.weight", (256, 384, 3, 3)),
        ("output_blocks.12.0.in_layers.2.weight", (128, 384, 3, 3)),
        ("output_blocks.12.0.emb_layers.1.weight", (256, 512)),
        ("output_blocks.13.0.skip_connection.weight", (128, 256, 1, 1)),
        ("out.0.weight", (128,)),
        ("out.2.weight", (6, 128, 3, 3)),
    ],
)
def test_full_size_key_shapes(cifar_state: dict[str, Tensor], key: str, shape: tuple[int, ...]) -> None:
    assert tuple(cifar_state[key].shape) == shape


@pytest.mark.parametrize(
    ("prefix", "count"),
    [
        ("input_blocks.0", 3_584),
        ("input_blocks.2", 427_008),
        ("input_blocks.4", 147_584),
        ("input_blocks.5", 1_445_376),
        ("input_blocks.10", 1_707_520),
        ("input_blocks.12", 590_080),
        ("input_blocks.15", 1_443_840),
        ("middle_block", 3_151_360),
        ("output_blocks.1", 2_165_504),
        ("output_blocks.3", 2_755_584),
        ("output_blocks.5", 2_429_184),
        ("output_blocks.7", 3_019_264),
        ("output_blocks.11", 2_691_328),
        ("output_blocks.12", 771_712),
        ("output_blocks.15", 607_616),
        ("time_embed", 328_704),
        ("out", 7_174),
    ],
)
def test_full_size_block_parameter_counts(cifar_state: dict[str, Tensor], prefix: str, count: int) -> None:
    assert _block_params(cifar_state, prefix) == count


def test_full_size_has_no_block_beyond_the_table(cifar_state: dict[str, Tensor]) -> None:
    assert not any(k.startswith(("input_blocks.16.", "output_blocks.16.")) for k in cifar_state)
    attention = {k.rsplit(".", 2)[0] for k in cifar_state if k.endswith("qkv.weight")}
    assert len(attention) == 15
    assert "input_blocks.13.1" not in attention and "input_blocks.3.1" not in attention


@pytest.mark.parametrize(("mult", "count"), [((1, 2, 2, 2), 1_629_478), ((1, 2), 757_030)])
def test_small_stand_in_parameter_counts(mult: tuple[int, ...], count: int) -> None:
    with torch.device("meta"):
        unet = IDDPMUNet(
            IDDPMConfig(32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=mult)
        )
    assert sum(p.numel() for p in unet.parameters()) == count


@pytest.mark.parametrize(
    "config",
    [
        IDDPMConfig.cifar10(),
        SMALL,
        IDDPMConfig(16, 1, 64, 1, num_res_blocks=2, attention_resolutions=(2,), channel_mult=(1, 3)),
        IDDPMConfig(32, model_channels=32, num_res_blocks=1, attention_resolutions=(), channel_mult=(2, 1, 2)),
    ],
)
def test_infer_config_recovers_the_layout(config: IDDPMConfig) -> None:
    with torch.device("meta"):
        state = IDDPMUNet(config).state_dict()
    assert infer_config(state, image_size=config.image_size) == config


@pytest.mark.parametrize(
    "config",
    [
        IDDPMConfig(32, model_channels=48),
        IDDPMConfig(32, model_channels=32, num_heads=3),
        IDDPMConfig(20, model_channels=32),
    ],
)
def test_unbuildable_configs_are_user_errors(config: IDDPMConfig) -> None:
    with pytest.raises(ItdError):
        IDDPMUNet(config)


def test_fresh_network_outputs_zero_until_reinitialised() -> None:
    torch.manual_seed(0)
    unet = IDDPMUNet(TINY).eval()
    z, g = _inputs()
    assert torch.count_nonzero(unet(z, t_net_exact(g).float())) == 0
    assert torch.count_nonzero(_randomise(unet)(z, t_net_exact(g).float())) > 0


# --- building blocks against independent computations ---------------------------------------------------------


def _group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int = 32) -> Tensor:
    """GroupNorm by hand in float64: biased variance over each group of channels and all positions."""
    b, c = x.shape[:2]
    xg = x.to(F64).reshape(b, groups, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    normed = ((xg - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return normed * weight.to(F64).reshape(shape) + bias.to(F64).reshape(shape)


def test_attention_uses_the_legacy_per_head_layout() -> None:
    channels, heads = 64, 4
    torch.manual_seed(3)
    block = AttentionBlock(channels, heads)
    _randomise(block)
    with torch.no_grad():
        block.norm.weight.normal_(1.0, 0.2)
        block.norm.bias.normal_(0.0, 0.2)
    x = torch.randn(2, channels, 3, 2)
    flat = x.reshape(2, channels, 6).to(F64)
    normed = _group_norm(flat, block.norm.weight, block.norm.bias)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0].to(F64), normed) + block.qkv.bias.to(F64)[:, None]
    c = channels // heads
    legacy = [[h * 3 * c + j * c for h in range(heads)] for j in range(3)]  # q_h, k_h, v_h start at h·3c + j·c
    modern = [[j * channels + h * c for h in range(heads)] for j in range(3)]  # q, k, v first, then heads
    expected = _manual_attention(block, flat, qkv, legacy, c).reshape(x.shape)
    other = _manual_attention(block, flat, qkv, modern, c).reshape(x.shape)
    with torch.no_grad():
        out = block(x).to(F64)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    assert (out - other).abs().max() > 1e-3


def _manual_attention(block: AttentionBlock, flat: Tensor, qkv: Tensor, starts: list[list[int]], c: int) -> Tensor:
    """Per-head softmax(q·k/√c) v with q, k, v of head h at channels starts[j][h]…+c, then proj_out and residual."""
    outs = []
    for sq, sk, sv in zip(*starts, strict=True):
        q, k, v = qkv[:, sq : sq + c], qkv[:, sk : sk + c], qkv[:, sv : sv + c]
        attn = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", attn, v))
    weight, bias = block.proj_out.weight.detach()[:, :, 0].to(F64), block.proj_out.bias.detach().to(F64)
    return flat + torch.einsum("oc,bct->bot", weight, torch.cat(outs, dim=1)) + bias[:, None]


def test_resblock_scale_shift_norm_by_hand() -> None:
    torch.manual_seed(4)
    block = ResBlock(32, 64, emb_channels=16, dropout=0.3)
    _randomise(block).eval()
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    conv_in, lin, conv_out = block.in_layers[2], block.emb_layers[1], block.out_layers[3]
    gn_in, gn_out, skip = block.in_layers[0], block.out_layers[0], block.skip_connection
    h = F.conv2d(F.silu(_group_norm(x, gn_in.weight, gn_in.bias).float()), conv_in.weight, conv_in.bias, padding=1)
    e = F.linear(F.silu(emb), lin.weight, lin.bias)
    scale, shift = e[:, :64, None, None], e[:, 64:, None, None]
    h = _group_norm(h, gn_out.weight, gn_out.bias).float() * (1 + scale) + shift
    expected = F.conv2d(x, skip.weight, skip.bias) + F.conv2d(F.silu(h), conv_out.weight, conv_out.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), expected, atol=1e-4, rtol=1e-4)


def test_group_norm_runs_in_float32_for_low_precision_inputs() -> None:
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.group_norm(x.float(), 32, eps=1e-5).to(torch.bfloat16))


def _record(module: nn.Module, pre: bool = False) -> list[Tensor]:
    """Record the module's first input (pre) or its output on every call."""
    seen: list[Tensor] = []
    if pre:
        module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    else:
        module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    return seen


def test_skip_concatenation_puts_h_first_and_skip_second() -> None:
    unet = _unet()
    z, g = _inputs(2)
    middle, last_in = _record(unet.middle_block), _record(unet.input_blocks[-1])
    first_out = _record(unet.output_blocks[0], pre=True)
    with torch.no_grad():
        unet(z, t_net_exact(g).float())
    width = middle[0].shape[1]
    torch.testing.assert_close(first_out[0][:, :width], middle[0])
    torch.testing.assert_close(first_out[0][:, width:], last_in[0])


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0.0, 1.5, 999.75], dtype=F64)
    emb = timestep_embedding(t, 128)
    freq1 = 10000 ** (-1 / 64)
    torch.testing.assert_close(emb[:, 0], torch.cos(t))
    torch.testing.assert_close(emb[:, 64], torch.sin(t))
    torch.testing.assert_close(emb[:, 1], torch.cos(t * freq1))
    torch.testing.assert_close(emb[:, 65], torch.sin(t * freq1))


# --- schedule and time maps: spec §2.3 -------------------------------------------------------------------------


def _alphas_cumprod_numpy(steps: int = 4000, s: float = 0.008) -> np.ndarray:
    """The cosine schedule by the β recursion with Python math, written independently of the code under test."""
    f = [math.cos((i / steps + s) / (1 + s) * math.pi / 2) ** 2 for i in range(steps + 1)]
    betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(steps)])
    return np.cumprod(1 - betas)


@pytest.fixture(scope="module")
def index_logsnr() -> Tensor:
    a = _alphas_cumprod_numpy()
    return torch.from_numpy(np.log(a) - np.log1p(-a))


def test_cosine_schedule_matches_the_recursion_and_anchors(index_logsnr: Tensor) -> None:
    a = cosine_alphas_cumprod()
    assert a.dtype == F64 and a.shape == (4000,)
    np.testing.assert_allclose(a.numpy(), _alphas_cumprod_numpy(), rtol=1e-12)
    assert a[0].item() == pytest.approx(0.9999901341811863, rel=1e-15)
    anchors = index_logsnr[[0, 1, 3998, 3999]].tolist()
    assert anchors == pytest.approx([11.5264, 10.8180, -15.7007, -22.6085], abs=1e-4)


def test_trained_range_is_first_to_last_unclipped_step() -> None:
    lo, hi = TRAINED_LOGSNR
    assert lo == pytest.approx(-15.70, abs=5e-3)
    assert hi == pytest.approx(11.53, abs=5e-3)
    assert (lo, hi) == pytest.approx((-15.7007, 11.5264), abs=1e-4)


def test_exact_map_hits_every_trained_index(index_logsnr: Tensor) -> None:
    t = t_net_exact(index_logsnr[:3999])
    assert t.dtype == F64
    expected = torch.arange(3999, dtype=F64) / 4
    assert (t - expected).abs().max().item() < 1e-9
    assert t_net_exact(index_logsnr[3999:]).item() == pytest.approx(999.742, abs=1e-3)


def test_exact_map_is_monotone_and_clamped() -> None:
    g = torch.linspace(-15.7, 11.52, 20001, dtype=F64)
    assert (t_net_exact(g).diff() < 0).all()
    wide = t_net_exact(torch.linspace(-60, 60, 20001, dtype=F64))
    assert (wide.diff() <= 0).all() and wide.min() == 0
    assert wide.max().item() == pytest.approx(999.75, abs=1e-9) and wide.max() <= 999.75
    above = torch.tensor([11.5265, 11.6, 12.0, 14.0, 18.652, 40.0], dtype=F64)
    assert (t_net_exact(above) == 0).all()
    assert t_net_exact(torch.tensor([11.52], dtype=F64)).item() > 0


@pytest.mark.parametrize(
    ("gamma", "reference", "exact", "tol"),
    [(-6.129, 970.071, 969.821, 0.02), (0.0, 496.050, 495.800, 1e-3), (6.261, 21.141, 20.891, 0.01),
     (10.0, 1.094, 0.844, 1e-3), (14.0, 0.021, 0.0, 1e-3), (18.652, 0.0002, 0.0, 1e-4)],
)  # fmt: skip
def test_time_maps_match_the_spec_table(gamma: float, reference: float, exact: float, tol: float) -> None:
    g = torch.tensor([gamma], dtype=F64)
    assert t_net_reference(g).item() == pytest.approx(reference, abs=tol)
    assert t_net_exact(g).item() == pytest.approx(exact, abs=tol)


def test_reference_map_is_a_quarter_step_later_inside_the_range() -> None:
    g = torch.linspace(-15.7, 11.5, 2001, dtype=F64)
    diff = t_net_reference(g) - t_net_exact(g)
    torch.testing.assert_close(diff, torch.full_like(diff, 0.25), atol=1e-10, rtol=0)
    assert (t_net_reference(torch.tensor([14.0, 30.0], dtype=F64)) > 0).all()


# --- denoiser and loading ---------------------------------------------------------------------------------------


def test_round_trip_through_a_file_is_exact(tmp_path: Path) -> None:
    unet = _unet(SMALL)
    den = load_iddpm(_saved(tmp_path, unet))
    assert isinstance(den, IDDPMDenoiser) and not den.training and not den.unet.training
    assert den.family == "iddpm" and den.input_shape == (3, 32, 32) and den.trained_logsnr == TRAINED_LOGSNR
    z, g = _inputs(size=32)
    with torch.no_grad():
        eps = den(z, g)
        direct = unet(z, t_net_exact(g).float())
    assert eps.shape == z.shape and eps.dtype == torch.float32
    assert torch.equal(eps, direct[:, :3])
    assert not torch.equal(eps, direct[:, 3:])


def test_learn_sigma_false_keeps_all_three_channels(tmp_path: Path) -> None:
    unet = _unet(IDDPMConfig(16, model_channels=32, out_channels=3, num_res_blocks=1, channel_mult=(1, 2)))
    den = load_iddpm(_saved(tmp_path, unet), image_size=16)
    z, g = _inputs()
    with torch.no_grad():
        assert torch.equal(den(z, g), unet(z, t_net_exact(g).float()))


def test_reference_time_map_feeds_the_later_time(tmp_path: Path) -> None:
    unet = _unet()
    den = load_iddpm(_saved(tmp_path, unet), image_size=16, time_map="reference")
    z, g = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(den(z, g), unet(z, (t_net_exact(g) + 0.25).float())[:, :3])


def test_batch_of_distinct_logsnrs_equals_samples_alone() -> None:
    den = IDDPMDenoiser(_unet())
    z = torch.randn(1, 3, 16, 16).expand(4, -1, -1, -1).contiguous()
    g = torch.tensor([-4.0, 0.5, 6.0, 10.5], dtype=F64)
    with torch.no_grad():
        batch = den(z, g)
        alone = torch.cat([den(z[i : i + 1], g[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert (batch[1:] - batch[:1]).abs().amax() > 1e-3


def test_nested_and_prefixed_state_dicts_load(tmp_path: Path) -> None:
    unet = _unet()
    state = {f"module.{k}": v for k, v in unet.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"model": unet.state_dict()}, tmp_path / "model.pt")
    z, g = _inputs(2)
    with torch.no_grad():
        want = unet(z, t_net_exact(g).float())[:, :3]
        for name in ("nested.pth", "model.pt"):
            assert torch.equal(load_iddpm(tmp_path / name, image_size=16)(z, g), want)


def test_checkpoint_suffixes() -> None:
    assert is_iddpm_checkpoint("a/cifar10_uncond_vlb_50M_500K.pt") and is_iddpm_checkpoint(Path("x.PTH"))
    assert not is_iddpm_checkpoint("model.safetensors") and not is_iddpm_checkpoint("google/ddpm-cifar10-32")


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("hello, these are not weights\n")
    with pytest.raises(ItdError, match="not a PyTorch checkpoint"):
        load_iddpm(tmp_path / "notes.pt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ItdError, match="does not exist"):
        load_iddpm(tmp_path / "absent.pt")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with (tmp_path / "raw.pt").open("wb") as fh:
        pickle.dump(argparse.Namespace(weights=[1, 2]), fh)
    for name in ("module.pt", "raw.pt"):
        with pytest.raises(ItdError, match=r"unsafe.*refuses.*state_dict\(\)"):
            load_iddpm(tmp_path / name)


def test_non_state_dict_contents(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"weights": [1, 2], "note": "x"}, tmp_path / "dict.pt")
    for name in ("list.pt", "dict.pt"):
        with pytest.raises(ItdError, match="state_dict"):
            load_iddpm(tmp_path / name)


def test_renamed_key_is_named(tmp_path: Path) -> None:
    state = _unet().state_dict()
    state["middle_block.1.qkv_renamed.weight"] = state.pop("middle_block.1.qkv.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(
        ItdError, match=r"missing middle_block\.1\.qkv\.weight.*unexpected middle_block\.1\.qkv_renamed"
    ):
        load_iddpm(tmp_path / "renamed.pt")


def test_other_architecture_is_rejected(tmp_path: Path) -> None:
    torch.save(nn.Sequential(nn.Linear(2, 3), nn.ReLU()).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(ItdError, match=r"input_blocks\.0\.0\.weight"):
        load_iddpm(tmp_path / "mlp.pt")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = _unet().state_dict()
    state["output_blocks.0.0.emb_layers.1.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ItdError, match=r"wrong shape output_blocks\.0\.0\.emb_layers\.1\.bias"):
        load_iddpm(tmp_path / "shape.pt")


def test_unknown_time_map_and_wrong_channels() -> None:
    unet = _unet()
    with pytest.raises(ItdError, match="time map"):
        IDDPMDenoiser(unet, time_map="nearest")  # type: ignore[arg-type]
    with pytest.raises(ItdError, match="expects images"):
        IDDPMDenoiser(unet)(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=F64))
