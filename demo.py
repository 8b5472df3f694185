"""
demo.py -- the whole AutoCoA pipeline on the tiny world, in one command, ending with the paper's Table 1.

    make demo                                            # = python demo.py --config configs/tiny.yaml
    python demo.py --config configs/tiny.yaml --quick    # tiny sizes, a few steps each (what the tests run)
    python demo.py --config configs/tiny.yaml run.name=seed1 run.seed=1

The steps, each one ordinary stage script called in-process through its main(argv) (each can be run alone with
the same arguments; the demo prints every command it runs):

    data.py        the tiny world, its tokenizer, the untrained base model, and the synthesised SFT data
                   (CoT, CoA, CoT+A pairs from the scripted teacher with the real BM25 tool)
    sft.py         CoT only from the base model: the stand-in for the paper's starting reasoning model -> cot
    sft.py         SFT-2 from the base model                                      -> runs/<name>/sft2
    sft.py         SFT-1 from the CoT model, then SFT-2 from it                   -> sft1, sft12
    sft.py         SFT-3 from SFT-1&2 (no observation mask: the internal world model) -> sft123
    worldmodel.py  a separate world-model LM and its fidelity report             -> worldmodel
    rl.py          GRPO from SFT-1&2&3, three schedules: all simulated (the policy writes its own observations),
                   the paper's first 5/6 simulated then real, and all real        -> rl_sim, rl_simreal, rl_real
    eval.py        every model above on the held-out test questions (greedy, real tool), plus two baselines:
                   no tool (the CoT model, searching switched off) and a fixed workflow (SFT-2's weights; the loop,
                   not the model, searches each entity the question names, then the model answers)

It prints the Table-1-shaped markdown table (EM by question kind, average EM and F1, actions per question, real
tool calls spent in RL training) and writes runs/<name>/results.md, runs/<name>/rl_curves.png (reward and EM
over RL steps per schedule), runs/<name>/accuracy_by_stage.png, and finally one complete trajectory of the final
model on a held-out question, the model's tokens and the environment's told apart.

A training step whose output folder already exists is skipped (delete runs/<name>/ to start over; the evals always
run); a stage script that is missing is reported and its rows stay empty.

Not here: seeds averaged over (run the demo with several run.seed and compare results.md), real QA sets (see
configs/smollm2_eval.yaml and eval.py).
"""
import importlib
import json
import os
import shlex
import sys
import time

import eval as ev
from tools import SECTIONS, ConfigError, EnvConfig, RunConfig, cli, load_config, read_jsonl

# Quick mode: a small world and a few steps per stage, enough to exercise every code path in about a minute.
QUICK = {
    "run": ["run.name=tiny_quick", "run.data_dir=data/tiny_quick"],  # never mixed with the full demo's files
    "world": ["world.n_people=200", "world.n_famous=8", "world.n_cities=12", "world.n_countries=4",
             "world.n_companies=10", "world.n_first=16", "world.n_last=16", "world.n_dev=40", "world.n_test=60",
             "world.famous_repeats=4"],
    "synth": ["synth.limit=300"],
    "sft": ["sft.steps=6", "sft.batch_size=8", "sft.device_batch_size=8", "sft.save_every=0", "sft.heldout=none"],
    "worldmodel": ["worldmodel.steps=5", "worldmodel.batch_size=8", "worldmodel.eval_calls=0",
                   "worldmodel.eval_questions=0"],
    "rl": ["rl.steps=2", "rl.prompts_per_step=4", "rl.group_size=2", "rl.eval_n=4", "rl.save_every=0"],
    "eval": ["eval.limit=12"],
}
EVAL_LIMIT = 0  # test questions per eval in the full demo (0 = all)

