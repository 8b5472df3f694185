"""
eval.py -- evaluate any model on any QA set with any environment, and the baselines the paper compares against.

What it measures (AutoCoA, arXiv 2503.06580, Sec. 4 / Table 1), per question and in a summary:
    EM, F1 (SQuAD normalisation, several gold answers), the paper's lenient accuracy (EM, or >= 70% of a gold
    answer's tokens in the prediction), format-error rate (tools.parse), actions per question, real and simulated
    tool calls, generated tokens per question (tokens the model wrote; observations excluded), wall time, all of
    them also by question kind (the tiny world's city/employer/country/comparison/yesno, and well_known: the rows
    with needs_search false), and where a set marks which questions need a search, the two when-to-act errors:
    needed searches skipped (a question that needs one answered without searching) and needless searches (a
    well-known fact answered after one). Greedy by default; with eval.samples=n and eval.temperature>0, n samples
    per question and the mean and spread (std over the n samples) of each accuracy. An optional LLM judge (an
    OpenAI-compatible /chat/completions endpoint through `requests`) adds a judged accuracy; it is off by default
    and its key is read from an environment variable, never a file. Nothing is cut silently: `truncated` is the
    share of trajectories stopped at env.max_new_tokens (observations included), with a warning line above
    env.truncation_warn.

The answer scored is the last \\boxed{} after </think> (tools.parse); when the format is broken the last \\boxed{}
anywhere is still scored (none at all: the last line after </think>), so EM measures what the model answered and
format_error counts the broken trajectories separately (the training reward, tools.reward, is stricter: 0 on any
format error; each record carries both).

Three modes, all through rollout.py so the rows compare fairly:
    agent     the model decides when to search (CoA): rollout() with the configured environment;
    notool    the model answers from what it knows: for a CoA model the same rollout() with env.max_actions=0 (its
              first action is cut off and the answer forced, as in Algorithm 1); for an instruct model (a chat
              template) direct prompting for a short answer, through rollout.generate;
    workflow  the actions are decided by an external loop, not by the model (the paper's contrast):
              fixed  (the tiny world) one search with the whole question as the query (retrieve-then-read), the
                     action and observation written into the context by the loop, then the model reasons and answers
                     with no further search allowed;
              react  (instruct models) a few-shot Thought / Action: Search[...] / Observation loop: generate until
                     "Observation:", run the query, append the result, repeat; "Action: Finish[...]" answers.
              auto   react for a model with a chat template, fixed otherwise.

Outputs: <run.dir>/<eval.out>/<tag>.jsonl (one row per question and sample) and <tag>.summary.json; with several
sets (eval.data=nq,triviaqa,...) one pair per set and the paper's Table 1: <tag>.table.md and <tag>.table.json,
a column per set plus their average, rows EM, F1, lenient accuracy, format-error rate, actions per question (and
the judge's; and the two when-to-act errors where every set marks which questions need a search). An earlier
eval's results under the same eval.out and tag are never replaced unless --overwrite, and a lock refuses a second
eval on that tag while one runs (plumbing.claim_run); a summary is written after its rows, so it always describes them.

    python eval.py --config configs/tiny.yaml init=sft2                     # the agent, greedy, real tool
    python eval.py --config configs/tiny.yaml init=sft2 mode=notool
    python eval.py --config configs/tiny.yaml init=sft2 limit=5 show=2     # and print 2 trajectories (chat.py: ask one)
    python eval.py --config configs/tiny.yaml init=sft2 samples=4 temperature=0.7 env.env=policy
    python eval.py --config configs/smollm2_eval.yaml mode=workflow data=/path/hotpotqa.jsonl limit=50
    python eval.py --config configs/smollm2_eval.yaml data=nq,triviaqa,hotpotqa,2wiki,musique,bamboogle \
        qa_dir=PATH/flashrag_test limit=500                               # Table 1: nq -> PATH/nq.jsonl, ...
    torchrun --nproc_per_node 8 eval.py --config configs/qwen7b.yaml init=rl data=nq,hotpotqa   # a shard per rank

Not here: the pass@k family, retrieval metrics (data.bm25_recall has recall@k), an LLM judge for training rewards.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

import data
from config import ConfigError, RunConfig, backoff, cli, load_config
from plumbing import (barrier, check_worldmodel_folder, claim_run, load_model, print0, progress, release_run,
                      resolve_model, setup_dist)
from rollout import Episode, count_calls, encode_prompt, generate, rollout, truncation_warning
from tools import (EnvConfig, SearchEnv, action_text, answer_text, build_prompt, exact_match, extract_boxed,
                   f1_score, lenient_match, loss_mask, make_environment, observation_body, parse)


@dataclass
class EvalConfig:
    init: str = "sft2"  # the model: a folder, a stage name under <run.dir>/, "base", or an HF hub name
    data: str = "test"  # comma-separated QA sets, each a split of run.data_dir (train|dev|test), a QA JSONL path,
                        # a name with a file <qa_dir>/<name>.jsonl, or a FlashRAG hub name (nq, ...); several: a table
    qa_dir: str = "data/qa"  # where QA set names find their files (nq -> data/qa/nq.jsonl)
    limit: int = 0  # evaluate the first N questions only (0 = all)
    mode: str = "agent"  # agent | notool | workflow (see the docstring)
    workflow: str = "auto"  # auto | fixed | react: how the workflow baseline decides its actions
    samples: int = 1  # samples per question; 1 with temperature 0 = greedy
    temperature: float = 0.0  # sampling temperature; 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    batch_size: int = 64  # questions per rollout call (times samples = sequences in flight)
    tag: str = ""  # name of the output files; empty = <init>-<mode>-<data>
    out: str = "eval"  # results go to <run.dir>/<out>/
    show: int = 0  # print this many trajectories with model vs environment tokens told apart
    log_calls: str = ""  # append every real tool call to this JSONL (world-model training data, worldmodel.py)
    judge: bool = False  # also ask an LLM judge (OpenAI-compatible endpoint) whether each answer is right
    judge_url: str = "http://127.0.0.1:8001/v1/chat/completions"  # the judge's chat-completions endpoint
    judge_model: str = "gpt-4o-mini"  # the request's "model"
    judge_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (empty: no auth header)
    judge_timeout_s: float = 30.0  # per judge request
    judge_workers: int = 16  # judge requests in flight
    seed: int = 0  # sampling seed (a torch.Generator), so sampled evals repeat exactly
    max_tool_failures: float = 0.05  # share of a set's real tool calls that may fail: the call that takes it past
    # this stops the eval, naming the server and the cause (exit 1); its numbers would measure the failures

    RANGES = {"limit": "[0, inf)", "samples": "[1, inf)", "temperature": "[0, inf)", "top_p": "(0, 1]",
              "batch_size": "[1, inf)", "show": "[0, inf)", "judge_timeout_s": "(0, inf)", "judge_workers": "[1, inf)",
              "max_tool_failures": "[0, 1]"}
    CHOICES = {"mode": ("agent", "notool", "workflow"), "workflow": ("auto", "fixed", "react")}


# -----------------------------------------------------------------------------
# Inputs: the model and the questions

def load_questions(cfg, source=None):
    source = source or cfg.eval.data
    named = os.path.join(cfg.eval.qa_dir, f"{source}.jsonl")
    if source in ("train", "dev", "test") and not os.path.exists(source):
        source = os.path.join(cfg.run.data_dir, f"{source}.jsonl")
    elif not os.path.exists(source) and os.path.exists(named):
        source = named
    elif not os.path.exists(source) and source not in data.HUB_NAMES:
        raise ConfigError(f"eval.data: no QA file {source!r} nor {named!r} (eval.qa_dir), "
                          f"and no FlashRAG hub name ({', '.join(data.HUB_NAMES)})")
    return data.load_qa(source, limit=cfg.eval.limit or None)


# -----------------------------------------------------------------------------
# Running the model: the agent, the no-tool baseline, the two workflow baselines

def run_agent(model, tokenizer, rows, env_cfg, environment, ecfg, generator):
    """rollout() over batches of questions; episodes come back in row order, samples adjacent."""
    episodes = []
    for batch in progress(rows, ecfg.batch_size, "eval", environment):
        episodes += rollout(model, tokenizer, batch, env_cfg, environment, group_size=ecfg.samples,
                            temperature=ecfg.temperature, top_p=ecfg.top_p, generator=generator)
    return episodes


def notool_env(env_cfg):
    """The no-tool baseline's env for a CoA model: no action allowed (rollout forces the answer at the first one,
    whatever env.limit_observation says: max_actions=0 is closed-book)."""
    return dataclasses.replace(env_cfg, max_actions=0, env="real")  # "real" with a tool never called (NoTool)


def generate_batch(model, tokenizer, prompts, max_new_tokens, stop_strings, ecfg, generator, desc="eval",
                   environment=None):
    """rollout.generate over batches: prompts (lists of ids) -> [(ids, logps)] in order."""
    out = []
    for batch in progress(prompts, ecfg.batch_size, desc, environment, unit="seq"):
        ids, logps = generate(model, tokenizer, batch, max_new_tokens, stop_strings=stop_strings,
                              temperature=ecfg.temperature, top_p=ecfg.top_p, generator=generator)
        out += list(zip(ids, logps))
    return out


class Trace:
    """One workflow trajectory being built: completion ids with who wrote each (mask), like rollout's Episode."""

    def __init__(self, row, prompt_ids):
        self.row, self.prompt_ids = row, list(prompt_ids)
        self.ids, self.mask, self.logps, self.actions = [], [], [], []
        self.real_calls = self.sim_calls = 0
        self.finish, self.answer, self.done = "length", None, False

    def add(self, ids, who, logps=None):
        """Append tokens; who = 'model' (trained on) or 'env' (written by the loop/tool): tools.loss_mask."""
        ids = [int(t) for t in ids]
        self.ids += ids
        self.mask += loss_mask(who, len(ids))
        self.logps += [float(x) for x in logps] if logps is not None else [0.0] * len(ids)

    def episode(self, tokenizer):
        return Episode(question=self.row["question"], golds=list(self.row["golden_answers"]),
                       prompt_ids=self.prompt_ids, ids=self.ids, mask=self.mask, logps=self.logps,
                       actions=self.actions, real_calls=self.real_calls, sim_calls=self.sim_calls,
                       finish=self.finish, text=tokenizer.decode(self.ids), reward=0.0)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def call_context(tokenizer, question, query, env_cfg):
    """The context a loop-made call hands the environment, shaped as rollout's: the CoA prompt, then the action.
    From it a SearchEnv log and a world model read the question (tools.split_context); the bare question would
    come back as history with an empty question."""
    return build_prompt(tokenizer, question, env_cfg) + action_text(query, env_cfg)


