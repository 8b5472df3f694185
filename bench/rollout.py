"""
bench/rollout.py -- rollout.py's throughput against the way others do it and against the floor.

    (a) rollout      rollout.rollout: one KV cache, pauses at the action, one batched tool call, the observation
                     prefilled as one chunk for the paused rows only;
    (b) regenerate   Search-R1's way: HF model.generate stops at the action tag (stop_strings), the loop decodes
                     the query, appends the observation ids and calls generate again on the whole sequence, so
                     every turn re-prefills the full context;
    (c) floor        a plain batched HF loop (DynamicCache, left padding, 2D mask) that does the same prefills
                     (prompts, then each observation chunk) and the same number of one-token decode steps in
                     lockstep, with argmax and nothing else: no pausing, no tool, no bookkeeping.
    (s) static       (a) with env.static_decode: preallocated cache, fixed-shape decode step, a CUDA graph per
                     (batch bucket, key length) on cuda (eager on CPU);
    (d) regenerate   (b) with cache_implementation="static" sized once for all turns: on cuda transformers then
        static       compiles the decode forward itself (torch.compile), what a plain-transformers user would pick;
                     on CPU it does not compile;
    (e) graph floor  (c) on transformers' StaticCache, every one-token step one CUDA graph replay (eager on CPU).

The work is identical for the three. An untrained model never writes a tag, so a script fixes the shape of
every trajectory: per turn the action opener forced, `free` tokens chosen by the model (tags, braces and EOS
suppressed), then the action closer forced; after `turns` actions the think closer and \\boxed{ are forced, `answer` free tokens, then "}".
(a) applies the script in a wrapper around the LM head, (b) as a LogitsProcessor; (c) just follows the
same forward schedule. Observations come from a zero-cost in-memory tool (tiny-world documents chosen by the
query's hash) through tools.SearchEnv, cut to env.obs_max_tokens (150) tokens; (c) feeds (a)'s observation ids.
Each method runs `repeats` times interleaved (a, s, b, d, c, e, a, ...) after one untimed warm-up round (graph
captures, compilation); the medians give the ratios. Per method: tokens/s and ms per step (all in); for (a) and
(s) one more timed run splits the time and gives the ms of a one-token decode step, and its ratio to the weight
read (parameter bytes / the card's memory bandwidth: BANDWIDTH by torch.cuda.get_device_name, or
--bandwidth-gbs). Issue 14's targets (GPU, 1.5B shape, batch 64, 3 calls): (s) >= 6,500 tok/s, decode step
<= 6 ms, (s) ahead of (d), time(s) <= 1.25 x time(e). --torch-profile prints where one (s) run spends its time.

    python bench/rollout.py                               # tiny (repeats 3) and SmolLM2-135M (repeats 1)
    python bench/rollout.py --models tiny --repeats 5 --batch 16 --turns 3,4,5
    python bench/rollout.py --profile                     # cProfile of one (a) run per model, top entries
    python bench/rollout.py --models tiny --torch-profile   # torch.profiler operators of one (s) run

Targets (issue 3): (a) >= 3x the throughput of (b); time(a) <= 1.25 x time(c). Ends with one JSON line.

The last measurements, what they show and why the static path exists: docs/benchmarks.md.
"""
import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import sys
import time
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

import data  # noqa: E402
import rollout as R  # noqa: E402
from config import RunConfig, load_config, read_corpus  # noqa: E402
from plumbing import load_model  # noqa: E402
from tools import EnvConfig, SearchEnv, answer_text  # noqa: E402


# -----------------------------------------------------------------------------
# The script every trajectory follows, and the zero-cost tool

