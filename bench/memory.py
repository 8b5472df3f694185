"""
bench/memory.py -- peak GPU memory per phase of the 7B recipe, measured without a GPU: the real Qwen2-7B shapes
under fake tensors (FakeTensorMode: shapes and dtypes, no storage), the project's own code for every step, and
torch's memory trackers counting each tensor the step allocates. Ends with one JSON line.

Setups (each: the model built from a transformers Qwen2Config, fp32 master weights unless said otherwise):
  fsdp       `ranks` ranks of FSDP2 (a fake process group, rank 0 measured), exactly as plumbing.wrap_model shards:
             fully_shard per decoder layer then the root, bf16 MixedPrecisionPolicy over fp32 masters;
             AdamW as sft.py / rl.py build it; activation checkpointing as rl.py enables it
  lora       one GPU: peft LoRA (rank lora_rank on q, k, v, o, gate, up, down) over a frozen bf16 base, adapters
             and their AdamW state in fp32; the reference is the same model with the adapter disabled
  full       one GPU, full fine-tuning: FSDP2 on a 1-rank group (what bf16=true means on one process)
  full_small the same at the small shape (`small`, Qwen2.5-1.5B's by default): up to which size it fits
Phases (peak per rank, against gpu_gb):
  sft2        one optimizer step of SFT-2/3 (sft.train_step): one sequence of sft2_tokens per rank
  sft1        one optimizer step of SFT-1: one pair (chosen + rejected) of sft1_tokens each per rank
  rl_update   one GRPO update (rl.update): one micro-batch of micro_batch trajectories of prompt_tokens +
              new_tokens, logits of the completion only, the bf16 reference forward for the KL, the entropy
  rl_rollout  the policy as rl.generation_mode hands it to rollout.py (FSDP2: gathered whole in bf16), and
              rollout.py's RowCache for this rank's trajectories (prompts * group / ranks): the prompts prefilled
              in one chunk, the cache doubled as the decode steps past its end do, then the last decode step (the
              longest attention; the steps between allocate less). One GPU: the most trajectories decoded
              together that fit (its "trajectories"; rl.rollout_batch would be set to it)
A check at a small shape (agreement): one plain fp32 AdamW step measured by the tracker under fake tensors and on
real CPU tensors, and parameters + gradients + AdamW state against 16 bytes a parameter.

What the numbers are: bytes of live tensors as torch.distributed._tools' MemTracker / FSDPMemTracker count them
(GB = 1e9 bytes; an "80 GB" card holds 80 GiB = 85.9e9). Not counted: the CUDA context, NCCL buffers, allocator
fragmentation and cuBLAS workspaces (keep a few GB of room). The fake tensors live on the cpu device (this torch
has no CUDA, and FSDP2's device mesh and FakeTensorMode need a real device type), so attention runs the CPU
fused kernel's shapes: like FlashAttention no T x T scores, which CUDA's kernels also avoid. Fake tensors carry no
values, so a number the code reads back from a tensor (.item(), .tolist()) is supplied (Scalars): 1 for counts
and norms, the cache's length during the rollout; and transformers, which takes them for a trace, is told to skip
the attention mask where a real run does (as_real_masks). Each setup first runs one untracked SFT step (AdamW's
state exists from then on, as in every later step). SFT phases hold no reference model; RL phases add it.

    python bench/memory.py                                  # the 7B recipe, every setup: minutes on CPU, no GPU
    python bench/memory.py setups=fsdp ranks=8 sft2_tokens=16384
    python bench/memory.py big=tiny small=tiny sft2_tokens=64 sft1_tokens=48 prompt_tokens=16 new_tokens=48

Not here: time (tokens/s; bench/gpu_check.py measures it on a GPU), pipeline or tensor parallelism, vLLM.
"""
import contextlib
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import plumbing  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402
from rollout import Episode, RowCache, forward_chunk  # noqa: E402
from config import ConfigError, check_ranges, cli, read_key_values  # noqa: E402

