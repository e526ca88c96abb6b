"""Our own improved-diffusion UNet (Nichol & Dhariwal 2021), key-compatible with the released checkpoints (§2.2)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itdcli.errors import ItdError

GROUPS = 32


@dataclass(frozen=True)
class IDDPMConfig:
    """Hyper-parameters of an improved-diffusion UNet; attention rates are downsample factors (spec §2.2, §5)."""

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 6
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (2, 4)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_heads: int = 4
    dropout: float = 0.3

    @classmethod
    def cifar10(cls) -> IDDPMConfig:
        """The configuration of both released CIFAR-10 checkpoints, L_vlb and L_hybrid (spec §2.1)."""
        return cls(image_size=32)

    @property
    def emb_channels(self) -> int:
        """Width of the timestep embedding MLP, four times the base width."""
        return 4 * self.model_channels

    def widths(self) -> list[int]:
        """Channel count of each resolution level."""
        return [m * self.model_channels for m in self.channel_mult]

    def check(self) -> None:
        """Raise ItdError if the network cannot be built: GroupNorm32, head split or image size (spec §5)."""
        if self.num_res_blocks < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ItdError(f"IDDPM config {self}: need num_res_blocks >= 1 and positive channel multipliers")
        if any(w % GROUPS for w in self.widths()):
            raise ItdError(f"IDDPM widths {self.widths()} must be multiples of {GROUPS} (GroupNorm32)")
        if any(w % self.num_heads for w in self.widths()):
            raise ItdError(f"{self.num_heads} attention heads do not divide the widths {self.widths()}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ItdError(
                f"image size {self.image_size} is not divisible by {factor} ({len(self.channel_mult)} levels)"
            )


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups evaluated in float32 whatever the input dtype (spec §2.2)."""

    def __init__(self, channels: int) -> None:
        """32 groups, eps 1e-5, affine."""
        super().__init__(GROUPS, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise in float32 and return the input's dtype."""
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, as improved-diffusion initialises its output convolutions (spec §2.4)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t·f_k), sin(t·f_k)], f_k = max_period^(−k/half), fractional t allowed (spec §2.2)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    k = torch.arange(half, dtype=dtype, device=t.device)
    args = t.to(dtype)[:, None] * torch.exp(-math.log(max_period) * k / half)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def legacy_qkv_attention(qkv: Tensor) -> Tensor:
    """Softmax attention on (N, 3c, T) laid out [q; k; v], both q and k scaled by c^(−1/4), softmax in float32."""
    c = qkv.shape[1] // 3
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
    scale = c**-0.25
    logits = torch.einsum("nct,ncs->nts", q * scale, k * scale)
    weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
    return torch.einsum("nts,ncs->nct", weights, v)


