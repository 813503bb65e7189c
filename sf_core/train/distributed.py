"""Data-parallel training under torchrun: one process per device, the same training loop on every rank.

    torchrun --nproc_per_node 8 -m sf_core train ...        (multi-node: --nnodes, --node_rank, --rdzv_*)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init_world` joins the process group
(NCCL on GPUs, gloo on CPU) with a timeout, so a rank that stops answering fails the job instead of hanging
it, and torchrun stops the other ranks when one exits with an error.

Every rank rolls out its own samples (the trainer keys their randomness by the global sample index).
After the backward passes of an optimiser step, `World.average_gradients` averages the LoRA gradients and the
step's loss over the ranks with one all-reduce (what DDP does), so every rank takes the same optimiser step
and holds the same LoRA. `shard_frozen_base` additionally splits the frozen base weights across the ranks
with FSDP2 `fully_shard` (for bases that do not fit one device); the LoRA stays whole on every rank.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import SelfForcingError
from ..preflight import check_device


@dataclass
class World:
    """This process's place among the data-parallel ranks. The default is a single process (no communication)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # torch.distributed process group; None for a single process
    device: torch.device = torch.device("cpu")  # where this rank's collectives run (cuda:LOCAL_RANK under NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Average the .grad of `params` (a missing grad counts as zeros) and the scalar `loss` over the
        ranks, in one all-reduce of a flat fp32 buffer. Returns the averaged loss."""
        if self.size == 1:
            return loss
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                         + [loss.reshape(1).float().to(params[0].device)])
        dist.all_reduce(flat, group=self.group)
        flat /= self.size
        offset = 0
        for p in params:
            g = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        return flat[-1]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (one tiny all-reduce; `flag` itself alone for one
        process). Ranks that stop on a signal agree on the iteration, so none is left waiting in a collective."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def broadcast_object(self, obj, src: int = 0):
        """`obj` as rank `src` has it (picklable; tensors keep their device)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def close(self) -> None:
        """Leave the process group (a no-op for a single process)."""
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: str | torch.device, timeout: float = 1800.0) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment; a single process without it.

    device: "cuda" (each rank takes cuda:LOCAL_RANK) or "cpu". timeout: seconds any collective may wait
    for the other ranks before the job fails. Returns (world, this rank's device).
    """
    device = check_device(device) if isinstance(device, str) else device
    if not launched_by_torchrun():
        return World(), device
    import torch.distributed as dist

    if not dist.is_available():
        raise SelfForcingError("this PyTorch build has no torch.distributed; run without torchrun (one process)")
    if timeout <= 0:
        raise SelfForcingError(f"the process-group timeout must be positive, got {timeout} s")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise SelfForcingError(f"under torchrun give --device cuda, not {device}: each rank takes cuda:LOCAL_RANK")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise SelfForcingError(f"distributed training runs on cuda or cpu, not {device.type}")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return World(rank, size, local, dist.group.WORLD, device), device


#: Modules whose weights `shard_frozen_base` splits (the bulk of a Wan DiT); norms and modulations stay whole.
SHARDED = (nn.Linear, nn.Conv3d)


def shard_frozen_base(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """FSDP2: split the weight of every Linear and Conv3d of `model` across the ranks (dim 0), in place.

    The Wan forward calls these modules one by one (`WanBackbone`), so each is its own FSDP unit: its full
    weight is gathered just before its forward (and again for backward) and freed after. Base weights stay
    frozen; a LoRA attached with hooks sees the module's input and output only and trains as usual. The
    small rest (norms, modulations, buffers) moves to `device` whole. `model` may be on the CPU: each rank
    keeps only its shard on `device`. Returns `model`.
    """
    if world.size == 1:
        raise SelfForcingError("sharding the base needs several processes: launch with torchrun --nproc_per_node N")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, SHARDED):
                for p in mod.parameters(recurse=False):
                    p.data = p.data.to(device)
                for name, b in mod.named_buffers(recurse=False):
                    setattr(mod, name, b.to(device))
    for mod in list(model.modules()):
        if isinstance(mod, SHARDED):
            fully_shard(mod, mesh=mesh, reshard_after_forward=True)
    # Linear outputs are views on some backends; the Wan forward never changes them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model
