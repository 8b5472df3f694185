"""
demo.py -- the whole AutoCoA pipeline on the tiny world, in one command, ending with the paper's Table 1.

    make demo                                            # = python demo.py --config configs/tiny.yaml (seed 0)
    python demo.py --config configs/tiny.yaml --seeds 3  # seeds 0, 1, 2: mean and spread per cell
    python demo.py --config configs/tiny.yaml --seeds 3 --readme   # ... and rewrite docs/results.md and the README's
                                                                   # headline table and trajectory
    python demo.py --config configs/tiny.yaml --quick    # tiny sizes, a few steps each (what the tests run)
    python demo.py --config configs/tiny.yaml --jobs 1   # one core (default 2: independent stages side by side)
    python demo.py --config configs/tiny.yaml --pretrain # the tiny model reads its world first (runs/tiny_pretrain)

Each seed is an independent run: its own world (people, corpus, questions), tokenizer, model initialisation, SFT
data order and RL sampling, under runs/<name>/seed<s>/ with its data in <data_dir>/seed<s>/. The steps, each one
ordinary stage script run as `python stage.py ...` (the demo prints every command it runs and where its log goes;
each can be run alone with the same arguments):

    data.py        the tiny world, its tokenizer, the untrained base model, and the synthesised SFT data
                   (CoT, CoA, CoT+A pairs from the scripted teacher with the real BM25 tool)
    sft.py         (--pretrain only) pre-training: plain LM loss on the world's documents written as search
                   results, each repeated by its entity's popularity (long-tailed; dev/test people after the
                   cut-off); CoT, SFT-2 and SFT-3 then replay those documents, RL-1 draws popular prompts -> pretrain
    sft.py         CoT only from the base model: the stand-in for the paper's starting reasoning model -> cot
    sft.py         SFT-2 from the CoT model                                       -> sft2
    sft.py         SFT-1 from the CoT model, then SFT-2 from it                   -> sft1, sft12
    sft.py         SFT-3 from SFT-1&2 (no observation mask: the internal world model) -> sft123
    worldmodel.py  a separate world-model LM (fine-tuned from SFT-1&2&3 on real calls) and the fidelity report,
                   and ZeroSearch's kind (the same, its prompt also showing the question's gold answers)
                                                                                  -> worldmodel, worldmodel_gold
    rl.py          GRPO from SFT-1&2&3, five schedules: all simulated (the policy writes its own observations),
                   the paper's first 5/6 simulated then real, all real, and 5/6 simulated by the separate
                   world-model LM, or by the gold-shown one, then real (beyond the paper); and the control the
                   paper lacks, RL-2 alone: the simulated-then-real run's real steps without its simulated ones
                                                      -> rl_sim, rl_simreal, rl_real, rl_wm, rl_zs, rl_rl2
    eval.py        every model above on the held-out test questions (greedy, real tool), plus two baselines:
                   no tool (the CoT model, searching switched off) and a fixed workflow (SFT-2's weights behind a
                   retrieve-then-read loop: one search with the question, then the model answers, never searching)

It writes runs/<name>/results.json (per-seed values of every cell and the float path they ran on, float_path: the
same seeds on the same CPU kind, ATen kernel set and --jobs give the same file, bit for bit; another float path is
another draw, see bench/draws.py),
runs/<name>/results.md (the Table-1-shaped table, mean and standard deviation over the seeds, the commit it ran on,
the stage times, and the knowledge curve: by how often pre-training repeated a person, the policy's closed-book
accuracy and how often each simulator's observation keeps the birth city), runs/<name>/rl_curves.png and
accuracy_by_stage.png (the first seed's), and prints one complete trajectory of the final model on a held-out
question, the model's tokens and the environment's told apart; its last line is the command that asks that model a
question of your own (chat.py). With --readme docs/results.md's results section (between its two marker lines) gets
the tables, the README's headline section EM and real calls per method and its trajectory section the trajectory,
and docs/ the two plots; with --pretrain, docs/results.md's own "pretrain results" section gets the tables and docs/
the plots as pretrain_*.png.

A training step whose output folder already exists is skipped (delete runs/<name>/ to start over; the evals always
run); a stage script that is missing is reported and its rows stay empty.

Not here: real QA sets (see configs/smollm2_eval.yaml and eval.py).
"""
import importlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import eval as ev
from config import SECTIONS, ConfigError, RunConfig, cli, help_text, load_config, read_argv, read_metrics, show_help
from tools import EnvConfig

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
        ("+RL-2 alone (control)", "rl_rl2", "agent"),
        ("+RL real only", "rl_real", "agent"), ("+RL world-model LM then real", "rl_wm", "agent"),
        ("+RL gold-shown world model then real", "rl_zs", "agent")]