class ResBlock(nn.Module):
    """Residual block with scale-shift normalisation by the timestep embedding (spec §2.2)."""

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float) -> None:
        """Keys in_layers.{0,2}, emb_layers.1, out_layers.{0,3} and, when widths differ, skip_connection."""
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * cout))
        conv_out = _zeroed(nn.Conv2d(cout, cout, 3, padding=1))
        self.out_layers = nn.Sequential(GroupNorm32(cout), nn.SiLU(), nn.Dropout(dropout), conv_out)
        self.skip_connection: nn.Module = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """skip(x) + conv(dropout(silu(GN(h)·(1 + scale) + shift))), h = in_layers(x)."""
        h: Tensor = self.in_layers(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[1:](h)
        skip: Tensor = self.skip_connection(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with the legacy per-head contiguous qkv layout (spec §2.2)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        """Keys norm, qkv (Conv1d C→3C) and proj_out (Conv1d C→C, zero-initialised)."""
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x + proj_out(attention), heads taken as contiguous [q_h; k_h; v_h] slices of the qkv channels."""
        b, c, height, width = x.shape
        flat = x.reshape(b, c, -1)
        qkv: Tensor = self.qkv(self.norm(flat))
        heads = legacy_qkv_attention(qkv.reshape(b * self.num_heads, -1, qkv.shape[-1]))
        out: Tensor = self.proj_out(heads.reshape(b, c, -1))
        return (flat + out).reshape(b, c, height, width)


class Downsample(nn.Module):
    """Strided 3×3 convolution halving the resolution (key `op`)."""

    def __init__(self, channels: int) -> None:
        """Stride 2, padding 1."""
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Halve height and width."""
        out: Tensor = self.op(x)
        return out


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 convolution (key `conv`)."""

    def __init__(self, channels: int) -> None:
        """Padding 1."""
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double height and width."""
        out: Tensor = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return out


class TimestepSequential(nn.ModuleList):
    """Layers applied in turn, residual blocks also receiving the timestep embedding (keys `.0`, `.1`, …)."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        """Hold the layers in order."""
        super().__init__(layers)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply each layer, passing emb to residual blocks only."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class IDDPMUNet(nn.Module):
    """The improved-diffusion UNet: its state_dict matches the released checkpoints key for key (spec §2.2)."""

    def __init__(self, config: IDDPMConfig) -> None:
        """Build time_embed, input_blocks, middle_block, output_blocks and out, in the checkpoint's key order."""
        super().__init__()
        config.check()
        self.config = config
        mc, emb = config.model_channels, config.emb_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks, skips = self._down_path()
        ch = skips[-1]
        self.middle_block = TimestepSequential(
            [self._res(ch, ch), AttentionBlock(ch, config.num_heads), self._res(ch, ch)]
        )
        self.output_blocks = self._up_path(skips)
        width = config.widths()[0]
        self.out = nn.Sequential(
            GroupNorm32(width), nn.SiLU(), _zeroed(nn.Conv2d(width, config.out_channels, 3, padding=1))
        )

    def _res(self, cin: int, cout: int) -> ResBlock:
        """A residual block with this network's embedding width and dropout."""
        return ResBlock(cin, cout, self.config.emb_channels, self.config.dropout)

    def _stage(self, cin: int, cout: int, rate: int) -> list[nn.Module]:
        """A residual block, followed by attention when the downsample rate is an attention rate."""
        layers: list[nn.Module] = [self._res(cin, cout)]
        if rate in self.config.attention_resolutions:
            layers.append(AttentionBlock(cout, self.config.num_heads))
        return layers

    def _down_path(self) -> tuple[nn.ModuleList, list[int]]:
        """Input blocks and the channel count each pushes onto the skip stack."""
        cfg = self.config
        blocks = nn.ModuleList([TimestepSequential([nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1)])])
        skips, ch, rate = [cfg.model_channels], cfg.model_channels, 1
        for level, width in enumerate(cfg.widths()):
            for _ in range(cfg.num_res_blocks):
                blocks.append(TimestepSequential(self._stage(ch, width, rate)))
                ch = width
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                blocks.append(TimestepSequential([Downsample(ch)]))
                skips.append(ch)
                rate *= 2
        return blocks, skips

    def _up_path(self, skips: list[int]) -> nn.ModuleList:
        """Output blocks, each consuming one skip; the last block of every level but the first upsamples."""
        cfg = self.config
        blocks, stack = nn.ModuleList(), list(skips)
        ch, rate = skips[-1], 2 ** (len(cfg.channel_mult) - 1)
        for level, width in reversed(list(enumerate(cfg.widths()))):
            for i in range(cfg.num_res_blocks + 1):
                layers = self._stage(ch + stack.pop(), width, rate)
                ch = width
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    rate //= 2
                blocks.append(TimestepSequential(layers))
        return blocks

    def forward(self, x: Tensor, t_net: Tensor) -> Tensor:
        """Network output (B, out_channels, H, W) at float network time t_net (B,), fractional allowed."""
        t = t_net.reshape(-1).expand(x.shape[0]) if t_net.numel() == 1 else t_net
        dtype = next(self.parameters()).dtype
        emb: Tensor = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        h, stack = x.to(dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            stack.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, stack.pop()], dim=1), emb)
        out: Tensor = self.out(h)
        return out