def workflow_queries(row):
    """The fixed workflow's searches: one, with the whole question as the query, as a retrieve-then-read pipeline
    does. Never the row's oracle queries: those hold the bridge entity of a 2-hop question (the city of "In which
    country was X born?"), which only a model that reads the first observation can know to ask for."""
    return [row["question"]]


def run_fixed_workflow(model, tokenizer, rows, env_cfg, environment, ecfg, generator):
    """Search first, then answer. The loop (not the model) writes the actions and their observations (mask 0);
    the model then writes its reasoning and answer. If it starts another action, the action is cut and the answer
    forced (tools.answer_text's opener, as at rollout's action limit): the model never decides to search."""
    if environment is None:
        raise ConfigError("the fixed workflow needs a tool: env.env=real or worldmodel")
    traces = []
    for row in rows:
        for _ in range(ecfg.samples):
            traces.append(Trace(row, encode_prompt(tokenizer, row["question"], env_cfg)))
    # 1) the external workflow: one batched search of every question's entities
    queries = [workflow_queries(t.row) for t in traces]
    flat = [q for qs in queries for q in qs]
    contexts = [call_context(tokenizer, t.row["question"], q, env_cfg) for t, qs in zip(traces, queries) for q in qs]
    observations = iter(environment(flat, contexts)) if flat else iter(())
    for trace, qs in zip(traces, queries):
        for q in qs:
            trace.add(encode(tokenizer, action_text(q, env_cfg)), "env")
            trace.add(encode(tokenizer, " " + next(observations)), "env")
            trace.actions.append(q)
        count_calls(trace, environment, len(qs))
    # 2) the model reasons and answers; an attempted action is cut off and the answer forced
    budget = max(48, env_cfg.max_new_tokens - max(len(t.ids) for t in traces))  # observations count, as in rollout
    outs = generate_batch(model, tokenizer, [t.prompt_ids + t.ids for t in traces], budget,
                          (env_cfg.action_open,), ecfg, generator, "eval workflow", environment)
    again = []
    for trace, (ids, logps) in zip(traces, outs):
        text = tokenizer.decode(ids)
        if env_cfg.action_open in text:  # cut at the action opener: keep the tokens before it
            keep = cut_before(tokenizer, ids, env_cfg.action_open)
            trace.add(ids[:keep], "model", logps[:keep])
            trace.add(encode(tokenizer, answer_text(env_cfg)), "env")
            again.append(trace)
        else:
            trace.add(ids, "model", logps)
            answered = parse(tokenizer.decode(trace.ids), env_cfg).answer is not None
            trace.finish = "answer" if answered else ("eos" if len(ids) < budget else "length")  # as run_react
    if again:
        outs = generate_batch(model, tokenizer, [t.prompt_ids + t.ids for t in again], 32, ("}",), ecfg, generator)
        for trace, (ids, logps) in zip(again, outs):
            trace.add(ids, "model", logps)
            trace.finish = "max_actions"
    return [t.episode(tokenizer) for t in traces]


