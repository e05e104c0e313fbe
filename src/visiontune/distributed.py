"""Data-parallel training under torchrun: who this process is, its process group, and the collectives.

Without torchrun there is no process group and every helper here is a no-op that returns its
input, so the engine and the pipeline read the same for one process and for many.
torch is imported inside the functions: the command line reads Launch before it may import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from visiontune import Stopped


@dataclass(frozen=True)
class Launch:
    """What torchrun tells each worker through its environment."""

    rank: int
    world_size: int
    local_rank: int
    run_id: str  # the same on every rank and across restarts: names the launch's one output folder
    restart_count: int  # above 0 once torchrun --max-restarts has restarted the workers

    @classmethod
    def from_env(cls) -> Launch | None:
        """This process's launch, or None when torchrun did not start it."""
        env = os.environ
        if "TORCHELASTIC_RUN_ID" not in env or "WORLD_SIZE" not in env:
            return None
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            run_id=env["TORCHELASTIC_RUN_ID"],
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )


@contextlib.contextmanager
def process_group(launch: Launch | None, device) -> Iterator[None]:
    """The process group for the block: nccl with one GPU per rank, gloo on a CPU; none without torchrun.

    Destroyed at the end whatever happens, so no rank leaves a group behind that holds its GPU.
    """
    if launch is None:
        yield
        return
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = _attempt_store(launch)
    ranks = {"rank": launch.rank, "world_size": launch.world_size} if store else {}
    dist.init_process_group(backend, store=store, device_id=device if backend == "nccl" else None, **ranks)
    try:
        with peer_loss_as_interrupt():  # one line, not a traceback, where a collective lost its peer
            yield
            dist.barrier()  # leave together: a rank gone early looks like a failure to the slower ones
    finally:
        dist.destroy_process_group()


class PeerLost(Stopped):
    """Another rank stopped (killed, out of memory, failed): this one stops as on Ctrl-C, its run
    KILLED and resumable, and torchrun restarts all ranks (--max-restarts) or ends the job."""


@contextlib.contextmanager
def peer_loss_as_interrupt() -> Iterator[None]:
    """A collective that fails because a peer is gone becomes PeerLost, not a traceback."""
    try:
        yield
    except Exception as err:
        if not _active() or not _lost_peer(err):
            raise
        cause = str(err).splitlines()[0].split(". ")[0][:200]  # gloo and nccl add paragraphs of advice
        raise PeerLost(f"another rank stopped ({cause})") from err


def _lost_peer(err: Exception) -> bool:
    import torch.distributed as dist

    # nccl raises DistError's subclasses; gloo a plain RuntimeError from its transport.
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "/gloo/" in str(err))


def _attempt_store(launch: Launch):
    """torchrun's store under a key prefix of this attempt's own, or None for torchrun's default.

    The agent keeps one store for all attempts of a launch, and a restarted rank could read
    the previous attempt's gloo or nccl addresses there and wait for ever (seen here with
    --max-restarts; pytorch issue 135712). With --standalone one agent restarts every rank,
    so their restart counts agree.
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, launch.world_size, is_master=False)
    return dist.PrefixStore(f"visiontune/attempt_{launch.restart_count}", store)


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: 0 without torchrun."""
    import torch.distributed as dist

    return dist.get_rank() if _active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0, which alone records the run (MLflow, checkpoints, Hydra's files)."""
    return rank() == 0


def broadcast(value):
    """Rank 0's `value` on every rank (a small picklable object: a run id, a folder)."""
    import torch.distributed as dist

    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if _active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do: one rank downloads, the others find the files."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Each value summed over all ranks (loss sums and counts of a phase), in one collective.

    float64 on the host side of the call: counts up to 2**53 stay exact, so an accuracy reduced
    over ranks is the one a single process computes.
    """
    return _reduced(values, device, "SUM")


def min_over_ranks(value: float, device) -> float:
    return _reduced([value], device, "MIN")[0]


def _reduced(values: list[float], device, op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    if not _active():
        return values
    # nccl reduces tensors on the rank's GPU only; gloo on the CPU.
    tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def data_parallel(module, find_unused_parameters: bool = False):
    """`module` inside DistributedDataParallel, which averages its gradients over the ranks.

    Only for the training step: evaluation runs the plain module, whose ranks see different
    numbers of val batches (DDP's per-forward buffer broadcast would then wait for ever).
    """
    if not _active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def sync_batchnorm(module, device) -> bool:
    """BatchNorm layers that compute their batch statistics over all ranks' images; whether done.

    Only on CUDA: SyncBatchNorm refuses CPU tensors, and there average_norm_statistics (after each
    epoch) keeps the running statistics the same on every rank instead.
    """
    import torch

    if not _active() or device.type != "cuda":
        return False
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place below a top that is no norm
    return True


def plain_batchnorm(module) -> None:
    """SyncBatchNorm layers back to BatchNorm2d (same parameters and statistics) before the
    model is logged: the logged model runs in one process, and exports to ONNX."""
    import torch

    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            plain = torch.nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            plain.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, plain.to(child.weight.device if child.affine else "cpu"))
        else:
            plain_batchnorm(child)


def average_norm_statistics(module) -> None:
    """Running statistics of the norm layers that trained, averaged over the ranks, as timm's
    dist_bn=reduce does after each epoch: without SyncBatchNorm each rank updated them from its
    own images. Frozen norms (eval mode) are the same everywhere and left exactly as they are."""
    import torch
    import torch.distributed as dist

    if not _active():
        return
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.training:
            for stat in (norm.running_mean, norm.running_var):
                if stat is not None:
                    dist.all_reduce(stat, op=dist.ReduceOp.SUM)
                    stat.div_(world_size())


def state_digest(module) -> str:
    """sha256 of every parameter and buffer, in state_dict order: equal digests, equal weights."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def same_weights_everywhere(module) -> str:
    """The digest of the weights, checked to be the same on every rank; raises if a rank differs."""
    import torch.distributed as dist

    from visiontune import VisiontuneError

    mine = state_digest(module)
    if not _active():
        return mine
    digests = [None] * world_size()
    dist.all_gather_object(digests, mine)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise VisiontuneError(
            f"after training, the weights of rank(s) {differing} differ from rank 0's: data-parallel "
            f"training went out of step (a bug); the model of rank 0 is not trustworthy"
        )
    return mine
