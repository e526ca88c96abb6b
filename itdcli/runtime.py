"""Everything device-, dtype-, RNG- and rank-specific: device choice, precision per logSNR, generators, torchrun."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

from itdcli.core.kinds import PrecisionName
from itdcli.errors import ItdError

EVAL_PRECISION = "float32 network, TF32 off, float64 reductions"
T = TypeVar("T")
Mode = Literal["bf16", "tf32", "fp32"]
# Highest logSNR at which each format keeps the estimates within the 0.002 bpd budget, measured with
# benchmarks/precision.py on the bundled digits model (128 images; CPU bf16 arithmetic, TF32 emulated by
# rounding matmul operands): the running mean absolute change of the rounded integrand reaches 0.001 bpd at
# logSNR −1 in bf16, and TF32 adds 0.00065 bpd from −1 to 3 (0.00103 by 4). The rounding step is far more
# sensitive than the format limits γ* ≈ 12.5 (bf16) and 16.6 (TF32) of spec §11.1 suggest.
BF16_MAX_LOGSNR = -1.0
TF32_MAX_LOGSNR = 3.0


@dataclass(frozen=True)
class Precision:
    """Network precision per logSNR: bf16 autocast below `bf16_below`, TF32 below `tf32_below`, float32 above."""

    name: str
    bf16_below: float = -math.inf
    tf32_below: float = -math.inf

    def mode(self, logsnr: float) -> Mode:
        """The format used for a cell at this logSNR."""
        if logsnr < self.bf16_below:
            return "bf16"
        return "tf32" if logsnr < self.tf32_below else "fp32"

    def describe(self) -> str:
        """One line for result.json."""
        if self.name == "fp32":
            return EVAL_PRECISION
        return (
            f"bf16 autocast below logSNR {self.bf16_below:g}, TF32 below {self.tf32_below:g} (emulated on CPU), "
            "float32 above; float64 reductions"
        )


def precision(name: PrecisionName, device: torch.device) -> Precision:
    """`auto`: the per-logSNR policy on CUDA, float32 on CPU (no fast bf16 there); or the named one."""
    if name == "auto":
        name = "policy" if device.type == "cuda" else "fp32"
    if name == "policy":
        return Precision("policy", BF16_MAX_LOGSNR, TF32_MAX_LOGSNR)
    if name == "bf16":
        return Precision("bf16", math.inf, math.inf)
    return Precision("fp32")


@contextlib.contextmanager
def network_mode(mode: Mode, device: torch.device) -> Iterator[None]:
    """Run the network in one format: bf16 autocast, TF32 matmuls and convolutions, or exact float32.

    CPUs have no TF32 unit: there TF32 is emulated by rounding every float32 operand of a matmul or
    convolution to TF32's 10 significand bits (`round_tf32`), with float32 accumulation as on a GPU.
    """
    if mode == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if mode == "tf32" and device.type != "cuda":
        with _TF32Emulation():
            yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def round_tf32(t: Tensor) -> Tensor:
    """float32 values rounded to the nearest TF32 value (10 significand bits, ties to even); others unchanged."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32).reshape(t.shape)


class _TF32Emulation(torch.overrides.TorchFunctionMode):
    """Rounds the float32 operands of matmuls and convolutions to TF32, as a GPU's tensor cores do."""

    # matched by name: the same op reaches the mode as torch.conv2d, F.conv2d or a Tensor method
    OPS: ClassVar[frozenset[str]] = frozenset(
        {"conv1d", "conv2d", "linear", "scaled_dot_product_attention", "matmul", "__matmul__", "mm", "addmm"}
        | {"bmm", "baddbmm", "einsum"}
    )

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """Round tensor arguments of the ops in OPS; run every other op unchanged."""
        if getattr(func, "__name__", "") in self.OPS:
            args = tuple(round_tf32(a) if isinstance(a, Tensor) else a for a in args)
        return func(*args, **(kwargs or {}))


def prepare_model(
    model: Callable[..., Tensor], device: torch.device, channels_last: bool, compile: bool
) -> Callable[..., Tensor]:
    """Move a network to `device`, in channels-last memory format and compiled when asked (CUDA graphs on GPU)."""
    if isinstance(model, torch.nn.Module):
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        return cast(Callable[..., Tensor], torch.compile(model, mode=mode, dynamic=False))
    return model


def channels_last(wanted: bool | None, device: torch.device) -> bool:
    """Channels-last memory as asked, else on CUDA only (no consistent gain on CPU, benchmarks/nll.py)."""
    return device.type == "cuda" if wanted is None else wanted


def to_channels_last(z: Tensor) -> Tensor:
    """An image batch in channels-last memory format (other shapes unchanged)."""
    return z.contiguous(memory_format=torch.channels_last) if z.dim() == 4 else z


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is a device out-of-memory error, the signal to retry with a smaller batch."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    """Release cached GPU memory after an out-of-memory error (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Stop:
    """A stop requested by SIGINT or SIGTERM, taken at the next step boundary (exact resume, docs/finetune.md)."""

    def __init__(self) -> None:
        """No stop requested yet."""
        self.signal: str | None = None

    def requested(self) -> bool:
        """Whether any rank was asked to stop (agreed over the ranks under torchrun, so none is left waiting)."""
        asked = self.signal is not None
        if distributed() and _active():
            flag = torch.tensor([float(asked)], device=_comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item() > 0)
            self.signal = self.signal or ("SIGINT" if asked else None)
        return asked


@contextlib.contextmanager
def deferred_stop() -> Iterator[Stop]:
    """Turn the first SIGINT/SIGTERM into a request the loop honours between steps; a second one interrupts at once.

    A signal that lands inside an optimizer step would otherwise leave weights, moments and RNG half-updated,
    so a checkpoint written then could not be resumed bit for bit.
    """
    import signal
    import threading

    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: object) -> None:
        if stop.signal is not None:
            raise KeyboardInterrupt
        stop.signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def host_memory_available() -> int:
    """Bytes of host memory available to new allocations (Linux MemAvailable, else free physical pages)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as fh:
            line = next(ln for ln in fh if ln.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_memory_available(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory on CUDA, else the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_memory_available()


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


def generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for image `index` of a run seeded with `seed`: the same draws on any device or batch size.

    `stream` separates independent sets of draws for the same image (rounds of points, the pilot pass).
    """
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index * 0x85EBCA77 + stream * 0xC2B2AE3D + 1) % (2**63))


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


def init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group once (NCCL for CUDA, gloo otherwise); a no-op for a single process.

    A CUDA `device` without an index means cuda:LOCAL_RANK. The group lasts until `leave()`, `shutdown()` or
    exit. True when this call joined it: only that caller leaves it (an nll run inside a finetune must not).
    """
    if not distributed() or _active():
        return False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group, if one is initialised (the exit hook; no barrier, since a rank may have failed)."""
    if _active():
        dist.destroy_process_group()


def leave() -> None:
    """End a successful distributed command: wait for every rank, then leave the group while all objects live.

    Ranks that reach the end at different times (rank 0 still writing) and a group torn down only at interpreter
    exit let gloo's worker threads outlive the tensors they hold, which can abort a finished rank.
    """
    if _active():
        dist.barrier()
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
