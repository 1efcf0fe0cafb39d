"""One process per device: what a qtune command needs when `torchrun` or `accelerate launch` starts
several copies of it.

The launchers set RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; `launch()` reads
them (a plain `qtune ...` is rank 0 of 1). Training goes through Hugging Face accelerate (DDP by
default; DeepSpeed and FSDP through its plugins, see `qtune.training.replica`); this module holds
the parts every command shares: the process's device, the process group, and the collectives that
shard work over the ranks and put the results back in input order.

Only rank 0 writes files and prints: `quiet_other_ranks()` sends the other ranks' standard output
to /dev/null (errors still reach standard error).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence, TypeVar

from qtune.errors import QtuneError

T = TypeVar("T")

COLLECTIVE_TIMEOUT_MINUTES = 180


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun / accelerate launch (even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise QtuneError(f"environment variable {name}={value!r} is not a whole number (set by the launcher: "
                         "torchrun or accelerate launch)") from None


def launch() -> Launch:
    """This process's place among the launched ones (rank 0 of 1 when nothing launched it)."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise QtuneError(f"RANK={rank} and WORLD_SIZE={world} do not fit together (RANK must be 0 .. WORLD_SIZE-1)")
    return Launch(rank=rank, world_size=world, local_rank=local, launched="LOCAL_RANK" in os.environ or world > 1)


def device_name(requested: str) -> str:
    """The device this process uses for `--device requested`: under a launcher, `auto` and `cuda`
    mean the GPU of this process's LOCAL_RANK; a fixed `cuda:N` with several processes is refused
    (they would all share one GPU)."""
    where = launch()
    if not where.launched:
        return requested
    import torch

    if requested.startswith("cuda:") and where.distributed:
        raise QtuneError(f"--device {requested} with {where.world_size} processes would put all of them on one "
                         "GPU: leave --device auto (each process takes the GPU of its LOCAL_RANK), or limit the "
                         "GPUs with CUDA_VISIBLE_DEVICES")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{where.local_rank % torch.cuda.device_count()}"
    if requested == "cuda":
        raise QtuneError("--device cuda, but no GPU is visible to this process")
    return "cpu" if requested == "auto" else requested


def init_process_group() -> Launch:
    """Join the launched processes' group (NCCL on GPUs, gloo on CPUs) unless already joined."""
    where = launch()
    if not where.distributed:
        return where
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(where.local_rank % torch.cuda.device_count())
        # Rank 0 evaluates and saves while the others wait at the next collective: a long
        # evaluation must not look like a hung rank (PyTorch's default timeout is 10-30 minutes).
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))
        # left at exit, not after each command: several commands of one process share the group
        atexit.register(leave_process_group)
    return where


def leave_process_group() -> None:
    """Leave the process group, if this process joined one (registered to run at exit): a gloo
    group still alive when the interpreter ends can abort the process ("terminate called without
    an active exception") after its work is done, which the launcher reports as a failed rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with exit status `code` (what `qtune` and `python -m qtune.cli` do last).

    A process that joined a process group ends without the interpreter's teardown: its exit
    handlers run (leaving the group among them), its output is flushed, and it exits at once. At
    teardown, gloo's threads and the objects they still hold can abort a process whose work is
    done ("terminate called without an active exception", exit -6), which the launcher reports as
    a failed rank and a user reads as a failed command. After success the ranks first wait for each
    other, so none closes its connections while another still uses them."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        sys.exit(code)
    if code == 0:
        try:
            dist.barrier()
        except RuntimeError:  # a rank that failed has left: the launcher reports it, this rank is done
            pass
    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs, while the interpreter is whole
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def quiet_other_ranks() -> None:
    """Only rank 0 prints: the others' standard output goes to /dev/null and their progress bars off."""
    if launch().is_main:
        return
    sys.stdout = open(os.devnull, "w")
    os.environ["TQDM_DISABLE"] = "1"


def barrier() -> None:
    if launch().distributed:
        import torch.distributed as dist

        init_process_group()
        dist.barrier()


def all_gather_objects(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    where = launch()
    if not where.distributed:
        return [value]
    import torch.distributed as dist

    init_process_group()
    out = [None] * where.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value, source: int = 0):
    """Rank `source`'s `value` on every rank."""
    if not launch().distributed:
        return value
    import torch.distributed as dist

    init_process_group()
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def shard_bounds(count: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of `count` items; shares differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def map_sharded(fn: Callable[[Sequence], Sequence[T]], items: Sequence) -> list[T]:
    """`fn(items)` with the items split over the launched ranks: each rank runs `fn` on its
    contiguous share and every rank gets the results back in input order, as one list. One
    process: just `fn(items)`."""
    where = launch()
    if not where.distributed:
        return fn(items)
    start, end = shard_bounds(len(items), where.world_size, where.rank)
    parts = all_gather_objects(fn(items[start:end]))
    return [x for part in parts for x in part]


_SCALE_GRAD = None


def _scale_grad():
    """torch.autograd.Function: identity forward, gradient times a factor backward. Built on first
    use, so importing this module does not import torch."""
    global _SCALE_GRAD
    if _SCALE_GRAD is None:
        import torch

        class ScaleGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, factor):
                ctx.factor = factor
                return x.view_as(x)

            @staticmethod
            def backward(ctx, grad):
                return grad * ctx.factor, None

        _SCALE_GRAD = ScaleGrad
    return _SCALE_GRAD


def gather_rows(tensor):
    """(rows_r, ...) on each rank -> ((sum of rows, ...) on every rank in rank order, [rows_r per
    rank]). Ranks may hold different row counts (the gather pads, then drops the padding).

    For a loss that every rank computes over the whole gathered batch (the same value on every
    rank): the other ranks' rows are constants here and this rank's own rows carry its graph, with
    their gradient multiplied by the number of ranks. After DDP averages the ranks' gradients, each
    parameter holds exactly the gradient one process would get for that loss over the global batch,
    and no collective runs in the backward pass (where it could interleave with DDP's own)."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [int(c) for c in all_gather_objects(int(tensor.shape[0]))]
    most = max(counts)
    if most == 0:
        return tensor, counts
    padded = tensor.detach()
    if padded.shape[0] < most:
        pad = torch.zeros((most - padded.shape[0], *padded.shape[1:]), dtype=padded.dtype, device=padded.device)
        padded = torch.cat([padded, pad])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    rows = [part[:n] for part, n in zip(parts, counts)]
    rows[rank] = _scale_grad().apply(tensor, float(world))
    return torch.cat(rows), counts