class Script:
    """Per step (one sampled token per row), None = the model's free choice, else the forced token id."""

    def __init__(self, tok, env, free, turns, answer):
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        open_, close = enc(env.action_open + " "), enc(env.action_close)  # an action: opener, query, closer
        self.turns = [open_ + [None] * free + close for _ in range(turns)]
        self.turns.append([None] * free + enc(answer_text(env)) + [None] * answer + enc("}"))
        self.steps = [s for turn in self.turns for s in turn]
        texts = [tok.decode([i]) for i in range(len(tok))]
        special = set(tok.all_special_ids)
        self.banned = torch.tensor([i in special or any(c in t for c in "<>{}") for i, t in enumerate(texts)])

    def apply(self, scores, step):
        forced = self.steps[min(step, len(self.steps) - 1)]
        if forced is None:
            banned = self.banned.to(scores.device)
            return scores.masked_fill(banned[:scores.shape[-1]], float("-inf"))
        out = torch.full_like(scores, float("-inf"))
        out[:, forced] = 0.0
        return out


class ScriptedHead(torch.nn.Module):
    """The LM head with the script applied; one call per forward (all rows in lockstep), so a counter is the step."""

    def __init__(self, head, script):
        super().__init__()
        self.head, self.script, self.step = head, script, 0

    def forward(self, hidden):
        logits = self.script.apply(self.head(hidden), self.step)
        self.step += 1
        return logits


class ScriptedProcessor(LogitsProcessor):
    """The same script inside HF generate: the step is the turn's offset plus the tokens generated this call."""

    def __init__(self, script):
        self.script, self.offset, self.start = script, 0, 0

    def __call__(self, input_ids, scores):
        return self.script.apply(scores, self.offset + input_ids.shape[1] - self.start)


class DocsTool:
    """tool(queries, k) -> k tiny-world documents per query, picked by the query's hash: no search cost."""

    def __init__(self, corpus_path):
        self.docs = [d["contents"] for d in read_corpus(corpus_path)]

    def __call__(self, queries, k=8):
        return [[self.docs[(zlib.crc32(q.encode()) + j * 7919) % len(self.docs)] for j in range(k)] for q in queries]


# -----------------------------------------------------------------------------
# The three methods; each returns (seconds, model-written tokens, per-row completion ids)

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class ForwardTimer:
    """Patches rollout.forward_chunk and StaticDecoder.step to split a rollout's time: chunk forwards (prompts,
    observations), one-token decode steps (counted), and the rest (sampling, stop checks, the tool, bookkeeping)."""

    def __init__(self, device):
        self.chunk, self.step, self.device = R.forward_chunk, R.StaticDecoder.step, device
        self.seconds, self.decode_steps = {"chunk": 0.0, "decode": 0.0}, 0

    def timed(self, kind, fn, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.seconds[kind] += time.perf_counter() - t0
        return out

    def __enter__(self):
        def chunk(model, cache, rows, feeds, pad_id):
            one = max(len(f) for f in feeds) == 1
            self.decode_steps += one
            return self.timed("decode" if one else "chunk", self.chunk, model, cache, rows, feeds, pad_id)

        def step(decoder, *args):
            self.decode_steps += 1
            return self.timed("decode", self.step, decoder, *args)
        R.forward_chunk, R.StaticDecoder.step = chunk, step
        return self

    def __exit__(self, *exc):
        R.forward_chunk, R.StaticDecoder.step = self.chunk, self.step


def run_rollout(model, tok, rows, env, environment, script, timer=None):
    head = model.lm_head
    model.lm_head = ScriptedHead(head, script)
    try:
        with timer or contextlib.nullcontext():
            sync(model.device)
            t0 = time.perf_counter()
            episodes = R.rollout(model, tok, rows, env, environment)
            sync(model.device)
            seconds = time.perf_counter() - t0
    finally:
        model.lm_head = head
    for ep in episodes:  # the script held: every row took the same steps
        assert ep.finish == "answer" and len(ep.actions) == len(script.turns) - 1, (ep.finish, ep.actions)
        assert sum(ep.mask) == len(script.steps), (sum(ep.mask), len(script.steps))
    return seconds, sum(sum(ep.mask) for ep in episodes), episodes


def left_pad(seqs, pad_id, device):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def run_regenerate(model, tok, rows, env, environment, script, static_len=0):
    """Search-R1's loop: generate until the action tag, decode the query, append the observation, re-prefill.

    static_len > 0: (d), generate with cache_implementation="static" sized once to static_len columns (one shape
    for every turn); on cuda transformers then compiles the decode forward itself (torch.compile, its default
    compile_config), on CPU it does not.
    """
    static = {"cache_implementation": "static", "max_cache_len": static_len} if static_len else {}
    processor = ScriptedProcessor(script)
    sync(model.device)
    t0 = time.perf_counter()
    seqs = [R.encode_prompt(tok, r["question"], env) for r in rows]
    completions = [[] for _ in rows]
    n_model = 0
    for t, turn in enumerate(script.turns):
        ids, mask = left_pad(seqs, tok.pad_token_id, model.device)
        processor.start = ids.shape[1]
        last = t == len(script.turns) - 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=len(turn), do_sample=False,
                             logits_processor=LogitsProcessorList([processor]), pad_token_id=tok.pad_token_id,
                             stop_strings=None if last else [env.action_close], tokenizer=tok,
                             temperature=None, top_p=None, top_k=None, **static)
        processor.offset += len(turn)
        new = out[:, ids.shape[1]:].tolist()
        n_model += sum(len(x) for x in new)
        if not last:
            texts = tok.batch_decode(new)
            queries = [x.rpartition(env.action_close)[0].rpartition(env.action_open)[2].strip() for x in texts]
            observations = [tok.encode(o, add_special_tokens=False) for o in environment(queries)]
        else:
            observations = [[] for _ in rows]
        for i in range(len(rows)):
            seqs[i] = seqs[i] + new[i] + observations[i]
            completions[i] += new[i] + observations[i]
    sync(model.device)
    return time.perf_counter() - t0, n_model, completions


