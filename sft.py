"""
sft.py -- the supervised stages of AutoCoA (arXiv 2503.06580, Sec. 3.2). Distributed setup, checkpoints, metric
logs and the run guard come from plumbing.py, shared with rl.py and worldmodel.py.

Data: the pre-training corpus of data.py (<run.data_dir>/pretrain.jsonl, stage pretrain), then the synthesised
trajectories of data.py (<run.data_dir>/synth/train.jsonl; rows of type cot, coa, pair).
A trajectory is tokenized as prompt (rollout.encode_prompt, exactly what rollout.py feeds) + each segment on its
own (add_special_tokens=False) + EOS, so which token the environment wrote comes from the segment, never from
matching strings. Stages (sft.stage):

  pretrain  next-token loss on the world's documents, each written as a search result
        (`<search_result> title\ntext </search_result>`), each repeated by its entity's popularity (data.popularity:
        long-tailed). Before any CoT: the tiny model's stand-in for what a pre-trained LM read of its world, so
        its own simulated search results (SFT-3, rl.py's env=policy) know popular entities and not the tail.
  cot   next-token loss on every CoT row (no tool). The tiny world's stand-in for the paper's starting point, a
        reasoning model that answers from memory; also the CoT-only baseline.
  sft1  CoT+A, *when* to act. Each pair shares a prefix (a no-tool attempt cut after a sentence) and has two
        continuations, one searching, one not; chosen = the one that ends right. With lp = the log-prob of a
        continuation's model tokens divided by their number (observation tokens excluded),

            L1 = -log sigmoid(lp_chosen - lp_rejected) - alpha * lp_chosen              (alpha = 0.2)

        The prefix and the prompt are context only.
  sft2  CoT + CoA, *how* to act: next-token loss on the model's tokens, observation tokens masked,

            L2 = - sum_t m_t log p(x_t | x_<t) / sum_t m_t       m_t = 1 where the model wrote x_t, 0 in observations

        over a stream with `cot_share` CoT rows (well-known facts, no search) and CoA rows for the rest.
  sft3  the same without the mask (m_t = 1 on every completion token): the model also learns to predict what
        the search returns, its internal world model (used by rl.py's env=policy).

Training: AdamW, cosine schedule with linear warm-up, gradient clipping, gradient accumulation
(batch_size sequences per step over all ranks, device_batch_size per forward), length bucketing (batches are cut
from windows of similar-length trajectories). Losses are normalised over the whole global batch (token or pair
counts known to every rank), so 1 process and N processes take the same step.
Precision, one path for sft.py, rl.py and worldmodel.py: bf16=true wraps the model in FSDP2 (fully_shard per
decoder layer, then the root) with a bf16 MixedPrecisionPolicy: forward and backward in bf16, fp32 master weights,
gradients reduced in fp32. It needs parallel=fsdp, and means the same on one process (a 1-rank process group is
started, so `python` and `torchrun --nproc_per_node 1` run it too) as on N. bf16=false trains in fp32.
Outputs are named for the stages that made them (demo.py, the README): cot, sft1, sft2 (SFT-2 alone), sft12
(SFT-1 then SFT-2), sft123 (then SFT-3; rl.py starts from it). Under them: <run.dir>/<out>/ (HF folder, written
atomically), <run.dir>/<out>.ckpt/step_XXXXXX/ (resume),
<run.dir>/<out>.metrics.jsonl (one line per step; the last line holds the held-out metrics on dev trajectories:
next-token loss on the model's tokens, and the perplexity of the real observations).

    python sft.py --config configs/tiny.yaml stage=cot                    # -> runs/tiny/cot
    python sft.py --config configs/tiny.yaml stage=sft2 init=cot          # -> runs/tiny/sft2 (SFT-2 alone)
    python sft.py --config configs/tiny.yaml stage=sft1 init=cot          # -> runs/tiny/sft1
    python sft.py --config configs/tiny.yaml stage=sft2 init=sft1 out=sft12     # -> runs/tiny/sft12 (SFT-1&2)
    python sft.py --config configs/tiny.yaml stage=sft3 init=sft12 out=sft123   # -> runs/tiny/sft123 (SFT-1&2&3)
    python sft.py --config configs/tiny.yaml stage=sft2 --resume          # after a crash: the same weights
    torchrun --nproc_per_node 2 sft.py --config configs/tiny.yaml         # 2 CPU processes (gloo), same losses
    python sft.py --config configs/tiny.yaml run.device=cuda parallel=fsdp bf16=true   # one GPU, bf16 compute

Measured on the tiny world (configs/tiny.yaml, greedy, real tool, 300 test questions; `demo.py --seeds 3`):
SFT-2 from the CoT model, 900 steps of 16: EM 0.937 / 0.967 / 0.970 (seeds 0/1/2) against 0.063 / 0.037 / 0.043
for the CoT-only model (stage cot, 600 steps); SFT-1&2 0.993 / 0.953 / 0.977; SFT-1&2&3 0.967 / 0.943 / 0.910.
Dev EM first sits on a plateau (the model has not yet learnt to copy facts from observations) and leaves it
somewhere between 400 and 700 steps, seed by seed (at 32 a step, seed 1 after 600 steps: dev EM 0.54).

Departures from the paper: the tiny world's CoT data comes from a scripted teacher, not a reasoning model;
sft1's pairs may have an empty prefix with real teachers (data.py); the DPO-style term has no beta and no
reference model (the formula above, as in the paper's stage-1 loss).
Not here: sequence packing (length bucketing instead), LoRA, evaluation by generation (eval.py).
"""
import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import (RUN_FLAGS, all_reduce, barrier, check_bf16, claim_run, finished_run, full_state_dict, is_dist,
                      load_checkpoint, log_line, plain_copy, print0, progress_bar, release_run, resume_checkpoint,
                      save_checkpoint, setup_dist, start_logging, truncate_log, wrap_model)