# the rows of the table: (label, model folder under run.dir, eval mode)
ROWS = [("no tool", "cot", "notool"), ("workflow", "sft2", "workflow"), ("SFT-2", "sft2", "agent"),
        ("SFT-1&2", "sft12", "agent"), ("SFT-1&2&3", "sft123", "agent"),
        ("+RL simulated only", "rl_sim", "agent"), ("+RL simulated then real", "rl_simreal", "agent"),
        ("+RL real only", "rl_real", "agent")]
RL_RUNS = {"rl_sim": 1.0, "rl_simreal": 5 / 6, "rl_real": 0.0}  # out folder -> share of simulated steps
KINDS = ("city", "employer", "country", "comparison", "yesno", "well_known")


class Pipeline:
    """Runs stage scripts in-process with the shared arguments; remembers what ran and how long it took."""

    def __init__(self, config_path, overrides, quick, run_dir):
        self.config_path, self.overrides, self.quick, self.run_dir = config_path, overrides, quick, run_dir
        self.times, self.missing = {}, []

    def argv(self, sections, extra=()):
        """--config, quick-mode settings, the user's overrides, the step's own: for run, env and its sections."""
        known = ("run", "env", *sections)
        quick = [a for key in known for a in QUICK.get(key, [])] if self.quick else []
        mine = [o for o in self.overrides if o.split(".", 1)[0] in known]
        return ["--config", self.config_path, *quick, *mine, *extra]

    def step(self, name, module, sections, extra=(), out=None):
        """Run module.main(argv) unless out (a folder under run.dir) exists already."""
        if out and os.path.exists(os.path.join(self.run_dir, out, "config.json")):
            print(f"== {name}: {os.path.join(self.run_dir, out)} exists, skipped")
            return True
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the file is there but broken: that is a bug to see, not a missing stage
                raise
            print(f"== {name}: skipped, {module}.py is missing")
            self.missing.append(name)
            return None
        argv = self.argv(sections, extra)
        if module in ("sft", "rl", "worldmodel"):  # the demo regenerates a run its own earlier try left behind
            argv.append("--overwrite")
        print(f"== {name}: python {module}.py {shlex.join(argv)}", flush=True)
        t0 = time.time()
        result = mod.main(argv)
        self.times[name] = time.time() - t0
        return result if result is not None else True


def run_stages(p):
    """Every training stage, in order; each call is one stage script's main()."""
    p.step("world, base model, synthesis", "data", ("world", "model", "synth"))  # each part only when missing
    # the CoT model stands in for the paper's starting point, a reasoning model that has never acted
    p.step("CoT", "sft", ("sft",), ["sft.stage=cot", "sft.init=base", "sft.out=cot"], out="cot")
    p.step("SFT-2", "sft", ("sft",), ["sft.stage=sft2", "sft.init=base", "sft.out=sft2"], out="sft2")
    p.step("SFT-1", "sft", ("sft",), ["sft.stage=sft1", "sft.init=cot", "sft.out=sft1"], out="sft1")
    p.step("SFT-1&2", "sft", ("sft",), ["sft.stage=sft2", "sft.init=sft1", "sft.out=sft12"], out="sft12")
    p.step("SFT-1&2&3", "sft", ("sft",), ["sft.stage=sft3", "sft.init=sft12", "sft.out=sft123"], out="sft123")
    p.step("world model", "worldmodel", ("worldmodel",),
           ["worldmodel.policy=" + os.path.join(p.run_dir, "sft123")], out="worldmodel")
    for out, share in RL_RUNS.items():
        p.step(f"RL {out}", "rl", ("rl",), ["rl.init=sft123", f"rl.out={out}", f"rl.sim_share={share:.6f}"],
               out=out)


def run_evals(p):
    """eval.py on every row's model; returns {label: summary} for the rows whose model exists."""
    results = {}
    for label, folder, mode in ROWS:
        if not os.path.exists(os.path.join(p.run_dir, folder, "config.json")):
            print(f"== eval {label}: no model at {os.path.join(p.run_dir, folder)}, row left empty")
            continue
        extra = [f"eval.init={folder}", f"eval.mode={mode}", "eval.data=test", f"eval.tag={slug(label)}"]
        if EVAL_LIMIT and not p.quick:
            extra.append(f"eval.limit={EVAL_LIMIT}")
        summary = p.step(f"eval {label}", "eval", ("eval",), extra)
        if isinstance(summary, dict):
            results[label] = summary
    return results


def slug(label):
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


# -----------------------------------------------------------------------------
# The table, the plots, the trajectory

def rl_metrics(run_dir, out):
    """The rows of an RL run's metrics log ([] when there is none); a broken line is reported and skipped."""
    path = os.path.join(run_dir, out + ".metrics.jsonl")
    if not os.path.exists(path):
        return []
    placed = read_jsonl(path, lambda row: None if isinstance(row, dict) else "not a JSON object", "metrics row")
    return [row for _, row in placed]


def train_calls(run_dir, folder):
    """Real tool calls spent in RL training for an RL row ("-" for rows without RL)."""
    rows = rl_metrics(run_dir, folder) if folder in RL_RUNS else []
    return str(rows[-1].get("real_calls_total", 0)) if rows else "-"


def results_table(results, run_dir):
    """Markdown shaped like the paper's Table 1: one row per method, EM by question kind, then the averages."""
    kinds = [k for k in KINDS if any(k in s["by_kind"] for s in results.values())]
    head = ["method", *kinds, "EM", "F1", "actions/q", "real calls in RL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, folder, _ in ROWS:
        s = results.get(label)
        if s is None:
            lines.append("| " + " | ".join([label] + ["n/a"] * (len(head) - 1)) + " |")
            continue
        cells = [f"{s['by_kind'][k]['em']:.2f}" if k in s["by_kind"] else "-" for k in kinds]
        cells += [f"{s['em']:.3f}", f"{s['f1']:.3f}", f"{s['actions']:.2f}", train_calls(run_dir, folder)]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def smooth(xs, window=5):
    """Trailing mean over `window` steps (RL batch rewards are noisy)."""
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def plot(results, run_dir):
    """rl_curves.png (reward and EM per RL step, one line per schedule) and accuracy_by_stage.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for out, share in RL_RUNS.items():
        metrics = rl_metrics(run_dir, out)
        rows = [r for r in metrics if "reward" in r]
        if rows:
            label = f"{out} ({share:.0%} simulated)"
            steps = [r["step"] for r in rows]
            raw, = ax_r.plot(steps, [r["reward"] for r in rows], alpha=0.25)
            ax_r.plot(steps, smooth([r["reward"] for r in rows]), color=raw.get_color(), label=label)
            line, = ax_e.plot(steps, smooth([r["em"] for r in rows]), label=label, color=raw.get_color())
            held = [r for r in metrics if "eval_em" in r]  # held-out EM at the eval points
            ax_e.plot([r["step"] for r in held], [r["eval_em"] for r in held], "o--", color=line.get_color())
    for ax, name, title in ((ax_r, "reward", "training-batch reward (faint: per step; bold: mean of 5)"),
                            (ax_e, "EM", "EM (line: training batch, mean of 5; dots: held-out dev)")):
        ax.set_xlabel("RL step"), ax.set_ylabel(name), ax.set_title(title, fontsize=9), ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    fig.suptitle("GRPO from SFT-1&2&3: simulated steps (the policy writes its own observations) vs real tool",
                 fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "rl_curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    labels = [label for label, _, _ in ROWS if label in results]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    bars = ax.bar(range(len(labels)), [results[k]["em"] for k in labels], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_title("held-out test EM by stage (greedy, real tool)", fontsize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test EM"), ax.set_ylim(0, 1), ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "accuracy_by_stage.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


FINAL = "+RL simulated then real"  # the paper's recipe: its trajectory ends the demo


def final_model(results, run_dir):
    """The paper's final model, or else the last row (in table order) whose model exists."""
    order = [r for r in ROWS if r[0] == FINAL] + list(reversed(ROWS))
    for label, folder, mode in order:
        if mode == "agent" and label in results:
            return label, os.path.join(run_dir, folder)
    return None, None


def show_one(cfg, model_dir, kind="country", tries=16):
    """One trajectory of model_dir on a held-out 2-hop question: the first of `tries` such test questions that
    it answers right (a walk-through reads better on a success), else the first one. Scored as eval.py does."""
    import torch
    from rollout import rollout
    from tools import SearchEnv, load_model, make_tool
    model, tokenizer = load_model(model_dir, cfg.run)
    rows = ev.data.load_qa(os.path.join(cfg.run.data_dir, "test.jsonl"))
    rows = [r for r in rows if r.get("kind") == kind][:tries] or rows[:1]
    env = SearchEnv(make_tool(cfg.env, cfg.run), tokenizer, cfg.env)
    with torch.no_grad():
        episodes = rollout(model, tokenizer, rows, cfg.env, env)
    ev.score(episodes, rows, cfg.env, 1)  # fills each episode.reward
    i = next((i for i, ep in enumerate(episodes) if ep.reward == 1.0), 0)
    print(f"question ({rows[i]['id']}, {rows[i].get('kind')}; the first of {len(rows)} such test questions "
          f"{'it answers right' if episodes[i].reward else '(none answered right)'}): {rows[i]['question']}  "
          f"gold: {rows[i]['golden_answers']}")
    print(ev.show_trajectory(episodes[i], tokenizer))
    return episodes[i]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    unknown = [a for a in argv if a.startswith("--") and "=" not in a and a != "--config"]
    if unknown:
        raise ConfigError(f"config: unknown flag {', '.join(unknown)} (demo.py takes: --config, --quick)")
    config_path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), "configs/tiny.yaml")
    overrides = [a for a in argv if "=" in a and not a.startswith("--config")]
    stray = [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in SECTIONS or "." not in o.split("=")[0]]
    if stray:  # each stage takes its own sections only: these would be dropped in silence
        raise ConfigError(f"config: {', '.join(stray)} names no section (section.key=value; {', '.join(SECTIONS)})")
    cfg = load_config({"run": RunConfig, "env": EnvConfig}, ["--config", config_path] +
                      (QUICK["run"] if quick else []) + [o for o in overrides if o.split(".", 1)[0] in ("run", "env")])
    t0 = time.time()
    p = Pipeline(config_path, overrides, quick, cfg.run.dir)
    run_stages(p)
    results = run_evals(p)
    table = results_table(results, cfg.run.dir)
    note = ("no tool: the CoT-only model, searching switched off (env.max_actions=0). workflow: SFT-2's weights, but the "
            "loop searches each entity named in the question and the model only answers. RL rows start from "
            "SFT-1&2&3. Test questions are about people no training question mentions; well_known = famous "
            "people's facts, answerable without a search.")
    print("\n" + table + "\n\n" + note)
    os.makedirs(cfg.run.dir, exist_ok=True)
    with open(os.path.join(cfg.run.dir, "results.md"), "w") as f:
        f.write(f"# AutoCoA on the tiny world ({'quick' if quick else 'full'} demo, seed {cfg.run.seed})\n\n"
                f"{table}\n\n{note}\n\nStage times (s): {json.dumps({k: round(v, 1) for k, v in p.times.items()})}\n")
    if results:
        print("plots:", ", ".join(plot(results, cfg.run.dir)))
    label, model_dir = final_model(results, cfg.run.dir)
    if model_dir:
        print(f"\n== one held-out trajectory of the final model ({label}):")
        show_one(cfg, model_dir)
    if p.missing:
        print("missing stages:", ", ".join(p.missing))
    print(f"demo done in {time.time() - t0:.0f}s; table in {os.path.join(cfg.run.dir, 'results.md')}")
    return results


if __name__ == "__main__":
    cli(main)
