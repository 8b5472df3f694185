"""
plumbing.py -- what every trainer (sft.py, rl.py, worldmodel.py) and eval.py share, none of it AutoCoA itself:

  models              load_model / load_tokenizer (any HF causal LM by folder, stage name or hub id; a missing or
                      incomplete folder is one line naming the stage that writes it), pick_device, pick_dtype
  distributed setup   setup_dist (torchrun ranks, gloo on CPU / nccl on GPU), wrap_model (DDP, or FSDP2 with a
                      bf16 MixedPrecisionPolicy, on one process too), all_reduce / all_mean, print0, barrier
  LoRA                add_lora (peft adapters on the decoder's linear projections), base_dtype, is_lora, hf_model,
                      merge_lora (the output folder holds the merged weights)
  metric logs         log_line (one JSON line per step in <out>.metrics.jsonl, also to wandb or TensorBoard when
                      run.log asks), truncate_log (a resumed run rewrites what came after its checkpoint)
  checkpoints         save_checkpoint / load_checkpoint: <out>.ckpt/step_XXXXXX/ = the trained weights (each rank's
                      FSDP2 shard, or the whole once) + meta.json + optimizer, scheduler and RNG per rank + a
                      manifest of their sizes and SHA-256s, written to a .tmp folder and renamed, so a killed run
                      leaves a whole checkpoint or none; resume_checkpoint passes over a damaged one (a file cut
                      short, or changed at the same size) to the newest intact one
  loading, saving     load_sharded (load_model + wrap_model; under FSDP2 only rank 0 reads the weights),
                      full_state_dict (gathered for the HF output folder, in its dtype as it is gathered)
  the run guard       claim_run / release_run: a run never deletes an earlier run's output unless --overwrite,
                      and a lock refuses a second live run on the same out=
  accumulation        max_over_ranks (filler passes), grad_sync + backward_global (one gradient for the global
                      batch), add_token_weighted / token_weighted_means, sum_over_ranks, clip_grad_norm
  trainer helpers     resolve_model (a stage's init), load_trainee (its model, LoRA and all), claim_and_resume /
                      nothing_left / resume_run (the preamble of every trainer's main), cosine_lr (sft.py,
                      worldmodel.py), pad / collate (padded batches)

A trainer's loop reads: setup_dist -> claim_and_resume (claim_run, resume_checkpoint) -> nothing_left (finished_run:
nothing to do) -> load_sharded (load_trainee) -> resume_run (load_checkpoint) -> steps, each ending in log_line and
now and then save_checkpoint -> save the HF folder -> release_run.
"""
import atexit
import contextlib
import copy
import fcntl
import gc
import glob
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import ConfigError, RunConfig, partial_write, read_metrics


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
        atexit.register(end_dist)
    return rank, world_size, device