GB = 1e9
SHAPES = {  # Qwen2Config fields; untied embeddings, as DeepSeek-R1-Distill-Qwen-7B and -1.5B have
    "qwen7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
               "intermediate_size": 18944, "vocab_size": 152064},
    "qwen1p5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                 "intermediate_size": 8960, "vocab_size": 151936},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 512},
}
SETUPS = ("fsdp", "lora", "full", "full_small")


@dataclass
class Args:
    big: str = "qwen7b"  # the shape of the fsdp, lora and full setups (qwen7b | qwen1p5b | tiny)
    small: str = "qwen1p5b"  # the shape of full_small: full fine-tuning on one GPU
    setups: str = ",".join(SETUPS)  # which setups to run, comma-separated (see the docstring)
    ranks: int = 8  # FSDP2 ranks of the fsdp setup
    sft2_tokens: int = 8192  # SFT-2/3 sequence length (the paper's cutoff), one sequence per rank per forward
    sft1_tokens: int = 6144  # SFT-1: each continuation of the pair (the paper's cutoff)
    prompt_tokens: int = 512  # RL prompt length
    new_tokens: int = 8192  # RL completion length (the paper's max response)
    prompts: int = 48  # RL prompts per step, all ranks (the paper's)
    group: int = 5  # RL trajectories per prompt (the paper's)
    micro_batch: int = 1  # RL trajectories per forward/backward (configs/qwen7b.yaml's rl.micro_batch)
    kl_coef: float = 0.001  # > 0: the reference forward is part of the update (the paper's 0.001)
    entropy_coef: float = 0.001  # > 0: the update computes the entropy over the vocabulary (the paper's 0.001)
    lora_rank: int = 64  # LoRA rank r of the lora setup
    gpu_gb: float = 80.0  # the card's memory, GB
    check_hidden: int = 256  # the agreement check's shape: hidden size (a real fp32 step on CPU runs at it)

    RANGES = {"ranks": "[1, inf)", "sft2_tokens": "[2, inf)", "sft1_tokens": "[2, inf)", "prompt_tokens": "[1, inf)",
              "new_tokens": "[2, inf)", "prompts": "[1, inf)", "group": "[1, inf)", "micro_batch": "[1, inf)",
              "kl_coef": "[0, inf)", "entropy_coef": "[0, inf)", "lora_rank": "[1, inf)", "gpu_gb": "(0, inf)",
              "check_hidden": "[8, inf)"}


# -----------------------------------------------------------------------------
# Fake tensors, a fake process group, and the numbers read back from tensors

class Scalars(TorchDispatchMode):
    """Answers .item() / .tolist() of a fake tensor (which has no value) with `value`."""
    value = 1  # a count or a norm: rl.update's normaliser is then non-zero and its loss finite, so it steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return type(self).value
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def as_real_masks():
    """transformers takes a fake tensor for a trace and then always builds the (T, T) attention mask, which a real
    run skips when no token is padded (SDPA's is_causal); here it reads the padding mask (via Scalars) as a real
    run does."""
    from transformers import masking_utils
    saved = masking_utils.is_tracing
    masking_utils.is_tracing = lambda tensor=None: False
    try:
        yield
    finally:
        masking_utils.is_tracing = saved


def fake_world(ranks):
    """A process group of `ranks` ranks in which this process is rank 0 and collectives move nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)


def build(where, shape, dtype=torch.float32, grad_checkpointing=True):
    """A Qwen2 model of `shape` with fake (or meta) weights, set up as rl.build_models sets up the policy."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    with where:
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape], tie_word_embeddings=False),
                                                 dtype=dtype, attn_implementation="sdpa")
        if grad_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def shard(model):
    """plumbing.wrap_model's FSDP2 + bf16 path. Outside the fake mode: the device mesh reads real rank numbers."""
    return plumbing.wrap_model(model, torch.device("cpu"), "fsdp", bf16=True)


def n_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# -----------------------------------------------------------------------------
# Measuring one phase

