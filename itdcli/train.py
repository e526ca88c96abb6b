"""The training loop of `itd finetune`: batches, the ITD objective, EMA, checkpoints and exact resumption."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from itdcli import runtime
from itdcli.core import channel
from itdcli.core.gaussian import GaussianReference
from itdcli.core.objective import itd_loss_terms
from itdcli.core.proposal import Proposal
from itdcli.errors import ItdError, ItdInterrupted
from itdcli.models import checkpoints


@dataclass
class Setup:
    """What one training run needs: network, data, reference, proposal and the optimisation settings."""

    denoiser: torch.nn.Module
    values: Tensor
    ref: GaussianReference
    proposal: Proposal
    device: torch.device
    batch_size: int
    total_steps: int
    seed: int
    lr: float
    optimizer: str
    weight_decay: float
    ema_decay: float
    grad_clip: float
    bf16: bool
    description: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    """The mutable training state saved in a checkpoint and restored by --resume."""

    step: int
    optimizer: torch.optim.Optimizer
    ema: torch.optim.swa_utils.AveragedModel | None
    last_saved: int = -1
    first_value: float | None = None  # the first loss this process saw (nats/image), to tell divergence; not saved


DIVERGENCE_FACTOR = 1000.0  # a loss this many times its first size (at least 1 bit/dim) above it has diverged


def _check_divergence(state: State, value: float, dim: int) -> None:
    """Stop a run whose loss grew by orders of magnitude; the last good checkpoint stays as it was."""
    if state.first_value is None:
        state.first_value = value
        return
    unit = dim * math.log(2)  # nats per image in one bit/dim
    if value - state.first_value > DIVERGENCE_FACTOR * max(abs(state.first_value), unit):
        kept = f"the last good checkpoint (step {state.last_saved}) is kept; " if state.last_saved >= 0 else ""
        raise ItdError(
            f"the loss diverged: {value / unit:.3g} bits/dim at step {state.step}, from {state.first_value / unit:.3g} "
            f"at the start; {kept}lower --lr (or set --grad-clip) and start again"
            + (" with --resume" if state.last_saved >= 0 else "")
        )


def make_optimizer(setup: Setup) -> torch.optim.Optimizer:
    """Adam (the paper's, default betas) or AdamW over the network's parameters."""
    params = setup.denoiser.parameters()
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=setup.lr, weight_decay=setup.weight_decay)
    return torch.optim.Adam(params, lr=setup.lr, weight_decay=setup.weight_decay)


def make_ema(setup: Setup) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights (torch's AveragedModel), or none for decay 0."""
    if setup.ema_decay == 0:
        return None
    avg = torch.optim.swa_utils.get_ema_multi_avg_fn(setup.ema_decay)  # type: ignore[no-untyped-call]
    return torch.optim.swa_utils.AveragedModel(setup.denoiser, multi_avg_fn=avg, use_buffers=True)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full per-rank batches in one epoch of the DistributedSampler's share (drop_last)."""
    per_rank = n // runtime.world_size()
    return max(1, per_rank // (batch_size // runtime.world_size()))


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, epoch: int, seed: int, rank: int, world: int) -> tuple[int, ...]:
    """This rank's DistributedSampler order for one epoch, computed once per epoch rather than once per step."""
    from torch.utils.data import DistributedSampler

    sampler: DistributedSampler[int] = DistributedSampler(
        cast(Any, range(n)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return tuple(sampler)


def batch_indices(n: int, step: int, setup: Setup) -> Tensor:
    """This rank's image indices for `step`: a DistributedSampler epoch order, sliced; no loader state to save."""
    per_rank_batch = setup.batch_size // runtime.world_size()
    per_epoch = steps_per_epoch(n, setup.batch_size)
    order = _epoch_order(n, step // per_epoch, setup.seed, runtime.rank(), runtime.world_size())
    start = (step % per_epoch) * per_rank_batch
    return torch.tensor(order[start : start + per_rank_batch])


def train_step(model: torch.nn.Module, setup: Setup, state: State) -> float:
    """One optimisation step of the ITD loss with one logSNR per image; returns the loss value in nats/image."""
    rows = batch_indices(setup.values.shape[0], state.step, setup)
    gen = runtime.generator(setup.seed + 104729 * runtime.rank(), state.step)
    x = setup.values[rows].to(torch.float64)
    logsnr = setup.proposal.icdf(torch.rand(len(rows), generator=gen, dtype=torch.float64))
    eps = torch.randn(x.shape, generator=gen)
    z = channel.noisy(x, eps.to(torch.float64), logsnr).to(torch.float32).to(setup.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=setup.bf16):
        eps_hat = model(z, logsnr.to(setup.device))
    w, mmse_g = setup.proposal.weight(logsnr), setup.ref.mmse(logsnr)
    surrogate, value = itd_loss_terms(
        eps.to(setup.device), eps_hat.float(), w.to(setup.device), mmse_g.to(setup.device), setup.ref.entropy()
    )
    mean_value = float(runtime.all_reduce_mean(value.detach().reshape(1)))
    if not math.isfinite(mean_value):
        raise ItdError(
            f"the loss became non-finite at step {state.step}; "
            + (f"the last good checkpoint (step {state.last_saved}) is kept: " if state.last_saved >= 0 else "")
            + "lower --lr or set --grad-clip and start again"
            + (" with --resume" if state.last_saved >= 0 else "")
        )
    _check_divergence(state, mean_value, setup.values[0].numel())
    state.optimizer.zero_grad(set_to_none=True)
    surrogate.backward()  # type: ignore[no-untyped-call]
    if setup.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(setup.denoiser.parameters(), setup.grad_clip)
    state.optimizer.step()
    if state.ema is not None:
        state.ema.update_parameters(setup.denoiser)
    state.step += 1
    return mean_value


def averaged(setup: Setup, state: State) -> torch.nn.Module:
    """The network to evaluate and ship: the EMA copy, or the raw network without EMA."""
    return setup.denoiser if state.ema is None else state.ema.module


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state split into safetensors-able tensors and JSON-able scalars."""
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Rebuild an optimizer state_dict from its saved parts and load it."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(out: Path, setup: Setup, state: State, extra: dict[str, Any]) -> None:
    """Replace DIR/checkpoint whole: description, EMA and raw weights, optimizer, step and RNG (rank 0 only)."""
    from safetensors.torch import save_file

    from itdcli.api.records import atomic_folder

    if not runtime.is_main():
        return
    with atomic_folder(out / checkpoints.SUBFOLDER) as tmp:
        (tmp / checkpoints.DESCRIPTION).write_text(json.dumps({**setup.description, **extra}, indent=2) + "\n")
        save_file(_cpu_state(averaged(setup, state)), str(tmp / checkpoints.WEIGHTS))
        save_file(_cpu_state(setup.denoiser), str(tmp / checkpoints.RAW_WEIGHTS))
        tensors, meta = _optimizer_tensors(state.optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if setup.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(setup.device)
        if state.ema is not None:
            tensors["ema.n_averaged"] = state.ema.n_averaged.cpu()
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "trainer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({"step": state.step, **meta}) + "\n")
    state.last_saved = state.step


def _cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """A module's state_dict as contiguous CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def restore(out: Path, setup: Setup, state: State) -> None:
    """Load raw and EMA weights, optimizer, step and RNG from DIR/checkpoint (--resume)."""
    from safetensors.torch import load_file

    folder = out / checkpoints.SUBFOLDER
    setup.denoiser.load_state_dict(load_file(str(folder / checkpoints.RAW_WEIGHTS)))
    tensors = load_file(str(folder / "trainer.safetensors"))
    meta = json.loads((folder / "trainer.json").read_text())
    _restore_optimizer(state.optimizer, {k: v.to(setup.device) for k, v in tensors.items()}, meta)
    for group in state.optimizer.param_groups:  # the options of this run, so that --resume --lr 1e-5 lowers it
        group["lr"], group["weight_decay"] = setup.lr, setup.weight_decay
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and setup.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], setup.device)
    if state.ema is not None:
        state.ema.module.load_state_dict(load_file(str(folder / checkpoints.WEIGHTS)))
        state.ema.n_averaged.copy_(tensors["ema.n_averaged"])
    state.step = state.last_saved = int(meta["step"])


def _wrap(setup: Setup) -> torch.nn.Module:
    """DistributedDataParallel around the network under torchrun (gradients all-reduced), else the network."""
    if not runtime.distributed():
        return setup.denoiser
    from torch.nn.parallel import DistributedDataParallel

    ids = [setup.device.index] if setup.device.type == "cuda" else None
    return DistributedDataParallel(setup.denoiser, device_ids=ids)


def run(
    out: Path,
    setup: Setup,
    state: State,
    every: dict[str, int | None],
    log: Callable[[dict[str, Any]], None],
    evaluate: Callable[[int], None],
) -> None:
    """Train to `total_steps`: log, evaluate and checkpoint on schedule; checkpoint on Ctrl-C and at the end."""
    model = _wrap(setup)
    setup.denoiser.train()
    if runtime.distributed():  # distinct dropout masks per rank (one process keeps its exact RNG stream)
        torch.manual_seed(runtime.generator(setup.seed + runtime.rank(), state.step).initial_seed())
    dim = setup.values[0].numel() * math.log(2)
    with runtime.deferred_stop() as stop:
        try:
            for _ in _steps(state, setup.total_steps):
                value = train_step(model, setup, state)
                if state.step % (every["log"] or 1) == 0 or state.step == setup.total_steps:
                    log({"step": state.step, "loss_bpd": value / dim, "lr": setup.lr})
                if every["eval"] and state.step % every["eval"] == 0:
                    evaluate(state.step)
                if every["save"] and state.step % every["save"] == 0:
                    save(out, setup, state, {"step": state.step})
                if stop.requested() and state.step < setup.total_steps:  # a stop in the last step just ends it
                    save(out, setup, state, {"step": state.step})
                    raise ItdInterrupted(
                        f"stopped by {stop.signal} at step {state.step}; checkpoint saved in {out}: continue with "
                        "--resume (it goes on exactly as an uninterrupted run)"
                    )
        except KeyboardInterrupt as exc:  # a second signal: the step in flight is dropped, the last checkpoint kept
            kept = f"the checkpoint of step {state.last_saved} is kept" if state.last_saved >= 0 else "nothing saved"
            raise ItdInterrupted(f"interrupted twice during step {state.step}: {kept}; continue with --resume") from exc
        except torch.cuda.OutOfMemoryError as exc:
            half = max(1, setup.batch_size // 2)
            raise ItdError(f"out of GPU memory at batch size {setup.batch_size}: try --batch-size {half}") from exc
    save(out, setup, state, {"step": state.step})


def _steps(state: State, total: int) -> Iterator[int]:
    """Yield until the state's step reaches `total` (the step advances inside train_step)."""
    while state.step < total:
        yield state.step