def end_dist():
    """At exit, while Python is still whole: free the wrapped models no one holds any more (DDP and FSDP2 keep the
    process group and its pending work alive), then destroy the group. Left to the interpreter's teardown, gloo's
    threads sometimes end a finished run with "terminate called without an active exception" (SIGABRT, exit -6).
    A script should hold its models in a function's locals, as the trainers' main() do, not in module globals."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


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
        for layer in hf_model(model).model.layers:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    if not is_dist() or strategy == "none":
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in hf_model(model).model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ConfigError(f"config: parallel strategy must be ddp, fsdp or none, got {strategy!r}")


def load_sharded(path, run, device, dtype, strategy="ddp", bf16=False, prepare=None):
    """(model, tokenizer): load_model, prepare(model) (the trainer's changes to the module tree: LoRA adapters,
    activation checkpointing), then wrap_model, without a whole copy of the weights per rank. Under FSDP2 on N
    ranks rank 0 reads the weights (into host RAM, the one whole copy), the others build the model on the meta
    device, every rank shards it, and each receives its shards from rank 0 by broadcast (then the buffers, such as
    the rotary frequencies, which the state dict leaves out; LoRA adapters are rank 0's too). DDP, none, or one
    process: as before."""
    prepare = prepare or (lambda model: model)
    if not (is_dist() and (strategy == "fsdp" or bf16)):
        model, tokenizer = load_model(path, run, device=device, dtype=dtype)
        return wrap_model(prepare(model), device, strategy, bf16), tokenizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    rank = dist.get_rank()
    model, tokenizer = load_model(path, run, device=torch.device("cpu" if rank == 0 else "meta"), dtype=dtype)
    model = prepare(model)
    whole = model.state_dict() if rank == 0 else {}
    model = wrap_model(model, device, "fsdp", bf16)
    if rank:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    return model, tokenizer


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


def plain_copy(model, device, dtype=None):
    """The HF model with whole, plain weights: the model itself, or under FSDP2 a copy on rank 0 holding the
    weights full_state_dict gathers in dtype (a collective: every rank calls this; the other ranks get None). Only
    FSDP2 gathers: the model itself needs no copy of its weights. A LoRA model comes back with its adapters merged
    into the weights (peft's merge_and_unload, in place: call it when training is over), so its folder loads with
    from_pretrained like any other."""
    if not is_fsdp(model):
        return merge_lora(unwrap(model))
    state_dict = full_state_dict(model, dtype)
    if not state_dict:
        return None
    from transformers import AutoModelForCausalLM
    copy = AutoModelForCausalLM.from_config(hf_model(model).config, dtype=next(iter(state_dict.values())).dtype)
    if is_lora(model):  # the same adapters, so that the gathered state dict's names and shapes fit
        copy = wrap_peft(copy, unwrap(model).peft_config["default"])
    copy.load_state_dict(state_dict)
    return merge_lora(copy).to(device)


def unwrap(model):
    """The HF model inside a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return model.module if isinstance(model, DDP) else model


# -----------------------------------------------------------------------------
# Models: any HF causal LM by path or name, on the run's device in the run's dtype (here, beside load_sharded,
# which builds on load_model: tools.py and config.py stay free of torch)

def pick_device(run):
    if run.device != "auto":
        return torch.device(run.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(run, device):
    if run.dtype != "auto":
        return getattr(torch, run.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def master_dtype(run):
    """The dtype trained weights are kept in: run.dtype, or float32 for "auto" (bf16 compute, where asked, comes
    from FSDP2's MixedPrecisionPolicy over these fp32 masters)."""
    return getattr(torch, run.dtype) if run.dtype != "auto" else torch.float32


def is_hub_id(name):
    """An owner/name the hub could hold (a path such as runs/tiny/sft123 or ./x is not one)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".") and \
        not os.path.isdir(name.split("/")[0])  # runs/sft2 with a runs/ folder here: a local path


def missing_model(path, what="model"):
    """The one-line error for a model folder that is not there: which folder, and which script writes it."""
    name = os.path.basename(os.path.normpath(path))
    writer = ("rl.py (rl.out=NAME)" if name.startswith("rl") else "worldmodel.py (worldmodel.out=NAME)"
              if name.startswith("worldmodel") else "sft.py (sft.out=NAME)" if name.startswith(("sft", "cot"))
              else "the stage whose out= is NAME").replace("NAME", name)
    return ConfigError(f"{what}: no model folder {path!r} ({writer} writes it; demo.py runs every stage)")


MODEL_FILES = (("config.json", ("config.json",)),  # what from_pretrained needs in a folder, and the files that give it
               ("weights (model.safetensors)", ("model.safetensors", "model.safetensors.index.json",
                                                "pytorch_model.bin", "pytorch_model.bin.index.json")),
               ("tokenizer (tokenizer.json)", ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                               "vocab.json")))


def check_model_folder(path, what="model"):
    """path, once it holds what from_pretrained needs (MODEL_FILES); else a one-line ConfigError naming what is
    missing (transformers says it in a long traceback, and only once the run has loaded everything else)."""
    if os.path.isfile(os.path.join(path, "meta.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path} is a checkpoint to resume from, not a model folder: the run's model is "
                          f"{os.path.dirname(os.path.normpath(path)).removesuffix('.ckpt')} (written when it ends)")
    missing = [name for name, files in MODEL_FILES if not any(os.path.isfile(os.path.join(path, f)) for f in files)]
    if missing:
        raise ConfigError(f"{what}: {path!r} is not a model folder: it has no {' and no '.join(missing)}")
    return path


def check_worldmodel_folder(path):
    """path, once it is a folder worldmodel.py wrote: its config.json records worldmodel_gold (main sets it), which a
    policy's folder lacks. A policy there would serve as a simulator without a word."""
    check_model_folder(path, "env.worldmodel")
    with open(os.path.join(path, "config.json")) as f:
        if "worldmodel_gold" not in json.load(f):
            raise ConfigError(f"env.worldmodel: {path!r} is not a world model (its config.json has no worldmodel_gold, "
                              f"which worldmodel.py writes; a policy's folder?)")
    return path


def model_path(name, run_dir, what="model"):
    """The folder a config's model name means: a folder, a stage output <run_dir>/<name>, or an owner/name hub
    id; anything else, or a folder that is not a model, is a ConfigError naming the folder expected under run_dir,
    before any hub call."""
    staged = os.path.join(run_dir, name)
    if os.path.isdir(name):
        return check_model_folder(name, what)
    if os.path.isdir(staged):
        return check_model_folder(staged, what)
    if is_hub_id(name):
        return name
    raise missing_model(staged if os.sep not in name else name, what)


def load_model(path, run=None, device=None, dtype=None):
    """(model, tokenizer) from an HF folder or hub name; the tokenizer as load_tokenizer gives it."""
    from transformers import AutoModelForCausalLM
    tokenizer = load_tokenizer(path)
    run = run or RunConfig()
    device = device or pick_device(run)
    dtype = dtype or pick_dtype(run, device)
    if device.type == "meta":  # the structure without the weights (plumbing.load_sharded: FSDP2 ranks but rank 0)
        from transformers import AutoConfig
        with device:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, tokenizer


def load_tokenizer(path):
    """The tokenizer of an HF folder or hub name as every script uses it: padding on the left (rollout.py needs
    it), EOS as the pad token where it has none.

    A path that is not a folder and not a hub id (or a hub id not cached while HF_HUB_OFFLINE=1) is a one-line
    ConfigError before any hub call: offline, transformers would retry the hub for minutes and never say which
    local folder was meant.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    if not os.path.isdir(path) and (not is_hub_id(path) or (
            constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(path, "config.json"), str))):
        raise missing_model(path)
    if os.path.isdir(path):
        check_model_folder(path)
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # a hub name the hub cannot serve (no network, a typo, a gated model): transformers' cause
        if os.path.isdir(path):
            raise
        raise ConfigError(f"model: cannot load {path!r} from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -----------------------------------------------------------------------------
# LoRA (peft, lora_rank > 0 in sft.py and rl.py): low-rank adapters on every linear projection of the decoder train,
# the base stays frozen. So the base is held in its compute dtype (bf16 on GPU: half the bytes of fp32 masters) with
# no gradients or AdamW state of its own, and rl.py's reference is the same model with the adapters off (no copy).

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, rank, alpha):
    """The HF model wrapped by peft with LoRA adapters of this rank on LORA_TARGETS; only they require grad.
    Their output is scaled by alpha / rank; B starts at zero, so the model starts as the base exactly. No dropout:
    it would make rl.py's ratio differ from 1 on policy. Adapters on a bf16 or fp16 base are kept in fp32 (peft's
    autocast_adapter_dtype), as the fp32 masters of full fine-tuning are: small updates vanish in bf16 weights."""
    from peft import LoraConfig
    return wrap_peft(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                       bias="none", task_type="CAUSAL_LM"))


def wrap_peft(model, config):
    """peft's get_peft_model, quiet: peft reads transformers' deprecated is_gradient_checkpointing (a FutureWarning
    a rank, every time a model is wrapped)."""
    from peft import get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def base_dtype(run, device, lora_rank):
    """The dtype a trainer loads its model in: fp32 masters (master_dtype) to fine-tune every weight; under
    LoRA the frozen base's compute dtype (pick_dtype: bf16 on GPU, fp32 on CPU), the adapters being fp32."""
    return pick_dtype(run, device) if lora_rank else master_dtype(run)


def is_lora(model):
    """A peft model (add_lora). While peft is not imported, no model can be one: runs without LoRA never load it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(unwrap(model), peft.PeftModel)


def hf_model(model):
    """The HF causal LM inside DDP and peft (peft puts its LoRA layers into it in place)."""
    return unwrap(model).get_base_model() if is_lora(model) else unwrap(model)


def merge_lora(model):
    """A LoRA model's HF model with the adapters merged into its weights (in place); any other model as it is."""
    return model.merge_and_unload() if is_lora(model) else model


def all_reduce(values, op=None):
    """Sum (or op) of a list of floats over ranks, as python floats; unchanged in one process."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


@contextlib.contextmanager
def generation_mode(model):
    """The module rollout.py should call (rl.py's rollouts and evals, sft.py's dev curve). FSDP2: gather every shard
    once for the whole rollout (ranks generate different lengths, so per-forward all-gathers would deadlock), then
    free them. DDP: the inner module."""
    from torch.distributed.fsdp import FSDPModule
    was_training = model.training
    model.eval()
    if isinstance(model, FSDPModule):
        with torch.no_grad():  # FSDP2 sets itself up at the root's first forward; unshard() needs that done
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
        model.set_reshard_after_forward(False)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.unshard()
    try:
        with torch.no_grad():
            yield unwrap(model)
    finally:
        if isinstance(model, FSDPModule):
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            model.set_reshard_after_forward(True)
        model.train(was_training)


def broadcast0(value):
    """Rank 0's python object on every rank (each rank passes its own; only rank 0's is kept)."""
    if not is_dist():
        return value
    holder = [value]
    dist.broadcast_object_list(holder)
    return holder[0]


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
        rows = [row for _, row in read_metrics(path) if row.get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


# -----------------------------------------------------------------------------
# Checkpoints: <dir>/step_XXXXXX/ = trained weights (per rank under FSDP2) + meta.json + optimizer/scheduler/RNG
# per rank + manifest.json

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


def full_state_dict(model, dtype=None):
    """The whole model's weights as plain tensors in host memory on rank 0 (the HF output folder; the other ranks
    get {}). Under FSDP2 they are gathered one tensor at a time (a collective: every rank calls it) and each is cast
    to dtype (None: the master weights' own) as it arrives, so no whole copy in the master dtype is ever built."""
    from torch.distributed.tensor import DTensor
    rank = dist.get_rank() if is_dist() else 0
    whole = {}
    for name, tensor in unwrap(model).state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if rank == 0:
            whole[name] = tensor.to("cpu", dtype or tensor.dtype)
    return whole


def save_pretrained(model, path, state_dict):
    """model.save_pretrained(path) of state_dict (full_state_dict's), with config.json naming the weights' dtype
    (save_pretrained names the model's own, the fp32 of master weights)."""
    model = unwrap(model)
    model.save_pretrained(path, state_dict=state_dict)
    dtype = next(iter(state_dict.values())).dtype
    if dtype != model.dtype:
        config = copy.deepcopy(model.config)
        config.dtype = str(dtype).split(".")[1]
        config.save_pretrained(path)


def save_checkpoint(ckpt_dir, step, model, optimizer, scheduler=None, meta=None, keep=2, also_keep=None):
    """Write <ckpt_dir>/step_<step:06d>/ atomically; every rank must call it. Returns the folder.

    Nothing is gathered: under FSDP2 each rank writes its own shard of the parameters that train
    (model_rank_<r>.pt; frozen ones come back from the run's init), otherwise rank 0 writes them whole (model.pt),
    in their training dtype. Rank 0 writes meta.json (meta: config, data position, ... plus step); each rank writes
    its optimizer, scheduler and RNG state (rank_<r>.pt). Each file's SHA-256 is computed as its bytes are written;
    rank 0 then records every file's size and hash in manifest.json, which load time checks (resume_checkpoint).
    Everything goes to step_XXXXXX.tmp first and is renamed once all ranks are done, so a killed run leaves either
    a whole checkpoint or none; a failed write (a full disk) removes the .tmp folder and is one line naming the
    folder and the cause, and the earlier checkpoints stay as they were. Only the newest `keep` are kept, and the
    one of step `also_keep` (sft.py's best dev step).
    """
    rank = dist.get_rank() if is_dist() else 0
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    with partial_write(tmp, f"checkpoint {final}"):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        sha256 = {}
        if rank == 0:
            meta = {**(meta or {}), "step": step, "world_size": dist.get_world_size() if is_dist() else 1}
            sha256["meta.json"] = write_hashed(os.path.join(tmp, "meta.json"),
                                               lambda f: f.write(json.dumps(meta, indent=1).encode()))
        weights = weights_file(model, rank)
        if weights:
            sha256[weights] = write_hashed(os.path.join(tmp, weights), lambda f: torch.save(trained_state(model), f))
        sha256[f"rank_{rank}.pt"] = write_hashed(os.path.join(tmp, f"rank_{rank}.pt"), lambda f: torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
             "rng": rng_state()}, f))
        for theirs in all_objects(sha256):
            sha256.update(theirs)
        if rank == 0:
            write_json(os.path.join(tmp, MANIFEST), {"sizes": {name: os.path.getsize(os.path.join(tmp, name))
                                                               for name in sorted(os.listdir(tmp))},
                                                     "sha256": dict(sorted(sha256.items()))})
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep else []:
            if also_keep is None or os.path.basename(old) != f"step_{also_keep:06d}":
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


