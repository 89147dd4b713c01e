"""Several processes: `torchrun --nproc-per-node N -m llmprune compress ...` (NCCL on GPUs, gloo on CPU).

What is split, and how the result stays the single-process one bit for bit:
- calibration batches: rank r captures and propagates a contiguous share of the batches
  (`local_batches`) and keeps their activations; statistics are per-batch values summed in the
  canonical pairwise order (`observers.PairwiseSum`): each rank sums its own batches into aligned
  blocks, `pairwise_total` hands every block to every rank in batch order and each rank finishes the
  same tree, so every rank holds the statistics a single process would have computed;
- pruning: the linears handed to `submit` go round-robin to the ranks (the same assignment on every
  rank: all ranks submit the same sequence); each owner runs the method for its linears and
  `flush` broadcasts the results, which every rank applies in submission order;
- writing: rank 0 writes the checkpoint and the journal; every rank keeps the same model state.
Stage kinds whose statistics do not reduce through `LayerObserver` run replicated (`replicated()`):
every rank processes every batch. Per-process thread counts must match for CPU matmuls to round the
same (a GPU run needs the same GPU model on every rank).

Without torchrun (or with one process) every function here is the plain single-process operation.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import torch

from llmprune.errors import UserError

_split = True                        # False inside `replicated()`: every rank runs every batch
_pending: list[dict] = []           # submitted prunes awaiting `flush`
_submitted = 0                       # how many prunes were ever submitted (the round-robin position)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    """RANK as torchrun sets it (0 without torchrun), before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes and prints."""
    return rank() == 0


def splitting() -> bool:
    return active() and _split


def init_from_env(device: str) -> str:
    """Join the torchrun process group (NCCL for CUDA, gloo for CPU); returns this rank's device."""
    if env_world_size() <= 1 or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise UserError(f"torchrun started {env_world_size()} processes but only {torch.cuda.device_count()} "
                            f"CUDA devices are visible; use --nproc-per-node {torch.cuda.device_count()} or fewer")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=torch.device(device))
    else:
        torch.distributed.init_process_group("gloo")
    return device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def check_batches(n_batches: int) -> None:
    if splitting() and n_batches < world_size():
        raise UserError(f"the calibration data makes {n_batches} batches for {world_size()} processes; every process "
                        f"needs at least one: use fewer processes, more samples or a smaller batch_size")


def local_batches(n_batches: int) -> list[int]:
    """The batch indices this rank calibrates on: a contiguous share (all of them unless splitting)."""
    if not splitting():
        return list(range(n_batches))
    check_batches(n_batches)
    r, n = rank(), world_size()
    return list(range(r * n_batches // n, (r + 1) * n_batches // n))


@contextlib.contextmanager
def replicated(enabled: bool = True):
    """Within: every rank runs every batch (for stage kinds that do not reduce through LayerObserver)."""
    global _split
    saved = _split
    _split = saved and not enabled
    try:
        yield
    finally:
        _split = saved


# ---- reductions -----------------------------------------------------------------------------------

def sum_ints(value: int) -> int:
    if not splitting():
        return value
    values: list = [None] * world_size()
    torch.distributed.all_gather_object(values, int(value))
    return sum(values)


def pairwise_total(partial) -> torch.Tensor | None:
    """The canonical pairwise sum over every rank's batches (`observers.PairwiseSum`), on every rank."""
    if not splitting():
        return partial.total()
    from llmprune.calibration.observers import PairwiseSum

    mine = [(start, size, tuple(value.shape), str(value.dtype).replace("torch.", ""), str(value.device))
            for start, size, value in partial.blocks]
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    total = PairwiseSum()
    for r, blocks in enumerate(everyone):
        for k, (start, size, shape, dtype, _) in enumerate(blocks):
            if r == rank():
                value = partial.blocks[k][2].contiguous()
            else:
                value = torch.empty(shape, dtype=getattr(torch, dtype), device=_comm_device())
            torch.distributed.broadcast(value, src=r)
            total.push(start, size, value)
    partial.blocks = []
    return total.total()


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- linears pruned in parallel -------------------------------------------------------------------

def submit(compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
           apply: Callable[[torch.Tensor, torch.Tensor, float], None]) -> None:
    """Prune one matrix: `compute()` -> (pruned weight, keep_mask) runs on the matrix's owner rank,
    `apply(pruned, keep_mask, seconds)` on every rank. One process: both at once. Several: the owner
    computes now, everyone applies at the next `flush` (results broadcast in submission order)."""
    global _submitted
    owner = _submitted % world_size() if splitting() else rank()
    _submitted += 1
    if not splitting():
        t0 = time.perf_counter()
        pruned, keep_mask = compute()
        apply(pruned, keep_mask, time.perf_counter() - t0)
        return
    item = {"owner": owner, "apply": apply}
    if owner == rank():
        t0 = time.perf_counter()
        item["pruned"], item["keep_mask"] = compute()
        item["seconds"] = time.perf_counter() - t0
    _pending.append(item)


def flush() -> None:
    """Broadcast every pending result from its owner and apply it, in submission order."""
    if not _pending:
        return
    items = list(_pending)
    _pending.clear()
    mine = [(tuple(it["pruned"].shape), str(it["pruned"].dtype).replace("torch.", ""), it["seconds"])
            if it["owner"] == rank() else None for it in items]
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    device = _comm_device()
    for k, item in enumerate(items):
        shape, dtype, seconds = everyone[item["owner"]][k]
        if item["owner"] == rank():
            pruned, keep = item["pruned"].contiguous(), item["keep_mask"].to(torch.uint8).contiguous()
        else:
            pruned = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            keep = torch.empty(shape, dtype=torch.uint8, device=device)
        pruned = _broadcast_into(pruned, item["owner"], device)
        keep = _broadcast_into(keep, item["owner"], device)
        item["apply"](pruned, keep.bool(), seconds)


def _broadcast_into(tensor: torch.Tensor, src: int, device: torch.device) -> torch.Tensor:
    """Broadcast `tensor` (on any device) from `src`; returns the received tensor on `device`."""
    staged = tensor if tensor.device == device else tensor.to(device)
    torch.distributed.broadcast(staged, src=src)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor
