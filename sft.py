"""
sft.py -- the AutoCoA supervised stages (arXiv 2503.06580, Sec. 3.2-3.3), and the distributed/checkpoint
plumbing that rl.py and worldmodel.py share.

(Work in progress: this first commit holds the shared plumbing; the stages follow.)
"""
import glob
import json
import os
import random
import shutil

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# Distributed plumbing (shared with rl.py and worldmodel.py)

def setup_dist(run=None):
    """(rank, world_size, device). Under torchrun (RANK/WORLD_SIZE set) the process group is started once:
    nccl on GPU, gloo on CPU. `run` (a RunConfig) may force the device; default cuda if available, else cpu."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want = getattr(run, "device", "auto") if run is not None else "auto"
    use_cuda = torch.cuda.is_available() if want == "auto" else want.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, device


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if is_dist():
        dist.barrier()


def wrap_model(model, device, strategy="ddp"):
    """Data-parallel wrapper. ddp: every rank holds the whole model (small models); fsdp: FSDP2 fully_shard,
    one shard group per decoder layer then the root (parameters become DTensors). One process: unchanged."""
    if not is_dist() or strategy == "none":
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in unwrap(model).model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"config: parallel strategy must be ddp, fsdp or none, got {strategy!r}")


def unwrap(model):
    """The HF model inside a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return model.module if isinstance(model, DDP) else model


def all_mean(value, device=None):
    """Mean of a python float over ranks (for logging)."""
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], device=device or "cpu")
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# -----------------------------------------------------------------------------
# Checkpoints: <dir>/step_XXXXXX/ = save_pretrained weights + meta.json + optimizer/scheduler/RNG per rank

def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(model):
    """The whole model's weights as plain tensors, on every rank (gathers FSDP2 shards)."""
    if is_dist() and not isinstance(model, DDP):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def save_checkpoint(ckpt_dir, step, model, optimizer, scheduler=None, meta=None, keep=2):
    """Write <ckpt_dir>/step_<step:06d>/ atomically; every rank must call it. Returns the folder.

    Rank 0 writes the HF weights (save_pretrained, so the folder loads with from_pretrained) and meta.json
    (meta: config, data position, ... plus step); each rank writes its optimizer, scheduler and RNG state.
    Everything goes to step_XXXXXX.tmp first and is renamed once all ranks are done, so a killed run leaves
    either a whole checkpoint or none. Only the newest `keep` checkpoints are kept.
    """
    rank = dist.get_rank() if is_dist() else 0
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state_dict = full_state_dict(model)  # collective under FSDP2: every rank takes part
    if rank == 0:
        unwrap(model).save_pretrained(tmp, state_dict=state_dict)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**(meta or {}), "step": step, "world_size": dist.get_world_size() if is_dist() else 1}, f,
                      indent=1)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": rng_state()}, os.path.join(tmp, f"rank_{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(ckpt_dir):
    """Complete checkpoint folders, oldest first (.tmp leftovers of a killed run are ignored)."""
    return sorted(p for p in glob.glob(os.path.join(ckpt_dir, "step_*")) if not p.endswith(".tmp"))


def latest_checkpoint(ckpt_dir):
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Restore weights, optimizer, scheduler and this rank's RNG from a save_checkpoint folder; returns meta.

    Call it after wrap_model and after building the optimizer. The run must use the same number of ranks.
    """
    from transformers import AutoModelForCausalLM
    rank = dist.get_rank() if is_dist() else 0
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    world_size = dist.get_world_size() if is_dist() else 1
    if meta.get("world_size", 1) != world_size:
        raise ValueError(f"{path} was written by {meta['world_size']} ranks; resume with the same number "
                         f"(now {world_size})")
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(unwrap(model).parameters()).dtype)
    if is_dist() and not isinstance(model, DDP):  # FSDP2: scatter the full weights into the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(saved.state_dict())
    state = torch.load(os.path.join(path, f"rank_{rank}.pt"), weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return meta