MANIFEST = "manifest.json"  # {"sizes": {file: bytes}, "sha256": {file: hex}} of a checkpoint's files, written last


def weights_file(model, rank):
    """The file of a checkpoint that holds this rank's trained weights (None: rank 0 holds them all)."""
    if is_fsdp(model):
        return f"model_rank_{rank}.pt"
    return "model.pt" if rank == 0 else None


def trained_state(model):
    """This rank's part of the parameters that train (under FSDP2 its local shards), by name, in their own dtype."""
    from torch.distributed.tensor import DTensor
    return {name: (p.to_local() if isinstance(p, DTensor) else p).detach()
            for name, p in unwrap(model).named_parameters() if p.requires_grad}


class Hashing:
    """A file opened for writing that hashes the bytes passing through it: the checksum costs one pass over bytes
    already in memory, not a second read of the file."""
    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def write_hashed(path, write):
    """write(f) into a new file at path; returns the SHA-256 (hex) of what was written. A file object, not a path:
    a failed write keeps its OSError (torch.save given a path reports "unexpected pos")."""
    with open(path, "wb") as f:
        hashing = Hashing(f)
        write(hashing)
    return hashing.sha256.hexdigest()


def file_sha256(path, chunk=1 << 24):
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha256.update(block)
    return sha256.hexdigest()


