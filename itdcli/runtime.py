"""Everything device-, dtype-, RNG- and rank-specific: device choice, float32/TF32, generators, torchrun."""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

from itdcli.errors import ItdError

EVAL_PRECISION = "float32 network, TF32 off, float64 reductions"
T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit CUDA request without a GPU is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ItdError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ItdError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
    return device


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Evaluate networks in true float32: TF32 off for matmul and cuDNN, no autograd (spec §11.1)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for image `index` of a run seeded with `seed`: the same draws on any device or batch size."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63))


# Distributed runs: one process per device under `torchrun`, which sets RANK, LOCAL_RANK and WORLD_SIZE.


def distributed() -> bool:
    """Whether this process is one of several launched by torchrun (WORLD_SIZE above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _active() -> bool:
    """Whether a default process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's RANK, else 0."""
    return dist.get_rank() if _active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: from the process group, else from torchrun's WORLD_SIZE, else 1."""
    return dist.get_world_size() if _active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this is rank 0, the one process that prints and writes files."""
    return rank() == 0


def local_device(name: str = "auto") -> torch.device:
    """`resolve_device`, except that under torchrun a CUDA device without an index becomes cuda:LOCAL_RANK."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and distributed():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group once (NCCL for CUDA, gloo otherwise); a no-op for a single process.

    A CUDA `device` without an index means cuda:LOCAL_RANK. The group lasts until `shutdown()` or exit.
    """
    if not distributed() or _active():
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group, if one is initialised."""
    if _active():
        dist.destroy_process_group()


def _require_group() -> bool:
    """True when collectives must run; an error when torchrun started several ranks but none joined a group."""
    if world_size() > 1 and not _active():
        raise RuntimeError("several ranks but no process group: call runtime.init_distributed(device) first")
    return world_size() > 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here; a no-op for a single process."""
    if _require_group():
        dist.barrier()


def shard_of(index: Tensor, r: int) -> Tensor:
    """Rank `r`'s part of a 1-D tensor: every world_size-th entry from position r (index[r::world])."""
    return index[r :: world_size()]


def shard(index: Tensor) -> Tensor:
    """This rank's part of a 1-D tensor (index[rank::world]); all of it for a single process."""
    return shard_of(index, rank())


def all_gather_rows(t: Tensor) -> Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order; first dimensions may differ between ranks."""
    if not _require_group():
        return t
    local = t.to(_comm_device()).contiguous()
    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    counts = [int(s) for s in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]).to(t.device)


def gather_shards(t: Tensor, n: int) -> Tensor:
    """Undo `shard`: from each rank's rows of a length-`n` sharded tensor, all `n` rows in their original order."""
    rows = all_gather_rows(t)
    if rows.shape[0] != n:
        raise RuntimeError(f"gathered {rows.shape[0]} rows from the ranks, expected {n}")
    positions = torch.cat([shard_of(torch.arange(n), r) for r in range(world_size())])
    return rows[positions.argsort().to(rows.device)]


def all_reduce_mean(t: Tensor) -> Tensor:
    """The element-wise mean of `t` over all ranks (a copy; `t` itself is left alone)."""
    if not _require_group():
        return t.clone()
    total = t.to(_comm_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / world_size()).to(t.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s picklable `obj` on every rank; `obj` itself for a single process."""
    if not _require_group():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return cast(T, box[0])