from tools import ConfigError, build_prompt, cli, master_dtype, model_path, read_jsonl


@dataclass
class SFTConfig:
    stage: str = "sft2"  # pretrain | cot | sft1 | sft2 | sft3 (see the docstring)
    init: str = "base"  # model to start from: base | a stage output under run.dir (cot, sft1, ...) | a path
    out: str = ""  # output folder under run.dir; "" = the stage's name
    data: str = ""  # training rows; "" = <run.data_dir>/synth/train.jsonl (pretrain: <run.data_dir>/pretrain.jsonl)
    heldout: str = ""  # held-out rows for the final metrics; "" = <run.data_dir>/synth/dev.jsonl ("none": skip)
    cot_share: float = 0.15  # sft2/sft3: share of CoT rows (well-known facts) in the stream; the rest is CoA
    pretrain_share: float = 0.0  # cot/sft2/sft3: share of the stream replayed from the pre-training corpus (by
                                 # popularity), so what pre-training taught is not overwritten (0 = none; sft1's
                                 # pairs never mix)
    alpha: float = 0.2  # sft1: weight of the chosen continuation's log-likelihood
    steps: int = 0  # optimizer steps; 0 = the stage's own default below
    pretrain_steps: int = 1000  # default steps of stage pretrain
    cot_steps: int = 300  # default steps of stage cot
    sft1_steps: int = 100  # default steps of stage sft1
    sft2_steps: int = 500  # default steps of stage sft2
    sft3_steps: int = 100  # default steps of stage sft3
    batch_size: int = 32  # sequences (sft1: pairs) per optimizer step, over all ranks
    device_batch_size: int = 8  # sequences (pairs) per forward; the rest is gradient accumulation
    lr: float = 1e-5  # peak learning rate (a pretrained model's; the tiny model from scratch uses 3e-3)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up inside the steps (a shorter run ends warming up), then the cosine
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    bucket_batches: int = 16  # length bucketing: batches are cut from windows of this many batches sorted by length
    max_len: int = 512  # trajectories longer than this (prompt included) are cut
    parallel: str = "ddp"  # ddp | fsdp (FSDP2) | none, under torchrun
    bf16: bool = False  # bf16 compute, fp32 master weights (FSDP2 MixedPrecisionPolicy; needs parallel=fsdp)
    save_every: int = 100  # checkpoint every this many steps (0 = none before the end; the last step's is kept)
    keep_ckpts: int = 2  # newest checkpoints kept

    RANGES = {"cot_share": "[0, 1)", "alpha": "[0, inf)", "steps": "[0, inf)", "cot_steps": "[0, inf)",
              "sft1_steps": "[0, inf)", "sft2_steps": "[0, inf)", "sft3_steps": "[0, inf)", "batch_size": "[1, inf)",
              "device_batch_size": "[1, inf)", "lr": "(0, inf)", "min_lr_ratio": "[0, 1]", "warmup_steps": "[0, inf)",
              "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "bucket_batches": "[1, inf)", "max_len": "[2, inf)",
              "save_every": "[0, inf)", "keep_ckpts": "[0, inf)",
              "pretrain_share": "[0, 1)", "pretrain_steps": "[0, inf)"}
    CHOICES = {"stage": ("pretrain", "cot", "sft1", "sft2", "sft3"), "parallel": ("ddp", "fsdp", "none")}