def all_objects(obj):
    """obj of every rank, in rank order ([obj] in one process)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def check_checkpoint(path, rank=0):
    """None when every file of the checkpoint's manifest is there with the size it was written with, and the files
    this rank loads (its own and the shared ones) with the SHA-256 they were written with, else what is wrong. A
    checkpoint without a manifest, or without hashes (written before they had them), is checked for what it has."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        sizes, sha256 = manifest["sizes"], manifest.get("sha256", {})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} were written"
    for name, digest in sha256.items():
        owner = re.search(r"rank_(\d+)\.pt$", name)  # another rank's file is that rank's to check
        if (owner is None or int(owner[1]) == rank) and file_sha256(os.path.join(path, name)) != digest:
            return f"{name} has other contents than were written (same size, SHA-256 differs)"
    return None


def resume_checkpoint(ckpt_dir):
    """The newest intact checkpoint of ckpt_dir, or None when there is none at all. A damaged newer one (a file
    cut short, missing or changed) is reported in one line and passed over; its files stay. Only damaged ones:
    ConfigError. Every rank calls it and hashes the files it will load; all take the verdict of the first rank that
    found a problem."""
    rank = dist.get_rank() if is_dist() else 0
    found = list_checkpoints(ckpt_dir)
    for path in reversed(found):
        problem = next((p for p in all_objects(check_checkpoint(path, rank)) if p is not None), None)
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
      a run that ends removes its file (release_run), and so does one stopped by an error or a signal (config.cli);
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
    """Release every lock this process holds: its run stopped on an error or a signal (config.cli). With a signal,
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

    Call it after load_sharded (or wrap_model) and after building the optimizer. The run must use the same number
    of ranks and the same sharding (each rank reads its own file). A checkpoint written before checkpoints held
    sharded weights (an HF folder, model.safetensors) loads as it did then.
    """
    rank = dist.get_rank() if is_dist() else 0
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    world_size = dist.get_world_size() if is_dist() else 1
    if meta.get("world_size", 1) != world_size:
        raise ConfigError(f"{path} was written by {meta['world_size']} ranks; resume with the same number "
                         f"(now {world_size})")
    if os.path.exists(os.path.join(path, "config.json")):
        load_hf_weights(path, model)
    else:
        weights = weights_file(model, rank) or "model.pt"
        if not os.path.exists(os.path.join(path, weights)):
            raise ConfigError(f"{path} has no {weights}: it was written {'without' if is_fsdp(model) else 'with'} "
                              f"FSDP2; resume with the same parallel= and bf16= settings")
        saved = torch.load(os.path.join(path, weights), map_location="cpu", weights_only=True)
        with torch.no_grad():  # to_local() then is the shard itself: copy_ writes into the parameter
            mine = trained_state(model)
            if saved.keys() != mine.keys():
                raise ConfigError(f"{path}: its weights are not this model's trained parameters (another model, or "
                                  f"another choice of what trains); resume with the run's own settings")
            for name, tensor in mine.items():
                tensor.copy_(saved[name])
    state = torch.load(os.path.join(path, f"rank_{rank}.pt"), weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return meta


def load_hf_weights(path, model):
    """The whole weights of an HF folder into model (scattered into its shards under FSDP2)."""
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(unwrap(model).parameters()).dtype)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(saved.state_dict())