def run_floor(model, tok, rows, env, script, obs_ids):
    """The same forwards as (a) with a plain HF cache: prefill, decode steps, observation chunks, argmax only.

    obs_ids[t][i]: row i's observation ids after action t (from (a)), fed with the token before it as one chunk.
    """
    device = model.device
    prompts = [R.encode_prompt(tok, r["question"], env) for r in rows]
    sync(device)
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    ids, attn = left_pad(prompts, tok.pad_token_id, device)
    n_model, action = 0, 0
    chunk_after = {sum(len(turn) for turn in script.turns[:t + 1]) for t in range(len(script.turns) - 1)}
    for step in range(len(script.steps)):
        positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        n_model += len(rows)
        if step + 1 in chunk_after:  # the action closer was just written: feed it with the observation
            chunk, chunk_mask = left_pad([[0] + o for o in obs_ids[action]], tok.pad_token_id, device)
            first = chunk.shape[1] - 1 - torch.tensor([len(o) for o in obs_ids[action]], device=device)
            chunk[torch.arange(len(rows), device=device), first] = token
            ids, attn, action = chunk, torch.cat([attn, chunk_mask], 1), action + 1
        else:
            ids, attn = token[:, None], torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    sync(device)
    return time.perf_counter() - t0, n_model


class GraphFloor:
    """(e): (c)'s forwards with transformers' own StaticCache (all rows write one shared column per step) and
    each one-token step captured once as a CUDA graph (on cuda; eager elsewhere). Prompts and observation chunks
    are left-padded and eager, as in (c). Kept across runs, so the capture happens in the warm-up round."""

    def __init__(self, model, batch, capacity):
        from transformers import StaticCache
        self.model, self.device, self.graph = model, model.device, None
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        self.keep = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)  # False: a padding column
        self.columns = torch.arange(capacity, device=self.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.neg = torch.finfo(model.dtype).min

    def forward(self, ids, positions, visible):
        mask = torch.zeros(visible.shape, dtype=self.model.dtype, device=self.device).masked_fill_(~visible, self.neg)
        out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    def chunk(self, ids, attn, start):
        w = ids.shape[1]
        self.keep[:, start:start + w] = attn.bool()
        positions = (self.keep[:, :start + w].long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        visible = self.keep[:, None, :] & (self.columns[None, None, :] <= start + torch.arange(w, device=self.device)[None, :, None])
        self.token[:, 0] = self.forward(ids, positions, visible)
        self.pos.copy_(positions[:, -1:] + 1)

    def decode(self):
        """One step in place: token, pos and the cache's own column counter advance."""
        now = self.cache.layers[0].cumulative_length
        self.token[:, 0] = self.forward(self.token, self.pos, (self.keep & (self.columns <= now))[:, None, :])
        self.pos += 1

    def replay(self):
        if self.device.type != "cuda":
            return self.decode()
        if self.graph is None:  # warm up on a side stream, then capture; the state the warm-up advanced is restored
            saved = [layer.cumulative_length.clone() for layer in self.cache.layers] + [self.pos.clone(), self.token.clone()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.decode()
            torch.cuda.current_stream().wait_stream(stream)
            for t, v in zip([layer.cumulative_length for layer in self.cache.layers] + [self.pos, self.token], saved):
                t.copy_(v)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.decode()
        self.graph.replay()

    def run(self, tok, rows, env, script, obs_ids):
        prompts = [R.encode_prompt(tok, r["question"], env) for r in rows]
        sync(self.device)
        t0 = time.perf_counter()
        self.cache.reset()
        self.keep.fill_(True)
        ids, attn = left_pad(prompts, tok.pad_token_id, self.device)
        start, n_model, action, pending = 0, 0, 0, (ids, attn)
        chunk_after = {sum(len(turn) for turn in script.turns[:t + 1]) for t in range(len(script.turns) - 1)}
        for step in range(len(script.steps)):
            if pending is not None:
                self.chunk(*pending, start)
                start, pending = start + pending[0].shape[1], None
            else:
                self.replay()
                start += 1
            n_model += len(rows)
            if step + 1 in chunk_after:  # the action closer was just written: feed it with the observation
                chunk, chunk_mask = left_pad([[0] + o for o in obs_ids[action]], tok.pad_token_id, self.device)
                first = chunk.shape[1] - 1 - torch.tensor([len(o) for o in obs_ids[action]], device=self.device)
                chunk[torch.arange(len(rows), device=self.device), first] = self.token[:, 0]
                pending, action = (chunk, chunk_mask), action + 1
        sync(self.device)
        return time.perf_counter() - t0, n_model


# -----------------------------------------------------------------------------
# The card's weight-read bound: bytes of weights / memory bandwidth is the least time a decode step can take

BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("B200", 8.0e12),
             ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.86e12),
             ("A10", 0.6e12), ("L4", 0.3e12), ("RTX 4090", 1.01e12), ("RTX 3090", 0.94e12), ("V100", 0.9e12)]
# bytes/s, spec sheets; the first name contained in torch.cuda.get_device_name wins (so H100 NVL before H100)


def bandwidth(device, override_gbs):
    if override_gbs:
        return override_gbs * 1e9
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH if key in name), None)


