"""
worldmodel.py -- a world model that simulates the search tool, and a measurement of how faithful it is.

AutoCoA (arXiv 2503.06580, Sec. 3.3) trains most of RL in a simulated environment: instead of calling the real
tool, a *world model* writes the observation. Real calls are then few (costly, slow, changing), simulated calls
are cheap. Two world models are compared here:

    policy      the internal world model: the policy itself (after SFT-3) writes its own <search_result> ...
                </search_result> (rollout.py's env=policy mode); the paper's choice.
    worldmodel  a separate LM fine-tuned here on logged real calls to write the observation

The separate world model learns p(observation | question, history, query) from real calls (one part a line here;
in the prompt they follow each other after the question's line)

    Question: In which country was Ada Brun born?                          <- question
     <begin_search> Ada Brun </end_search><search_result> ... </search_result>   <- earlier calls (history)
     <begin_search> Lorn </end_search>                                     <- the query
    <search_result> Lorn\\nLorn is a city in Kesh. </search_result><eos>    <- target: the only trained tokens

    loss = - sum_t log p(obs_t | prompt, obs_<t) / #obs tokens        (prompt tokens masked out)

Any HF causal LM can be the world model (`init`; empty = the untrained base). demo.py starts it from the policy
after SFT-3 (`init=sft123`), which already knows the tags and part of the facts: on the tiny world its observations
then keep the answer far more often than those of a world model trained twice as long from the untrained base
(measured in docs/tiny_world.md, "Why tiny.yaml sets what it sets").

The history keeps only earlier actions and observations, not the policy's thoughts: the tool never sees them,
and so the world model stays the same whatever style of reasoning the policy writes.

With `gold=true` it is ZeroSearch's kind of simulator (arXiv 2505.04588): the prompt also holds the question's
gold answers right after the question line (`Question: q\\nAnswer: Kesh\\n`, then history and query), so it can
learn to write the answer-bearing document whatever it remembers of the entity; the target, the real
observation, is unchanged. The golds come from <run.data_dir>'s QA files (logged calls carry none); served, from
its training questions only (RL-1's prompts: an eval on dev or test questions with it stops at the first call).
The folder's config.json records `worldmodel_gold`, so `env.worldmodel=<folder>` serves it as trained, and a
question with no gold answer is an error, never a prompt without one.

Data: real calls as JSONL rows {"question", "history" (the trajectory's text so far, ending with the action),
"query", "observation"}. tools.SearchEnv(log_path=...) writes them wherever the real tool is used; synthesis
keeps <run.data_dir>/synth/calls_train.jsonl (the default source). With `calls=oracle` they are made here
instead, by sending each training question's oracle queries to the real tool.

Served as an environment (tools.WorldModelEnv; tools.make_environment builds it for env.env=worldmodel): the same
call signature as tools.SearchEnv, `(queries, contexts) -> observations`, tags included, body cut to the same
env.obs_max_tokens of the policy's tokenizer; batched, greedy, KV-cached; `simulated = True`; it counts its calls, so
every run can report real vs simulated calls.

The fidelity report, on held-out real calls, split into queries the world model has seen in training (entities
it could have memorised) and queries it has not:
    answer kept     of the calls whose real observation holds a gold answer (one the query does not already
                    contain), the share whose simulated observation holds it too
    fact recall     of the real observation's sentences about the queried entity, the share reproduced verbatim
    token F1        SQuAD token F1 between the simulated and the real observation body
    obs NLL         teacher-forced negative log-likelihood per token of the real observation
    invented        share of the simulated observation's entity mentions (capitalised words) found nowhere in
                    the corpus; `unsupported`: share not in the real observation
and end to end: the agent's EM (tools.reward) on questions with the real tool, the world model, and the policy's
own simulation, with the real and simulated calls each run spent. On the tiny world also the knowledge curve: for
people grouped by how often the pre-training corpus repeated their document (data.popularity; 0 = dev and test
people, after the cut-off), the policy's closed-book EM on "Where was X born?" and how often each simulator's
observation for the query X holds the birth city. Report: printed and <run.dir>/<out>.report.json.
Outputs, as every trainer's: <run.dir>/<out>/ (HF folder), <out>.ckpt/ (resume), <out>.metrics.jsonl (loss and lr
a step; the last row holds the report's numbers), also sent to wandb or tensorboard with run.log.

Departures from the paper: the paper uses only the policy as world model; a separate LM is our addition (the
gold-shown one ZeroSearch's), as is the whole fidelity report. The history drops the policy's thoughts (above).

    python worldmodel.py --config configs/tiny.yaml init=sft123         # from the policy, print the report
    python worldmodel.py --config configs/tiny.yaml steps=600 policy=runs/tiny/sft123
    python worldmodel.py --config configs/tiny.yaml calls='runs/tiny/logs/*.jsonl'   # other logged real calls
    python worldmodel.py --config configs/tiny.yaml init=sft123 gold=true out=worldmodel_gold   # ZeroSearch's
    python rl.py --config configs/tiny.yaml env.worldmodel=runs/tiny/worldmodel sim_share=0.8333  # RL-1 on it
    python worldmodel.py --config configs/tiny.yaml --resume            # after a crash (--overwrite: start over)
    python worldmodel.py --config configs/tiny.yaml run.device=cuda bf16=true  # one GPU: bf16 compute, fp32 masters
    torchrun --nproc_per_node 2 worldmodel.py --config configs/tiny.yaml

Not here: generation (rollout.py), the policy's SFT-3 (sft.py), choosing real vs simulated steps (rl.py).
"""
import dataclasses
import glob
import json
import os
import random
import re
import time
from dataclasses import dataclass