# -----------------------------------------------------------------------------
# Gradient accumulation over micro-batches and ranks: the bookkeeping that lets 1 process and N processes take the
# same optimizer step on the same global batch, kept here so that a trainer's step reads as its math

def max_over_ranks(count):
    """The largest count over ranks (int). Every rank must run the same number of forward/backward passes: FSDP2
    all-gathers each layer inside forward and DDP all-reduces in the last backward, so a rank that stopped early
    would leave the others waiting forever. A rank with fewer micro-batches pads up to this with empty ones."""
    return int(all_reduce([count], dist.ReduceOp.MAX if is_dist() else None)[0])


def sum_over_ranks(sums):
    """{key: float} summed over ranks, keys in sorted order: every rank must put the same keys in the same place of
    the one all_reduce."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce([sums[k] for k in keys])))


def grad_sync(model, last):
    """Context for one micro-batch of an optimizer step: DDP all-reduces the gradients in every backward unless under
    model.no_sync(), and only the `last` micro-batch needs to. DDP decides when the forward runs, so the context
    holds the forward as well as the backward. FSDP2 and one process: nothing to do."""
    return contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()


def backward_global(loss):
    """loss.backward() for a micro-batch whose loss is already normalised by the global batch's count (tokens,
    trajectories or pairs over all ranks and micro-batches). DDP and FSDP2 average the gradients over ranks;
    scaling by world_size undoes that mean, so the gradients add up to the global loss's."""
    (loss * (dist.get_world_size() if is_dist() else 1)).backward()


