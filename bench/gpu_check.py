"""
bench/gpu_check.py -- the project on one GPU in one command (under 6 minutes on one H100); ends with one JSON line.

    (a) pipeline  the tiny world at small scale on the device, every stage through its own main(): data.py (a small
                  world and its synthesis), sft.py (sft2), worldmodel.py, rl.py (2 steps: the world model's
                  simulated environment, then the real tool; launched with `torchrun --nproc_per_node 1`), eval.py.
                  The three training stages run with bf16=true: FSDP2 on one rank, fp32 master weights.
    (b) rl_1p5b   3 rl.py steps of a 1.5B-shaped random Qwen2 (data.py overrides: hidden 1536, 28 layers, 12 heads,
                  2 KV heads, MLP 8960, the tiny tokenizer: 1.3e9 parameters) with configs/qwen7b.yaml's settings
                  that fit one GPU (KL reference, grad checkpointing, bf16, group 5, temperature 0.6, micro_batch 2),
                  16 prompts a step and 256 new tokens: step time, rollout tokens/s, update time, peak memory, and
                  memory held outside PyTorch (another framework's preallocation, e.g. JAX's 75%). The weights are
                  random, so nothing is saved (a 1.3B checkpoint with its optimizer is ~16 GB of disk and minutes).
    (c) rollout   bench/rollout.py's three loops (rollout.py, generate + re-prefill, the lockstep floor) on the tiny
                  model and on the 1.5B shape (bf16).
    (d) memory    a memory arithmetic (weights, Adam, reference, gathered bf16 weights, KV cache, saved inputs,
                  logits) for the 1.5B run of (b), compared phase by phase (state, rollout peak, update peak) with
                  what PyTorch measured; a phase off by more than 25% is named. The 7B recipe's memory per phase is
                  bench/memory.py's (fake tensors on the real shapes, the trainers' own steps; docs/gpu.md).

    python bench/gpu_check.py                       # on the GPU; work folder runs/gpu_check (re-created)
    python bench/gpu_check.py --device cpu          # tiny shapes everywhere (the test suite runs this, ~1 min)
    make gpu-check

Not here: multi-GPU runs (torchrun --nproc_per_node 8 rl.py --config configs/qwen7b.yaml is the real thing),
the 7B model itself (no hub here), timing of the pipeline's quality (the demo's job).
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as ev  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402
import worldmodel  # noqa: E402

GB = 1e9
SMALL_WORLD = ["world.n_people=200", "world.n_famous=8", "world.n_cities=12", "world.n_countries=4",
               "world.n_companies=10", "world.n_first=16", "world.n_last=16", "world.n_dev=40", "world.n_test=60",
               "world.famous_repeats=4"]
SHAPES = {  # data.py model overrides of the big model of (b) and (c)
    "cuda": {"hidden_size": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "intermediate_size": 8960,
             "max_positions": 2048},
    "cpu": {"hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 128,
            "max_positions": 1024},
}
SIZES = {  # what each part runs, per device
    "cuda": {"sft_steps": 30, "wm_steps": 30, "rl_prompts": 16, "new_tokens": 256,
             "bench": [("tiny", 16, 3), ("1p5b", 64, 3)]},  # (model, batch, tool calls)
    "cpu": {"sft_steps": 2, "wm_steps": 2, "rl_prompts": 2, "new_tokens": 24, "bench": [("tiny", 2, 1)]},
}


# -----------------------------------------------------------------------------
# (a) the pipeline

def common(args, name="tiny"):
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.data_dir={args.out}/data",
            f"run.runs_dir={args.out}", f"run.name={name}", f"run.device={args.device}"]


def pipeline(args, size):
    """Every stage of the tiny world at small scale; seconds per stage, the RL metrics and the final EM."""
    times, t0 = {}, time.time()
    data.main(common(args) + SMALL_WORLD + ["synth.limit=200"])
    times["data"], t0 = time.time() - t0, time.time()
    sft.main(common(args) + ["sft.stage=sft2", "sft.init=base", f"sft.steps={size['sft_steps']}", "sft.batch_size=8",
                             "sft.device_batch_size=8", "sft.save_every=0", "sft.heldout=none", "sft.lr=3e-3",
                             "sft.parallel=fsdp", "sft.bf16=true"])
    times["sft"], t0 = time.time() - t0, time.time()
    worldmodel.main(common(args) + [f"worldmodel.steps={size['wm_steps']}", "worldmodel.batch_size=8",
                                    "worldmodel.eval_calls=0", "worldmodel.eval_questions=0", "worldmodel.bf16=true"])
    times["worldmodel"], t0 = time.time() - t0, time.time()
    run_dir = os.path.join(args.out, "tiny")
    rl_argv = common(args) + ["rl.init=sft2", "rl.steps=2", "rl.sim_share=0.5", "rl.sim_env=worldmodel",
                              f"env.worldmodel={run_dir}/worldmodel", "rl.prompts_per_step=4", "rl.group_size=2",
                              "rl.eval_n=4", "rl.save_every=0", "rl.kl_coef=0.01", "rl.parallel=fsdp", "rl.bf16=true",
                              "env.max_new_tokens=64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           os.path.join(ROOT, "rl.py"), *rl_argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode:
        raise RuntimeError(f"torchrun --nproc_per_node 1 rl.py failed:\n{proc.stderr[-3000:]}")
    times["rl_torchrun_1"], t0 = time.time() - t0, time.time()
    with open(os.path.join(run_dir, "rl.metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    summary = ev.main(common(args) + ["eval.init=rl", "eval.limit=12"])
    times["eval"] = time.time() - t0
    return {"seconds": {k: round(v, 1) for k, v in times.items()}, "rl_envs": [r["env"] for r in steps if "env" in r],
            "rl_eval_em": [r["eval_em"] for r in steps if "eval_em" in r], "eval_em": summary["em"]}


# -----------------------------------------------------------------------------
# (b) RL steps of the big shape, with memory probes around rollout and update

class Probe:
    """Wraps rl.rollout and rl.learn (as rl.main calls them) to time them and read PyTorch's memory around them."""

    def __init__(self, cuda):
        self.cuda, self.steps = cuda, []

    def mem(self):
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak(self):
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def rollout(self, real):
        def wrapped(policy, *a, **k):
            self.reset()
            t0 = time.time()
            episodes = real(policy, *a, **k)
            self.steps.append({"rollout_s": time.time() - t0, "rollout_peak": self.peak(),
                               "model_tokens": sum(sum(ep.mask) for ep in episodes),
                               "rollout_dtype": str(next(policy.parameters()).dtype).replace("torch.", "")})
            return episodes
        return wrapped

    def learn(self, real):
        def wrapped(*a, **k):
            state = self.mem()  # weights, optimizer state, reference: what lives across steps (grads are freed)
            self.reset()
            t0 = time.time()
            out = real(*a, **k)
            self.steps[-1].update(state=state, update_s=time.time() - t0, update_peak=self.peak())
            return out
        return wrapped