import torch

import data
import plumbing
from plumbing import (RUN_FLAGS, all_mean, barrier, claim_and_resume, cosine_lr, load_sharded,
                      log_line, nothing_left, plain_copy, print0, progress, progress_bar, release_run, resume_run,
                      save_checkpoint, setup_dist, start_logging)
from rollout import generate
from config import ConfigError, RunConfig, cli, load_config, read_corpus, read_jsonl
from plumbing import load_model, master_dtype, model_path
from tools import (EnvConfig, SearchEnv, WorldModelEnv, action_text, build_prompt, format_observation, make_tool,
                   normalize_answer, observation_body, parse, reward, shown_answers, token_f1,
                   wm_prompt_ids)


@dataclass
class WorldModelConfig:
    # model and data
    init: str = ""  # model to fine-tune: a folder, a stage name under run.dir (sft123, ...) or a hub name; empty =
                    # the base model (tiny world: untrained)
    out: str = "worldmodel"  # output folder name under <run.dir>
    calls: str = "auto"  # logged real calls (JSONL path or glob) | oracle (the train questions' oracle queries sent to
                         # the real tool) | auto: <run.data_dir>/synth/calls_train.jsonl (logged by synthesis) if it
                         # exists, else oracle
    heldout_share: float = 0.05  # share of training questions whose calls are held out (their entities are seen)
    unseen: str = ""  # questions whose oracle calls make the unseen held-out set; empty = <run.data_dir>/test.jsonl
    history_max_tokens: int = 256  # earlier calls kept in the prompt, cut from the left
    gold: bool = False  # ZeroSearch (arXiv 2505.04588): the prompt also holds the question's gold answers, read from
                        # <run.data_dir>'s QA files (served: train.jsonl only); saved in the folder's config.json
    # optimisation
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # calls per step, all ranks together
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 20  # linear warm-up inside the steps (a shorter run ends warming up), then the cosine
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    bf16: bool = False  # bf16 compute, fp32 master weights: FSDP2's MixedPrecisionPolicy, as sft.bf16 (else DDP)
    # report
    eval_calls: int = 100  # held-out calls per group (seen, unseen); 0 = no fidelity report
    policy: str = ""  # policy folder whose own simulation is measured too; empty = <run.dir>/sft123
    agent: str = ""  # agent folder for the end-to-end EM; empty = the policy folder
    eval_questions: int = 50  # test questions per end-to-end run; 0 = skip
    eval_batch: int = 32  # sequences per generation batch
    knowledge_people: int = 50  # knowledge curve: people per popularity bucket (0 = skip; needs pretrain.jsonl)
    # bookkeeping
    save_every: int = 0  # steps between resumable checkpoints; 0 = only at the end
    keep_ckpts: int = 2  # newest checkpoints kept
    log_every: int = 50  # steps between the losses kept in the report's train_loss (the metrics JSONL: every step)

    RANGES = {"heldout_share": "[0, 1)", "history_max_tokens": "[0, inf)", "steps": "[0, inf)",
              "batch_size": "[1, inf)", "lr": "[0, inf)", "min_lr_ratio": "[0, 1]", "warmup_steps": "[0, inf)",
              "weight_decay": "[0, inf)",
              "grad_clip": "[0, inf)", "eval_calls": "[0, inf)", "eval_questions": "[0, inf)", "eval_batch": "[1, inf)",
              "save_every": "[0, inf)", "keep_ckpts": "[0, inf)", "log_every": "[1, inf)"}


