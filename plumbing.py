"""
plumbing.py -- what every trainer (sft.py, rl.py, worldmodel.py) and eval.py share, none of it AutoCoA itself:

  distributed setup   setup_dist (torchrun ranks, gloo on CPU / nccl on GPU), wrap_model (DDP, or FSDP2 with a
                      bf16 MixedPrecisionPolicy, on one process too), all_reduce / all_mean, print0, barrier
  metric logs         log_line (one JSON line per step in <out>.metrics.jsonl, also to wandb or TensorBoard when
                      run.log asks), truncate_log (a resumed run rewrites what came after its checkpoint)
  checkpoints         save_checkpoint / load_checkpoint: <out>.ckpt/step_XXXXXX/ = HF weights + meta.json +
                      optimizer, scheduler and RNG per rank + a manifest of their sizes, written to a .tmp folder
                      and renamed, so a killed run leaves a whole checkpoint or none; resume_checkpoint passes over
                      a damaged one (a file cut short) to the newest intact one
  the run guard       claim_run / release_run: a run never deletes an earlier run's output unless --overwrite,
                      and a lock refuses a second live run on the same out=

A trainer's loop reads: setup_dist -> claim_run -> resume_checkpoint (finished_run: nothing to do) -> wrap_model
-> load_checkpoint -> steps, each ending in log_line and now and then save_checkpoint -> save the HF folder ->
release_run.
"""
import contextlib
import fcntl
import glob
import json
import os
import random
import re
import shlex
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tools import ConfigError, partial_write


# -----------------------------------------------------------------------------
# Distributed setup