class Tracker(MemTracker):
    """torch's MemTracker, which hooks every parameter of a module it sees run to name its gradient; a frozen one
    (LoRA's base) refuses a hook, so modules holding any get none (their trained children, LoRA's A and B, do)."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        hooks = install_grad_hooks and all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, hooks)


def tracker(model, optimizer, external=()):
    """FSDPMemTracker where the policy is FSDP2, torch's MemTracker otherwise; `external`: other live models."""
    if plumbing.is_fsdp(model):
        t = FSDPMemTracker(model, optimizer)
    else:
        t = Tracker()
        t.track_external(model, optimizer)
    t.track_external(*external)
    return t


def measure(fake, model, optimizer, run, external=()):
    """Peak of `run(tracker)` on rank 0 (FSDP2 shards evenly: every rank's): {"peak_gb", "peak_bytes",
    "at_peak_bytes": {the tracker's category: bytes live at the peak}}."""
    t = tracker(model, optimizer, external)
    with fake, Scalars(), as_real_masks(), t:
        run(t)
    snap = next(iter(t.get_tracker_snapshot("peak").values()))
    return {"peak_gb": round(snap["Total"] / GB, 3), "peak_bytes": snap["Total"],
            "at_peak_bytes": {getattr(k, "value", k): v for k, v in snap.items() if v and k != "Total"}}