# -----------------------------------------------------------------------------
# Real calls: logs, or the oracle's queries sent to the real tool

def read_calls(pattern):
    """Logged real calls from a JSONL path or glob; malformed rows are reported with file:line and skipped, and
    failed calls (logged with an "error": their observation is a failure message) are left out."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError(f"worldmodel.calls: no file matches {pattern!r}")
    return [row for path in paths for _, row in read_jsonl(path, check_call, "call row") if not row.get("error")]


def check_call(row):
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in CALL_KEYS):
        return "needs string " + ", ".join(CALL_KEYS)
    return None


CALL_KEYS = ("question", "history", "query", "observation")


def oracle_calls(rows, search):
    """Every question's oracle queries, in order, sent to `search` (a SearchEnv, which counts them).

    The history of a call is the text so far, as in a SearchEnv log: the earlier calls of the same question,
    then the action being answered. Returns rows shaped like a SearchEnv log.
    """
    calls, histories = [], [""] * len(rows)
    for hop in range(max((len(r.get("queries", [])) for r in rows), default=0)):
        live = [i for i, r in enumerate(rows) if len(r.get("queries", [])) > hop]
        queries = [rows[i]["queries"][hop] for i in live]
        for i, query, obs in zip(live, queries, search(queries)):
            histories[i] += action_text(query, search.env)
            calls.append({"question": rows[i]["question"], "history": histories[i], "query": query,
                          "observation": obs})
            histories[i] += obs  # rollout.py appends the observation right after the action
    return calls


# -----------------------------------------------------------------------------
# The world model's examples: prompt ids (masked) + observation ids (trained)

def make_example(tokenizer, call, env, history_max_tokens, golds=None):
    """(prompt_ids, target_ids): the target is the observation then eos, tokenized on its own like rollout.py.
    golds (question -> answers) only for a gold-shown world model."""
    prompt = wm_prompt_ids(tokenizer, call["question"], call["history"], call["query"], env, history_max_tokens,
                           shown_answers(golds, call["question"]))
    target = tokenizer.encode(call["observation"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt, target


def collate(examples, pad_id):
    """Right-padded input_ids, attention_mask, labels (-100 on prompt and padding: loss on observations only)."""
    seqs = [{"ids": p + t, "mask": [0] * len(p) + [1] * len(t)} for p, t in examples]
    ids, attn, target = plumbing.collate(seqs, pad_id, torch.device("cpu"))
    return ids, attn, ids.masked_fill(target == 0, -100)


def batch_at(step, n_examples, batch_size, seed):
    """The example indices of a step: a pure function of (seed, step), so a resumed run sees the same data."""
    return random.Random(seed * 1_000_003 + step).sample(range(n_examples), min(batch_size, n_examples))


# -----------------------------------------------------------------------------
# Fidelity: simulated vs real observation of the same call

NOT_ENTITIES = {"the", "a", "an", "in", "on", "at", "it", "he", "she", "they", "this", "that", "his", "her", "no",
                "search", "question", "i", "we", "of", "and", "is", "was"}


def entities(text):
    """Entity mentions: capitalised words (the tiny world's names; a cheap proxy for real text)."""
    return [w for w in re.findall(r"\b[A-Z][\w'-]*", text) if w.lower() not in NOT_ENTITIES]


def contains(text, answer):
    """Whole-word containment after SQuAD normalisation."""
    a = normalize_answer(answer)
    return bool(a) and f" {a} " in f" {normalize_answer(text)} "


def sentences(text):
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n", text) if s.strip()]


def fidelity(sim, real, query, golds, known, env):
    """Per-call fidelity of a simulated observation against the real one (None: the metric does not apply).

    known: the set of entity names of the corpus (anything else the simulation names is invented).
    """
    sim_body, real_body = observation_body(sim, env), observation_body(real, env)
    answers = [g for g in golds if contains(real_body, g) and not contains(query, g)]
    facts = [s for s in sentences(real_body) if contains(s, query) and normalize_answer(s) != normalize_answer(query)]
    sim_facts = {normalize_answer(s) for s in sentences(sim_body)}
    names, real_names = entities(sim_body), set(entities(real_body))
    return {
        "answer_kept": float(any(contains(sim_body, g) for g in answers)) if answers else None,
        "fact_recall": sum(normalize_answer(s) in sim_facts for s in facts) / len(facts) if facts else None,
        "token_f1": token_f1(sim_body, real_body, both_empty=1.0),
        "invented": sum(n not in known for n in names) / len(names) if names else 0.0,
        "unsupported": sum(n not in real_names for n in names) / len(names) if names else 0.0,
        "well_formed": float(sim.startswith(env.obs_open) and sim.endswith(env.obs_close)),
    }


def mean_metrics(rows):
    """Average each metric over the calls where it applies; n_<metric> says over how many."""
    out = {"calls": len(rows)}
    for key in rows[0] if rows else []:
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
        if len(vals) != len(rows):
            out[f"n_{key}"] = len(vals)
    return out


def policy_observations(model, tokenizer, calls, env, batch_size=32):
    """The policy's internal world model, as rollout.py's env=policy runs it: after its action the observation
    opener is appended and the policy writes the rest, up to the closer or the token budget."""
    prompts = [tokenizer.encode(c, add_special_tokens=False) + tokenizer.encode(env.obs_open, add_special_tokens=False)
               for c in contexts_of(calls, tokenizer, env)]
    texts = []
    for batch in progress(prompts, batch_size, "fidelity: policy", unit="call"):
        outs, _ = generate(model, tokenizer, batch, env.obs_max_tokens + 8, [env.obs_close])
        texts += [tokenizer.decode(o).replace(tokenizer.eos_token, "") for o in outs]
    return [format_observation([observation_body(t, env)], tokenizer, env, numbered=False) for t in texts]


@torch.no_grad()
def observation_nll(model, examples, pad_id, batch_size=32):
    """Teacher-forced negative log-likelihood per observation token; examples are (prompt_ids, observation_ids)."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, attn, labels = collate(examples[i:i + batch_size], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
        targets = labels[:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum").item()
        count += int((targets != -100).sum())
    return total / max(count, 1)


def corpus_entities(env, run):
    path = env.corpus or os.path.join(run.data_dir, "corpus.jsonl")
    return {name for doc in read_corpus(path) for name in entities(doc["contents"])}


def fidelity_table(sim_obs, calls, known, env):
    return mean_metrics([fidelity(s, c["observation"], c["query"], c.get("golden_answers", []), known, env)
                         for s, c in zip(sim_obs, calls)])


# -----------------------------------------------------------------------------
# Training

def split_calls(calls, heldout_share, seed):
    """(train, heldout) by question: all calls of a held-out question are held out."""
    questions = sorted({c["question"] for c in calls})
    random.Random(seed).shuffle(questions)
    held = set(questions[:int(len(questions) * heldout_share)])
    return [c for c in calls if c["question"] not in held], [c for c in calls if c["question"] in held]


def train(cfg, model, tokenizer, examples, device, rank, world_size, ckpt, metrics_path):
    """Fine-tune on (prompt, observation) examples from checkpoint `ckpt` (None: the start); one metrics row a step
    to metrics_path (rank 0). Returns the list of (step, loss) every log_every steps."""
    wm = cfg.worldmodel
    if wm.batch_size < world_size:
        raise ConfigError(f"config: worldmodel.batch_size={wm.batch_size} is smaller than the {world_size} ranks")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=wm.lr, weight_decay=wm.weight_decay, betas=(0.9, 0.95))
    ckpt_dir = os.path.join(cfg.run.dir, wm.out + ".ckpt")
    start = resume_run(ckpt, ckpt_dir, model, optimizer, None, metrics_path, "worldmodel", rank)["step"]
    log, t_last = [], time.time()
    bar = progress_bar(range(start, wm.steps), initial=start, total=wm.steps, disable=rank != 0, desc="worldmodel")
    for step in bar:
        lr = cosine_lr(step, wm.steps, wm.warmup_steps, wm.min_lr_ratio, peak=wm.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_at(step, len(examples), wm.batch_size, cfg.run.seed)[rank::world_size]
        ids, attn, labels = (t.to(device) for t in collate([examples[i] for i in batch], tokenizer.pad_token_id))
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"world model loss is {loss.item()} at step {step}; lower worldmodel.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if wm.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), wm.grad_clip)
        optimizer.step()
        mean, now = all_mean(loss.item()), time.time()
        if rank == 0:
            log_line(metrics_path, {"step": step + 1, "loss": mean, "lr": lr, "step_s": now - t_last})
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        t_last = now
        if step % wm.log_every == 0 or step == wm.steps - 1:
            log.append((step, mean))
        if (wm.save_every and (step + 1) % wm.save_every == 0) or step == wm.steps - 1:
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, meta={"config": cfg.to_dict()},
                            keep=wm.keep_ckpts)
    final = plain_copy(model, device, torch.bfloat16 if wm.bf16 else None)
    return (final.eval() if final is not None else None), log  # FSDP2: rank 0's only


# -----------------------------------------------------------------------------
# The report: fidelity on held-out real calls, then the agent end to end

def held_out_groups(heldout, extra, train_queries, n, seed):
    """(seen, unseen): held-out calls whose query the world model was trained on, and calls whose query it never saw."""
    rng = random.Random(seed + 1)
    seen = [c for c in heldout if normalize_answer(c["query"]) in train_queries]
    unseen = [c for c in heldout + extra if normalize_answer(c["query"]) not in train_queries]
    return rng.sample(seen, min(n, len(seen))), rng.sample(unseen, min(n, len(unseen)))


def contexts_of(calls, tokenizer, env):
    """The text a rollout would hand the environment for each call: prompt + history, ending with the action."""
    out = []
    for c in calls:
        history = c["history"]
        if not history.rstrip().endswith(env.action_close):  # a log written without contexts
            history += action_text(c["query"], env)
        out.append(build_prompt(tokenizer, c["question"], env) + history)
    return out


def end_to_end(agent, agent_tok, rows, cfg, environments):
    """Agent EM, format-error rate and call counts with each environment: {name: {"em", "format_error", "real_calls",
    "sim_calls", "seconds"}}."""
    from rollout import rollout
    out = {}
    for name, make in environments.items():
        env_cfg = dataclasses.replace(cfg.env, env=name)
        environment = make(agent_tok)
        t0 = time.time()
        episodes = []
        for batch in progress(rows, cfg.worldmodel.eval_batch, f"end to end, tool={name}", environment):
            episodes += rollout(agent, agent_tok, batch, env_cfg, environment)
        n = max(1, len(episodes))
        out[name] = {"em": sum(reward(e.text, e.golds, cfg.env) for e in episodes) / n,
                     "format_error": sum(not parse(e.text, cfg.env).format_ok for e in episodes) / n,
                     "real_calls": sum(e.real_calls for e in episodes),
                     "sim_calls": sum(e.sim_calls for e in episodes), "seconds": round(time.time() - t0, 1)}
    return out


def measure_worldmodel(world_env, groups, known):
    """Fidelity of the separate world model, served exactly as rollout.py would call it."""
    env, wm_tok, out = world_env.env, world_env.wm_tokenizer, {}
    for group, sample in groups.items():
        sim = [obs for part in progress(sample, world_env.batch_size, f"fidelity: world model, {group}", unit="call")
               for obs in world_env([c["query"] for c in part], contexts_of(part, world_env.tokenizer, env))]
        pairs = [(world_env.prompt(c["question"], c["history"], c["query"]),
                  wm_tok.encode(c["observation"], add_special_tokens=False)) for c in sample]
        out[group] = {**fidelity_table(sim, sample, known, env),
                      "obs_nll": observation_nll(world_env.model, pairs, wm_tok.pad_token_id)}
    return out


def measure_policy(model, tokenizer, groups, known, wm, env):
    """Fidelity of the policy's internal world model (the observation it writes after its own action)."""
    out = {}
    for group, sample in groups.items():
        sim = policy_observations(model, tokenizer, sample, env, wm.eval_batch)
        pairs = [(tokenizer.encode(ctx, add_special_tokens=False),
                  tokenizer.encode(c["observation"], add_special_tokens=False))
                 for c, ctx in zip(sample, contexts_of(sample, tokenizer, env))]
        out[group] = {**fidelity_table(sim, sample, known, env),
                      "obs_nll": observation_nll(model, pairs, tokenizer.pad_token_id)}
    return out


# -----------------------------------------------------------------------------
# The knowledge curve: what the simulators know, by how often the pre-training corpus repeated the person

BUCKETS = ((0, 0), (1, 2), (3, 9), (10, 29), (30, 99), (100, 10 ** 9))  # repeats in <data_dir>/pretrain.jsonl


def bucket_name(lo, hi):
    return "0 (after cut-off)" if hi == 0 else f"{lo}+" if hi >= 10 ** 9 else f"{lo}-{hi}"


def popularity_buckets(data_dir, n, seed):
    """{bucket: [(person, repeats)]}: up to n people per bucket of pre-training repeats; dev and test people (not
    in the pre-training corpus) are the 0 bucket. {} without a pre-training corpus (real data) or when n is 0."""
    path = os.path.join(data_dir, "pretrain.jsonl")
    if not n or not os.path.exists(path):
        return {}
    with open(os.path.join(data_dir, "world.json")) as f:
        people = json.load(f)["people"]
    repeats = data.pretrain_repeats(path)
    rng, out = random.Random(seed), {}
    for lo, hi in BUCKETS:
        group = [(p, repeats.get(p["name"], 0)) for p in people if lo <= repeats.get(p["name"], 0) <= hi]
        if group:
            out[bucket_name(lo, hi)] = rng.sample(group, min(n, len(group)))
    return out


def knowledge_curve(policy, tokenizer, buckets, env, search, world_env=None):
    """By popularity bucket, over each bucket's people ("Where was <name> born?"):
        closed_book    the policy's EM with searching switched off (env.max_actions=0: it answers from memory)
        kept_policy    the policy's own simulated observation for the query <name> holds the birth city
        kept_worldmodel  the same for the separate world model (world_env), when given"""
    from rollout import rollout
    out = {}
    for name, group in buckets.items():
        calls = [{"question": f"Where was {p['name']} born?", "history": "", "query": p["name"]} for p, _ in group]
        rows = [{"question": c["question"], "golden_answers": [p["city"]]} for c, (p, _) in zip(calls, group)]
        episodes = rollout(policy, tokenizer, rows, dataclasses.replace(env, max_actions=0, env="real"), search)
        kept = lambda obs: sum(contains(observation_body(o, env), p["city"]) for o, (p, _) in zip(obs, group))
        m = {"people": len(group), "closed_book": sum(reward(e.text, e.golds, env) for e in episodes) / len(group),
             "kept_policy": kept(policy_observations(policy, tokenizer, calls, env)) / len(group)}
        if world_env is not None:
            m["kept_worldmodel"] = kept(world_env([c["query"] for c in calls], contexts_of(calls, tokenizer, env))) \
                / len(group)
        out[name] = m
    return out


def print_report(report):
    cols = ["calls", "obs_nll", "well_formed", "answer_kept", "fact_recall", "token_f1", "invented", "unsupported"]
    print("\nfidelity on held-out real calls (seen: the world model was trained on calls with this query)")
    print(f"{'simulator':<12} {'entities':<8} " + " ".join(f"{c:>11}" for c in cols))
    for name, groups in report["fidelity"].items():
        for group, m in groups.items():
            cells = [f"{m.get(c, float('nan')):>11.3f}" if c != "calls" else f"{m['calls']:>11d}" for c in cols]
            print(f"{name:<12} {group:<8} " + " ".join(cells))
    for split, runs in report.get("end_to_end", {}).items():
        print(f"\nagent end to end on {split}-entity questions ({report['agent']})")
        for name, r in runs.items():
            print(f"  tool={name:<11} EM {r['em']:.3f} | format errors {r['format_error']:.3f} | real calls "
                  f"{r['real_calls']:5d} | simulated calls {r['sim_calls']:5d} | {r['seconds']:.1f}s")
    if report.get("knowledge"):
        print("\nknowledge by popularity (repeats in the pre-training corpus; birth city of each bucket's people)")
        for bucket, m in report["knowledge"].items():
            print(f"  {bucket:<18} " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in m.items()))