def rl_big(args, size):
    """3 rl.main steps of the big shape with qwen7b.yaml's settings; the probes' numbers per step."""
    shape = SHAPES[args.device]
    data.main(common(args, "big") + SMALL_WORLD + [f"model.{k}={v}" for k, v in shape.items()])
    base = os.path.join(args.out, "big", "base")
    n_params = sum(t.numel() for t in load_safetensors(base).values())
    with open(os.path.join(base, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    cuda = args.device == "cuda"
    probe = Probe(cuda)
    saved = rl.rollout, rl.learn, rl.save_checkpoint, rl.save_final
    rl.rollout, rl.learn = probe.rollout(rl.rollout), probe.learn(rl.learn)
    rl.save_checkpoint = rl.save_final = lambda *a, **k: None  # random weights: nothing worth 16 GB of disk
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        rl.main(["--config", os.path.join(ROOT, "configs", "qwen7b.yaml"), f"run.data_dir={args.out}/data",
                 f"run.runs_dir={args.out}", "run.name=big", f"run.device={args.device}", f"rl.init={base}",
                 "rl.steps=3", f"rl.prompts_per_step={size['rl_prompts']}", "rl.eval_n=0", "rl.save_every=0",
                 "env.tool=bm25", "env.topk=2", "env.obs_max_tokens=150", "env.max_actions=4",
                 f"env.max_new_tokens={size['new_tokens']}"])
    finally:
        rl.rollout, rl.learn, rl.save_checkpoint, rl.save_final = saved
    cfg = load_qwen7b_rl()
    out = {"params": n_params, "vocab": vocab, "shape": shape, "group_size": cfg.group_size,
           "prompts_per_step": size["rl_prompts"],
           "micro_batch": cfg.micro_batch, "kl_coef": cfg.kl_coef, "new_tokens": size["new_tokens"], "steps": []}
    for s in probe.steps:
        out["steps"].append({"step_s": round(s["rollout_s"] + s["update_s"], 2), "rollout_s": round(s["rollout_s"], 2),
                             "update_s": round(s["update_s"], 2), "model_tokens": s["model_tokens"],
                             "rollout_tok_s": round(s["model_tokens"] / s["rollout_s"], 1),
                             "rollout_dtype": s["rollout_dtype"], "state_gb": gb(s["state"]),
                             "rollout_peak_gb": gb(s["rollout_peak"]), "update_peak_gb": gb(s["update_peak"])})
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out["peak_gb"] = gb(torch.cuda.max_memory_allocated())
        out["held_outside_pytorch_gb"] = gb(total - free - torch.cuda.memory_reserved())  # JAX et al.
    out["_probe"] = probe.steps
    return out


def load_safetensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def load_qwen7b_rl():
    from config import RunConfig, load_config
    from tools import EnvConfig
    return load_config({"run": RunConfig, "env": EnvConfig, "rl": rl.RLConfig},
                       ["--config", os.path.join(ROOT, "configs", "qwen7b.yaml")], own="rl").rl


def gb(n):
    return None if n is None else round(n / GB, 2)


# -----------------------------------------------------------------------------
# (c) bench/rollout.py

def rollout_bench(args, size):
    spec = importlib.util.spec_from_file_location("bench_rollout", os.path.join(ROOT, "bench", "rollout.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = []
    for name, batch, turns in size["bench"]:
        path = os.path.join(args.out, "tiny" if name == "tiny" else "big", "base")
        opts = argparse.Namespace(batch=batch, turns=turns, free=16 if args.device == "cuda" else 4,
                                  answer=4 if args.device == "cuda" else 2, obs_tokens=150, device=args.device,
                                  data_dir=os.path.join(args.out, "data"), profile=False, torch_profile=False,
                                  bandwidth_gbs=0.0,
                                  repeats=3 if (name == "tiny" and args.device == "cuda") else 1)
        results.append(bench.bench_model(name, path, opts, os.path.join(args.out, "data", "corpus.jsonl")))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


# -----------------------------------------------------------------------------
# (d) a memory arithmetic, checked against (b)

def arithmetic(n_params, layers, kv_heads, head_dim, hidden, intermediate, vocab, ranks, episodes_per_rank,
               context_tokens, completion_tokens, micro_batch, kl=True):
    """An RL step's memory as formulas, in bytes: per-term, and the three phase totals per GPU."""
    t = {"masters_fp32": 4 * n_params / ranks, "adam_fp32": 8 * n_params / ranks,
         "reference_bf16": 2 * n_params / ranks if kl else 0.0,
         "gathered_bf16": 2 * n_params,
         "kv_cache": 2 * layers * kv_heads * head_dim * 2 * episodes_per_rank * context_tokens,
         "grads_fp32": 4 * n_params / ranks,
         "saved_inputs": micro_batch * context_tokens * hidden * 2 * layers,
         "recomputed_layer": 3 * micro_batch * context_tokens * intermediate * 2,
         "logits": 2 * micro_batch * completion_tokens * vocab * 4}
    state = t["masters_fp32"] + t["adam_fp32"] + t["reference_bf16"]
    return {"terms": t, "state": state, "rollout": state + t["gathered_bf16"] + t["kv_cache"],
            "update": state + t["grads_fp32"] + t["saved_inputs"] + t["recomputed_layer"] + t["logits"]}


def memory_check(big, args):
    """The arithmetic for (b)'s run against its measurements."""
    shape = big["shape"]
    episodes = big["prompts_per_step"] * big["group_size"]
    prompt_tokens = 100  # the tiny world's prompt: system text + question
    mine = arithmetic(big["params"], shape["layers"], shape["kv_heads"], shape["hidden_size"] // shape["heads"],
                      shape["hidden_size"], shape["intermediate_size"], big["vocab"], 1, episodes,
                      prompt_tokens + big["new_tokens"], big["new_tokens"], big["micro_batch"], big["kl_coef"] > 0)
    out = {"predicted_gb": {k: gb(mine[k]) for k in ("state", "rollout", "update")}}
    later = [s for s in big["_probe"][1:] if s["state"] is not None]  # from step 2: AdamW's moments exist
    if later:
        measured = {"state": max(s["state"] for s in later), "rollout": max(s["rollout_peak"] for s in later),
                    "update": max(s["update_peak"] for s in later)}
        ratios = {k: measured[k] / mine[k] for k in measured}
        out["measured_gb"] = {k: gb(v) for k, v in measured.items()}
        out["measured_over_predicted"] = {k: round(v, 2) for k, v in ratios.items()}
        out["off"] = [f"{k}: measured {ratios[k]:.2f}x the arithmetic" for k in ratios if abs(ratios[k] - 1) > 0.25]
    else:
        out["measured_gb"] = None  # no CUDA: the arithmetic is computed, not checked
    return out


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same checks at CPU size (tests)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="work folder (re-created)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --device cpu for the tiny-shape run)")
    shutil.rmtree(args.out, ignore_errors=True)  # our own work folder: every run starts from nothing
    size, t0 = SIZES[args.device], time.time()
    report = {"bench": "gpu_check", "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__}
    report["pipeline"] = pipeline(args, size)
    print("gpu_check (a) pipeline:", json.dumps(report["pipeline"]), flush=True)
    big = rl_big(args, size)
    report["memory"] = memory_check(big, args)
    report["rl_1p5b"] = {k: v for k, v in big.items() if k != "_probe"}
    print("gpu_check (b) rl:", json.dumps(report["rl_1p5b"]), flush=True)
    print("gpu_check (d) memory:", json.dumps(report["memory"]), flush=True)
    report["rollout"] = rollout_bench(args, size)
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
