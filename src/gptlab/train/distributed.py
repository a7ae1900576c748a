"""Many processes, one run: DDP or FSDP2 under ``torchrun``, using PyTorch's own engines.

Launch the same ``gptlab train`` (or ``finetune sft``) command once per device::

    torchrun --nproc_per_node 8 -m gptlab train --preset gpt2              # one machine, 8 GPUs
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m gptlab train --preset gpt2

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them gptlab runs as one
process, as always. Backends: NCCL on CUDA, gloo on the CPU (which is how the tests run).

How the work is split. Every process draws the same *global* batch of ``batch_size * world``
sequences (the sampler's generator is seeded alike everywhere) and keeps its own slice of
``batch_size`` rows. So N processes with ``--batch-size B`` train on exactly the data that one
process with ``--batch-size N*B`` sees, and the gradients, averaged across processes, are the
same up to float rounding. The sampler state is therefore global too, which is what lets a run
resume with a different number of processes.

- DDP (the default with several processes): each process holds the whole model; gradients are
  averaged during backward. Rank 0 writes ordinary checkpoints.
- FSDP2 (``--fsdp``, ``torch.distributed.fsdp.fully_shard``): parameters, gradients and
  optimizer state are sharded, for models that do not fit one device. The weights are gathered
  to rank 0 for an ordinary ``model.safetensors``; the optimizer state is saved sharded, as a
  distributed checkpoint (``torch.distributed.checkpoint``) in ``last/distributed/``, which any
  number of processes can load (it is resharded on load).

Every process must run the same settings. They are compared at start-up, so a mismatch (a
different flag on one node) stops every rank with the same message instead of a hang later.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from gptlab.errors import UserError

SHARDS = "distributed"  # the folder of a checkpoint that holds FSDP's sharded optimizer state
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """True when torchrun (or a launcher like it) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


@contextmanager
def process_group(device: str = "auto") -> Iterator[Dist]:
    """Join the process group when launched by torchrun, and leave it at the end; a single
    process otherwise. Entered once per run, by whoever starts it, which hands the ``Dist`` on."""
    if not launched():
        yield Dist()
        return
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield Dist(rank, world, local)
    finally:
        dist.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """Each process uses its own GPU; CPU processes share the CPU."""
    if d.active and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a decision only rank 0 may take, such as a run dir)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_main(d: Dist, decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only (a decision that looks at and changes the file system);
    every rank gets its answer, or the same one-line error."""
    answer, error = None, None
    if d.is_main:
        try:
            answer = decide()
        except UserError as e:
            error = str(e)
    answer, error = broadcast((answer, error))
    if error is not None:
        raise UserError(error)
    return answer


def check_same_settings(settings: dict[str, Any], d: Dist) -> None:
    """Stop every rank with one message if the ranks were started with different settings."""
    if not d.active:
        return
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * d.world
    dist.all_gather_object(digests, digest)
    odd = [r for r, h in enumerate(digests) if h != digests[0]]
    if odd:
        raise UserError(f"the {d.world} processes were started with different settings (ranks {odd} differ from "
                        "rank 0); launch every process with the same command and files")


def shard_batch(batch: tuple[torch.Tensor, ...], d: Dist) -> tuple[torch.Tensor, ...]:
    """This rank's rows of a global batch."""
    if d.world == 1:
        return batch
    n = batch[0].size(0) // d.world
    return tuple(t[d.rank * n:(d.rank + 1) * n] for t in batch)


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module the loop runs forward and backward on: the model itself, DDP around it, or
    the model sharded in place by FSDP2 (each block its own unit, then the rest)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not d.active:
            raise UserError("--fsdp needs a process group: launch with torchrun (--nproc_per_node 1 works too)")
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if d.active and d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole state dict, gathered to rank 0's CPU (empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, d: Dist) -> None:
    """Every rank writes its shard of the optimizer state into ``folder`` (a distributed checkpoint).

    Only the per-parameter tensors (moments, step counts) are saved: the hyperparameters in
    ``param_groups`` come from the run's settings on resume, and leaving them out means the
    checkpoint holds no pickled Python values, only tensors and the ``.metadata`` index."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    if d.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    barrier()
    dcp.save({"optimizer": {"state": state["state"]}}, checkpoint_id=str(folder))
    barrier()


def _describe(e: BaseException) -> str:
    """An exception as one short line, for a UserError."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a distributed checkpoint's ``.metadata`` (a pickle) allowing only the classes such an
    index is made of; any other global, the thing a hostile pickle needs to run code, is refused."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata",
                                                  "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                                  "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},  # looks a name up among torch's layouts, nothing else
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "WindowsPath"},  # the folder it was saved to
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def read_sharded_metadata(folder: Path) -> Any:
    """The checked ``Metadata`` of the distributed checkpoint in ``folder``: read without running
    code from the file, its optimizer entries all tensors (a pickled value is never loaded), and
    its data files plain names inside ``folder``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    f = folder / ".metadata"
    try:
        with open(f, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except FileNotFoundError:
        raise UserError(f"{f} is missing; the sharded optimizer state is incomplete, resume from another "
                        "checkpoint") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... for damaged or hostile files
        raise UserError(f"{f} cannot be loaded safely ({_describe(e)}); it is corrupt or not a gptlab sharded "
                        "optimizer state") from None
    storage = getattr(metadata, "storage_data", None)
    entries = getattr(metadata, "state_dict_metadata", None)
    if not (isinstance(metadata, Metadata) and isinstance(storage, dict) and isinstance(entries, dict)):
        raise UserError(f"{f} is not a distributed checkpoint index; the sharded optimizer state is corrupt")
    odd = [k for k, v in entries.items() if str(k).startswith("optimizer.state.")
           and not isinstance(v, TensorStorageMetadata)]
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo)
                and isinstance(info.relative_path, str) and Path(info.relative_path).name == info.relative_path
                and info.relative_path not in ("", ".", "..") and not info.transform_descriptors):
            odd.append(str(getattr(index, "fqn", index)))
    if odd:
        raise UserError(f"{f} describes entries gptlab does not write ({', '.join(odd[:3])}); refusing to load the "
                        "sharded optimizer state")
    return metadata


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load a sharded optimizer state saved by any number of processes into this run's shards.

    ``torch.distributed.checkpoint`` would unpickle ``.metadata`` with the full unpickler; it
    gets the index read and checked by ``read_sharded_metadata`` instead, and then reads only
    tensors (with ``torch.load(weights_only=True)``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not folder.is_dir():
        raise UserError(f"{folder.parent} has no {SHARDS}/ optimizer state: it was not saved with --fsdp; resume it "
                        "without --fsdp")
    metadata = read_sharded_metadata(folder)

    class CheckedReader(dcp.FileSystemReader):
        def read_metadata(self) -> Any:
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return metadata

    current = get_optimizer_state_dict(model, optimizer)
    state = {"optimizer": {"state": current["state"]}}
    try:
        dcp.load(state, storage_reader=CheckedReader(str(folder)))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        raise UserError(f"{folder} cannot be loaded into this model's optimizer ({_describe(cause)}); it is "
                        "corrupt or from another model") from None
    set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"]["state"],
                                                "param_groups": current["param_groups"]})