# -----------------------------------------------------------------------------
# Data: synthesised rows -> token ids and loss masks

def read_synth(path):
    """Rows of a synth JSONL; a malformed row is reported with file, line and reason, then skipped."""
    from data import check_synth_row
    rows = [row for _, row in read_jsonl(path, check_synth_row, "synth row", warn=print0)]
    if not rows:
        raise ConfigError(f"{path}: no usable rows (empty, or every row bad: each is named above)")
    return rows


def encode_texts(tokenizer, texts, cache=None):
    """ids of each text (add_special_tokens=False); one batched call for the texts not in `cache` yet."""
    cache = {} if cache is None else cache
    new = sorted({t for t in texts if t not in cache})
    if new:
        cache.update(zip(new, tokenizer(new, add_special_tokens=False)["input_ids"]))
    return [cache[t] for t in texts]


def encode_segments(tokenizer, segments, observation_mask=True, cache=None):
    """(ids, mask) of a list of segments, each tokenized on its own; mask 0 on env segments if observation_mask."""
    ids, mask = [], []
    for seg, piece in zip(segments, encode_texts(tokenizer, [seg["text"] for seg in segments], cache)):
        ids += piece
        mask += [0 if (seg["who"] == "env" and observation_mask) else 1] * len(piece)
    return ids, mask


def encode_trajectory(tokenizer, env, question, segments, observation_mask=True, context=(), max_len=512,
                      cache=None):
    """{"ids", "mask"} of prompt + context + segments + EOS; mask 1 on the tokens the loss is taken on.

    The prompt is tokenized as rollout.encode_prompt does it. context: segments that are read but never trained
    on (a pair's shared prefix). mask[t] says whether ids[t] is a target (predicted from ids[:t]).
    cache: {text: ids}, shared across calls so a data set is tokenized in a few batched calls.
    """
    ids = list(encode_texts(tokenizer, [build_prompt(tokenizer, question, env)], cache)[0])
    mask = [0] * len(ids)
    ctx_ids, _ = encode_segments(tokenizer, context, cache=cache)
    ids, mask = ids + ctx_ids, mask + [0] * len(ctx_ids)
    seg_ids, seg_mask = encode_segments(tokenizer, segments, observation_mask, cache)
    ids, mask = ids + seg_ids + [tokenizer.eos_token_id], mask + seg_mask + [1]
    return {"ids": ids[:max_len], "mask": mask[:max_len]}


def build_examples(rows, stage, tokenizer, env, max_len):
    """The stage's examples: {"ids", "mask"} (cot, sft2, sft3) or {"chosen", "rejected"} (sft1), plus "cot"."""
    out, cache = [], {}
    texts = [build_prompt(tokenizer, r["question"], env) for r in rows]
    texts += [s["text"] for r in rows for part in ("segments", "prefix", "chosen", "rejected") for s in r.get(part, [])]
    encode_texts(tokenizer, texts, cache)  # every text at once: the fast tokenizer batches them
    for row in rows:
        if stage == "sft1":
            if row["type"] == "pair":
                enc = lambda part: encode_trajectory(tokenizer, env, row["question"], row[part], True, row["prefix"],
                                                     max_len, cache)
                out.append({"chosen": enc("chosen"), "rejected": enc("rejected"), "cot": False})
        elif row["type"] == "cot" and (stage == "cot" or not row.get("needs_search", True)):
            # sft2/3 mix in CoT of well-known facts only: closed-book CoT on questions that need a search would
            # teach the model to skip the search there
            out.append({**encode_trajectory(tokenizer, env, row["question"], row["segments"], True, (), max_len,
                                            cache), "cot": True})
        elif row["type"] == "coa" and stage in ("sft2", "sft3"):
            out.append({**encode_trajectory(tokenizer, env, row["question"], row["segments"], stage == "sft2", (),
                                            max_len, cache), "cot": False})
    if not out:
        raise ConfigError(f"no training rows for stage {stage} (synthesise with: python data.py ... --synth)")
    return out


