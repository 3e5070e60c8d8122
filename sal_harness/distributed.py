"""Multi-process training under torchrun: DDP or FSDP2 (``fully_shard``), gloo on the CPU, NCCL on CUDA.

Every process draws the same *global* batch from the same data generator and trains on its own slice,
and the loss is a sum over the global batch's scored targets divided by their global count (times the
world size, which the gradient averaging divides back out), so N processes take the same step as one
process over the whole batch, up to the rounding of the gradient reduction. Checkpoints of several processes
are sharded (sal_harness.checkpoint, torch.distributed.checkpoint): each process writes and reads its own part of
the state dicts that ``local_state`` gives, whatever number of processes wrote them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sal_harness.errors import HarnessError


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: rank and world size (1 without torchrun), its device, the wrapping kind."""

    rank: int
    size: int
    device: torch.device
    kind: str = "none"  # "none", "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str, kind: str) -> World:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on the CPU, NCCL on CUDA); HarnessError when
    the device is CUDA and this machine has none (or not that index)."""
    check_device_present(torch.device(device))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    place = torch.device(device)
    if place.type == "cuda":
        place = torch.device("cuda", local_rank)
        torch.cuda.set_device(place)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if place.type == "cuda" else "gloo")
    return World(dist.get_rank(), size, place, kind)


def check_device_present(place: torch.device, name: str = "train.device") -> None:
    """HarnessError naming the setting ``name`` when ``place`` is a CUDA device this machine does not have."""
    if place.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (place.index or 0) >= count:
        raise HarnessError(f"{name}={place} but this machine has {count} CUDA device(s) (torch "
                           f"{torch.__version__}): set {name}=cpu, or run where the GPU is")


DRAIN_TIMEOUT_S = 10.0


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        if dist.get_backend() == "gloo":
            _drain_gloo()
        dist.destroy_process_group()


def _drain_gloo() -> None:
    """Let gloo's worker threads finish with every finished collective before the group can be destroyed.

    A worker thread releases a collective's tensors a moment after the caller sees the result, and freeing a
    tensor whose Python object the caller dropped takes the GIL; the group's destructor holds the GIL and joins
    those threads. When the last reference to the group goes right then (e.g. a DDP Reducer freed with an
    exception's traceback), the process hangs: seen on 2 loaded cores (tests/test_harness_distributed.py, a DDP
    run whose save refused a non-finite weight). A barrier (no rank left mid-collective; bounded, so a rank that
    failed alone still exits) and a pause that releases the GIL leave the threads idle."""
    with contextlib.suppress(RuntimeError):
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=DRAIN_TIMEOUT_S))
    time.sleep(0.05)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DDP(model) or FSDP2 (each block sharded, then the root), or the model itself in one process."""
    if world.size == 1:
        return model
    if world.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside a DDP wrapper (FSDP2 shards in place: the model is its own root)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, world: World, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction on accumulation micro-steps (enabled=False), reduce on the last one."""
    if world.size == 1 or enabled:
        yield
    elif world.kind == "ddp":
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]


def sum_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    """values summed over every process (a copy; the input is left alone)."""
    total = values.detach().clone()
    if world.size > 1:
        dist.all_reduce(total)
    return total


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer, placeholders: bool = False
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state dicts as this process holds them (every rank must call): DTensor shards under
    FSDP2, whole tensors otherwise; keys are the GPT's parameter names (no wrapper prefix), and the optimizer's
    ``state`` is keyed by parameter name too. torch.distributed.checkpoint loads into these tensors in place;
    ``load_local_state`` then hands them to the model and the optimizer.

    An optimizer that has taken no step has no state. torch's get_state_dict makes one up (a zero-gradient step
    at lr 0): kept with ``placeholders`` (tensors for a checkpoint's state to be loaded into), otherwise undone
    and left out of the state dict, since AdamW's step count would change the next update."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    untouched = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if untouched and not placeholders:
        optimizer.state.clear()
        optimizer_state = {**optimizer_state, "state": {}}
    return model_state, optimizer_state


def load_local_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                     optimizer_state: dict[str, Any]) -> None:
    """Inverse of local_state (every rank passes its own part)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    forget_made_up_state(optimizer, optimizer_state)


def forget_made_up_state(optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
    """After set_state_dict: a loaded optimizer state that is empty (no step taken) leaves the optimizer without
    state, not with the one set_state_dict made up (see local_state)."""
    if not loaded["state"]:
        optimizer.state.clear()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any], world: World) -> None:
    """Load a full (unsharded) state, as a one-process checkpoint holds it, into every rank's model and optimizer
    (every rank passes the full state)."""
    if world.kind != "fsdp":
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=keyed_by_name(optimizer_state, model, optimizer),
                   options=StateDictOptions(full_state_dict=True))
    forget_made_up_state(optimizer, optimizer_state)


def keyed_by_name(optimizer_state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
                  ) -> dict[str, Any]:
    """An optimizer state dict as ``optimizer.state_dict()`` writes it (parameters numbered 0, 1, ... in the
    order of the param groups) keyed by parameter name instead, as set_state_dict takes it; one already keyed by
    name is returned as it is. The numbering follows ``optimizer``'s groups, built the same way."""
    if all(isinstance(key, str) for group in optimizer_state["param_groups"] for key in group["params"]):
        return optimizer_state
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    return {"state": {order[i]: state for i, state in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def min_over_ranks(value: int, world: World) -> int:
    """The smallest of every process's ``value``."""
    smallest = torch.tensor(value, device=world.device)
    if world.size > 1:
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