def report_metrics(report):
    """The report's numbers as one flat metrics row: fidelity_<simulator>_<group>_<metric>, e2e_<split>_<tool>_em."""
    row = {f"fidelity_{name}_{group}_{metric}": value for name, groups in report["fidelity"].items()
           for group, metrics in groups.items() for metric, value in metrics.items() if value is not None}
    row.update({f"e2e_{split}_{tool}_em": r["em"] for split, runs in report.get("end_to_end", {}).items()
                for tool, r in runs.items()})
    return row


def real_calls(cfg, search, golds):
    """(calls, source): logged real calls, or the oracle's through `search`; each with its golden answers."""
    source = cfg.worldmodel.calls
    if source == "auto":
        logged = os.path.join(cfg.run.data_dir, "synth", "calls_train.jsonl")
        source = logged if os.path.exists(logged) else "oracle"
    if source == "oracle":
        calls = oracle_calls(data.load_qa(os.path.join(cfg.run.data_dir, "train.jsonl")), search)
    else:
        calls = read_calls(source)
    for c in calls:
        c["golden_answers"] = golds.get(c["question"], [])
    return calls, source


def fidelity_report(cfg, model, tokenizer, policy_tok, search, golds, train_calls, heldout, shown):
    """Steps 3 and 4 of main, on rank 0: fidelity on held-out real calls, the knowledge curve, the agent end to
    end. Returns the report's fidelity, knowledge and end-to-end parts (main adds the training losses, prints it
    and writes it)."""
    wm, env = cfg.worldmodel, cfg.env
    report = {"fidelity": {}}
    # 3. fidelity on held-out real calls: queries the world model was trained on (seen) and not (unseen)
    unseen_path = wm.unseen or os.path.join(cfg.run.data_dir, "test.jsonl")
    extra = []
    if os.path.exists(unseen_path):  # questions about people no training question names
        extra = oracle_calls(data.load_qa(unseen_path), search)
        for c in extra:
            c["golden_answers"] = golds.get(c["question"], [])
    train_queries = {normalize_answer(c["query"]) for c in train_calls}
    seen, unseen = held_out_groups(heldout, extra, train_queries, wm.eval_calls, cfg.run.seed)
    groups = {name: sample for name, sample in (("seen", seen), ("unseen", unseen)) if sample}
    known = corpus_entities(env, cfg.run)
    serve = lambda tok: WorldModelEnv(model, tokenizer, env, tok, wm.history_max_tokens, wm.eval_batch, shown)
    report["fidelity"]["worldmodel"] = measure_worldmodel(serve(policy_tok), groups, known)
    policy = wm.policy or os.path.join(cfg.run.dir, "sft123")
    if os.path.exists(os.path.join(policy, "config.json")):
        policy_model, policy_tok = load_model(policy, cfg.run)
        report["fidelity"]["policy"] = measure_policy(policy_model, policy_tok, groups, known, wm, env)
        buckets = popularity_buckets(cfg.run.data_dir, wm.knowledge_people, cfg.run.seed)
        if buckets:  # a gold-shown world model is told the birth city: its curve would measure copying, not knowledge
            world_env = None if wm.gold else serve(policy_tok)
            report["knowledge"] = knowledge_curve(policy_model, policy_tok, buckets, env, search, world_env)
    else:
        print(f"no policy folder at {policy}: the policy's own simulation is not measured")

    # 4. the agent end to end: EM with the real tool, the world model, and its own simulation
    agent = wm.agent or policy
    if wm.eval_questions and not os.path.exists(os.path.join(agent, "config.json")):
        print(f"no agent folder at {agent}: end-to-end EM skipped")
    elif wm.eval_questions:
        rng, held_q = random.Random(cfg.run.seed + 2), {c["question"] for c in heldout}
        splits = {"seen": [r for r in data.load_qa(os.path.join(cfg.run.data_dir, "train.jsonl"))
                           if r["question"] in held_q and r.get("needs_search", True)],
                  "unseen": [r for r in data.load_qa(unseen_path) if r.get("needs_search", True)]
                             if os.path.exists(unseen_path) else []}
        environments = {"real": lambda tok: SearchEnv(make_tool(env, cfg.run), tok, env),
                        "worldmodel": serve,
                        "policy": lambda tok: None}
        agent_model, agent_tok = load_model(agent, cfg.run)
        report["agent"], report["end_to_end"] = agent, {}
        for split, rows in splits.items():
            if rows:
                rows = rng.sample(rows, min(wm.eval_questions, len(rows)))
                report["end_to_end"][split] = end_to_end(agent_model, agent_tok, rows, cfg, environments)
    return report