def cut_before(tokenizer, ids, marker):
    """How many leading ids end before marker's text starts (a tag may be several pieces; ids are never re-encoded)."""
    start = tokenizer.decode(ids).find(marker)
    if start < 0:
        return len(ids)
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) > start:
            return n - 1
    return len(ids)


# -----------------------------------------------------------------------------
# The ReAct workflow for instruct models: an external prompt and loop decide the actions

REACT_PROMPT = """Answer the question by searching Wikipedia. Use exactly this format:
Thought: what you need to find
Action: Search[a short search query]
Observation: the search result
... (Thought / Action / Observation may repeat)
Thought: I now know the answer
Action: Finish[the short answer]

Example.
Question: Which country is the birthplace of the author of Dracula?
Thought: I need the author of Dracula.
Action: Search[Dracula author]
Observation: Dracula is an 1897 novel by Irish author Bram Stoker.
Thought: Bram Stoker was Irish, born in Dublin.
Action: Search[Bram Stoker birthplace]
Observation: Bram Stoker was born in Clontarf, Dublin, Ireland.
Thought: I now know the answer
Action: Finish[Ireland]"""

REACT_ACTION = re.compile(r"Action\s*:\s*(Search|Finish)\s*\[(.*?)(\]|$)", re.S | re.I)


