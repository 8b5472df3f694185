"""
chat.py -- ask a trained model a question and watch it act: one question, or an interactive prompt.

The question goes through rollout.py as in eval.py (greedy unless temperature > 0), with the environment the
config names: the real tool (BM25 over the corpus; the retrieval server with env.tool=http env.url=...), the
policy's own simulation (env.env=policy, RL-1's environment) or a world-model LM (env.env=worldmodel
env.worldmodel=PATH). It prints the prompt and the trajectory with the environment's text told apart from the
model's (colour on a terminal, else the environment's text in [[...]]), then the answer as eval.py scores it and
the calls spent.

    python chat.py --config configs/tiny.yaml run.data_dir=data/tiny/seed0 init=runs/tiny/seed0/rl_simreal \
        question="In which country was Suvelom Rilor born?"    # after make demo: its final model (its last line)
    python chat.py --config configs/tiny.yaml init=rl question="In which country was Suvelom Rilor born?"
    python chat.py --config configs/tiny.yaml init=sft123          # interactive: one question a line, empty ends
    python chat.py --config configs/tiny.yaml init=rl env.env=policy                 # the model simulates the tool
    python chat.py --config configs/tiny.yaml init=rl env.env=worldmodel env.worldmodel=runs/tiny/worldmodel
    python chat.py --config configs/qwen7b.yaml init=rl env.url=http://127.0.0.1:8000/retrieve temperature=0.6

Not here: a dialogue (every question starts afresh, as in training), scoring against gold answers (eval.py).
"""
import glob
import os
import sys
from dataclasses import dataclass

import torch

import data
import eval as ev
from config import ConfigError, RunConfig, cli, load_config
from plumbing import load_model, resolve_model
from rollout import rollout
from tools import EnvConfig, make_environment


@dataclass
class ChatConfig:
    init: str = "rl"  # the model: a folder, a stage output under <run.dir> (sft123, rl, ...), "base" or a hub name
    question: str = ""  # the question; empty = an interactive prompt (one question a line; an empty line ends)
    temperature: float = 0.0  # sampling temperature; 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int = 0  # sampling seed (a torch.Generator), so a sampled answer repeats

    RANGES = {"temperature": "[0, inf)", "top_p": "(0, 1]"}


def questions(first):
    """The question given, or one per line typed at the prompt until an empty line or end of input."""
    if first:
        yield first
        return
    while True:
        try:
            line = input("question> ").strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def ask(model, tokenizer, question, cfg, environment):
    """One trajectory for the question, printed with who wrote what; returns the Episode."""
    c = cfg.chat
    generator = torch.Generator(device=model.device).manual_seed(c.seed)
    with torch.no_grad():
        episode = rollout(model, tokenizer, [{"question": question, "golden_answers": []}], cfg.env, environment,
                          temperature=c.temperature, top_p=c.top_p, generator=generator)[0]
    answer, format_ok, reason = ev.predicted_answer(episode, cfg.env)
    print(ev.show_trajectory(episode, tokenizer, scored=False))
    print(f"answer: {answer!r} ({'well formed' if format_ok else 'format error: ' + reason}); real calls "
          f"{episode.real_calls}, simulated calls {episode.sim_calls}\n", flush=True)
    return episode


def find_model(cfg):
    """The model chat.init names (plumbing.resolve_model). A bare stage name with nothing behind it is a one-line error
    that says what is there instead: make demo writes each seed's models one level down (<run.dir>/seed0/rl_simreal,
    its world in <run.data_dir>/seed0), so after it the default `rl` finds nothing under <run.dir>."""
    init, run_dir = cfg.chat.init, cfg.run.dir
    if os.sep in init or init == "base" or os.path.isdir(init) or os.path.isdir(os.path.join(run_dir, init)):
        return resolve_model(init, cfg, "chat.init")
    finals = sorted(glob.glob(os.path.join(run_dir, "seed*", "rl_simreal", "config.json")))  # the demo's last stage
    found = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(run_dir, "*", "config.json")))
    if finals:
        final = os.path.dirname(finals[0])
        seed = os.path.basename(os.path.dirname(final))
        hint = (f"make demo's final model is {final}: give init={final} run.data_dir="
                f"{os.path.join(cfg.run.data_dir, seed)} (the corpus of its seed's world)")
    elif found:
        hint = f"the models under {run_dir}: {', '.join(found)}"
    else:
        hint = f"nothing is trained under {run_dir} yet (make demo trains every stage, then prints the chat command)"
    raise ConfigError(f"chat.init={init!r}: no model folder {os.path.join(run_dir, init)!r}; {hint}")


def main(argv=None):
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "model": data.ModelConfig, "chat": ChatConfig}, argv,
                      own="chat")
    path = find_model(cfg)  # a missing folder: one line saying what is there
    model, tokenizer = load_model(path, cfg.run)
    model.eval()
    environment = make_environment(cfg.env, cfg.run, tokenizer)  # real, a world-model LM, or None
    where = {"real": f"the real tool ({cfg.env.tool})", "policy": "its own simulation (env.env=policy)",
             "worldmodel": f"the world-model LM {cfg.env.worldmodel}"}.get(cfg.env.env, cfg.env.env)
    print(f"chat: {path}, searching with {where}", file=sys.stderr, flush=True)
    return [ask(model, tokenizer, q, cfg, environment) for q in questions(cfg.chat.question)]


if __name__ == "__main__":
    cli(main)