# -----------------------------------------------------------------------------

METHODS = "asbdce"  # a rollout, s rollout static_decode, b regenerate, d regenerate static(+compile), c floor, e graph floor


def bench_model(name, path, args, corpus):
    model, tok = load_model(path, RunConfig(), device=torch.device(args.device))
    model.eval()
    script = Script(tok, EnvConfig(), args.free, args.turns, args.answer)
    # max_new_tokens bounds the completion (the static cache is sized by it): the script's tokens, the observations
    budget = len(script.steps) + args.turns * (args.obs_tokens + 40)
    env = EnvConfig(obs_max_tokens=args.obs_tokens, max_actions=args.turns, max_new_tokens=budget, topk=8)
    static_env = dataclasses.replace(env, static_decode=True)
    environment = SearchEnv(DocsTool(corpus), tok, env)
    rows = data.load_qa(os.path.join(args.data_dir, "test.jsonl"))[:args.batch]
    capacity = max(len(R.encode_prompt(tok, r["question"], env)) for r in rows) + budget + 1
    floor = GraphFloor(model, len(rows), capacity)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_rollout(model, tok, rows, env, environment, script)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    times = {k: [] for k in METHODS}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # round 0 warms up: graphs captured, (d) compiled, caches sized
            t = {}
            t["a"], n_a, episodes = run_rollout(model, tok, rows, env, environment, script)
            t["s"], n_s, static_episodes = run_rollout(model, tok, rows, static_env, environment, script)
            t["b"], n_b, completions = run_regenerate(model, tok, rows, env, environment, script)
            t["d"], n_d, _ = run_regenerate(model, tok, rows, env, environment, script, static_len=capacity)
            obs_ids = observation_chunks(episodes, len(script.turns) - 1)
            t["c"], n_c = run_floor(model, tok, rows, env, script, obs_ids)
            t["e"], n_e = floor.run(tok, rows, env, script, obs_ids)
            assert n_a == n_s == n_b == n_d == n_c == n_e, (n_a, n_s, n_b, n_d, n_c, n_e)
            print(f"  {name}{' (warm-up)' if repeat == 0 else ''}: " + "  ".join(f"({k}) {t[k]:.2f}s" for k in METHODS),
                  flush=True)
            for k in METHODS if repeat else ():
                times[k].append(t[k])
    splits = {}
    for k, e in (("a", env), ("s", static_env)):  # one more run each, timed inside (a sync per forward costs a little)
        with ForwardTimer(model.device) as timer:
            total, _, _ = run_rollout(model, tok, rows, e, environment, script)
        splits[k] = {"chunk_forwards": timer.seconds["chunk"], "decode_forwards": timer.seconds["decode"],
                     "rest": total - sum(timer.seconds.values()), "decode_steps": timer.decode_steps,
                     "decode_ms": 1000 * timer.seconds["decode"] / max(1, timer.decode_steps)}
    if args.torch_profile:
        torch_profile(model, tok, rows, static_env, environment, script)
    med = {k: statistics.median(v) for k, v in times.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = bandwidth(model.device, args.bandwidth_gbs)
    bound_ms = 1000 * weight_bytes / bw if bw else None
    steps = len(script.steps)  # forwards per trajectory, the same for every method
    obs_len = [sum(1 for m in ep.mask if m == 0) / max(1, len(ep.actions)) for ep in episodes]
    result = {"model": name, "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
              "dtype": str(model.dtype), "batch": args.batch, "tool_calls": args.turns,
              "obs_tokens_mean": round(statistics.mean(obs_len), 1), "model_tokens": n_a,
              "seconds": {k: round(v, 3) for k, v in med.items()},
              "tokens_per_s": {k: round(n_a / v, 1) for k, v in med.items()},
              "ms_per_step": {k: round(1000 * v / steps, 3) for k, v in med.items()},  # all in: chunks, tool, sampling
              "decode_ms": {k: round(v["decode_ms"], 3) for k, v in splits.items()},  # one-token steps alone
              "weight_bytes": weight_bytes, "bandwidth_gbs": bw and bw / 1e9,
              "weight_read_ms": bound_ms and round(bound_ms, 4),
              "decode_ms_over_weight_read": bound_ms and {k: round(v["decode_ms"] / bound_ms, 2) for k, v in splits.items()},
              "a_over_b_throughput": round(med["b"] / med["a"], 2), "a_over_c_time": round(med["a"] / med["c"], 3),
              "s_over_a_throughput": round(med["a"] / med["s"], 2), "s_over_d_throughput": round(med["d"] / med["s"], 2),
              "s_over_e_time": round(med["s"] / med["e"], 3),
              "c_over_b_throughput": round(med["b"] / med["c"], 2),  # the most any loop doing (a)'s work could gain
              "rows_identical_a_b": sum(ep.ids == c for ep, c in zip(episodes, completions)),
              "rows_identical_a_s": sum(a.ids == b.ids for a, b in zip(episodes, static_episodes)),
              "split_s": {k: {n: round(x, 3) for n, x in v.items()} for k, v in splits.items()}}
    tps = result["tokens_per_s"]
    print(f"{name} on {result['device']} ({result['dtype']}): {n_a} model tokens, obs {result['obs_tokens_mean']} "
          f"tok/call; tok/s " + ", ".join(f"({k}) {tps[k]}" for k in METHODS))
    print(f"  (s)/(a) throughput {result['s_over_a_throughput']}x, (s) vs (d) {result['s_over_d_throughput']}x "
          f"(target > 1), (s)/(e) time {result['s_over_e_time']} (target <= 1.25); (a)/(b) "
          f"{result['a_over_b_throughput']}x, (a)/(c) time {result['a_over_c_time']}; ids identical a vs b "
          f"{result['rows_identical_a_b']}/{len(rows)}, a vs s {result['rows_identical_a_s']}/{len(rows)}")
    for k, v in splits.items():
        bound = f", {v['decode_ms'] / bound_ms:.1f}x the weight read ({bound_ms:.3f} ms)" if bound_ms else ""
        print(f"  ({k}) decode step {v['decode_ms']:.2f} ms{bound} over {v['decode_steps']} steps; split: chunk "
              f"forwards {v['chunk_forwards']:.2f}s, decode forwards {v['decode_forwards']:.2f}s, the rest "
              f"{v['rest']:.2f}s (sampling, stops, tool, bookkeeping)", flush=True)
    return result


def torch_profile(model, tok, rows, env, environment, script):
    """Where one static-path rollout spends its time: torch.profiler's operators by self time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_rollout(model, tok, rows, env, environment, script)
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=18))


def observation_chunks(episodes, turns):
    """obs_ids[t][i]: the environment ids row i got after its action t."""
    chunks = [[] for _ in range(turns)]
    for ep in episodes:
        runs, current = [], []
        for t, m in zip(ep.ids, ep.mask):
            if m == 0:
                current.append(t)
            elif current:
                runs.append(current)
                current = []
        for t in range(turns):
            chunks[t].append(runs[t])
    return chunks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--models", default="tiny,smollm2", help="comma list of model.base values (tiny, smollm2, an HF path)")
    p.add_argument("--batch", type=int, default=16, help="trajectories generated together")
    p.add_argument("--turns", default="3", help="tool calls per trajectory; a comma list runs each")
    p.add_argument("--free", type=int, default=16, help="free model tokens per turn")
    p.add_argument("--answer", type=int, default=4, help="free answer tokens")
    p.add_argument("--obs-tokens", type=int, default=150, help="tokens of each observation")
    p.add_argument("--repeats", type=int, default=0, help="0 = 3 for tiny, 1 for smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--data-dir", default="data/tiny", help="the tiny world (its base model and questions)")
    p.add_argument("--profile", action="store_true", help="cProfile of one (a) run per model")
    p.add_argument("--torch-profile", action="store_true", help="torch.profiler table of one (s) run per model")
    p.add_argument("--bandwidth-gbs", type=float, default=0.0,
                   help="memory bandwidth in GB/s for the weight-read bound (default: BANDWIDTH by device name)")
    args = p.parse_args(argv)
    args.turns_list = args.turns
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "world": data.WorldConfig, "model": data.ModelConfig},
                      ["--config", "configs/tiny.yaml"], own="world")
    if not os.path.exists(os.path.join(args.data_dir, "test.jsonl")):
        data.main(["--config", "configs/tiny.yaml"])
    corpus = os.path.join(args.data_dir, "corpus.jsonl")
    results = []
    repeats = args.repeats
    for name in args.models.split(","):
        for turns in [int(t) for t in str(args.turns_list).split(",")]:
            cfg.model.base = name
            args.repeats, args.turns = repeats or (3 if name == "tiny" else 1), turns
            results.append(bench_model(name, data.base_model_path(cfg), args, corpus))
    print(json.dumps({"bench": "rollout", "device": args.device, "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    main()