HERE = os.path.dirname(os.path.abspath(__file__))
README, DOCS = os.path.join(HERE, "README.md"), os.path.join(HERE, "docs")  # what --readme rewrites (docs/results.md)
RL_RUNS = {"rl_sim": 1.0, "rl_simreal": 5 / 6, "rl_real": 0.0, "rl_wm": 5 / 6, "rl_zs": 5 / 6,
           "rl_rl2": 0.0}  # out -> simulated share
# --pretrain (the tiny model reads its world first; see docs/tiny_world.md, "What the model knows before it acts")
REPLAY = "sft.pretrain_share=0.25"  # CoT and SFT-2: a quarter of the stream replays pre-training documents
# SFT-3: half the stream replayed, 4x the default steps. Chosen over seeds 0, 1, 2 on training prompts and dev
# (bench/sim_rewards.py: how often a search on a needs-search question ends right, simulation vs real; dev EM) against
# other shares, lr and lengths: the sweep is in docs/tiny_world.md, "Why tiny.yaml sets what it sets"
SFT3_REPLAY = ["sft.pretrain_share=0.5", "sft.sft3_steps=800"]
SIM_PROMPTS = "rl.sim_popular=30"  # RL-1 prompts: questions about people pre-training repeated 30+ times
RL_STEPS = {"rl_rl2": 1 / 6}  # share of rl.steps the run takes (others: all): RL-2 alone = rl_simreal's real steps
# who writes the simulated observations: the policy itself (its SFT-3 internal world model, the paper's choice),
# or for rl_wm the separate world-model LM of worldmodel.py, for rl_zs the gold-shown one (beyond the paper)
# RL run -> (its world model's folder under run.dir, stage name, worldmodel.py's own settings); the gold-shown one
# skips the knowledge curve: it is told the answer, and the plain one's report has the policy's curve
WORLD_MODELS = {"rl_wm": ("worldmodel", "world model", []),
                "rl_zs": ("worldmodel_gold", "gold-shown world model", ["worldmodel.gold=true",
                                                                         "worldmodel.knowledge_people=0"])}
KINDS = ("city", "employer", "country", "comparison", "yesno", "well_known")


class Pipeline:
    """Runs the stage scripts of one seed with the shared arguments; remembers what ran and how long it took.

    Training stages run as child processes (`python stage.py ...`), their output in <run_dir>/logs/<out>.log.
    Stages that do not depend on each other run side by side, `jobs` at a time, one torch thread each; a stage
    that runs alone gets `jobs` threads. Evals run in this process (they return their summaries). The same
    command gives the same numbers; another --jobs may not (a thread count changes the order of float sums)."""

    def __init__(self, config_path, overrides, quick, run_dir, jobs=1, pretrain=False):
        self.config_path, self.overrides, self.quick, self.run_dir = config_path, overrides, quick, run_dir
        self.pretrain = pretrain  # --pretrain: pre-training on the world, replay, RL-1 on popular prompts
        self.jobs, self.times, self.missing = jobs, {}, []

    def argv(self, sections, extra=()):
        """--config, quick-mode settings, the user's overrides, the step's own: for run, env and its sections."""
        known = ("run", "env", *sections)
        quick = [a for key in known for a in QUICK.get(key, [])] if self.quick else []
        mine = [o for o in self.overrides if o.split(".", 1)[0] in known]
        return ["--config", self.config_path, *quick, *mine, *extra]

    def train(self, name, module, sections, extra=(), out=None, threads=None):
        """`python module.py argv` in a child process, unless out (a folder under run_dir) exists already."""
        if out and os.path.exists(os.path.join(self.run_dir, out, "config.json")):
            print(f"== {name}: {os.path.join(self.run_dir, out)} exists, skipped", flush=True)
            return
        script = os.path.join(HERE, module + ".py")
        if not os.path.exists(script):
            print(f"== {name}: skipped, {module}.py is missing", flush=True)
            self.missing.append(name)
            return
        argv = self.argv(sections, extra)
        if module in ("sft", "rl", "worldmodel"):  # no finished folder: redo what an interrupted try left behind
            argv.append("--overwrite")
        log = os.path.join(self.run_dir, "logs", (out or module) + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print(f"== {name}: python {module}.py {shlex.join(argv)}  (log: {log})", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, script, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                  env={**os.environ, "OMP_NUM_THREADS": str(threads or self.jobs),
                                       "PYTHONUNBUFFERED": "1"})
        self.times[name] = time.time() - t0
        if done.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"demo: {name} failed (exit {done.returncode}); the end of {log}:\n{tail}")
        print(f"== {name}: done in {self.times[name]:.0f}s", flush=True)

    def side_by_side(self, *chains):
        """Each chain is a list of train() argument tuples run in order; the chains run on `jobs` workers."""
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for future in [pool.submit(lambda c: [self.train(*step, threads=1) for step in c], chain)
                           for chain in chains]:
                future.result()  # a failed stage raises here

    def step(self, name, module, sections, extra=()):
        """module.main(argv) in this process (evals); returns what it returns."""
        mod = importlib.import_module(module)
        argv = self.argv(sections, extra)
        print(f"== {name}: python {module}.py {shlex.join(argv)}", flush=True)
        t0 = time.time()
        result = mod.main(argv)
        self.times[name] = time.time() - t0
        return result