def parse_react(text):
    """The last action of one ReAct turn: ('search', query) | ('finish', answer) | ('answer', text) | (None, '').

    A turn without an Action line that says 'Final Answer: X' or 'answer is X' is read as an answer; anything else
    is a broken turn (None), which ends the trajectory with no answer.
    """
    actions = REACT_ACTION.findall(text)
    if actions:
        verb, arg, _ = actions[-1]
        arg = arg.strip()
        if arg:
            return verb.lower(), arg
    m = re.search(r"(?:final answer|answer is)\s*:?\s*(.+)", text, flags=re.I)
    if m:
        return "answer", m.group(1).strip().split("\n")[0].rstrip(".").strip()
    return None, ""


def react_prompt(tokenizer, question):
    messages = [{"role": "system", "content": REACT_PROMPT}, {"role": "user", "content": f"Question: {question}"}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{REACT_PROMPT}\n\nQuestion: {question}\n"
    return text + "Thought:"


def run_react(model, tokenizer, rows, env_cfg, environment, ecfg, generator):
    """Thought/Action/Observation: generate until 'Observation:', run the query, append the result, repeat.

    Each turn re-prefills the text so far (the workflow's own loop; the agent modes use rollout's KV-cached
    interrupts). Tool text is environment-written (mask 0). At env.max_actions searches the loop asks for the
    answer with a forced 'Action: Finish['.
    """
    if environment is None:
        raise ConfigError("the ReAct workflow needs a tool: env.env=real or worldmodel")
    traces = [Trace(row, encode(tokenizer, react_prompt(tokenizer, row["question"])))
              for row in rows for _ in range(ecfg.samples)]
    forcing = set()  # traces whose context ends with a forced "Action: Finish[" (the action limit was hit)
    for turn in range(env_cfg.max_actions + 2):
        live = [t for t in traces if not t.done and len(t.ids) < env_cfg.max_new_tokens]
        if not live:
            break
        budget = max(1, min(env_cfg.max_new_tokens - min(len(t.ids) for t in live), 128))
        outs = generate_batch(model, tokenizer, [t.prompt_ids + t.ids for t in live], budget,
                              ("Observation:",), ecfg, generator, f"eval react turn {turn + 1}", environment)
        searching = []
        for trace, (ids, logps) in zip(live, outs):
            trace.add(ids, "model", logps)
            if id(trace) in forcing:  # the model completes the forced Finish[: its answer runs to "]"
                trace.answer = re.split(r"[\]\n]", tokenizer.decode(ids))[0].strip() or None
                trace.finish, trace.done = "max_actions", True
                continue
            verb, arg = parse_react(tokenizer.decode(ids))
            if verb == "search" and len(trace.actions) < env_cfg.max_actions:
                searching.append((trace, arg))
            elif verb in ("finish", "answer"):
                trace.answer, trace.finish, trace.done = arg, "answer", True
            elif verb == "search":  # over the action limit: ask for the answer
                trace.add(encode(tokenizer, " (no more searches)\nThought: I must answer now.\nAction: Finish["), "env")
                forcing.add(id(trace))
            else:
                trace.finish, trace.done = ("eos" if len(ids) < budget else "length"), True
        if searching:
            results = environment([q for _, q in searching],
                                  [call_context(tokenizer, t.row["question"], q, env_cfg) for t, q in searching])
            for (trace, query), obs in zip(searching, results):
                body = observation_body(obs, env_cfg, every_tag=True)
                head = "" if tokenizer.decode(trace.ids[-4:]).rstrip().endswith("Observation:") else "\nObservation:"
                trace.add(encode(tokenizer, f"{head} {body}\nThought:"), "env")
                trace.actions.append(query)
                count_calls(trace, environment, 1)
    for trace in traces:
        if not trace.done and trace.finish != "answer":
            verb, arg = parse_react(tokenizer.decode(trace.ids))
            if verb in ("finish", "answer"):
                trace.answer, trace.finish = arg, "answer"
            else:
                trace.finish = "max_actions" if len(trace.actions) >= env_cfg.max_actions else "length"
    return [with_answer(t.episode(tokenizer), t.answer) for t in traces]


DIRECT_PROMPT = "Answer the question with a short answer only (a name, a date, a number or yes/no), no explanation."


def run_direct(model, tokenizer, rows, env_cfg, environment, ecfg, generator):
    """The no-tool baseline for an instruct model: ask for the short answer directly (no <think>, no tool).

    Small instruct models given the CoA prompt without tools end at once; the paper's no-retrieval baseline is
    direct prompting, so here the answer is the first line the model writes.
    """
    traces = [Trace(row, encode(tokenizer, tokenizer.apply_chat_template(
        [{"role": "system", "content": DIRECT_PROMPT}, {"role": "user", "content": row["question"]}],
        tokenize=False, add_generation_prompt=True))) for row in rows for _ in range(ecfg.samples)]
    outs = generate_batch(model, tokenizer, [t.prompt_ids for t in traces], 48, ("\n",), ecfg, generator)
    for trace, (ids, logps) in zip(traces, outs):
        trace.add(ids, "model", logps)
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        answer = re.sub(r"^(the )?answer( is)?\s*:?\s*", "", text.split("\n")[0], flags=re.I).rstrip(".").strip()
        trace.answer, trace.finish = answer or None, "answer" if answer else "eos"
    return [with_answer(t.episode(tokenizer), t.answer) for t in traces]


def with_answer(ep, answer):
    ep.loop_answer = answer  # the answer the loop read (ReAct: Finish[...]; direct: the first line), not \boxed{}
    return ep


# -----------------------------------------------------------------------------
# Scoring

def predicted_answer(ep, env_cfg):
    """(answer, format_ok, reason) of one episode. CoA: tools.parse; broken format -> the last \\boxed{} anywhere."""
    if hasattr(ep, "loop_answer"):
        ok = ep.loop_answer is not None
        return ep.loop_answer or "", ok, "" if ok else f"no answer ({ep.finish})"
    parsed = parse(ep.text, env_cfg)
    if parsed.format_ok:
        return parsed.answer, True, ""
    answer = parsed.answer if parsed.answer is not None else extract_boxed(ep.text, env_cfg.answer_open)
    if answer is None:  # no \boxed{} at all (small instruct models): the last line after </think>, if any
        tail = ep.text.split(env_cfg.think_close)[-1] if env_cfg.think_close in ep.text else ""
        lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
        answer = lines[-1][:200] if lines else ""
    return answer, False, parsed.reason


def score(episodes, rows, env_cfg, samples):
    """One record per episode (question x sample): the answer, its metrics and the episode's costs."""
    records = []
    for i, ep in enumerate(episodes):
        row, sample = rows[i // samples], i % samples
        answer, format_ok, reason = predicted_answer(ep, env_cfg)
        golds = list(row["golden_answers"])
        ep.reward = exact_match(answer, golds) if format_ok else 0.0  # the training reward's rule
        records.append({
            "id": row.get("id"), "sample": sample, "question": row["question"], "golden_answers": golds,
            "kind": row.get("kind", "all"), "needs_search": row.get("needs_search"),
            "answer": answer, "em": exact_match(answer, golds), "f1": f1_score(answer, golds),
            "lenient": lenient_match(answer, golds), "reward": ep.reward,
            "format_error": float(not format_ok), "reason": reason,
            "actions": len(ep.actions), "queries": list(ep.actions), "real_calls": ep.real_calls,
            "sim_calls": ep.sim_calls, "gen_tokens": int(sum(ep.mask)), "tokens": len(ep.ids),
            "truncated": float(ep.finish == "length"), "finish": ep.finish, "text": ep.text})
    return records


METRICS = ("em", "f1", "lenient", "reward", "format_error", "actions", "real_calls", "sim_calls", "gen_tokens",
           "truncated")  # truncated: stopped at env.max_new_tokens (observations included), the answer cut


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def std(xs):
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def well_known(row):
    """The tiny world's well-known facts (needs_search false): answerable closed-book, so a good agent does not
    search. A row without the mark (real QA sets) is neither well-known nor known to need a search."""
    return row.get("needs_search") is False


WHEN_TO_ACT = {"needed_search_skipped": "needed search skipped", "needless_search": "needless search"}  # labels


def when_to_act(records):
    """The two ways to get when-to-act wrong (what SFT-1 teaches), each a share of the records (question x sample):
    needed_search_skipped of those that need a search (needs_search true), answered without any; needless_search
    of the well-known ones, answered after a search. None where the set marks no such question."""
    needed = [r["actions"] == 0 for r in records if r.get("needs_search") is True]
    known = [r["actions"] > 0 for r in records if well_known(r)]
    return {"needed_search_skipped": mean(needed) if needed else None,
            "needless_search": mean(known) if known else None}


def summarize(records, samples=1):
    """Means over all records; per accuracy also the spread: std over the per-sample means (0 when greedy)."""
    out = {"questions": len(records) // max(samples, 1), "samples": samples}
    for key in METRICS + (("judge",) if any("judge" in r for r in records) else ()):
        vals = [r[key] for r in records if r.get(key) is not None]
        out[key] = mean(vals)
        if key in ("em", "f1", "lenient", "judge") and samples > 1:
            out[key + "_std"] = std(mean(r[key] for r in records if r["sample"] == s and r.get(key) is not None)
                                    for s in range(samples))
    out.update(when_to_act(records))
    groups = {}
    for r in records:
        groups.setdefault(r["kind"], []).append(r)
        if well_known(r):
            groups.setdefault("well_known", []).append(r)
    out["by_kind"] = {k: {"n": len(rs), **{m: mean(r[m] for r in rs) for m in ("em", "f1", "actions")}}
                      for k, rs in sorted(groups.items())}
    return out


# -----------------------------------------------------------------------------
# The optional LLM judge: an OpenAI-compatible /chat/completions endpoint

JUDGE_PROMPT = ("You grade answers to questions. Given the question, the gold answers and a predicted answer, "
                "reply with exactly one word: yes if the prediction means the same as a gold answer, else no.")


def judge_one(record, ecfg, key=None):
    """1.0 / 0.0 from the judge, or None when the endpoint fails (counted, never fatal)."""
    import requests
    user = (f"Question: {record['question']}\nGold answers: {' | '.join(record['golden_answers'])}\n"
            f"Predicted answer: {record['answer'] or '(none)'}\nCorrect?")
    body = {"model": ecfg.judge_model, "temperature": 0, "max_tokens": 3,
            "messages": [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": user}]}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for _ in backoff(2, 0.2):
        try:
            r = requests.post(ecfg.judge_url, json=body, headers=headers, timeout=ecfg.judge_timeout_s)
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"]
            return 1.0 if text.strip().lower().startswith("yes") else 0.0
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
            pass
    time.sleep(0.8)  # the backoff's next step: the worker waits before it asks a failing judge about another record
    return None


def judge(records, ecfg):
    """Add record['judge'] to every record, judge_workers requests in flight (a judge served by vLLM batches
    them; one at a time, 3 samples x 6 test sets would take hours); returns how many calls failed."""
    from concurrent.futures import ThreadPoolExecutor
    key = os.environ.get(ecfg.judge_key_env) if ecfg.judge_key_env else None
    asked = [r for r in records if r["answer"]]  # no answer: wrong, no call spent
    for r in records:
        r["judge"] = 0.0
    with ThreadPoolExecutor(ecfg.judge_workers) as pool:
        for r, verdict in zip(asked, pool.map(lambda r: judge_one(r, ecfg, key), asked)):
            r["judge"] = verdict
    return sum(r["judge"] is None for r in records)


# -----------------------------------------------------------------------------
# Showing one trajectory: who wrote which token

def show_trajectory(ep, tokenizer, color=None, scored=True):
    """The prompt, then the completion with the environment's tokens told apart from the model's:
    ANSI colour on a terminal (model green, environment grey), else the environment's text in [[ ]].
    scored=False leaves the reward out (a question asked with no gold answer, chat.py)."""
    color = sys.stdout.isatty() if color is None else color
    parts = [tokenizer.decode(ep.prompt_ids)]
    start = 0
    for i in range(1, len(ep.ids) + 1):
        if i == len(ep.ids) or ep.mask[i] != ep.mask[start]:
            text = tokenizer.decode(ep.ids[start:i])
            if ep.mask[start]:
                parts.append(f"\033[32m{text}\033[0m" if color else text)
            else:
                parts.append(f"\033[90m{text}\033[0m" if color else f"[[{text}]]")
            start = i
    legend = ("(green: written by the model; grey: written by the environment)" if color else
              "([[...]]: written by the environment; the rest after the prompt: written by the model)")
    scored = f"reward: {ep.reward}  " if scored else ""
    return "".join(parts) + f"\n{legend}\n{scored}finish: {ep.finish}  actions: {ep.actions}"


# -----------------------------------------------------------------------------

def evaluate(model, tokenizer, rows, cfg):
    """Run the configured mode over rows; (summary, records, episodes)."""
    ecfg, env_cfg = cfg.eval, cfg.env
    generator = torch.Generator(device=model.device).manual_seed(ecfg.seed)
    t0 = time.time()
    if ecfg.mode == "notool":
        environment = NoTool()
        if getattr(tokenizer, "chat_template", None):  # instruct models: direct prompting
            episodes = run_direct(model, tokenizer, rows, env_cfg, environment, ecfg, generator)
        else:  # a CoA model: the same rollout, every action cut off and the answer forced
            episodes = run_agent(model, tokenizer, rows, notool_env(env_cfg), environment, ecfg,
                                 generator)
    else:
        environment = make_environment(env_cfg, cfg.run, tokenizer, log_path=ecfg.log_calls or None)
        if isinstance(environment, SearchEnv):
            environment.limit_failures(ecfg.max_tool_failures, "eval.max_tool_failures", "eval: ")
        style = "agent" if ecfg.mode == "agent" else ecfg.workflow
        if style == "auto":
            style = "react" if getattr(tokenizer, "chat_template", None) else "fixed"
        runner = {"agent": run_agent, "fixed": run_fixed_workflow, "react": run_react}[style]
        episodes = runner(model, tokenizer, rows, env_cfg, environment, ecfg, generator)
    wall_s = time.time() - t0
    records = score(episodes, rows, env_cfg, ecfg.samples)
    judge_failures = judge(records, ecfg) if ecfg.judge else 0
    summary = summarize(records, ecfg.samples)
    summary.update(wall_s=wall_s, s_per_question=wall_s / max(len(rows), 1),
                   tool_failures=getattr(environment, "failures", 0))
    if ecfg.judge:
        summary["judge_failures"] = judge_failures
    return summary, records, episodes


class NoTool:
    """The no-tool baseline's environment: it is never called (max_actions=0); if it were, it says so."""
    simulated = False

    def __call__(self, queries, contexts=None):
        raise RuntimeError("no-tool baseline: the environment must not be called (env.max_actions=0)")


def write_results(records, summary, out_dir, tag):
    """<tag>.jsonl and <tag>.summary.json, so that a summary on disk always describes the rows beside it: the old
    summary goes first, then the rows and the summary are each renamed into place, the summary last. A kill at any
    point leaves the old pair, rows without a summary, or the new pair; never new rows beside an old summary."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{tag}.summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.exists(path):
        os.remove(path)
    data.write_jsonl(os.path.join(out_dir, f"{tag}.jsonl"), records)
    os.replace(path + ".tmp", path)
    return path


def result_tags(ecfg, model_name, sources):
    """(the lock's name, the suffixes of every file this eval writes after it): one set writes <tag>.jsonl and
    <tag>.summary.json; several write <tag>-<set>.jsonl and .summary.json for each, then <tag>.table.md/.json."""
    if len(sources) == 1:
        tag = ecfg.tag or f"{model_name}-{ecfg.mode}-{set_name(sources[0])}"
        return tag, (".jsonl", ".summary.json")
    tag = ecfg.tag or f"{model_name}-{ecfg.mode}"
    per_set = [f"-{set_name(s)}{ext}" for s in sources for ext in (".jsonl", ".summary.json")]
    return tag, (*per_set, ".table.md", ".table.json")


def summary_line(summary):
    spread = f" ± {summary['em_std']:.3f}" if "em_std" in summary else ""
    kinds = "  ".join(f"{k} {v['em']:.2f}" for k, v in summary["by_kind"].items())
    when = "".join(f"  {label} {summary[key]:.3f}" for key, label in WHEN_TO_ACT.items()
                   if summary.get(key) is not None)
    return (f"EM {summary['em']:.3f}{spread}  F1 {summary['f1']:.3f}  lenient {summary['lenient']:.3f}  "
            f"format errors {summary['format_error']:.3f}  actions/q {summary['actions']:.2f}  "
            f"real calls/q {summary['real_calls']:.2f}  tool failures {summary.get('tool_failures', 0)}  "
            f"gen tokens/q {summary['gen_tokens']:.0f}  truncated {summary['truncated']:.3f}  "
            f"{summary['wall_s']:.1f}s\n  by kind: {kinds}" + (f"\n  when to act:{when}" if when else ""))


# -----------------------------------------------------------------------------
# Several QA sets, several ranks: the paper's Table 1 in one command
#
# Under torchrun every rank evaluates rows[rank::world_size] of every set, then one all_gather_object brings all
# records to rank 0, which puts them back in row order and writes what one process would have written (greedy
# rows do not depend on the shard; wall_s is the slowest rank's).

TABLE_ROWS = (("em", "EM"), ("f1", "F1"), ("lenient", "lenient acc."), ("format_error", "format errors"),
              ("actions", "actions/question"))  # format errors: what explains a column of zeros


def gather_shards(shards, world_size):
    """{set: [per-rank part]} on rank 0 (None elsewhere): one all_gather_object for every set at once."""
    if world_size == 1:
        return {name: [part] for name, part in shards.items()}
    import torch.distributed as dist
    everything = [None] * world_size
    dist.all_gather_object(everything, shards)
    return {name: [ranks[name] for ranks in everything] for name in shards}


def merge_shards(parts, samples):
    """Records of rows[r::W] from each rank r -> all records in row order (samples adjacent)."""
    world_size, records = len(parts), []
    n_rows = sum(len(p["records"]) for p in parts) // samples
    for g in range(n_rows):
        local = parts[g % world_size]["records"]
        records += local[(g // world_size) * samples:(g // world_size + 1) * samples]
    return records


def table(summaries, judged=False):
    """{metric: {set: value, ..., "average": mean over sets}}: the paper's rows, one column per set."""
    rows = TABLE_ROWS + ((("judge", "judge acc."),) if judged else ())
    rows += tuple((key, label) for key, label in WHEN_TO_ACT.items()  # sets that mark which questions need a search
                  if all(s.get(key) is not None for s in summaries.values()))
    return {label: {**{name: s.get(key, 0.0) for name, s in summaries.items()},
                    "average": mean(s.get(key, 0.0) for s in summaries.values())} for key, label in rows}


def table_markdown(tab, title):
    sets = list(next(iter(tab.values())))
    lines = [f"### {title}", "", "| | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for label, values in tab.items():
        cells = [f"{values[s]:.2f}" if label.startswith("actions") else f"{100 * values[s]:.1f}" for s in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(tab, summaries, out_dir, tag, title):
    """<out_dir>/<tag>.table.md (accuracies in %) and .table.json (fractions, with each set's size)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{tag}.table")
    with open(base + ".md", "w") as f:
        f.write(table_markdown(tab, title))
    with open(base + ".json", "w") as f:
        json.dump({"title": title, "table": tab, "questions": {n: s["questions"] for n, s in summaries.items()}},
                  f, indent=1)
    return base + ".md"


def set_name(source):
    return os.path.basename(source).split(".")[0]


FLAGS = {"overwrite": "replace the results an earlier eval wrote under the same eval.out and tag"}


def main(argv=None):
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "model": data.ModelConfig, "eval": EvalConfig}, argv,
                      own="eval", flags=FLAGS)
    ecfg = cfg.eval
    if ecfg.samples > 1 and ecfg.temperature == 0:
        print0("warning: eval.samples > 1 with temperature 0: every sample is the same greedy trajectory")
    torch.manual_seed(cfg.run.seed)
    rank, world_size, device = setup_dist(cfg.run)
    path = resolve_model(ecfg.init, cfg, "eval.init")
    sources = [s.strip() for s in ecfg.data.split(",") if s.strip()]
    questions = {source: load_questions(cfg, source) for source in sources}  # a bad set fails before any work
    for source, rows in questions.items():
        if not rows:
            raise ConfigError(f"eval.data={source!r}: no usable questions (empty, or every row bad: each is named "
                              f"above)")
    model_name, out_dir = os.path.basename(path.rstrip('/')), os.path.join(cfg.run.dir, ecfg.out)
    lock_tag, outputs = result_tags(ecfg, model_name, sources)
    if rank == 0:  # two evals on one tag at once, or an earlier eval's results: refused, not silently replaced
        claim_run(out_dir, lock_tag, cfg.flags, outputs)
    if cfg.env.env == "worldmodel" and cfg.env.worldmodel and ecfg.mode != "notool":  # before the policy loads
        check_worldmodel_folder(cfg.env.worldmodel)
    model, tokenizer = load_model(path, cfg.run, device=device)
    model.eval()
    corpus = cfg.env.corpus or os.path.join(cfg.run.data_dir, "corpus.jsonl")
    if rank == 0 and cfg.model.wiki and cfg.env.tool == "bm25" and not os.path.exists(corpus):
        print("wiki corpus docs:", data.build_wiki_corpus(corpus))  # the offline Wikipedia, built on first use
    barrier()
    shards = {}
    for source, rows in questions.items():  # 1) every set: this rank's share of the questions
        with torch.no_grad():
            summary, records, episodes = evaluate(model, tokenizer, rows[rank::world_size], cfg)
        shards[source] = {"records": records, "wall_s": summary["wall_s"], "tool_failures": summary["tool_failures"],
                          "judge_failures": summary.get("judge_failures", 0)}
        for ep in episodes[:ecfg.show] if rank == 0 else []:
            print(show_trajectory(ep, tokenizer))
    gathered = gather_shards(shards, world_size)  # 2) one gather
    if rank != 0:
        return None
    summaries = {}
    for source in sources:  # 3) rank 0: each set's records and summary, as one process writes them
        parts = gathered[source]
        records = merge_shards(parts, ecfg.samples)
        summary = summarize(records, ecfg.samples)
        wall_s = max(p["wall_s"] for p in parts)
        summary.update(wall_s=wall_s, s_per_question=wall_s / max(summary["questions"], 1),
                       tool_failures=sum(p["tool_failures"] for p in parts), ranks=world_size)
        if ecfg.judge:
            summary["judge_failures"] = sum(p["judge_failures"] for p in parts)
        tag = lock_tag if len(sources) == 1 else f"{lock_tag}-{set_name(source)}"
        summary.update(model=path, mode=ecfg.mode, data=source, env=cfg.env.env, config=cfg.to_dict())
        out = write_results(records, summary, out_dir, tag)
        print(f"eval {tag}: {summary['questions']} questions -> {out}\n  {summary_line(summary)}")
        if warning := truncation_warning(summary["truncated"], cfg.env, f"eval {tag}"):
            print(warning)
        summary["tag"] = tag
        summaries[set_name(source)] = summary
    if len(sources) == 1:
        release_run(out_dir, lock_tag)
        return summaries[set_name(sources[0])]
    tab = table(summaries, ecfg.judge)  # 4) several sets: the table
    title = f"{model_name}, {ecfg.mode}, env {cfg.env.env}/{cfg.env.tool}"
    title += f", first {ecfg.limit} per set" if ecfg.limit else ""
    out = write_table(tab, summaries, out_dir, lock_tag, title)
    release_run(out_dir, lock_tag)
    print(f"table -> {out}\n" + table_markdown(tab, title))
    return {"table": tab, "summaries": summaries, "path": out}


if __name__ == "__main__":
    cli(main)