def add_token_weighted(sums, stats):
    """Accumulate one micro-batch's stats (per-token means, with its token count under "tokens") into sums as
    sums weighted by its tokens; token_weighted_means turns them into means over everything accumulated."""
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + (v * stats["tokens"] if k != "tokens" else v)


def token_weighted_means(sums):
    """One number per stat of add_token_weighted's sums for the global batch: a mean over every token of every
    micro-batch on every rank (a plain mean of per-rank means would weigh a rank of short trajectories as much as a
    rank of long ones). Sorted keys, "tokens" left out."""
    totals = sum_over_ranks(sums)
    tokens = max(totals.get("tokens", 0.0), 1.0)
    return {k: v / tokens for k, v in totals.items() if k != "tokens"}


def clip_grad_norm(model, max_norm):
    """Clip the gradients to a global norm of max_norm (0 = off: measured only, for the log); returns the norm
    before clipping as a float. Under FSDP2 the norm is a DTensor: full_tensor() makes it the whole model's."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# -----------------------------------------------------------------------------
# What the trainers (sft.py, rl.py, worldmodel.py) share beyond the plumbing above: the model they start from, the
# run's claim and resume, the lr schedule and the padded batch

def resolve_model(init, cfg, key):
    """A model folder from a stage's init setting (`key` names it in errors: sft.init, eval.init, chat.init):
    base (the first stage's, built here in the tiny world), an existing path, a stage output under run.dir, or a
    hub name."""
    from data import base_model_path
    if init == "base":
        return base_model_path(cfg)
    return model_path(init, cfg.run.dir, f"{key}={init!r}")


def load_trainee(init, run, device, stage):
    """(model, tokenizer) of the model a stage trains, from folder init, wrapped for the run (load_sharded).
    stage: sft.py's or rl.py's config (parallel, bf16, grad_checkpointing, lora_rank, lora_alpha). fp32 masters, or
    under LoRA fp32 adapters on the frozen base in its compute dtype (plain_copy merges them into the output)."""
    def prepare(model):  # before sharding, on every rank: the same module tree everywhere
        model.config.use_cache = False
        if stage.grad_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return add_lora(model, stage.lora_rank, stage.lora_alpha) if stage.lora_rank else model
    return load_sharded(init, run, device, base_dtype(run, device, stage.lora_rank), stage.parallel, stage.bf16,
                        prepare)


def claim_and_resume(run_dir, out, flags, rank):
    """Claim out= (claim_run on rank 0, before anything is loaded or written; the others wait) and return the
    checkpoint --resume continues from (None: the run starts afresh)."""
    if rank == 0:
        claim_run(run_dir, out, flags)
    barrier()
    return resume_checkpoint(os.path.join(run_dir, out + ".ckpt")) if "resume" in flags else None


def nothing_left(run_dir, out, ckpt, steps, who, rank):
    """True when the run under out= is finished (finished_run): says so in one line and releases the claim."""
    out_dir = os.path.join(run_dir, out)
    if not finished_run(out_dir, ckpt, steps):
        return False
    print0(f"{who}: {out_dir} is finished ({steps} steps): nothing to do (--overwrite starts over)")
    if rank == 0:
        release_run(run_dir, out)
    return True


def resume_run(ckpt, ckpt_dir, model, optimizer, scheduler, metrics_path, who, rank):
    """Load checkpoint ckpt (None: a fresh start) into model, optimizer and scheduler and return its meta
    ({"step": 0} when fresh); the metrics log keeps the rows up to that step. A fresh start under --resume (no
    whole checkpoint yet; claim_run dealt with the rest) drops what a killed run left in ckpt_dir."""
    meta = {"step": 0}
    if ckpt:
        meta = load_checkpoint(ckpt, model, optimizer, scheduler)
        print0(f"{who}: resumed from {ckpt} at step {meta['step']}")
    elif rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if rank == 0:
        truncate_log(metrics_path, meta["step"])  # from the start: a fresh log
    barrier()
    return meta


def cosine_lr(step, steps, warmup_steps, min_lr_ratio, peak=1.0):
    """The lr at `step` of `steps`: linear warm-up to peak over warmup_steps (a shorter run ends warming up), then a
    cosine down to peak * min_lr_ratio. peak=1.0 gives the factor a LambdaLR multiplies the base lr by."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pad(rows, value, dtype=torch.long, left=False):
    """(B, longest row) tensor of the rows (lists of numbers), filled with value past each row's end (left=True:
    before its start)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        out[i, start:start + len(r)] = torch.tensor(r, dtype=dtype)
    return out


def collate(seqs, pad_id, device):
    """Right-padded (B, T) input ids, attention mask and float32 target mask of sequences {"ids", "mask"}."""
    ids = pad([s["ids"] for s in seqs], pad_id)
    attn = pad([[1] * len(s["ids"]) for s in seqs], 0)
    target = pad([s["mask"] for s in seqs], 0, torch.float32)
    return ids.to(device), attn.to(device), target.to(device)
