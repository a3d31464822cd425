"""Data-parallel runs on torch.distributed: launched with `torchrun`, one process per CPU slot or GPU.

In one process (or without torchrun) every function here is the identity, so the callers need no second
code path. Under torchrun (`WORLD_SIZE` > 1), `init_from_env` joins the process group (gloo on the CPU,
nccl with `--device cuda`, one GPU per local rank) and then:
- `shard(count)`: the contiguous share of `count` items (calibration or test batches) of this rank, so that
  the ranks' shares, concatenated in rank order, are the one-process sequence;
- `all_reduce_sum_` / `gather_tensors`: statistics summed over ranks, or recorded tokens gathered in rank
  order (the one-process order);
- `owner(i)` / `broadcast_`: the work of a block (pruning its linears, its experts) divided among ranks
  round-robin, each result broadcast from the rank that computed it (`owned`, `assemble_owned`);
- `send` / `recv` / `gather_to`: tensors moved to one rank (an expert's tokens to the rank that owns it);
- `check_same`: arguments that must agree across ranks (the command line) are compared, with a one-line
  error on every rank when they do not.
"""

from __future__ import annotations

import datetime
import os

import torch

from .errors import UsageError, literal
from .settings import SettingError

_state = {"device": None}


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside an initialized process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return _dist().get_world_size() if active() else 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu", timeout_minutes: float = 60.0) -> str:
    """Join the process group torchrun describes; returns the device this rank computes on."""
    dist = _dist()
    if not launched() or dist.is_initialized():
        return device
    use_cuda = str(device).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise SettingError("device", f"{{device}} {literal(device)} requested but CUDA is not available on this "
                                         "machine")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); launch at most "
                             "one process per GPU")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    _state["device"] = torch.device(device) if use_cuda else torch.device("cpu")
    return device


def shutdown() -> None:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return _state["device"] or torch.device("cpu")


def shard(count: int) -> range:
    """This rank's contiguous share of `count` items (the first ranks take one more when it does not divide)."""
    size, index = world(), rank()
    base, extra = divmod(count, size)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def owner(index: int) -> int:
    """The rank that computes work item `index` (round-robin)."""
    return index % world()


def mine(index: int) -> bool:
    return owner(index) == rank()


def computed_by_owner(index: int, compute, shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """Work item `index`'s result on every rank: `compute()` on the rank that owns it, broadcast from there
    (in one process: just `compute()`). The result must have `shape` and `dtype`."""
    result = compute() if mine(index) else torch.empty(shape, dtype=dtype, device=device)
    return broadcast_(result, owner(index))


def owned(count: int) -> list[int]:
    """The work items of `count` that this rank computes (`owner(i) == rank()`), ascending."""
    return list(range(rank(), count, world()))


def assemble_owned(local: torch.Tensor, count: int) -> torch.Tensor:
    """Items 0..count-1 on every rank from each owner's share: `local` holds this rank's items (`owned(count)`,
    in order) stacked along dim 0; item i is broadcast from its owner (in one process: `local` itself)."""
    if not active():
        return local
    result = torch.empty((count, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for index in range(count):
        if mine(index):
            result[index] = local[index // world()]
        broadcast_(result[index], owner(index))
    return result


def send(tensor: torch.Tensor, dst: int) -> None:
    """Send `tensor` to rank `dst` (which calls `recv` with its shape and dtype)."""
    _dist().send(tensor.contiguous().to(_comm_device()), dst)


def recv(shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device | str) -> torch.Tensor:
    """The tensor rank `src` sends, on `device`."""
    buffer = torch.empty(shape, dtype=dtype, device=_comm_device())
    _dist().recv(buffer, src)
    return buffer.to(device)


def gather_to(tensor: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Every rank's rows of `tensor` (same trailing shape and dtype on every rank), concatenated in rank
    order, on rank `dst` only (None elsewhere); `tensor` itself in one process."""
    if not active():
        return tensor
    rows = gather_objects(tensor.shape[0])
    if rank() != dst:
        if rows[rank()]:
            send(tensor, dst)
        return None
    parts = [tensor if src == dst else recv((count, *tensor.shape[1:]), tensor.dtype, src, tensor.device)
             for src, count in enumerate(rows) if count]
    return torch.cat(parts) if parts else tensor[:0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (the same result on every rank)."""
    if active():
        moved = tensor.to(_comm_device())
        _dist().all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_sum(value: float | int) -> float | int:
    """A number summed over the ranks."""
    if not active():
        return value
    tensor = all_reduce_sum_(torch.tensor([float(value)], dtype=torch.float64))
    return type(value)(tensor.item())


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Give every rank rank `src`'s `tensor` (in place; same shape and dtype on every rank)."""
    if active():
        moved = tensor.contiguous().to(_comm_device())
        _dist().broadcast(moved, src)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def gather_objects(value) -> list:
    """Every rank's (small, picklable) `value`, in rank order."""
    if not active():
        return [value]
    values = [None] * world()
    _dist().all_gather_object(values, value)
    return values


def gather_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's list of tensors, concatenated in rank order (shapes may differ), on every rank."""
    if not active():
        return list(tensors)
    described = gather_objects([(tuple(t.shape), t.dtype) for t in tensors])
    device = tensors[0].device if tensors else torch.device("cpu")
    gathered: list[torch.Tensor] = []
    for src, shapes in enumerate(described):
        for position, (shape, dtype) in enumerate(shapes):
            if src == rank():
                buffer = tensors[position].contiguous()
            else:
                buffer = torch.empty(shape, dtype=dtype, device=device)
            gathered.append(broadcast_(buffer, src))
    return gathered


def check_same(value, what: str) -> None:
    """A one-line error on every rank when the ranks disagree about `value`."""
    values = gather_objects(value)
    for index, other in enumerate(values):
        if other != values[0]:
            raise UsageError(f"rank {index} was started with different {what} than rank 0; launch every rank with "
                             "the same command")


def barrier() -> None:
    if active():
        _dist().barrier()


def on_main(write, *args, **kwargs):
    """Run a write on rank 0 only (every rank in one process), then let the ranks meet."""
    result = write(*args, **kwargs) if is_main() else None
    barrier()
    return result
