"""
bench/rl_step.py -- one GRPO step (rollout + reward + loss + update) of rl.py against TRL's GRPOTrainer, on CPU,
at the same model, prompts, group size, completion length, learning rate and loss, measured side by side in one
process; the result is a ratio of medians (the machine may be shared, so absolute times mean little).

What is timed, per step:
  rl.py  rollout.rollout (KV cache, env=policy: no tool, as TRL has none here) + tools.reward + rl.learn
  TRL    GRPOTrainer's whole training step (generation with HF generate, reward, log-probs, loss, backward,
         optimizer step), from on_step_begin to on_step_end of a TrainerCallback
Both: temperature 1, beta (kl_coef) 0, one update per rollout batch, loss_type grpo, AdamW, no gradient clipping
difference (both clip at 1.0). The first step is a warm-up and is not counted.

    python bench/rl_step.py                                   # tiny base model, 8 prompts x 4, 64 new tokens
    python bench/rl_step.py model=/tmp/rlx/tiny/sft2 prompts=16 group=4 new_tokens=128 steps=4

TRL is not a dependency of the project: `pip install trl` first, or the bench says so and exits 0.
Ends with one JSON line.
"""
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rl  # noqa: E402
from rollout import rollout  # noqa: E402
from config import ConfigError, RunConfig, cli, read_key_values  # noqa: E402
from plumbing import load_model  # noqa: E402
from tools import EnvConfig, build_prompt, reward  # noqa: E402


@dataclass
class Args:
    model: str = "runs/tiny/base"  # the policy both trainers start from (data.py builds the tiny base)
    data: str = "data/tiny/train.jsonl"  # QA JSONL the prompts come from
    prompts: int = 8  # prompts per step
    group: int = 4  # trajectories per prompt
    new_tokens: int = 64  # completion tokens per trajectory
    steps: int = 4  # timed steps (after one warm-up step)
    lr: float = 1e-5  # learning rate of both
    threads: int = 1  # torch threads


def load_rows(path, n_steps, n_prompts):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n_steps * n_prompts]


def bench_rl(args, rows, env):
    """Seconds per step and completion tokens per trajectory of rl.py."""
    model, tokenizer = load_model(args["model"], RunConfig(device="cpu"))
    cfg = rl.RLConfig(group_size=args["group"], lr=args["lr"], loss_type="grpo")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    totals = {"skipped": 0, "bad_in_row": 0}
    times, rollout_times, lengths = [], [], []
    generator = torch.Generator().manual_seed(0)
    for step in range(args["steps"]):
        batch = rows[step * args["prompts"]:(step + 1) * args["prompts"]]
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            episodes = rollout(model, tokenizer, batch, env, None, group_size=args["group"], temperature=1.0,
                               max_new_tokens=args["new_tokens"], generator=generator)
        rollout_times.append(time.perf_counter() - t0)
        rewards = torch.tensor([reward(ep.text, ep.golds, env) for ep in episodes])
        rl.learn(model, None, optimizer, scheduler, episodes, rewards, list(range(len(batch))), cfg,
                 args["new_tokens"], tokenizer.pad_token_id, torch.device("cpu"), totals)
        times.append(time.perf_counter() - t0)
        lengths += [len(ep.ids) for ep in episodes]
    return times[1:], rollout_times[1:], sum(lengths) / len(lengths)


def bench_trl(args, rows, env):
    """Seconds per step and completion tokens per trajectory of TRL's GRPOTrainer."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    model, tokenizer = load_model(args["model"], RunConfig(device="cpu"))
    data = Dataset.from_list([{"prompt": build_prompt(tokenizer, r["question"], env), "golds": r["golden_answers"]}
                              for r in rows])

    def reward_fn(completions, golds, **kwargs):
        return [reward(c, g, env) for c, g in zip(completions, golds)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args["prompts"] * args["group"],
                            num_generations=args["group"], max_completion_length=args["new_tokens"],
                            max_steps=args["steps"], learning_rate=args["lr"], lr_scheduler_type="constant",
                            adam_beta2=0.99, beta=0.0, temperature=1.0, loss_type="grpo", num_iterations=1,
                            max_grad_norm=1.0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                            bf16=False, shuffle_dataset=False, seed=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    lengths = [float(log["completions/mean_length"]) for log in trainer.state.log_history
               if "completions/mean_length" in log]
    return timer.times[1:], sum(lengths) / max(len(lengths), 1)


def main(argv=None):
    args = read_key_values(Args, sys.argv[1:] if argv is None else argv, "config")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench/rl_step.py: trl is not installed (pip install trl; it is not a project dependency); skipped")
        print(json.dumps({"bench": "rl_step", "skipped": "trl not installed"}))
        return
    if not os.path.exists(os.path.join(args["model"], "config.json")):
        raise ConfigError(f"bench: no model at {args['model']} (python data.py --config configs/tiny.yaml builds it)")
    torch.set_num_threads(args["threads"])
    env = EnvConfig(env="policy", max_new_tokens=args["new_tokens"])
    rows = load_rows(args["data"], args["steps"], args["prompts"])
    torch.manual_seed(0)
    ours, ours_rollout, ours_len = bench_rl(args, rows, env)
    torch.manual_seed(0)
    theirs, theirs_len = bench_trl(args, rows, env)
    result = {"bench": "rl_step", "model": args["model"], "prompts": args["prompts"], "group": args["group"],
              "new_tokens": args["new_tokens"], "threads": args["threads"], "timed_steps": len(ours),
              "rl_s_per_step": statistics.median(ours), "rl_rollout_s": statistics.median(ours_rollout),
              "trl_s_per_step": statistics.median(theirs),
              "rl_tokens_per_traj": ours_len, "trl_tokens_per_traj": theirs_len,
              "speedup": statistics.median(theirs) / statistics.median(ours)}
    print(f"rl.py {result['rl_s_per_step']:.2f} s/step ({ours_len:.0f} tokens/trajectory), "
          f"TRL {result['trl_s_per_step']:.2f} s/step ({theirs_len:.0f} tokens/trajectory): "
          f"rl.py is {result['speedup']:.2f}x faster")
    print(json.dumps(result))


if __name__ == "__main__":
    cli(main)
