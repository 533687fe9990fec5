"""One run on N processes (``torchrun --nproc_per_node N -m bayesprune run ...``, or the Python API
inside an initialised ``torch.distributed`` process group): docs/scale-out.md.

What :func:`training.run_continuous` does differently when a process group of more than one
process is active (:func:`context` returns a :class:`Context`):

* every rank builds the same network from the run's seed; the training forward/backward goes
  through ``DistributedDataParallel``, so the noise parameters (``mu``, ``log_sigma``) are
  all-reduced like every other parameter, and the masks (buffers) are broadcast from rank 0;
* the training set is sharded per epoch by a ``DistributedSampler`` seeded with the run's epoch
  seed (``set_epoch``); each rank takes ``batch_size / world_size`` examples a step, so a step
  sees ``batch_size`` examples in all and the gradient is that of the mean loss over them;
* rank 0 draws the noise of a single run's stream; every other rank its own stream
  (:func:`rank_seed`), and a checkpoint holds all ranks' generator states (``rng_ranks``);
* pruning decisions are computed on every rank from the identical parameters and then
  compared (:meth:`Context.sync_masks`): rank 0's masks are the ones every rank keeps;
* only rank 0 locks and writes the run directory; its ``config.json`` and ``summary.json`` record
  ``world_size``; a checkpoint is read by rank 0 and broadcast to the others.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from .. import noise as _noise

__all__ = ["Context", "context", "init_from_env", "launched_by_torchrun", "rank_seed"]


def launched_by_torchrun() -> bool:
    """``WORLD_SIZE`` > 1 in the environment (torchrun and ``torch.distributed.run`` set it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE is {os.environ['WORLD_SIZE']!r}, "
                         "not a number of processes") from None


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``): backend ``nccl`` when the run trains on CUDA, else ``gloo``.
    Returns True if this call created the group (the caller destroys it), False if there is
    nothing to join or a group already exists."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 asks for several processes, but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: "
                         "start the processes with torchrun --nproc_per_node N")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def rank_seed(seed: int, rank: int) -> int:
    """The noise seed of ``rank`` > 0 of a run with ``seed``: a 63-bit number from numpy's
    SeedSequence of (seed, rank), so no two (seed, rank) pairs share a stream."""
    a, b = np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, dtype=np.uint32)
    return int((int(a) << 31) ^ int(b))


def context() -> "Context | None":
    """The active process group as a :class:`Context`, or None for a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


@dataclass(frozen=True)
class Context:
    """This process's place in the process group, and the collective steps of a run."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_writer(self) -> bool:
        """Rank 0 locks and writes the run directory."""
        return self.rank == 0

    def record(self, cfg):
        """``cfg`` with ``world_size`` set to this group's (a ValueError if it was set to another
        number, or if the batch does not split evenly over the processes)."""
        if cfg.world_size not in (1, self.world_size):
            raise ValueError(f"world_size is {cfg.world_size} in the configuration but the process group has "
                             f"{self.world_size} processes")
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {self.world_size} processes: each "
                             "takes batch_size / world_size examples a step; give a multiple of the world size")
        return replace(cfg, world_size=self.world_size)

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device becomes this process's GPU (``cuda:LOCAL_RANK``)."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def seed_noise(self, seed: int) -> None:
        """After the network is built: ranks > 0 draw their noise from a stream of their own."""
        if self.rank:
            torch.manual_seed(rank_seed(seed, self.rank))

    def train_loader(self, dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
        """This rank's shard of ``epoch``: a ``DistributedSampler`` (shuffled with ``seed`` and
        ``set_epoch(epoch)``, padded so that every rank takes the same number of steps),
        ``batch_size / world_size`` examples a step."""
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=int(seed), drop_last=False)
        sampler.set_epoch(int(epoch))
        per_rank = batch_size // self.world_size
        if hasattr(dataset, "images"):  # ImageTensorDataset: one index operation a batch
            return DataLoader(dataset, sampler=BatchSampler(sampler, per_rank, drop_last=False), batch_size=None)
        return DataLoader(dataset, sampler=sampler, batch_size=per_rank)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` (built again after every shrink; it broadcasts rank
        0's parameters and buffers when built)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled: for checkpoints and small decisions)."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sync_masks(self, model: torch.nn.Module) -> bool:
        """Compare the noise layers' masks of all ranks and give every rank rank 0's.  Returns
        True if they were identical already (ranks that decided alike); otherwise warns on
        rank 0's stderr, naming the layers that differed."""
        layers = _noise.noise_layers(model)
        masks = self.gather([n.mask.detach().cpu() for n in layers])
        differ = [n.layer_name for i, n in enumerate(layers)
                  if any(not torch.equal(masks[0][i], m[i]) for m in masks[1:])]
        if not differ:
            return True
        with torch.no_grad():
            for i, n in enumerate(layers):
                n.mask.copy_(masks[0][i].to(n.mask.device))
        if self.rank == 0:
            print(f"warning: the ranks took different pruning decisions in {', '.join(differ)}; "
                  "rank 0's are kept on every rank", file=sys.stderr)
        return False


@contextlib.contextmanager
def quiet_unless_writer(ctx: "Context | None"):
    """Ranks other than 0 print nothing to stdout inside the block."""
    if ctx is None or ctx.is_writer:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