def pretrain_examples(rows, tokenizer, env):
    """One example per document, written exactly as the real tool writes a one-document observation (the whole
    sequence learnt), with its repeats: epoch_order puts it that many times in an epoch."""
    from tools import format_observation
    texts = [format_observation([r["contents"]], tokenizer, env) for r in rows]
    return [{"ids": ids + [tokenizer.eos_token_id], "mask": [1] * (len(ids) + 1), "cot": False, "repeats": r["repeats"]}
            for r, ids in zip(rows, encode_texts(tokenizer, texts))]


def length_of(example):
    return len(example["ids"]) if "ids" in example else len(example["chosen"]["ids"]) + len(example["rejected"]["ids"])


def epoch_order(examples, stage, cot_share, batch_size, bucket_batches, seed, epoch, doc_share=0.0):
    """One epoch as a list of global batches (lists of example indices); a pure function of (seed, epoch), so a
    resumed run rebuilds the same order. sft2/sft3: every CoA row once, plus CoT rows drawn to make `cot_share`.
    pretrain: each document `repeats` times. Replayed documents ("doc" examples) are drawn by their repeats, with
    replacement, to make `doc_share` of the epoch."""
    rng = random.Random(seed * 100003 + epoch)
    cot = [i for i, e in enumerate(examples) if e["cot"]]
    docs = [i for i, e in enumerate(examples) if e.get("doc") for _ in range(e["repeats"])]
    rest = [i for i, e in enumerate(examples) if not e["cot"] and not e.get("doc") for _ in range(e.get("repeats", 1))]
    if stage in ("sft2", "sft3") and cot and rest and 0 <= cot_share < 1:
        n_cot = round(len(rest) * cot_share / (1 - cot_share))
        order = rest + [cot[j % len(cot)] for j in rng.sample(range(max(n_cot, len(cot))), n_cot)]
    else:
        order = cot + rest
    if docs and 0 < doc_share < 1:
        order += rng.choices(docs, k=round(len(order) * doc_share / (1 - doc_share)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches = []
    for w in range(0, len(order), window):  # length bucketing: similar lengths share a batch, less padding
        chunk = sorted(order[w:w + window], key=lambda i: length_of(examples[i]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # the ragged tail batch is dropped
    rng.shuffle(batches)
    return batches


class Stream:
    """Global batch for step s: epochs follow one another; `position(s)` = (epoch, batch in epoch)."""

    def __init__(self, examples, sc, seed):
        self.examples, self.sc, self.seed, self.cache = examples, sc, seed, {}
        self.n_batches = None  # batches per epoch, the same for every epoch

    def epoch(self, e):
        if e not in self.cache:
            self.cache = {e: epoch_order(self.examples, self.sc.stage, self.sc.cot_share, self.sc.batch_size,
                                         self.sc.bucket_batches, self.seed, e, self.sc.pretrain_share)}
            if not self.cache[e]:
                raise ConfigError(f"fewer examples ({len(self.examples)}) than sft.batch_size ({self.sc.batch_size})")
        return self.cache[e]

    def position(self, step):
        if self.n_batches is None:  # counted once: asking epoch(0) each step would evict (and rebuild) epoch e
            self.n_batches = len(self.epoch(0))
        return divmod(step, self.n_batches)

    def batch(self, step):
        epoch, index = self.position(step)
        return self.epoch(epoch)[index]


def collate(seqs, pad_id, device):
    """Right-padded (B, T) input ids, attention mask and target mask."""
    T = max(len(s["ids"]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    target = torch.zeros((len(seqs), T), dtype=torch.float32)
    for b, s in enumerate(seqs):
        n = len(s["ids"])
        ids[b, :n] = torch.tensor(s["ids"])
        attn[b, :n] = 1
        target[b, :n] = torch.tensor(s["mask"], dtype=torch.float32)
    return ids.to(device), attn.to(device), target.to(device)


# -----------------------------------------------------------------------------
# Losses: pure functions of tensors -> (loss, stats)

def token_logps(model, ids, attn):
    """(B, T-1) log p(ids[:, t+1] | ids[:, :t+1]) in float32 (the logits are bf16 under bf16=true)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return -F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


def next_token_loss(logps, target, n_targets):
    """L2/L3 summed over this micro-batch's targets and divided by the global batch's target count n_targets,
    so micro-batch losses add up to the global mean: (loss, stats)."""
    nll_sum = -(logps * target).sum()
    return nll_sum / n_targets, {"nll_sum": nll_sum.item(), "targets": target.sum().item()}


def sft1_loss(lp_chosen, lp_rejected, alpha, n_pairs):
    """L1 = -log sigmoid(lp_c - lp_r) - alpha * lp_c per pair, lp = length-normalised continuation log-prob;
    summed over this micro-batch's pairs and divided by the global pair count n_pairs: (loss, stats)."""
    per_pair = -F.logsigmoid(lp_chosen - lp_rejected) - alpha * lp_chosen
    margin = (lp_chosen - lp_rejected).detach()
    return per_pair.sum() / n_pairs, {"loss_sum": per_pair.sum().item(), "acc_sum": (margin > 0).float().sum().item(),
                                      "margin_sum": margin.sum().item(), "lp_chosen_sum": lp_chosen.sum().item()}


def continuation_logp(logps, target):
    """Length-normalised log-prob of each row's target tokens: (B,)."""
    return (logps * target).sum(-1) / target.sum(-1).clamp(min=1)


# -----------------------------------------------------------------------------
# One optimizer step: this rank's share of the global batch, in micro-batches

def train_step(model, examples, batch, sc, rank, world_size, device, pad_id):
    """Forward/backward over this rank's micro-batches; returns the global batch's stats (summed over ranks)."""
    per_rank = len(batch) // world_size
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    micro = [mine[i:i + sc.device_batch_size] for i in range(0, len(mine), sc.device_batch_size)]
    # normalisers over the whole global batch, known to every rank: no extra communication
    n_targets = sum(sum(examples[i]["mask"][1:]) for i in batch) if sc.stage != "sft1" else None
    totals = {}
    for k, part in enumerate(micro):
        sync = contextlib.nullcontext() if k == len(micro) - 1 or not isinstance(model, DDP) else model.no_sync()
        with sync:
            if sc.stage == "sft1":
                seqs = [examples[i]["chosen"] for i in part] + [examples[i]["rejected"] for i in part]
                ids, attn, target = collate(seqs, pad_id, device)
                lp = continuation_logp(token_logps(model, ids, attn), target[:, 1:])
                loss, stats = sft1_loss(lp[:len(part)], lp[len(part):], sc.alpha, len(batch))
            else:
                ids, attn, target = collate([examples[i] for i in part], pad_id, device)
                loss, stats = next_token_loss(token_logps(model, ids, attn), target[:, 1:], n_targets)
            (loss * world_size).backward()  # DDP/FSDP average the gradients over ranks: undo it to get the sum
        stats["tokens"] = attn.sum().item()
        for key, v in stats.items():
            totals[key] = totals.get(key, 0.0) + v
    keys = sorted(totals)  # sum the stats over ranks (for logging only)
    totals = dict(zip(keys, all_reduce([totals[k] for k in keys])))
    if sc.stage == "sft1":
        n = len(batch)
        return {"loss": totals["loss_sum"] / n, "acc": totals["acc_sum"] / n, "margin": totals["margin_sum"] / n,
                "lp_chosen": totals["lp_chosen_sum"] / n, "tokens": totals["tokens"]}
    return {"loss": totals["nll_sum"] / n_targets, "tokens": totals["tokens"]}


def lr_factor(step, sc, steps):
    """Linear warm-up to 1, then cosine down to min_lr_ratio."""
    if step < sc.warmup_steps:
        return (step + 1) / sc.warmup_steps
    progress = (step - sc.warmup_steps) / max(1, steps - sc.warmup_steps)
    return sc.min_lr_ratio + (1 - sc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# Held-out metrics: teacher-forced, on dev trajectories the model never trained on

@torch.no_grad()
def heldout_metrics(model, tokenizer, env, rows, device, batch_size=32, max_len=512):
    """Mean next-token loss on the model's tokens of dev CoA rows and CoT rows of well-known facts (what sft2
    trains on), and the perplexity of the real observations in dev CoA rows (what sft3 should lower: the
    internal world model)."""
    model.eval()
    sums = {"model": [0.0, 0], "obs": [0.0, 0]}
    seqs, cache = [], {}
    for row in rows:
        if row["type"] == "coa" or (row["type"] == "cot" and not row.get("needs_search", True)):
            plain = encode_trajectory(tokenizer, env, row["question"], row["segments"], True, (), max_len, cache)
            full = encode_trajectory(tokenizer, env, row["question"], row["segments"], False, (), max_len, cache)
            obs = [int(f and not p) for f, p in zip(full["mask"], plain["mask"])]  # the env segments' tokens
            seqs.append({"ids": plain["ids"], "mask": plain["mask"], "obs": obs})
    for i in range(0, len(seqs), batch_size):
        part = seqs[i:i + batch_size]
        ids, attn, target = collate(part, tokenizer.pad_token_id, device)
        _, _, obs = collate([{"ids": s["ids"], "mask": s["obs"]} for s in part], tokenizer.pad_token_id, device)
        logps = token_logps(model, ids, attn)
        for key, m in (("model", target[:, 1:]), ("obs", obs[:, 1:])):
            sums[key][0] += -(logps * m).sum().item()
            sums[key][1] += int(m.sum().item())
    model.train()
    out = {"heldout_loss": sums["model"][0] / max(1, sums["model"][1])}
    if sums["obs"][1]:
        out["heldout_obs_ppl"] = math.exp(sums["obs"][0] / sums["obs"][1])
    return out


# -----------------------------------------------------------------------------
# The whole stage

def resolve_init(init, cfg):
    """A model folder from sft.init: base, an existing path, a stage output under run.dir, or a hub name."""
    from data import base_model_path
    if init == "base":
        return base_model_path(cfg)
    return model_path(init, cfg.run.dir, f"sft.init={init!r}")


def main(argv=None):
    from data import ModelConfig, read_pretrain, save_atomic
    from tools import EnvConfig, RunConfig, load_config, load_model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per run: ours
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "model": ModelConfig, "sft": SFTConfig}, argv, own="sft",
                      flags=RUN_FLAGS)
    run, env, sc = cfg.run, cfg.env, cfg.sft
    check_bf16(sc.bf16, sc.parallel, "sft")
    steps = sc.steps or getattr(sc, f"{sc.stage}_steps")
    if steps == 0:
        print0(f"sft: 0 steps for stage {sc.stage}: nothing to do")
        return
    rank, world_size, device = setup_dist(run)
    if sc.batch_size % world_size:
        raise ConfigError(f"config: sft.batch_size ({sc.batch_size}) must divide by the number of ranks ({world_size})")
    out = sc.out or sc.stage
    out_dir, ckpt_dir = os.path.join(run.dir, out), os.path.join(run.dir, out + ".ckpt")
    metrics_path = os.path.join(run.dir, out + ".metrics.jsonl")
    if rank == 0:
        claim_run(run.dir, out, cfg.flags)  # before anything is loaded or written
    barrier()
    ckpt = resume_checkpoint(ckpt_dir) if "resume" in cfg.flags else None
    if finished_run(out_dir, ckpt, steps):
        print0(f"sft: {out_dir} is finished ({steps} steps): nothing to do (--overwrite starts over)")
        if rank == 0:
            release_run(run.dir, out)
        return
    start_logging(run, out, cfg.to_dict(), rank)
    random.seed(run.seed)
    torch.manual_seed(run.seed)

    # 1) model, data, optimizer
    init = resolve_init(sc.init, cfg) if rank == 0 else None
    if is_dist():  # rank 0 may have built the base model: everyone reads its path after it exists
        holder = [init]
        dist.broadcast_object_list(holder)
        init = holder[0]
    model, tokenizer = load_model(init, run, device=device, dtype=master_dtype(run))
    model.config.use_cache = False
    synth = os.path.join(run.data_dir, "synth")
    if sc.stage == "pretrain":
        examples = pretrain_examples(read_pretrain(sc.data or os.path.join(run.data_dir, "pretrain.jsonl")),
                                     tokenizer, env)
    else:
        examples = build_examples(read_synth(sc.data or os.path.join(synth, "train.jsonl")), sc.stage, tokenizer,
                                  env, sc.max_len)
        if sc.pretrain_share > 0 and sc.stage != "sft1":  # replay: pre-training documents join, drawn by popularity
            examples += [{**e, "doc": True} for e in pretrain_examples(
                read_pretrain(os.path.join(run.data_dir, "pretrain.jsonl")), tokenizer, env)]
    stream = Stream(examples, sc, run.seed)
    ddp_model = wrap_model(model, device, sc.parallel, sc.bf16)
    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, sc, steps))
    print0(f"sft: stage {sc.stage}, init {init}, {len(examples)} examples "
           f"({sum(e['cot'] for e in examples)} cot), {len(stream.epoch(0))} batches/epoch, {steps} steps, "
           f"{world_size} rank(s) on {device}")

    # 2) resume: weights, optimizer, scheduler, RNG; the data position follows from the step
    start = 0
    if ckpt:
        meta = load_checkpoint(ckpt, ddp_model, optimizer, scheduler)
        start = meta["step"]
        print0(f"sft: resumed from {ckpt} at step {start}")
    elif rank == 0:  # --resume before any whole checkpoint (claim_run dealt with the rest): start afresh
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if rank == 0:
        os.makedirs(run.dir, exist_ok=True)
        truncate_log(metrics_path, start)  # from the start: a fresh log

    # 3) the loop
    bar = progress_bar(range(start, steps), initial=start, total=steps, disable=rank != 0, desc=f"sft {sc.stage}")
    t_last = time.time()
    for step in bar:
        stats = train_step(ddp_model, examples, stream.batch(step), sc, rank, world_size, device,
                           tokenizer.pad_token_id)
        grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), sc.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.time()
        epoch, index = stream.position(step)
        row = {"step": step + 1, **stats, "lr": lr, "grad_norm": float(grad_norm), "epoch": epoch,
               "tok_s": stats["tokens"] / max(now - t_last, 1e-9)}
        t_last = now
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_s']:.0f}")
        if rank == 0:
            log_line(metrics_path, row)
        # the last step's too: --resume of a finished run knows it is finished, and more steps= continue it
        if (sc.save_every and (step + 1) % sc.save_every == 0) or step + 1 == steps:
            save_checkpoint(ckpt_dir, step + 1, ddp_model, optimizer, scheduler, keep=sc.keep_ckpts,
                            meta={"config": cfg.to_dict(), "init": init, "data_position": [epoch, index + 1]})

    # 4) the output folder, then held-out metrics
    state_dict = full_state_dict(ddp_model)  # gathers the shards under FSDP2: every rank takes part
    if rank == 0:
        final = plain_copy(ddp_model, state_dict, device)
        save_atomic(out_dir, final, tokenizer)
        heldout = sc.heldout or os.path.join(synth, "dev.jsonl")
        if heldout != "none" and os.path.exists(heldout):
            metrics = heldout_metrics(final, tokenizer, env, read_synth(heldout), device, max_len=sc.max_len)
            log_line(metrics_path, {"step": steps, "final": True, **metrics})
            print0("sft: held-out", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        print0(f"sft: wrote {out_dir}")
        release_run(run.dir, out)
    barrier()  # the process group stays up: a pipeline may call main() again in this process


if __name__ == "__main__":
    cli(main)