def setup_dist(run=None):
    """(rank, world_size, device). Under torchrun (RANK/WORLD_SIZE set) the process group is started once:
    nccl for GPU tensors, gloo for CPU tensors (all_reduce and all_mean reduce CPU tensors; nccl alone has no
    CPU backend). `run` (a RunConfig) may force the device; default cuda if available, else cpu."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want = getattr(run, "device", "auto") if run is not None else "auto"
    use_cuda = torch.cuda.is_available() if want == "auto" else want.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    return rank, world_size, device


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


PROGRESS_EVERY_S = 30  # a log file gets one progress line this often: a trace of the pace, not of every step


class LineLog:
    """What tqdm draws, made for a log file: each redraw ("\r" + the bar) replaces the pending line, which is
    written once every `every_s` seconds and when the bar ends ("\n"). A terminal redraws one line in place; a
    file keeps every redraw (a stage's log under the demo was a single line of them)."""

    def __init__(self, stream, every_s=PROGRESS_EVERY_S):
        self.stream, self.every_s, self.pending, self.next_t = stream, every_s, "", 0.0

    def write(self, text):
        for piece in re.split(r"[\r\n]", text):
            if piece.strip():
                self.pending = piece.rstrip()
        if self.pending and ("\n" in text or time.monotonic() >= self.next_t):
            self.stream.write(self.pending + "\n")
            self.pending, self.next_t = "", time.monotonic() + self.every_s

    def flush(self):
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on stderr (kwargs: tqdm's): redrawn in place on a terminal, a line every PROGRESS_EVERY_S
    seconds in a log file (LineLog). Every bar of the trainers, eval and synthesis is one of these."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, file=LineLog(sys.stderr), ascii=True, **kwargs)


def progress(items, size, desc, environment=None, unit="q"):
    """The items in slices of `size`, with a progress_bar on stderr (rank 0): items/s and, when an environment is
    given, the real or simulated calls it has answered and its failed ones so far. Every loop that may take more
    than a few seconds goes through one, so no eval or synthesis sits silent for minutes."""
    bar = progress_bar(total=len(items), desc=desc, unit=unit, disable=int(os.environ.get("RANK", 0)) != 0 or not items)
    try:
        for i in range(0, len(items), size):
            yield items[i:i + size]
            bar.update(len(items[i:i + size]))
            if hasattr(environment, "calls"):
                bar.set_postfix(calls=environment.calls, failures=getattr(environment, "failures", 0))
    finally:
        bar.close()


def barrier():
    if is_dist():
        dist.barrier()


def wrap_model(model, device, strategy="ddp", bf16=False):
    """Data-parallel wrapper. ddp: every rank holds the whole model (small models); fsdp: FSDP2 fully_shard,
    one shard group per decoder layer then the root (parameters become DTensors). One process: unchanged, except
    with bf16, which is FSDP2's MixedPrecisionPolicy on any number of ranks (a 1-rank group when not under
    torchrun): bf16 parameters in forward/backward, fp32 master weights and gradient reductions."""
    if bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        start_one_rank_group(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in unwrap(model).model.layers:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
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
    raise ConfigError(f"config: parallel strategy must be ddp, fsdp or none, got {strategy!r}")


def check_bf16(bf16, strategy, section):
    """bf16 is FSDP2's mixed precision (wrap_model): with ddp or none it would silently mean fsdp."""
    if bf16 and strategy != "fsdp":
        raise ConfigError(f"config: {section}.bf16=true needs {section}.parallel=fsdp (got {strategy!r})")


def start_one_rank_group(device):
    """FSDP2 needs a process group: under `torchrun --nproc_per_node 1`, its rendezvous (a store of our own would
    wait forever for torchrun's agent); under python, a 1-rank group on a free local port. Once per process."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
        return
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def plain_copy(model, state_dict, device):
    """The HF model with whole, plain weights: the model itself, or under FSDP2 a copy holding state_dict (the
    gathered weights of full_state_dict, in the master weights' dtype)."""
    if not is_fsdp(model):
        return unwrap(model)
    from transformers import AutoModelForCausalLM
    copy = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state_dict.values())).dtype)
    copy.load_state_dict(state_dict)
    return copy.to(device)


def unwrap(model):
    """The HF model inside a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return model.module if isinstance(model, DDP) else model


def all_reduce(values, op=None):
    """Sum (or op) of a list of floats over ranks, as python floats; unchanged in one process."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def all_mean(value):
    """Mean of a python float over ranks (for logging)."""
    return all_reduce([float(value)])[0] / (dist.get_world_size() if is_dist() else 1)


# -----------------------------------------------------------------------------
# Metric loggers: the rows log_line writes to <out>.metrics.jsonl, also sent to Weights & Biases or TensorBoard
# (run.log=wandb|tensorboard, rank 0 only). Neither package is a dependency: when the one asked for is missing,
# one warning line and the no-op logger, so the training code never asks which logger it has.

class NullLogger:
    def log(self, row):
        pass


class WandbLogger:
    def __init__(self, run, name, config):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project="autocoa", group=run.name, name=f"{run.name}/{name}", config=config,
                              dir=run.dir, reinit=True)  # reinit: a pipeline runs several stages in one process

    def log(self, row):
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                     step=row.get("step"))


class TensorBoardLogger:
    def __init__(self, run, name, config):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.writer = SummaryWriter(os.path.join(run.dir, "tensorboard", name))
        self.writer.add_text("config", json.dumps(config, indent=1))

    def log(self, row):
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, row.get("step", 0))
        self.writer.flush()  # a crashed run keeps what it logged


LOGGER = NullLogger()  # the logger of the stage running in this process; start_logging sets it


def start_logging(run, name, config, rank=0):
    """Point log_line at run.log's logger for stage `name` (rank 0; the other ranks never call log_line)."""
    global LOGGER
    kinds = {"none": NullLogger, "wandb": WandbLogger, "tensorboard": TensorBoardLogger}
    if run.log not in kinds:
        raise ConfigError(f"config: run.log must be none, wandb or tensorboard, got {run.log!r}")
    LOGGER = NullLogger()
    if rank == 0 and run.log != "none":
        try:
            LOGGER = kinds[run.log](run, name, config)
        except ImportError as e:
            print0(f"warning: run.log={run.log} but {e}; metrics go to the JSONL files only")
    return LOGGER


