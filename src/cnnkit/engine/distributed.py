"""Data-parallel training across processes with PyTorch's own engine (torchrun + DDP).

``cnnkit train`` started by ``torchrun`` finds RANK / WORLD_SIZE / LOCAL_RANK in its environment
and joins the process group (nccl on CUDA, gloo on the CPU); ``cnnkit train --nproc N`` starts
torchrun itself. The rules:

* ``data.batch_size`` is per process: the global batch is batch_size x world_size, and the default
  learning rate follows the global batch (0.1 per 256 images for SGD). Each process reads a
  disjoint 1/world_size of every epoch's order (the same permutation of (seed, epoch) on all).
* Gradients are averaged by DistributedDataParallel; batch-norm statistics stay per process
  unless ``runtime.sync_bn`` (CUDA) makes them global.
* Training metrics are summed over processes; validation runs on the full split in every
  process (identical weights give identical results), so early stopping, plateau schedules and
  best-model choices agree everywhere without extra messages.
* Only rank 0 prints and writes files; every process waits at a barrier after each checkpoint.
* Resuming needs the world size the run was started with (the data order per process depends on
  it) unless told ``--allow-world-change``.
* Under ``torchrun --max-restarts N`` a restarted group finds its run through a marker file
  keyed by torchrun's run id and continues from the latest checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cnnkit.errors import CnnkitError

TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (no-op when alone)."""
    world = env_world_size()
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend, store=_attempt_store(rank, world), rank=rank, world_size=world, timeout=TIMEOUT
        )
    return Dist(rank=rank, world_size=world, local_rank=local_rank)


def _attempt_store(rank: int, world: int):
    """torchrun's store under a prefix of this restart attempt. After ``--max-restarts`` starts
    the group again, the store can still hold the previous attempt's addresses; a peer that
    reads a dead process's address fails to connect ("Connection refused")."""
    # local: a private torch module, loaded only when a torchrun group forms
    from torch.distributed.rendezvous import _create_c10d_store

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = _create_c10d_store(addr, port, rank, world, TIMEOUT)
    return dist.PrefixStore(f"cnnkit/attempt-{restart_count()}", store)


def current() -> Dist:
    """This process's place in the group (rank 0 of 1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (the tensor itself when alone)."""
    if current().enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(value):
    """Rank 0's ``value`` (any picklable object) in every process."""
    if not current().enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool) -> bool:
    """True when ``ok`` is true in every process (so all can raise together)."""
    if not current().enabled:
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item()) == 0


def restart_marker(cache_dir: Path, out_dir: str | Path) -> Path | None:
    """Where rank 0 notes its run folder for torchrun restarts (None outside torchelastic): a
    file under the cache folder, keyed by torchrun's run id and the runs folder (runs/ itself
    holds only run folders)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or env_world_size() <= 1 and "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    where = hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return cache_dir / "torchrun" / f"{safe}-{where}"


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def wrap(model: torch.nn.Module, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (``model`` itself when alone)."""
    if not current().enabled:
        return model
    if sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


FAULT_ENV = "CNNKIT_FAULT_INJECT"


def fault_hook():
    """For fault-tolerance tests: with ``CNNKIT_FAULT_INJECT=rank:epoch:step`` the named process
    kills itself (SIGKILL, as a crashed machine would) after that step, in the first attempt
    of a torchrun group only. Returns an ``after_step(epoch, step)`` for ``fit``, or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or restart_count() > 0:
        return None
    rank, fault_epoch, fault_step = (int(v) for v in spec.split(":"))
    if rank != current().rank:
        return None

    def hook(epoch: int, step: int) -> None:
        if (epoch, step) == (fault_epoch, fault_step):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def launch(nproc: int, argv: list[str]) -> int:
    """``cnnkit train --nproc N``: run the cnnkit command ``argv`` (without ``--nproc``) under
    torchrun with N processes on this machine; returns torchrun's exit code."""
    if nproc < 1:
        raise CnnkitError(f"--nproc must be >= 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise CnnkitError("--nproc starts torchrun itself; drop it when already under torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "cnnkit", *argv]
    return subprocess.call(command)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
