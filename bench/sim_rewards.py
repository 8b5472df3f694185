"""
bench/sim_rewards.py -- what simulated RL steps reward, and what the RL models learnt from it.

RL-1 rewards a trajectory when its final answer is right, whoever wrote the observations. This script samples
RL-1's rollouts from the RL start (<run>/sft123, or model=: training prompts, temperature 1, group 4, as rl.py
does) in each environment, the policy's own simulation, worldmodel.py's LM, its gold-shown one (ZeroSearch's kind)
and the real tool, and gives the mean reward of the trajectories that search and of those that do not, on
questions that need a search and on well-known facts. Then, from the demo's test evals (<run>/eval/*.jsonl), each
model's when-to-act errors (eval.when_to_act): the share of the questions that need a search it answered without
one, and of the well-known facts it searched for.

    python bench/sim_rewards.py run=runs/tiny/seed0 data=data/tiny/seed0      # after the demo (seed 0)
    python bench/sim_rewards.py run=runs/tiny/seed0 data=data/tiny/seed0 prompts=200
    python bench/sim_rewards.py run=runs/tiny/seed0 data=data/tiny/seed0 popular=30  # as rl.sim_popular=30 draws
    python bench/sim_rewards.py run=runs/tiny/seed0 data=data/tiny/seed0 sim_greedy=false  # sampled observations
    python bench/sim_rewards.py config=configs/smollm2_tiny.yaml run=runs/smollm2_tiny data=data/smollm2_tiny \
        model=sft23 train=runs/smollm2_tiny/sft3_questions.jsonl     # bench/real_model.py: the people SFT-3 saw

Needs <run>/sft123 (or model=) and, for the world-model rows, <run>/worldmodel and <run>/worldmodel_gold (each row
only when its folder exists). Ends with one JSON line.
"""
import dataclasses
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import data  # noqa: E402
from eval import WHEN_TO_ACT, well_known, when_to_act  # noqa: E402
from rollout import rollout  # noqa: E402
from config import RunConfig, cli, load_config, read_key_values  # noqa: E402
from plumbing import load_model, model_path  # noqa: E402
from tools import EnvConfig, make_environment, reward  # noqa: E402
from rl import popular_rows  # noqa: E402


@dataclasses.dataclass
class Args:
    run: str = "runs/tiny/seed0"  # the demo's run folder of one seed (sft123, worldmodel, eval/ inside)
    data: str = "data/tiny/seed0"  # its data folder (train.jsonl, corpus.jsonl)
    config: str = "configs/tiny.yaml"  # the config the demo ran with
    model: str = "sft123"  # the RL start: a stage name under run, or a folder
    train: str = ""  # QA JSONL the prompts are drawn from ("" = <data>/train.jsonl), e.g. the questions SFT-3 saw
    prompts: int = 96  # training prompts sampled
    popular: int = 0  # only questions about people pre-training repeated this often or more, as rl.sim_popular
    sim_greedy: str = "config"  # the policy's own observations greedy (true) or sampled (false); config: env's
    group: int = 4  # trajectories per prompt
    seed: int = 0  # seed of the prompts and the sampling
    threads: int = 1  # torch threads


def reward_table(episodes, env):
    """{"needs search" | "well-known": {"searched" | "no search": [n, mean reward]}} over the episodes."""
    out = {q: {a: [0, 0.0] for a in ("searched", "no search")} for q in ("needs search", "well-known")}
    for ep in episodes:
        cell = out["well-known" if well_known(ep.row) else "needs search"][
            "searched" if ep.actions else "no search"]
        cell[0] += 1
        cell[1] += reward(ep.text, ep.golds, env)
    for row in out.values():
        for cell in row.values():
            cell[1] = round(cell[1] / cell[0], 3) if cell[0] else None
    return out


def when_to_act_on_test(eval_dir):
    """{eval tag: {needed_search_skipped, needless_search}} from the demo's test evals (eval.when_to_act)."""
    out = {}
    for name in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
        if name.endswith(".jsonl"):
            with open(os.path.join(eval_dir, name)) as f:
                shares = when_to_act(list(map(json.loads, f)))
            if any(v is not None for v in shares.values()):
                out[name[:-len(".jsonl")]] = {k: None if v is None else round(v, 3) for k, v in shares.items()}
    return out


def main(argv=None):
    args = read_key_values(Args, sys.argv[1:] if argv is None else argv, "sim_rewards")
    torch.set_num_threads(args["threads"])
    cfg = load_config({"run": RunConfig, "env": EnvConfig}, ["--config", args["config"], "run.device=cpu",
                                                             f"run.data_dir={args['data']}"] +
                     ([] if args["sim_greedy"] == "config" else [f"env.sim_greedy={args['sim_greedy']}"]))
    env = cfg.env
    model, tok = load_model(model_path(args["model"], args["run"], "sim_rewards"), device=torch.device("cpu"))
    rows = popular_rows(data.load_qa(args["train"] or os.path.join(args["data"], "train.jsonl")), args["data"],
                        args["popular"])
    random.Random(args["seed"]).shuffle(rows)
    rows = rows[:args["prompts"]]
    envs = {kind: dataclasses.replace(env, env=kind) for kind in ("policy", "real")}
    for name in ("worldmodel", "worldmodel_gold"):  # the gold-shown one: its folder's config.json says so
        if os.path.isdir(os.path.join(args["run"], name)):
            envs[name] = dataclasses.replace(env, env="worldmodel", worldmodel=os.path.join(args["run"], name))
    envs = {name: (env_cfg, make_environment(env_cfg, cfg.run, tok)) for name, env_cfg in envs.items()}
    result = {"reward": {}, "when_to_act_on_test": when_to_act_on_test(os.path.join(args["run"], "eval"))}
    print("mean reward (trajectories) at the RL start, by environment:")
    for name, (env_cfg, environment) in envs.items():
        episodes = rollout(model, tok, rows, env_cfg, environment, group_size=args["group"], temperature=1.0,
                           generator=torch.Generator().manual_seed(args["seed"]))
        table = result["reward"][name] = reward_table(episodes, env)
        print(f"  {name:15s} " + "  ".join(f"{q}, {a}: {cell[1]} ({cell[0]})" for q, row in table.items()
                                           for a, cell in row.items()))
    print("when to act on the test questions (eval.when_to_act):")
    for tag, shares in result["when_to_act_on_test"].items():
        print(f"  {tag:32s} " + "  ".join(f"{label} {shares[key]}" for key, label in WHEN_TO_ACT.items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli(main)