def main(argv=None):
    from transformers import AutoTokenizer
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "model": data.ModelConfig,
                       "worldmodel": WorldModelConfig}, argv, own="worldmodel", flags=RUN_FLAGS)
    wm, env = cfg.worldmodel, cfg.env
    init = model_path(wm.init, cfg.run.dir, f"worldmodel.init={wm.init!r}") if wm.init else None  # before any work
    rank, world_size, device = setup_dist(cfg.run)
    if wm.steps == 0:
        print0("worldmodel: worldmodel.steps=0: nothing to do")
        return None
    start_logging(cfg.run, wm.out, cfg.to_dict(), rank)  # run.log: the metrics rows also go to wandb/tensorboard
    ckpt = claim_and_resume(cfg.run.dir, wm.out, cfg.flags, rank)  # an earlier run's output, or a live run on out=
    if nothing_left(cfg.run.dir, wm.out, ckpt, wm.steps, "worldmodel", rank):
        return None
    out_dir = os.path.join(cfg.run.dir, wm.out)
    torch.manual_seed(cfg.run.seed)
    if rank == 0:
        data.base_model_path(cfg)  # build the tiny base once, before other ranks read it
    barrier()
    base = data.base_model_path(cfg)
    policy_tok = AutoTokenizer.from_pretrained(base)  # the observation budget is counted in the policy's tokens
    t0 = time.time()

    # 1. real calls: logged (synthesis, RL, eval), or the oracle's queries through the real tool
    search = SearchEnv(make_tool(env, cfg.run), policy_tok, env)
    golds = data.golds_by_question(cfg.run.data_dir)
    calls, source = real_calls(cfg, search, golds)
    train_calls, heldout = split_calls(calls, wm.heldout_share, cfg.run.seed)
    if not train_calls:
        raise ConfigError(f"worldmodel: no usable training calls in {source} (empty, or every row bad: each is "
                          f"named above)")
    print0(f"real calls from {source}: {len(train_calls)} train, {len(heldout)} held out "
           f"({search.calls} new tool calls, {time.time() - t0:.1f}s)")

    # 2. fine-tune the world model: loss on observation tokens only
    if init is None:  # the default, and in the tiny world an untrained model: a person should know which
        untrained = " (untrained: the tiny world's base knows nothing yet)" if cfg.model.base == "tiny" else ""
        print0(f"worldmodel: no worldmodel.init: fine-tuning the base model {base}{untrained}")
    model, tokenizer = load_sharded(init or base, cfg.run, device, master_dtype(cfg.run), "fsdp" if wm.bf16 else "ddp",
                                    wm.bf16)
    shown = golds if wm.gold else None  # ZeroSearch: each prompt holds its question's gold answers
    examples = [make_example(tokenizer, c, env, wm.history_max_tokens, shown) for c in train_calls]
    metrics_path = os.path.join(cfg.run.dir, wm.out + ".metrics.jsonl")
    model, log = train(cfg, model, tokenizer, examples, device, rank, world_size, ckpt, metrics_path)
    if rank == 0:
        model.config.worldmodel_gold = wm.gold  # in config.json: WorldModelEnv.from_path serves it as trained
        data.save_atomic(out_dir, model, tokenizer)
        release_run(cfg.run.dir, wm.out)
        print0(f"world model saved to {out_dir} ({time.time() - t0:.1f}s)")
    barrier()
    if rank != 0 or not wm.eval_calls:
        return {"train_loss": log, "fidelity": {}}

    # 3., 4. the report: fidelity on held-out real calls, then the agent end to end
    report = {"train_loss": log, **fidelity_report(cfg, model, tokenizer, policy_tok, search, golds, train_calls,
                                                   heldout, shown)}
    print_report(report)
    log_line(metrics_path, {"step": wm.steps, "final": True, **report_metrics(report)})
    with open(os.path.join(cfg.run.dir, wm.out + ".report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"total {time.time() - t0:.1f}s")
    return report


if __name__ == "__main__":
    cli(main)
