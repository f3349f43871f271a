"""Several processes, one model: helpers for ``torchrun`` data-parallel training and sharded sampling.

    torchrun --nproc_per_node 4 -m difflab train ...     # one process per GPU

``torchrun`` starts the processes and tells each one who it is through environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). :func:`setup` reads them and joins the process group
(NCCL on GPUs, Gloo on CPUs); the model is wrapped in ``torch.nn.parallel.DistributedDataParallel``, each
process takes its slice of the global batch and averages its loss over that slice, and DDP averages the
gradients, so one step equals a single-process step on the whole batch. Only the main process (rank 0)
writes logs, sample grids and checkpoints.

Every helper is also correct in a plain single process (no ``torchrun``, no process group): ranks are 0,
the world size is 1, collectives do nothing. Objects sent between processes go as JSON, never as pickles.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from difflab.devices import resolve_device
from difflab.errors import DifflabError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
REDUCE_OPS = ("sum", "mean", "max", "min")

_created_group = False  # whether setup() created the process group (and teardown() should destroy it)


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: its rank among ``world_size`` processes, its rank on this machine, and the
    device it should use (``cuda:LOCAL_RANK`` under NCCL)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" or "gloo"; None in a single process

    @property
    def is_main(self) -> bool:
        """The process that logs, samples and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise DifflabError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def setup(device: str | torch.device = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, or describe a single process.

    ``device`` is the device the user asked for (``auto``, ``cpu``, ``cuda``); under several processes a
    CUDA device becomes ``cuda:LOCAL_RANK`` with the NCCL backend, a CPU device uses Gloo. A process group
    that already exists is used as it is (and left to its creator). ``timeout_s`` bounds how long
    collectives wait for a missing process. Raises a one-line :class:`DifflabError` for a half-set
    environment or a group that cannot be joined."""
    global _created_group
    device = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        return DistInfo(rank, local, world, _local_device(device, local, world), dist.get_backend())
    present = [v for v in TORCHRUN_VARS[:3] if v in os.environ]
    if not present:
        return DistInfo(device=device)
    if len(present) < 3:
        missing = ", ".join(v for v in TORCHRUN_VARS[:3] if v not in present)
        raise DifflabError(f"{', '.join(present)} set but {missing} missing: launch with torchrun, "
                           "or unset them for a single process")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DifflabError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    if world == 1:
        return DistInfo(device=device)
    missing = [v for v in TORCHRUN_VARS[3:] if v not in os.environ]
    if missing:
        raise DifflabError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    if not dist.is_available():
        raise DifflabError("this PyTorch build has no torch.distributed; run a single process")
    device = _local_device(device, local, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        text = str(e).strip()
        raise DifflabError(f"rank {rank} could not join the {backend} process group at "
                           f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: "
                           f"{text.splitlines()[0] if text else type(e).__name__}") from None
    _created_group = True
    return DistInfo(rank, local, world, device, backend)


def _local_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """One GPU per process: ``cuda:LOCAL_RANK`` when several processes share CUDA."""
    if device.type != "cuda" or world == 1:
        return device
    if local_rank >= torch.cuda.device_count():
        raise DifflabError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                           "start at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device: str | torch.device = "auto"):
    """``with session(device) as info:`` -- :func:`setup` on entry, :func:`teardown` on the way out. After a
    successful block the processes leave together (a barrier first), so none tears down its connections while
    another is still working; after an error each leaves at once (a barrier could wait for a process that died)."""
    info = setup(device)
    try:
        yield info
    except BaseException:
        teardown()
        raise
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
    teardown()


def teardown() -> None:
    """Leave the process group if :func:`setup` created it (a no-op otherwise).

    Unreachable objects that may still hold the group (a ``DistributedDataParallel`` wrapper in a reference cycle,
    say) are collected first, a precaution: ``destroy_process_group`` only drops the registry's reference, and a
    group destroyed during interpreter shutdown can abort the process. (An abort of this kind -- SIGABRT,
    "terminate called without an active exception" -- was seen under torchrun on CPU; what stopped it in
    repeated runs was the barrier of :func:`session`, not this alone.)"""
    global _created_group
    if _created_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _created_group = False


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` items that ``rank`` of ``world`` takes: shard sizes
    differ by at most one (the first ``n % world`` ranks take one more) and cover ``0..n`` exactly once."""
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise DifflabError(f"cannot shard {n} items for rank {rank} of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _comm_device() -> torch.device:
    """Where tensors must live for the backend's collectives (NCCL talks only CUDA)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes with ``op`` (sum, mean, max, min); returns it."""
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {', '.join(REDUCE_OPS)}, got {op!r}")
    if not is_distributed():
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op)
    if op == "mean":
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank. It travels as JSON (never a pickle), so it must be JSON-
    serialisable and comes back as JSON types (tuples become lists) even in a single process."""
    if not is_distributed():
        return json.loads(json.dumps(obj))
    device = _comm_device()
    payload = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    data = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, src)
    return json.loads(bytes(data.cpu().tolist()).decode())


def main_first(fn, *, error_prefix: str = ""):
    """Run ``fn`` on the main process only, then let the others go on (a barrier). If it raises a
    :class:`DifflabError` (or an OSError) there, every process raises it (printed once, by rank 0), so none is left waiting at
    its next collective. Returns ``fn()``'s result on the main process and None on the others."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except DifflabError as e:
            error = str(e)
        except OSError as e:  # a folder that cannot be written: a user's problem, and the others must not hang
            error = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    error = broadcast_object(error)
    if error:
        raise DifflabError(error_prefix + error, all_ranks=True)
    return result


def main_then_others(fn):
    """``fn()`` on every process, the main one first: it downloads, decodes or encodes and writes the cache that the
    others then read. Errors as in :func:`main_first`."""
    result = main_first(fn)
    return result if is_main() else fn()


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """The whole batch of ``n`` items, in order, on every rank, from each rank's contiguous shard
    (:func:`shard_range`). ``local`` is this rank's shard, ``(stop - start, ...)``; an empty shard still
    takes part and must have the same trailing shape, dtype and device as the others."""
    start, stop = shard_range(n, rank(), world_size())
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} items but its shard of {n} is {stop - start}")
    if not is_distributed() or n == 0:
        return local
    world = dist.get_world_size()
    sizes = [b - a for a, b in (shard_range(n, r, world) for r in range(world))]
    padded = local.new_zeros((sizes[0], *local.shape[1:]))  # all_gather needs equal shapes; shard 0 is largest
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])