def run_stages(p):
    """Every training stage, in order; stages that need each other's output wait, the others run side by side."""
    p.train("world, base model, synthesis", "data", ("world", "model", "synth"))  # each part only when missing
    # --pretrain: what a pre-trained LM knows of its world, popular entities well, the tail barely (sft.py
    # stage=pretrain); later stages replay its documents (REPLAY), or SFT-2 would overwrite what it taught
    replay, init = ([REPLAY], "pretrain") if p.pretrain else ([], "base")
    if p.pretrain:
        p.train("pre-training", "sft", ("sft",), ["sft.stage=pretrain", "sft.init=base", "sft.out=pretrain",
                                                  "sft.batch_size=32", "sft.device_batch_size=32"], "pretrain")
    # the CoT model stands in for the paper's starting point, a reasoning model that has never acted
    p.train("CoT", "sft", ("sft",), ["sft.stage=cot", f"sft.init={init}", "sft.out=cot", *replay], "cot")
    p.side_by_side([("SFT-2", "sft", ("sft",), ["sft.stage=sft2", "sft.init=cot", "sft.out=sft2", *replay], "sft2")],
                   [("SFT-1", "sft", ("sft",), ["sft.stage=sft1", "sft.init=cot", "sft.out=sft1"], "sft1"),
                    ("SFT-1&2", "sft", ("sft",), ["sft.stage=sft2", "sft.init=sft1", "sft.out=sft12", *replay],
                     "sft12")])
    # --pretrain: SFT-3 relearns the facts with its observations, half its stream replayed documents, 800 steps
    p.train("SFT-1&2&3", "sft", ("sft",), ["sft.stage=sft3", "sft.init=sft12", "sft.out=sft123",
                                           *(SFT3_REPLAY if p.pretrain else [])], "sft123")
    steps = load_config({"run": RunConfig, "env": EnvConfig, "rl": importlib.import_module("rl").RLConfig},
                        p.argv(("rl",))).rl.steps
    popular = [SIM_PROMPTS] if p.pretrain else []
    rl = lambda out, *extra: (f"RL {out}", "rl", ("rl",), ["rl.init=sft123", f"rl.out={out}", *popular,
                                                           f"rl.sim_share={RL_RUNS[out]:.6f}",
                                                           f"rl.steps={max(1, round(steps * RL_STEPS.get(out, 1)))}",
                                                           *extra], out)
    # the world-model LMs start from the policy: they know the tags and what SFT-3 taught of the facts
    wm = lambda folder, name, extra: (name, "worldmodel", ("worldmodel",), [
        "worldmodel.init=sft123", "worldmodel.policy=" + os.path.join(p.run_dir, "sft123"), f"worldmodel.out={folder}",
        *extra], folder)
    p.side_by_side(*[[wm(*spec), rl(out, "rl.sim_env=worldmodel", "env.worldmodel=" + os.path.join(p.run_dir, spec[0]))]
                     for out, spec in WORLD_MODELS.items()],
                   *[[rl(out, "rl.sim_env=policy")] for out in RL_RUNS if out not in (*WORLD_MODELS, "rl_rl2")],
                   [rl("rl_rl2")])


def run_evals(p):
    """eval.py on every row's model; returns {label: summary} for the rows whose model exists."""
    results = {}
    for label, folder, mode in ROWS:
        if not os.path.exists(os.path.join(p.run_dir, folder, "config.json")):
            print(f"== eval {label}: no model at {os.path.join(p.run_dir, folder)}, row left empty")
            continue
        extra = [f"eval.init={folder}", f"eval.mode={mode}", "eval.data=test", f"eval.tag={slug(label)}",
                 "--overwrite"]  # a rerun of the demo evaluates its models again, on purpose
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
    return [row for _, row in read_metrics(path)]


def train_calls(run_dir, folder):
    """Real tool calls spent in RL training for an RL row ("-" for rows without RL)."""
    rows = rl_metrics(run_dir, folder) if folder in RL_RUNS else []
    return str(rows[-1].get("real_calls_total", 0)) if rows else "-"


CELLS = ("em", "f1", "lenient", "actions", "format_error", *ev.WHEN_TO_ACT)  # per-row metrics kept for every seed