def log_line(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    LOGGER.log(row)  # and to wandb / tensorboard when run.log asks for it (a no-op otherwise)


def truncate_log(path, step):
    """Keep metric lines up to `step` (a resumed run rewrites what came after its checkpoint); step 0, a run that
    starts afresh: none, the file goes (rows without a step, such as a report, too)."""
    if step == 0 and os.path.exists(path):
        os.remove(path)
    elif os.path.exists(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(lines)


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
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def save_checkpoint(ckpt_dir, step, model, optimizer, scheduler=None, meta=None, keep=2):
    """Write <ckpt_dir>/step_<step:06d>/ atomically; every rank must call it. Returns the folder.

    Rank 0 writes the HF weights (save_pretrained, so the folder loads with from_pretrained) and meta.json
    (meta: config, data position, ... plus step); each rank writes its optimizer, scheduler and RNG state; rank 0
    then records every file's size in manifest.json, which load time checks (resume_checkpoint). Everything goes to
    step_XXXXXX.tmp first and is renamed once all ranks are done, so a killed run leaves either a whole checkpoint
    or none; a failed write (a full disk) removes the .tmp folder and is one line naming the folder and the cause,
    and the earlier checkpoints stay as they were. Only the newest `keep` checkpoints are kept.
    """
    rank = dist.get_rank() if is_dist() else 0
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    with partial_write(tmp, f"checkpoint {final}"):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        state_dict = full_state_dict(model)  # collective under FSDP2: every rank takes part
        if rank == 0:
            unwrap(model).save_pretrained(tmp, state_dict=state_dict)
            write_json(os.path.join(tmp, "meta.json"),
                       {**(meta or {}), "step": step, "world_size": dist.get_world_size() if is_dist() else 1})
        with open(os.path.join(tmp, f"rank_{rank}.pt"), "wb") as f:  # a file object: a failed write keeps its
            torch.save({"optimizer": optimizer.state_dict(),       # OSError (a path gives "unexpected pos")
                        "scheduler": scheduler.state_dict() if scheduler else None, "rng": rng_state()}, f)
        barrier()
        if rank == 0:
            write_json(os.path.join(tmp, MANIFEST), {"sizes": {name: os.path.getsize(os.path.join(tmp, name))
                                                               for name in sorted(os.listdir(tmp))}})
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


MANIFEST = "manifest.json"  # {"sizes": {file: bytes}} of a checkpoint's files, written last


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def check_checkpoint(path):
    """None when every file of the checkpoint's manifest is there with the size it was written with, else what is
    wrong. A checkpoint without a manifest (written before they had one) is taken as it is."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            sizes = json.load(f)["sizes"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} were written"
    return None


def resume_checkpoint(ckpt_dir):
    """The newest intact checkpoint of ckpt_dir, or None when there is none at all. A damaged newer one (a file
    cut short or missing) is reported in one line and passed over; its files stay. Only damaged ones: ConfigError."""
    found = list_checkpoints(ckpt_dir)
    for path in reversed(found):
        problem = check_checkpoint(path)
        if problem is None:
            if path != found[-1]:
                print0(f"resuming from {path}, the newest intact checkpoint")
            return path
        print0(f"warning: checkpoint {path} is damaged: {problem}")
    if found:
        raise ConfigError(f"no intact checkpoint in {ckpt_dir}: all {len(found)} are damaged (--overwrite starts over)")
    return None


def checkpoint_step(path):
    return int(os.path.basename(path).split("_")[1])


def finished_run(out_dir, ckpt, steps):
    """Nothing left to do: the run's output folder exists (written last, so the run ended) and its checkpoint, if
    any, reached `steps` (a --resume with more steps goes on from it)."""
    return os.path.isdir(out_dir) and (ckpt is None or checkpoint_step(ckpt) >= steps)


# -----------------------------------------------------------------------------
# The run guard: a run never destroys what an earlier run left, and two live runs never share an out=

RUN_FLAGS = {"resume": "continue the run under out= from its newest checkpoint (same weights as an unbroken run)",
             "overwrite": "delete what an earlier run left under out= (folder, checkpoints, metrics) and start over"}
_LOCKS = {}  # lock file path -> (its open file, the run's outputs' suffixes), held for the life of this process
TRAINER_OUTPUTS = ("", ".ckpt", ".metrics.jsonl")  # what a trainer leaves under out=: folder, checkpoints, metrics


def claim_run(run_dir, out, flags, outputs=TRAINER_OUTPUTS):
    """Lock <run_dir>/<out>.lock and check what an earlier run left under this out=, before anything is written.

    - another live process holds the lock: ConfigError naming its PID. fcntl locks die with their process: a
      killed run may leave the file, holding its dead PID, but never a held lock, and the next run takes it over;
      a run that ends removes its file (release_run), and so does one stopped by an error or a signal (tools.cli);
    - <out> + each of `outputs` (a trainer's: <out>/, <out>.ckpt/, <out>.metrics.jsonl) exist, and neither --resume
      nor --overwrite was given: ConfigError saying how to do either (a fresh run would replace them);
    - --overwrite: they are deleted now, and the run starts over.
    Call it on rank 0 only. The lock belongs to the process: a second main() in it (demo.py) may claim again.
    """
    if "resume" in flags and "overwrite" in flags:
        raise ConfigError("give --resume or --overwrite, not both")
    os.makedirs(run_dir, exist_ok=True)
    lock_path = os.path.join(run_dir, out + ".lock")
    while lock_path not in _LOCKS:
        f = open(lock_path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(f"{os.path.join(run_dir, out)} is in use by a live run (PID {holder}; lock "
                              f"{lock_path}): wait for it, or give this run another out=") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (and removed) it between our open and our lock: take the new one
            f.close()
            continue
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _LOCKS[lock_path] = (f, outputs)
    left = [p for p in (os.path.join(run_dir, out + s) for s in outputs) if os.path.exists(p)]
    if left and "overwrite" in flags:
        for p in left:
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        print0(f"--overwrite: deleted {', '.join(left)}")
    elif left and "resume" not in flags:
        release_run(run_dir, out)
        how = "--resume continues it, --overwrite deletes it and starts over" if ".ckpt" in outputs else \
            "--overwrite replaces it"
        raise ConfigError(f"{', '.join(left)} exist(s), left by an earlier run: {how} (or choose another out=)")


def release_run(run_dir, out):
    """Drop the lock of claim_run and remove its file (at the end of a run; a crash drops the lock when the process
    ends, leaving a file that is not a lock). Removed while still held, so no other run can hold that file then."""
    path = os.path.join(run_dir, out + ".lock")
    f, _ = _LOCKS.pop(path, (None, None))
    if f is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        f.close()


def stop_runs(signal_name=None):
    """Release every lock this process holds: its run stopped on an error or a signal (tools.cli). With a signal,
    returns what the person who sent it needs next: each stopped trainer's newest checkpoint and the command that
    continues from it (the steps after it are lost)."""
    notes = []
    for path, (_, outputs) in list(_LOCKS.items()):
        base = path[:-len(".lock")]
        release_run(*os.path.split(base))
        if signal_name is None or ".ckpt" not in outputs:
            continue
        args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
        command = "the same torchrun command with --resume" if "LOCAL_RANK" in os.environ else \
            shlex.join(["python", os.path.relpath(sys.argv[0]), *args, "--resume"])
        newest = latest_checkpoint(base + ".ckpt")
        notes.append(f"newest checkpoint {newest} (the steps after it are lost): {command} continues from it"
                     if newest else f"no checkpoint yet: {command} starts it over")
    return "; ".join(notes)


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
        raise ConfigError(f"{path} was written by {meta['world_size']} ranks; resume with the same number "
                         f"(now {world_size})")
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(unwrap(model).parameters()).dtype)
    if is_fsdp(model):  # FSDP2: scatter the full weights into the shards
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