def sft_step(model, optimizer, stage, tokens, ranks):
    """One sft.py optimizer step (train_step, clip, AdamW) with one sequence (sft1: one pair) per rank."""
    sc = sft.SFTConfig(stage=stage, batch_size=ranks, device_batch_size=1)
    seq = {"ids": [1] * tokens, "mask": [1] * tokens}
    examples = [{"chosen": seq, "rejected": seq} if stage == "sft1" else seq] * ranks

    def run(t):
        sft.train_step(model, examples, list(range(ranks)), sc, 0, ranks, torch.device("cpu"), 0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def rl_update(model, ref, optimizer, a):
    """One rl.update: one micro-batch of micro_batch trajectories on this rank (the others add the same peak)."""
    rcfg = rl.RLConfig(micro_batch=a["micro_batch"], kl_coef=a["kl_coef"], entropy_coef=a["entropy_coef"])
    n = a["new_tokens"]
    episodes = [Episode("", [], [1] * a["prompt_tokens"], [1] * n, [1] * n, [0.0] * n) for _ in range(a["micro_batch"])]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def run(t):
        rl.update(model, ref, optimizer, scheduler, [(episodes, torch.zeros(len(episodes)))], rcfg, n, 0,
                  torch.device("cpu"), episodes[0])
    return run


def rl_rollout(model, rows, a):
    """rollout.py's cache and forwards for `rows` trajectories, through rl.generation_mode as rl.main calls it."""
    prompt, last = a["prompt_tokens"], a["prompt_tokens"] + a["new_tokens"] - 1

    def run(t):
        with rl.generation_mode(model) as policy:
            cache = RowCache(rows, prompt + 64, torch.device("cpu"))  # as rollout.run_loop starts it
            Scalars.value = 0  # the prefill: every row's prompt in one chunk, at column 0
            forward_chunk(policy, cache, None, [[1] * prompt] * rows, 0)
            while cache.capacity < last + 1:  # the decode steps that reach past the end double the cache
                cache.bind(None, None, cache.capacity + 1)
            Scalars.value = last  # the last decode step: attends to every column (the peak of the decode)
            t.reset_mod_stats()  # per-module stats only (a second forward of the root is refused); not the peak
            forward_chunk(policy, cache, None, [[1]] * rows, 0)
        Scalars.value = 1
    return run


class Through(torch.nn.Module):
    """A LoRA model called through a module of its own. rl.update scores the reference on the policy itself, its
    adapters off, then the policy: two forwards of one model, and torch's MemTracker refuses a second forward of
    a module called from the top level in one window (it takes it for the next iteration); called from inside
    another module, a module may run twice. Through(model, adapters=False) is that reference."""

    def __init__(self, peft_model, adapters=True):
        super().__init__()
        self.peft_model, self.adapters = peft_model, adapters

    def forward(self, **kwargs):
        with contextlib.nullcontext() if self.adapters else self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


# -----------------------------------------------------------------------------
# The setups

def lora_model(fake, shape, rank):
    """plumbing.add_lora over a frozen bf16 base, fp32 adapters (peft's autocast_adapter_dtype). peft moves
    each new layer with .to(), which fake parameters refuse (a swap), so it runs on the meta device and every
    parameter and buffer then becomes a fake one of the same shape, dtype and requires_grad."""
    model = plumbing.add_lora(build(torch.device("meta"), shape, dtype=torch.bfloat16), rank, 32.0)  # the trainers'
    with fake:
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
            for name, b in module.named_buffers(recurse=False):
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return model


def run_setup(name, a):
    """{phase: measurement} of one setup, plus its parameter counts."""
    fake = FakeTensorMode()
    shape = a["small"] if name == "full_small" else a["big"]
    ranks = a["ranks"] if name == "fsdp" else 1
    fake_world(ranks)
    out = {"shape": shape, "ranks": ranks}
    if name == "lora":
        model = lora_model(fake, shape, a["lora_rank"])
        ref = Through(model, adapters=False)
    else:
        model = shard(build(fake, shape))
        ref = None
        if a["kl_coef"]:  # rl.build_models' reference: bf16 weights, frozen, sharded like the policy
            ref = build(fake, shape, dtype=torch.bfloat16, grad_checkpointing=False).eval().requires_grad_(False)
            ref = shard(ref)
    out["params"], out["trainable"] = n_params(model), n_params(model, trainable=True)
    with fake:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
    limit = a["gpu_gb"]
    # one untracked step first: it makes AdamW's state, and DTensor fills its sharding cache (on a cold cache it
    # propagates clip_grad_norm_ over whole-size fake gradients, which the tracker would count)
    with fake, Scalars(), as_real_masks():
        sft_step(model, optimizer, "sft2", a["sft2_tokens"], ranks)(None)
    out["sft2"] = measure(fake, model, optimizer, sft_step(model, optimizer, "sft2", a["sft2_tokens"], ranks))
    out["sft1"] = measure(fake, model, optimizer, sft_step(model, optimizer, "sft1", a["sft1_tokens"], ranks))
    # RL: the same AdamW state (the policy's), plus the reference where it is a model of its own
    rl_models = [ref] if ref is not None and name != "lora" else []
    policy = Through(model) if name == "lora" else model
    out["rl_update"] = measure(fake, model, optimizer, rl_update(policy, ref, optimizer, a), rl_models)
    rows = a["prompts"] * a["group"] // ranks
    if name == "fsdp":
        out["rl_rollout"] = measure(fake, model, optimizer, rl_rollout(model, rows, a), rl_models)
        out["rl_rollout"]["trajectories"] = rows
    else:
        out["rl_rollout"] = largest_batch(fake, model, optimizer, rl_models, a, rows, limit)
    for phase in ("sft2", "sft1", "rl_update", "rl_rollout"):
        out[phase]["fits"] = out[phase]["peak_bytes"] <= limit * GB
    return out


def largest_batch(fake, model, optimizer, external, a, most, limit):
    """The rollout at the most trajectories decoded together whose peak fits `limit` GB (at most `most`): the peak
    is affine in the batch, so two sizes give the slope, and the answer is measured (one less while it does not
    fit). 0 trajectories: the state alone does not fit."""
    one = measure(fake, model, optimizer, rl_rollout(model, 1, a), external)
    if one["peak_bytes"] > limit * GB:
        return {**one, "trajectories": 0}
    two = measure(fake, model, optimizer, rl_rollout(model, 2, a), external)
    per_row = max(two["peak_bytes"] - one["peak_bytes"], 1)
    rows = min(most, 1 + int((limit * GB - one["peak_bytes"]) // per_row))
    while True:
        got = measure(fake, model, optimizer, rl_rollout(model, rows, a), external)
        if got["peak_bytes"] <= limit * GB or rows == 1:
            return {**got, "trajectories": rows, "per_trajectory_gb": round(per_row / GB, 4)}
        rows -= 1


# -----------------------------------------------------------------------------
# The check: the tracker under fake tensors against real tensors and against the arithmetic

def agreement(hidden, layers=4, tokens=256):
    """One plain fp32 AdamW step (no FSDP) of a Qwen2 of `hidden` (vocab 8 x hidden) on real CPU tensors and
    under fake tensors, both measured by MemTracker; and its parameters + gradients + AdamW state (after the
    step) against 16 bytes a parameter."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                      num_key_value_heads=max(hidden // 128, 1), intermediate_size=3 * hidden,
                      vocab_size=8 * hidden, tie_word_embeddings=False)
    out = {}
    for kind, mode in (("real", None), ("fake", FakeTensorMode())):
        with mode or torch.device("cpu"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ids = torch.randint(0, cfg.vocab_size, (1, tokens))
        t = MemTracker()
        t.track_external(model, optimizer)
        with (mode or torch.device("cpu")), Scalars(), as_real_masks(), t:
            for _ in range(2):  # the second step runs with AdamW's state
                t.reset_mod_stats()  # per-module stats only (a second forward of the root is refused); not the peak
                sft.next_token_loss(sft.token_logps(model, ids, torch.ones_like(ids)), torch.ones(1, tokens - 1),
                                    tokens)[0].backward()
                optimizer.step()
        state = t.get_tracker_snapshot("current")[torch.device("cpu")]
        out[kind] = {"peak": t.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"],
                     "state": state["Parameter"] + state["Gradient"] + state["Optstate"]}
        out["params"] = n_params(model)
    return {"params": out["params"], "real_peak_mb": round(out["real"]["peak"] / 1e6, 3),
            "fake_peak_mb": round(out["fake"]["peak"] / 1e6, 3),
            "fake_over_real": round(out["fake"]["peak"] / out["real"]["peak"], 4),
            "state_over_16_bytes_a_param": round(out["fake"]["state"] / (16 * out["params"]), 4)}


# -----------------------------------------------------------------------------

PHASES = ("sft2", "sft1", "rl_update", "rl_rollout")


def table(results, limit):
    """One table per phase: a row per setup, the peak against the card and what was live at the peak."""
    lines = []
    for phase in PHASES:
        lines.append(f"{phase} (peak per rank; the card: {limit:g} GB)")
        for name, r in results.items():
            m = r[phase]
            what = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(m["at_peak_bytes"].items(), key=lambda kv: -kv[1])
                             if v >= GB / 100)
            rows = f" trajectories {m['trajectories']}" if "trajectories" in m else ""
            lines.append(f"  {name:10s} {r['shape']:8s} x{r['ranks']}  {m['peak_gb']:8.2f} GB  "
                         f"{'fits' if m['fits'] else 'DOES NOT FIT'}{rows}  [{what}]")
    return "\n".join(lines)


def main(argv=None):
    a = read_key_values(Args, sys.argv[1:] if argv is None else argv, "config")
    check_ranges(Args(**a), "bench")
    setups = [s for s in a["setups"].split(",") if s]
    bad = [s for s in setups if s not in SETUPS] + [x for x in (a["big"], a["small"]) if x not in SHAPES]
    if bad or not setups:
        raise ConfigError(f"config: unknown setup or shape {', '.join(bad) or 'none'} (setups: "
                          f"{', '.join(SETUPS)}; shapes: {', '.join(SHAPES)})")
    torch.set_num_threads(1)  # fake steps do no arithmetic; the real check is small
    results = {}
    for name in setups:
        results[name] = run_setup(name, a)
        print(f"{name}: {results[name]['shape']} on {results[name]['ranks']} rank(s), {results[name]['params']:,} "
              f"parameters, {results[name]['trainable']:,} trained", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(table(results, a["gpu_gb"]))
    check = agreement(a["check_hidden"])
    print(f"check: a {check['params']:,}-parameter fp32 step, fake/real tracker peak {check['fake_over_real']}, "
          f"params+grads+AdamW / (16 B x params) {check['state_over_16_bytes_a_param']}")
    report = {"bench": "memory", "args": a, "setups": results, "check": check}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    cli(main)