def seed_cells(results, run_dir):
    """{label: {metric: value}} of one seed: the summary's metrics, EM by kind, real calls spent in RL."""
    out = {}
    for label, folder, _ in ROWS:
        s = results.get(label)
        if s is None:
            continue
        calls = train_calls(run_dir, folder)
        out[label] = {**{m: s[m] for m in CELLS}, **{f"em_{k}": v["em"] for k, v in s["by_kind"].items()},
                      "real_calls_rl": None if calls == "-" else int(calls)}
    return out


def wm_report(run_dir, out="worldmodel"):
    """worldmodel.py's report of one seed for the world model `out` ({} when there is none)."""
    path = os.path.join(run_dir, out + ".report.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def fidelity_cells(run_dir):
    """{simulator: {answer_kept_seen, answer_kept_unseen}} from worldmodel.py's reports ({} when there is none):
    how often a simulated observation keeps the answer-bearing fact that the real one holds. The gold-shown world
    model's report adds its own row, worldmodel_gold."""
    fidelity = wm_report(run_dir).get("fidelity", {})
    gold = wm_report(run_dir, "worldmodel_gold").get("fidelity", {})
    if "worldmodel" in gold:
        fidelity["worldmodel_gold"] = gold["worldmodel"]
    return {name: {f"answer_kept_{group}": m.get("answer_kept") for group, m in groups.items()}
            for name, groups in fidelity.items()}


def knowledge_cells(run_dir):
    """{popularity bucket: {people, closed_book, kept_policy, kept_worldmodel}}: worldmodel.py's knowledge curve."""
    return wm_report(run_dir).get("knowledge", {})


def gather(per_seed):
    """[{row: {metric: v}}] over seeds -> {row: {metric: [v per seed]}}, for the rows every seed has; a metric a
    seed lacks (a question kind its test split has none of) is None there."""
    rows = {}
    for label in (per_seed[0] if per_seed else {}):
        if all(label in cells for cells in per_seed):
            metrics = dict.fromkeys(m for cells in per_seed for m in cells[label])
            rows[label] = {m: [cells[label].get(m) for cells in per_seed] for m in metrics}
    return rows


def fidelity_table(fidelity):
    """Markdown: per simulator, how often its observation keeps the answer-bearing fact, seen / unseen entities."""
    names = {"policy": "the policy itself (SFT-1&2&3)", "worldmodel": "the world-model LM (worldmodel.py)",
             "worldmodel_gold": "the gold-shown world model (worldmodel.py gold=true, ZeroSearch's kind)"}
    lines = ["| simulator | answer kept, seen entities | answer kept, unseen entities |", "|---|---|---|"]
    for name, m in fidelity.items():
        lines.append(f"| {names.get(name, name)} | {cell(m.get('answer_kept_seen', [None]))} | "
                     f"{cell(m.get('answer_kept_unseen', [None]))} |")
    return "\n".join(lines)


def knowledge_table(knowledge):
    """Markdown: the knowledge curve, one row per popularity bucket (repeats of the person's document in
    pre-training), each cell a share of the bucket's people."""
    lines = ["| repeats in pre-training | closed-book EM (policy) | answer kept: policy's simulation | "
             "answer kept: world-model LM |", "|---|---|---|---|"]
    for bucket, m in knowledge.items():
        lines.append(f"| {bucket} | {cell(m.get('closed_book', [None]))} | {cell(m.get('kept_policy', [None]))} | "
                     f"{cell(m.get('kept_worldmodel', [None]))} |")
    return "\n".join(lines)


def cell(values, digits=2):
    """mean ± sample std over seeds, those with a value ('-' for none); one value: the value alone."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.mean(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results_table(rows):
    """Markdown shaped like the paper's Table 1: one row per method, EM by question kind, then the averages;
    each cell the mean ± standard deviation over the seeds."""
    kinds = [k for k in KINDS if any(f"em_{k}" in r for r in rows.values())]
    f1 = ["F1"] if f1_differs(rows) else []
    head = ["method", *kinds, "EM", *f1, "format errors", "actions/q", *ev.WHEN_TO_ACT.values(), "real calls in RL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, mode in ROWS:
        r = rows.get(label)
        if r is None:
            lines.append("| " + " | ".join([label] + ["n/a"] * (len(head) - 1)) + " |")
            continue
        cells = [cell(r[f"em_{k}"]) if f"em_{k}" in r else "-" for k in kinds]
        cells += [cell(r["em"], 3), *[cell(r["f1"], 3) for _ in f1], cell(r["format_error"]), cell(r["actions"])]
        # no tool and workflow: a loop decides their searches (none, one), so they make no when-to-act choice
        cells += [cell(r[key]) if mode == "agent" else "-" for key in ev.WHEN_TO_ACT]
        lines.append("| " + " | ".join([label] + cells + [cell(r["real_calls_rl"], 0)]) + " |")
    return "\n".join(lines)


def headline_table(rows):
    """Markdown for the README's front page: per method, test EM, actions per question and real calls in RL, each
    cell as in results_table (the full table, with EM by kind and the when-to-act errors, is docs/results.md's)."""
    lines = ["| method | test EM | actions/q | real calls in RL |", "|---|---|---|---|"]
    for label, _, _ in ROWS:
        r = rows.get(label)
        if r is not None:
            lines.append(f"| {label} | {cell(r['em'], 3)} | {cell(r['actions'])} | {cell(r['real_calls_rl'], 0)} |")
    return "\n".join(lines)


def f1_differs(rows):
    """Whether an F1 column would say anything EM does not: in the tiny world the gold answers are one word, so F1
    differs from EM only when some model answers in several words; then the table shows it."""
    return any(r["f1"] != r["em"] for r in rows.values())


def smooth(xs, window=5):
    """Trailing mean over `window` steps (RL batch rewards are noisy)."""
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def plot(results, run_dir, out_dir, seeds=(0,), quick=False):
    """rl_curves.png and accuracy_by_stage.png of one seed's run_dir (the first of `seeds`), written to out_dir;
    quick-mode plots are marked QUICK (their numbers mean nothing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [os.path.join(out_dir, "rl_curves.png"), os.path.join(out_dir, "accuracy_by_stage.png")]
    for path, fig in zip(paths, (plot_curves(plt, run_dir, seeds[0]), plot_accuracy(plt, results, seeds))):
        if quick:  # a reader who finds the file alone must not take it for a result
            fig.text(0.5, 0.5, "QUICK", fontsize=90, color="red", alpha=0.15, rotation=20, ha="center", va="center")
            fig.text(0.5, 0.3, "--quick: a check that the code runs; its numbers mean nothing", fontsize=12,
                     color="red", alpha=0.5, ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


def switch_step(runs):
    """The first real step of the simulated-then-real runs ({out: metrics rows}), or None when none ran."""
    return next((r["step"] for out, rows in runs.items() if 0 < RL_RUNS[out] < 1 for r in rows
                 if r.get("env") == "real"), None)


def plot_curves(plt, run_dir, seed):
    """Reward and EM per RL step, one line per schedule named as in the table, the simulated-to-real switch marked.
    RL-2 alone (the control) runs only the real steps, so it is drawn where those steps fall in the other runs."""
    labels = {folder: label for label, folder, _ in ROWS}
    runs = {out: rl_metrics(run_dir, out) for out in RL_RUNS}
    switch = switch_step(runs)
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4.6))
    for out, metrics in runs.items():
        rows = [r for r in metrics if "reward" in r]
        if not rows:
            continue
        shift, label, style = 0, labels.get(out, out), "-"
        if out == "rl_rl2" and switch is not None:  # its step 1 is the others' first real step
            shift, label, style = switch - rows[0]["step"], label + ", at the real steps", "--"
        steps = [r["step"] + shift for r in rows]
        raw, = ax_r.plot(steps, [r["reward"] for r in rows], alpha=0.25)
        ax_r.plot(steps, smooth([r["reward"] for r in rows]), style, color=raw.get_color(), label=label)
        ax_e.plot(steps, smooth([r["em"] for r in rows]), style, color=raw.get_color(), label=label)
        held = [r for r in metrics if "eval_em" in r]  # held-out EM at the eval points
        ax_e.plot([r["step"] + shift for r in held], [r["eval_em"] for r in held], "o--", color=raw.get_color())
    for ax, name, title in ((ax_r, "reward", "training-batch reward (faint: per step; bold: mean of 5)"),
                            (ax_e, "EM", "EM (line: training batch, mean of 5; dots: held-out dev)")):
        if switch is not None:  # before it the simulated runs never call the real tool: a jump here is the switch
            ax.axvline(switch - 0.5, color="gray", linestyle=":")
            ax.text(switch - 0.5, 0.99, "5/6 runs: simulated | real", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7, color="dimgray")
        ax.set_xlabel("RL step"), ax.set_ylabel(name), ax.set_title(title, fontsize=9), ax.grid(alpha=0.3)
    ax_r.legend(fontsize=7)
    fig.suptitle(f"GRPO from SFT-1&2&3, seed {seed}: steps in a simulated environment (the policy or a world model "
                 f"writes the observations), then the real tool", fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy(plt, results, seeds):
    """Held-out test EM of each row's model, one bar per row in table order, for the first seed."""
    labels = [label for label, _, _ in ROWS if label in results]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    bars = ax.bar(range(len(labels)), [results[k]["em"] for k in labels], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    spread = f"; the table: mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    ax.set_title(f"held-out test EM by stage, seed {seeds[0]} (greedy, real tool){spread}", fontsize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test EM"), ax.set_ylim(0, 1), ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


FINAL = "+RL simulated then real"  # the paper's recipe: its trajectory ends the demo


def final_model(results, run_dir):
    """The paper's final model, or else the last row (in table order) whose model exists."""
    order = [r for r in ROWS if r[0] == FINAL] + list(reversed(ROWS))
    for label, folder, mode in order:
        if mode == "agent" and label in results:
            return label, os.path.join(run_dir, folder)
    return None, None


def show_one(cfg, model_dir, kind="country", tries=16):
    """(question, text): one trajectory of model_dir on a held-out 2-hop question, the first of `tries` such test
    questions that it answers right (a walk-through reads better on a success), else the first one. Scored as
    eval.py does."""
    import torch
    from rollout import rollout
    from plumbing import load_model
    from tools import SearchEnv, make_tool
    model, tokenizer = load_model(model_dir, cfg.run)
    rows = ev.data.load_qa(os.path.join(cfg.run.data_dir, "test.jsonl"))
    rows = [r for r in rows if r.get("kind") == kind][:tries] or rows[:1]
    env = SearchEnv(make_tool(cfg.env, cfg.run), tokenizer, cfg.env)
    with torch.no_grad():
        episodes = rollout(model, tokenizer, rows, cfg.env, env)
    ev.score(episodes, rows, cfg.env, 1)  # fills each episode.reward
    i = next((i for i, ep in enumerate(episodes) if ep.reward == 1.0), 0)
    return rows[i]["question"], (
        f"question ({rows[i]['id']}, {rows[i].get('kind')}; the first of {len(rows)} such test questions "
        f"{'it answers right' if episodes[i].reward else '(none answered right)'}): {rows[i]['question']}  "
        f"gold: {rows[i]['golden_answers']}\n{ev.show_trajectory(episodes[i], tokenizer, color=False)}")


def chat_command(config_path, overrides, data_dir, model_dir, question):
    """What to run next: the chat.py command line that asks model_dir a question, with the interpreter that ran the
    demo (.venv/bin/python after make demo) and the seed's data (chat.py searches that world's corpus). The user's
    run.*/env.* overrides come along (a device, a tool), but not run.data_dir: the seed's replaces it."""
    python = os.path.relpath(sys.executable)
    keep = [o for o in overrides if o.split(".", 1)[0] in ("run", "env") and not o.startswith("run.data_dir=")]
    return shlex.join([python if not python.startswith("..") else "python", "chat.py", "--config", config_path, *keep,
                       f"run.data_dir={data_dir}", f"init={model_dir}"]) + f" question={shlex.quote(question)}"


def float_path(jobs):
    """What decides the floats besides the seed: the CPU, ATen's kernel set (ATEN_CPU_CAPABILITY lowers it), the
    threads each stage gets (--jobs) and torch's version. The same path and seeds give the same results.json, bit for
    bit; another path is another draw (docs/results.md, "Draws": bench/draws.py runs seeds on two paths)."""
    import platform
    import torch
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"cpu": cpu or platform.processor() or platform.machine(), "jobs": jobs, "torch": torch.__version__,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def path_text(path):
    return f"{path['cpu']}, ATen {path['aten_cpu_capability']}, --jobs {path['jobs']}, torch {path['torch']}"


def commit():
    """The commit the code ran on (+ '-dirty' when tracked files differ from it), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


QUICK_NOTE = ("QUICK MODE (--quick): a small world and a few steps per stage, to check that the code runs. Its "
              "numbers say nothing about the method: near-zero EM and broken formats are expected.")
NOTE = ("no tool: the CoT-only model, searching switched off (env.max_actions=0). workflow: SFT-2's weights behind "
        "a fixed retrieve-then-read loop (one search with the question, then the model answers without searching). "
        "RL rows start from SFT-1&2&3; RL-2 alone is the simulated-then-real run's real steps (1/6 of them) without "
        "its simulated ones; the gold-shown world model is worldmodel.py's LM with the question's gold answers in its "
        "prompt (ZeroSearch's simulator), so its observations can carry the answer whatever it knows. Test "
        "questions are about people no training question mentions; well_known = famous people's facts, answerable "
        "without a search. needed search skipped: the share of the questions that need a search answered without "
        "any; needless search: the share of the well_known ones answered after a search (eval.when_to_act); '-' for "
        "no tool and workflow, whose searches a loop decides.")
F1_NOTE = ("F1 is left out: it equals EM in every cell (the gold answers are one word, and no answer was partly "
           "right); results.json has it.")


def table_note(rows):
    """NOTE, and why the F1 column is missing when it is."""
    return NOTE + ("" if f1_differs(rows) else " " + F1_NOTE)


def run_seed(config_path, overrides, quick, seed, jobs, pretrain=False):
    """Every stage and eval for one seed; returns (the Pipeline, {label: eval summary})."""
    base = load_config({"run": RunConfig}, ["--config", config_path] + (QUICK["run"] if quick else []) +
                       [o for o in overrides if o.startswith("run.")])
    mine = [f"run.seed={seed}", f"run.name={base.run.name}/seed{seed}",
            f"run.data_dir={os.path.join(base.run.data_dir, f'seed{seed}')}"]
    p = Pipeline(config_path, [*overrides, *mine], quick, os.path.join(base.run.dir, f"seed{seed}"), jobs, pretrain)
    print(f"==== seed {seed}: {p.run_dir}", flush=True)
    run_stages(p)
    return p, run_evals(p)


def write_readme(path, text, part="results"):
    """Replace what stands between the two markers of `part` (results, headline, trajectory) in the markdown file at
    path (the README or docs/results.md) with text."""
    begin, end = f"<!-- {part}: begin (written by demo.py --readme) -->", f"<!-- {part}: end -->"
    with open(path) as f:
        readme = f.read()
    if begin not in readme or end not in readme:
        raise SystemExit(f"demo: {path} has no {part} markers ({begin} ... {end})")
    head, rest = readme.split(begin, 1)
    with open(path + ".tmp", "w") as f:
        f.write(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    os.replace(path + ".tmp", path)


FLAGS = {"seeds N": "run seeds run.seed .. run.seed+N-1, each its own world and model; cells: mean ± std (default 1)",
         "jobs N": "independent stages side by side, one core each (default 2)",
         "quick": "a small world and a few steps per stage: checks that the code runs (its numbers mean nothing)",
         "readme": "rewrite docs/results.md's tables, the README's headline table and trajectory, and docs/*.png "
                   "from this run (--pretrain: its own section of docs/results.md and docs/pretrain_*.png)",
         "pretrain": "pre-train on the world's corpus first, with replay and RL-1 on popular prompts "
                     "(runs/<name>_pretrain)"}


def all_sections():
    """{section: dataclass} of every stage: the demo passes each section.key=value to the stages that read it."""
    import rl
    import sft
    import worldmodel
    return {"run": RunConfig, "env": EnvConfig, "world": ev.data.WorldConfig, "model": ev.data.ModelConfig,
            "synth": ev.data.SynthConfig, "sft": sft.SFTConfig, "worldmodel": worldmodel.WorldModelConfig,
            "rl": rl.RLConfig, "eval": ev.EvalConfig}


def parse_flags(argv):
    """(quick, seeds, jobs, readme, pretrain, config path, overrides); an unknown --flag is an error, --help prints
    the help."""
    if "--help" in argv or "-h" in argv:
        show_help(help_text(all_sections(), flags=FLAGS, doc=__doc__, prog="demo.py"))
    config_path, overrides, given = read_argv(argv, FLAGS)  # the stages' own parser: the same flags and errors
    for name in ("seeds", "jobs"):
        text = given.get(name, "1")
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"config: --{name} takes a whole number >= 1, got {text!r}")
    n_seeds, jobs = int(given.get("seeds", 1)), int(given.get("jobs", 2))
    quick, readme, pretrain = "quick" in given, "readme" in given, "pretrain" in given
    config_path = config_path or "configs/tiny.yaml"
    stray = [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in SECTIONS or "." not in o.split("=")[0]]
    if stray:  # each stage takes its own sections only: these would be dropped in silence
        raise ConfigError(f"config: {', '.join(stray)} names no section (section.key=value; {', '.join(SECTIONS)})")
    return quick, n_seeds, jobs, readme, pretrain, config_path, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    quick, n_seeds, jobs, readme, pretrain, config_path, overrides = parse_flags(argv)
    if quick:
        print(QUICK_NOTE, flush=True)
    load = lambda: load_config({"run": RunConfig, "env": EnvConfig}, ["--config", config_path] + (
        QUICK["run"] if quick else []) + [o for o in overrides if o.split(".", 1)[0] in ("run", "env")])
    cfg = load()
    if pretrain:  # its own runs: the demo skips a stage whose output exists, and these differ from the default's
        overrides, cfg = [*overrides, f"run.name={cfg.run.name}_pretrain"], None
        cfg = load()
    t0, sha, path = time.time(), commit(), float_path(jobs)  # the code as it starts: later edits did not run
    seeds = [cfg.run.seed + i for i in range(n_seeds)]
    runs = [run_seed(config_path, overrides, quick, seed, jobs, pretrain) for seed in seeds]
    rows = gather([seed_cells(results, p.run_dir) for p, results in runs])
    fidelity = gather([fidelity_cells(p.run_dir) for p, _ in runs])
    knowledge = gather([knowledge_cells(p.run_dir) for p, _ in runs])
    table = results_table(rows) + ("\n\nHow faithful each simulator is (worldmodel.py, held-out real calls):\n\n" +
                                   fidelity_table(fidelity) if fidelity else "")
    table += ("\n\nThe knowledge curve at the RL start (SFT-1&2&3; worldmodel.py): \"Where was X born?\" for people "
              "grouped by how often pre-training repeated their document (0: dev/test people, after the cut-off)."
              "\n\n" + knowledge_table(knowledge) if knowledge else "")
    times = {f"seed{seed}": {k: round(v, 1) for k, v in p.times.items()} for seed, (p, _) in zip(seeds, runs)}
    print("\n" + table + "\n\n" + table_note(rows) + ("\n\n" + QUICK_NOTE if quick else ""))
    print("stage times (s):", json.dumps(times))
    os.makedirs(cfg.run.dir, exist_ok=True)
    with open(os.path.join(cfg.run.dir, "results.json.tmp"), "w") as f:  # no times: the same seeds, the same file
        json.dump({"commit": sha, "quick": quick, "seeds": seeds, "float_path": path, "rows": rows,
                   "fidelity": fidelity, "knowledge": knowledge}, f, indent=1, sort_keys=True)
    os.replace(os.path.join(cfg.run.dir, "results.json.tmp"), os.path.join(cfg.run.dir, "results.json"))
    command = "python demo.py " + shlex.join(argv)  # as given: --readme only when it was
    if os.environ.get("ATEN_CPU_CAPABILITY"):  # another float path, asked for by the caller
        command = f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} {command}"
    over = (f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else
            f"one seed ({seeds[0]}): no spread")
    section = (f"Held-out test EM by question kind, EM{', F1' if f1_differs(rows) else ''}, format-error rate, "
               f"actions per question, the when-to-act errors and real tool calls spent in RL; {over} (greedy, real "
               f"tool). Written by `{command}` on commit {sha}, float path {path_text(path)}.\n\n"
               + (QUICK_NOTE + "\n\n" if quick else "") + f"{table}\n\n{table_note(rows)}\n")
    with open(os.path.join(cfg.run.dir, "results.md"), "w") as f:
        f.write(f"# AutoCoA on the tiny world ({'quick' if quick else 'full'} demo)\n\n{section}\n"
                f"Stage times (s): {json.dumps(times)}\n")
    first_dir, first_results = runs[0][0].run_dir, runs[0][1]
    plots = plot(first_results, first_dir, cfg.run.dir, seeds, quick) if first_results else []
    print("plots:", ", ".join(plots))
    label, model_dir = final_model(first_results, first_dir)
    if model_dir:
        seed_cfg = load_config({"run": RunConfig, "env": EnvConfig}, runs[0][0].argv(()))
        question, shown = show_one(seed_cfg, model_dir)
        print(f"\n== one held-out trajectory of the final model ({label}, seed {seeds[0]}):\n{shown}")
    if readme:  # the tables, the plots (docs/), the headline and the trajectory, all from this run
        # --pretrain has its own section and plots beside the default pipeline's; the README stays the default's
        write_readme(os.path.join(DOCS, "results.md"), section, "pretrain results" if pretrain else "results")
        for path in plots:
            shutil.copyfile(path, os.path.join(DOCS, ("pretrain_" if pretrain else "") + os.path.basename(path)))
        if not pretrain:
            write_readme(README, f"Held-out test EM, actions per question and real tool calls spent in RL; {over} "
                         f"(greedy, real tool). Written by `{command}` on commit {sha}. Every column, the "
                         f"simulators' fidelity and the knowledge curve: docs/results.md.\n\n{headline_table(rows)}",
                         "headline")
        if model_dir and not pretrain:
            write_readme(README, f"The final model ({label}), seed {seeds[0]}, commit "
                         f"{sha}:\n\n```\n{shown}\n```", "trajectory")
    missing = sorted({m for p, _ in runs for m in p.missing})
    if missing:
        print("missing stages:", ", ".join(missing))
    print(QUICK_NOTE if quick else "", flush=True)
    print(f"demo done in {time.time() - t0:.0f}s; results in {os.path.join(cfg.run.dir, 'results.md')} and "
          f"results.json")
    if model_dir:  # the last line: what to run next, a command that works as printed
        print(f"next: ask the final model ({label}, seed {seeds[0]}) a question of your own (no question=: one a "
              f"line):\n{chat_command(config_path, overrides, seed_cfg.run.data_dir, model_dir, question)}", flush=True)
    return rows


if __name__ == "__main__":
    cli(main)
