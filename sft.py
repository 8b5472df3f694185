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
        the search returns, its internal world model (used by rl.py's env=policy). Two knobs the paper does not
        have (defaults: its plain SFT-3): obs_weight sets m_t on observation tokens (1 = no mask, 0 = SFT-2's
        mask), sft3_cot_share SFT-3's own share of CoT rows (configs/tiny.yaml: 0.3 and 0, docs/tiny_world.md).

Training: AdamW, cosine schedule with linear warm-up, gradient clipping, gradient accumulation
(batch_size sequences per step over all ranks, device_batch_size per forward), length bucketing (batches are cut
from windows of similar-length trajectories). Losses are normalised over the whole global batch (token or pair
counts known to every rank), so 1 process and N processes take the same step. How long: `steps`, or `epochs`
passes over the stage's examples (the paper's unit: 2), or the stage's default; steps=0 is nothing to do. A
trajectory longer than `max_len` is dropped, never cut (its answer comes last), and the count is printed (a
warning past 5% of the data). grad_checkpointing recomputes activations in backward (long trajectories).
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
    python sft.py --config configs/tiny.yaml stage=sft2 init=cot eval_every=0   # the last step's weights, no dev curve
    torchrun --nproc_per_node 2 sft.py --config configs/tiny.yaml         # 2 CPU processes (gloo), same losses
    python sft.py --config configs/tiny.yaml run.device=cuda parallel=fsdp bf16=true   # one GPU, bf16 compute

Model selection on dev (eval_every, sft2 and sft3 only): every eval_every steps the model answers eval_n dev
questions greedily with the real tool (rank 0, a checkpoint each time); the metrics log gets dev EM overall and
per question kind, the output folder gets the weights of the step with the best dev EM (the first of equals), and
with patience > 0 the stage ends `patience` evals after its best once that best has reached stop_em. Why, on the
tiny world (configs/tiny.yaml, dev EM every 50 steps; docs/tiny_world.md): dev EM leaves the copy plateau between
~350 and ~750 steps, draw by draw, then swings by about 0.1 from one eval to the next while the lr is high (seed 0:
1.000 at step 600, 0.890 at 700), the wrong answers being skipped searches ("I know this one" for an unseen person
who shares a famous person's first name); the paper's SFT-3 at lr 3e-3 swings further (0.215 -> 0.985 -> 0.725;
configs/tiny.yaml's obs_weight and sft3_cot_share steady it). The last step is then a draw from the swing, and
another CPU's float path draws another one.

Departures from the paper: the tiny world's CoT data comes from a scripted teacher, not a reasoning model;
sft1's pairs may have an empty prefix with real teachers (data.py); the DPO-style term has no beta and no
reference model (the formula above, as in the paper's stage-1 loss).
lora_rank > 0 trains LoRA adapters (peft, plumbing.add_lora) in fp32 on a frozen base in its compute dtype (bf16
on GPU): one GPU at 7B. Not here: sequence packing (length bucketing instead), the full evaluation (eval.py).
"""
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plumbing import (RUN_FLAGS, all_reduce, barrier, check_bf16, claim_and_resume, is_dist,
                      log_line, nothing_left, plain_copy, print0, progress_bar, release_run, resume_run,
                      save_checkpoint, setup_dist, start_logging, unwrap)
from plumbing import backward_global, clip_grad_norm, collate, cosine_lr, grad_sync, max_over_ranks, sum_over_ranks
from plumbing import broadcast0, generation_mode, load_checkpoint, load_tokenizer, load_trainee, resolve_model
from config import ConfigError, RunConfig, cli, load_config, read_jsonl, read_metrics
from data import ModelConfig, load_qa, save_atomic
from rollout import rollout
from tools import EnvConfig, build_prompt, loss_mask, make_environment, reward


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
    steps: int = -1  # optimizer steps; 0 = nothing to do; -1 = `epochs` passes if set, else the stage's default below
    epochs: float = 0.0  # passes over the stage's examples, the paper's unit (2 for every stage); used when steps=-1;
                         # 0 = the stage's default step count
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
    max_len: int = 512  # longest trajectory (prompt included) trained on; a longer one is dropped and counted, never
                        # cut (its answer comes last: a cut one would teach a trajectory that never answers)
    parallel: str = "ddp"  # ddp | fsdp (FSDP2) | none, under torchrun
    bf16: bool = False  # bf16 compute, fp32 master weights (FSDP2 MixedPrecisionPolicy; needs parallel=fsdp)
    grad_checkpointing: bool = False  # recompute activations in backward: long trajectories of large models
    save_every: int = 100  # checkpoint every this many steps (0 = none before the end; the last step's is kept)
    keep_ckpts: int = 2  # newest checkpoints kept
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen base (plumbing.add_lora; one GPU at 7B);
                        # the output folder holds them merged into the weights; 0 = every weight trains
    eval_every: int = 0  # sft2/sft3 (the stages that act): steps between greedy dev evals (real tool, eval_n
                         # questions of <run.data_dir>/dev.jsonl), each with a checkpoint: the curve (dev_em, per kind,
                         # in the metrics), and the output is the weights of the step with the best dev EM (the first
                         # of equals); 0 = none, the output is the last step's
    eval_n: int = 200  # dev questions per eval
    patience: int = 0  # with eval_every: the stage ends after this many evals without a new best dev EM, once the best
                       # has reached stop_em (a draw still on the copy plateau keeps training); 0 = every step runs
    stop_em: float = 0.9  # the dev EM the best must reach before sft.patience may end the stage
    sft3_cot_share: float = -1.0  # sft3's own cot_share; -1 = cot_share (the paper: SFT-3 trains on SFT-2's data)
    obs_weight: float = 1.0  # sft3: weight of the observation tokens in L3 (1 = the paper's plain no-mask loss)
    lora_alpha: float = 32.0  # LoRA: the adapters' output is scaled by lora_alpha / lora_rank; one alpha for every
                              # rank keeps the best lr about the same across ranks ("LoRA Without Regret", which
                              # also finds it ~10x full fine-tuning's lr)

    RANGES = {"cot_share": "[0, 1)", "alpha": "[0, inf)", "steps": "[-1, inf)", "epochs": "[0, inf)",
              "cot_steps": "[0, inf)",
              "sft1_steps": "[0, inf)", "sft2_steps": "[0, inf)", "sft3_steps": "[0, inf)", "batch_size": "[1, inf)",
              "device_batch_size": "[1, inf)", "lr": "(0, inf)", "min_lr_ratio": "[0, 1]", "warmup_steps": "[0, inf)",
              "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "bucket_batches": "[1, inf)", "max_len": "[2, inf)",
              "save_every": "[0, inf)", "keep_ckpts": "[0, inf)",
              "pretrain_share": "[0, 1)", "pretrain_steps": "[0, inf)",
              "lora_rank": "[0, inf)", "lora_alpha": "(0, inf)",
              "eval_every": "[0, inf)", "eval_n": "[1, inf)", "patience": "[0, inf)", "stop_em": "[0, 1]",
              "sft3_cot_share": "[-1, 1)", "obs_weight": "[0, 1]"}
    CHOICES = {"stage": ("pretrain", "cot", "sft1", "sft2", "sft3"), "parallel": ("ddp", "fsdp", "none")}

    def stage_cot_share(self):
        """The share of CoT rows in this stage's stream: sft3_cot_share for sft3 when set, else cot_share."""
        return self.sft3_cot_share if self.stage == "sft3" and self.sft3_cot_share >= 0 else self.cot_share


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


def encode_segments(tokenizer, segments, observation_weight=0, cache=None):
    """(ids, mask) of a list of segments, each tokenized on its own; the mask is tools.loss_mask's, by who wrote it."""
    ids, mask = [], []
    for seg, piece in zip(segments, encode_texts(tokenizer, [seg["text"] for seg in segments], cache)):
        ids += piece
        mask += loss_mask(seg["who"], len(piece), observation_weight)
    return ids, mask


def encode_trajectory(tokenizer, env, question, segments, observation_weight=0, context=(), cache=None):
    """{"ids", "mask"} of prompt + context + segments + EOS; mask = each token's weight as a target (1 on the
    model's tokens, observation_weight on the environment's, 0 on the prompt and context).

    The prompt is tokenized as rollout.encode_prompt does it. context: segments that are read but never trained
    on (a pair's shared prefix). mask[t] says whether ids[t] is a target (predicted from ids[:t]). Never cut: a
    trajectory longer than sft.max_len is dropped whole (drop_long).
    cache: {text: ids}, shared across calls so a data set is tokenized in a few batched calls.
    """
    ids = list(encode_texts(tokenizer, [build_prompt(tokenizer, question, env)], cache)[0])
    mask = [0] * len(ids)
    ctx_ids, _ = encode_segments(tokenizer, context, cache=cache)
    ids, mask = ids + ctx_ids, mask + [0] * len(ctx_ids)
    seg_ids, seg_mask = encode_segments(tokenizer, segments, observation_weight, cache)
    ids, mask = ids + seg_ids + [tokenizer.eos_token_id], mask + seg_mask + [1]
    return {"ids": ids, "mask": mask}


def build_examples(rows, stage, tokenizer, env, max_len, obs_weight=1.0):
    """The stage's examples: {"ids", "mask"} (cot, sft2, sft3) or {"chosen", "rejected"} (sft1), plus "cot";
    those longer than max_len are dropped and counted (drop_long). obs_weight: sft3's weight of observation tokens."""
    out, cache = [], {}
    texts = [build_prompt(tokenizer, r["question"], env) for r in rows]
    texts += [s["text"] for r in rows for part in ("segments", "prefix", "chosen", "rejected") for s in r.get(part, [])]
    encode_texts(tokenizer, texts, cache)  # every text at once: the fast tokenizer batches them
    for row in rows:
        if stage == "sft1":
            if row["type"] == "pair":
                enc = lambda part: encode_trajectory(tokenizer, env, row["question"], row[part], 0, row["prefix"],
                                                     cache)
                out.append({"chosen": enc("chosen"), "rejected": enc("rejected"), "cot": False})
        elif row["type"] == "cot" and (stage == "cot" or not row.get("needs_search", True)):
            # sft2/3 mix in CoT of well-known facts only: closed-book CoT on questions that need a search would
            # teach the model to skip the search there
            out.append({**encode_trajectory(tokenizer, env, row["question"], row["segments"], 0, (), cache),
                        "cot": True})
        elif row["type"] == "coa" and stage in ("sft2", "sft3"):
            weight = obs_weight if stage == "sft3" else 0
            out.append({**encode_trajectory(tokenizer, env, row["question"], row["segments"], weight, (), cache),
                        "cot": False})
    if not out:
        raise ConfigError(f"no training rows for stage {stage} (synthesise with: python data.py ... --synth)")
    return drop_long(out, max_len, f"stage {stage}")


HIGH_DROP_SHARE = 0.05  # a data set losing more than this to max_len gets a warning: the stage trains on a biased part


def longest(example):
    """The longest sequence an example feeds the model (a pair feeds its two continuations separately)."""
    return len(example["ids"]) if "ids" in example else max(len(example["chosen"]["ids"]),
                                                            len(example["rejected"]["ids"]))


def drop_long(examples, max_len, what):
    """The examples that fit max_len tokens. The others are dropped, never cut: a trajectory's answer comes last,
    so a cut one would teach the model to stop before answering. How many is printed in one line, as a warning
    when it is more than HIGH_DROP_SHARE of them (long trajectories are the multi-search ones: the rest is biased)."""
    kept = [e for e in examples if longest(e) <= max_len]
    dropped = len(examples) - len(kept)
    if dropped:
        share = dropped / len(examples)
        print0(f"{'warning: ' if share > HIGH_DROP_SHARE else ''}sft: {what}: {dropped} of {len(examples)} "
               f"trajectories ({share:.1%}) are longer than sft.max_len={max_len} tokens and were dropped"
               f"{' (raise sft.max_len)' if share > HIGH_DROP_SHARE else ''}")
    if examples and not kept:
        raise ConfigError(f"sft: {what}: every trajectory is longer than sft.max_len={max_len}")
    return kept


def pretrain_examples(rows, tokenizer, env, max_len):
    """One example per document, written exactly as the real tool writes a one-document observation (the whole
    sequence learnt), with its repeats: epoch_order puts it that many times in an epoch."""
    from tools import format_observation
    texts = [format_observation([r["contents"]], tokenizer, env) for r in rows]
    return drop_long([{"ids": ids + [tokenizer.eos_token_id], "mask": [1] * (len(ids) + 1), "cot": False,
                       "repeats": r["repeats"]} for r, ids in zip(rows, encode_texts(tokenizer, texts))], max_len,
                     "pre-training documents")


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
            self.cache = {e: epoch_order(self.examples, self.sc.stage, self.sc.stage_cot_share(), self.sc.batch_size,
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


# -----------------------------------------------------------------------------
# Losses: pure functions of tensors -> (loss, stats)

def token_logps(model, ids, attn):
    """(B, T-1) log p(ids[:, t+1] | ids[:, :t+1]) in float32 (the logits are bf16 under bf16=true).

    Not rl.token_logps: that one scores only the completion of left-padded rows, at the sampling temperature, with
    entropy, as logit - logsumexp; this one every next token of right-padded rows by cross_entropy. The two differ
    in the last bits, so one function for both would change one stage's trained weights."""
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
        with grad_sync(model, last=k == len(micro) - 1):
            if sc.stage == "sft1":
                seqs = [examples[i]["chosen"] for i in part] + [examples[i]["rejected"] for i in part]
                ids, attn, target = collate(seqs, pad_id, device)
                lp = continuation_logp(token_logps(model, ids, attn), target[:, 1:])
                loss, stats = sft1_loss(lp[:len(part)], lp[len(part):], sc.alpha, len(batch))
            else:
                ids, attn, target = collate([examples[i] for i in part], pad_id, device)
                loss, stats = next_token_loss(token_logps(model, ids, attn), target[:, 1:], n_targets)
            backward_global(loss)
        stats["tokens"] = attn.sum().item()
        for key, v in stats.items():
            totals[key] = totals.get(key, 0.0) + v
    totals = sum_over_ranks(totals)  # for logging only
    if sc.stage == "sft1":
        n = len(batch)
        return {"loss": totals["loss_sum"] / n, "acc": totals["acc_sum"] / n, "margin": totals["margin_sum"] / n,
                "lp_chosen": totals["lp_chosen_sum"] / n, "tokens": totals["tokens"]}
    return {"loss": totals["nll_sum"] / n_targets, "tokens": totals["tokens"]}


# -----------------------------------------------------------------------------
# Held-out metrics: teacher-forced, on dev trajectories the model never trained on

@torch.no_grad()
def heldout_metrics(model, tokenizer, env, rows, device, batch_size, max_len, rank=0, world_size=1):
    """Mean next-token loss on the model's tokens of dev CoA rows and CoT rows of well-known facts (what sft2
    trains on), and the perplexity of the real observations in dev CoA rows (what sft3 should lower: the
    internal world model). Every rank scores its share of the rows on the model as it trains (FSDP2 shards
    included: no gathered copy) and the sums are added over ranks; rows longer than max_len are left out."""
    seqs, cache = [], {}
    for row in rows:
        if row["type"] == "coa" or (row["type"] == "cot" and not row.get("needs_search", True)):
            plain = encode_trajectory(tokenizer, env, row["question"], row["segments"], 0, (), cache)
            full = encode_trajectory(tokenizer, env, row["question"], row["segments"], 1, (), cache)
            obs = [int(f and not p) for f, p in zip(full["mask"], plain["mask"])]  # the env segments' tokens
            seqs.append({"ids": plain["ids"], "mask": plain["mask"], "obs": obs})
    seqs = drop_long(seqs, max_len, "held-out rows")[rank::world_size]
    # FSDP2 gathers each layer inside forward: every rank runs the same number of forwards (filler: no targets)
    n_batches = max_over_ranks(math.ceil(len(seqs) / batch_size))
    was_training = model.training
    model.eval()
    sums = [0.0, 0, 0.0, 0]  # model-token loss, model tokens, observation loss, observation tokens
    for b in range(n_batches):
        part = seqs[b * batch_size:(b + 1) * batch_size] or [{"ids": [tokenizer.pad_token_id] * 2, "mask": [0, 0],
                                                               "obs": [0, 0]}]
        ids, attn, target = collate(part, tokenizer.pad_token_id, device)
        _, _, obs = collate([{"ids": s["ids"], "mask": s["obs"]} for s in part], tokenizer.pad_token_id, device)
        logps = token_logps(model, ids, attn)
        for k, m in enumerate((target[:, 1:], obs[:, 1:])):
            sums[2 * k] += -(logps * m).sum().item()
            sums[2 * k + 1] += int(m.sum().item())
    model.train(was_training)
    loss, n_model, obs_loss, n_obs = all_reduce(sums)
    out = {"heldout_loss": loss / max(1, n_model)}
    if n_obs:
        out["heldout_obs_ppl"] = math.exp(obs_loss / n_obs)
    return out


@torch.no_grad()
def dev_em(model, tokenizer, rows, env, environment):
    """Greedy EM on dev questions with the real tool, overall and per question kind: the curve that shows the
    model leaving the copy plateau (rank 0 alone; a pretrained model's dev set is small enough)."""
    with generation_mode(model) as policy:  # FSDP2 (bf16=true): the shards gathered once for the whole rollout
        episodes = rollout(policy, tokenizer, rows, env, environment)
    by_kind = {}
    for ep, row in zip(episodes, rows):
        by_kind.setdefault(row.get("kind", "all"), []).append(reward(ep.text, row["golden_answers"], env, "em"))
    out = {"dev_em": sum(map(sum, by_kind.values())) / len(rows)}
    return out | ({f"dev_em_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())} if len(by_kind) > 1 else {})


class DevBest:
    """sft.eval_every's bookkeeping: the best dev EM so far and its step, and the early stop (sft.patience evals
    without a new best, once the best has reached sft.stop_em). Rebuilt from the metrics log on --resume."""

    def __init__(self, patience, stop_em, metrics_path=None):
        self.patience, self.stop_em = patience, stop_em
        self.em, self.step, self.since = -1.0, None, 0
        if metrics_path and os.path.exists(metrics_path):
            for _, row in read_metrics(metrics_path):
                if "dev_em" in row and not row.get("final"):
                    self.update(row["step"], row["dev_em"])

    def update(self, step, em):
        """Record step's dev EM; True when it is a new best."""
        if em > self.em:
            self.em, self.step, self.since = em, step, 0
            return True
        self.since += 1
        return False

    def stop(self):
        return bool(self.patience) and self.em >= self.stop_em and self.since >= self.patience


# -----------------------------------------------------------------------------
# The whole stage

def stage_examples(sc, run, env, tokenizer):
    """The stage's examples: pre-training documents, or synthesised trajectories (plus replayed documents)."""
    from data import read_pretrain
    pretrain = os.path.join(run.data_dir, "pretrain.jsonl")
    if sc.stage == "pretrain":
        return pretrain_examples(read_pretrain(sc.data or pretrain), tokenizer, env, sc.max_len)
    examples = build_examples(read_synth(sc.data or os.path.join(run.data_dir, "synth", "train.jsonl")), sc.stage,
                              tokenizer, env, sc.max_len, sc.obs_weight)
    if sc.pretrain_share > 0 and sc.stage != "sft1":  # replay: pre-training documents join, drawn by popularity
        examples += [{**e, "doc": True} for e in pretrain_examples(read_pretrain(pretrain), tokenizer, env,
                                                                    sc.max_len)]
    return examples


def planned_steps(sc):
    """sft.steps when given (0: nothing to do); None when sft.epochs decides (known once the data is read); else
    the stage's default."""
    if sc.steps >= 0:
        return sc.steps
    return None if sc.epochs else getattr(sc, f"{sc.stage}_steps")


def shared_init(sc, cfg, rank):
    """sft.init's folder (plumbing.resolve_model), resolved on rank 0, which may build the base model there: the
    other ranks receive its path once it exists."""
    init = resolve_model(sc.init, cfg, "sft.init") if rank == 0 else None
    if is_dist():
        holder = [init]
        dist.broadcast_object_list(holder)
        init = holder[0]
    return init


def finish(ddp_model, tokenizer, cfg, out, steps, metrics_path, device, rank, world_size):
    """Held-out metrics on the model as it trained (every rank its share), then the output folder."""
    run, sc = cfg.run, cfg.sft
    heldout = sc.heldout or os.path.join(run.data_dir, "synth", "dev.jsonl")
    if heldout != "none" and os.path.exists(heldout):
        metrics = heldout_metrics(unwrap(ddp_model), tokenizer, cfg.env, read_synth(heldout), device,
                                  sc.device_batch_size, sc.max_len, rank, world_size)
        if rank == 0:
            log_line(metrics_path, {"step": steps, "final": True, **metrics})
        print0("sft: held-out", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    final = plain_copy(ddp_model, device, torch.bfloat16 if sc.bf16 else None)  # FSDP2: every rank takes part
    if rank == 0:
        out_dir = os.path.join(run.dir, out)
        save_atomic(out_dir, final, tokenizer)
        print0(f"sft: wrote {out_dir}")
        release_run(run.dir, out)
    barrier()  # the process group stays up: a pipeline may call main() again in this process


def main(argv=None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per run: ours
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "model": ModelConfig, "sft": SFTConfig}, argv, own="sft",
                      flags=RUN_FLAGS)
    run, env, sc = cfg.run, cfg.env, cfg.sft
    check_bf16(sc.bf16, sc.parallel, "sft")
    steps = planned_steps(sc)
    if steps == 0:
        print0(f"sft: 0 steps for stage {sc.stage}: nothing to do")
        return
    rank, world_size, device = setup_dist(run)
    if sc.batch_size % world_size:
        raise ConfigError(f"config: sft.batch_size ({sc.batch_size}) must divide by the number of ranks ({world_size})")
    out = sc.out or sc.stage
    ckpt_dir, metrics_path = os.path.join(run.dir, out + ".ckpt"), os.path.join(run.dir, out + ".metrics.jsonl")
    ckpt = claim_and_resume(run.dir, out, cfg.flags, rank)  # before anything is loaded or written

    # 1) data: the tokenizer alone reads it, so the step count (sft.epochs) is known before the model loads
    init = shared_init(sc, cfg, rank)
    tokenizer = load_tokenizer(init)
    examples = stage_examples(sc, run, env, tokenizer)
    stream = Stream(examples, sc, run.seed)
    if steps is None:  # the paper's unit: passes over this stage's examples
        steps = math.ceil(sc.epochs * len(stream.epoch(0)))
    if nothing_left(run.dir, out, ckpt, steps, "sft", rank):
        return
    start_logging(run, out, cfg.to_dict(), rank)
    random.seed(run.seed)
    torch.manual_seed(run.seed)

    # 2) model and optimizer
    ddp_model, _ = load_trainee(init, run, device, sc)  # LoRA: finish's plain_copy merges the adapters
    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, steps, sc.warmup_steps, sc.min_lr_ratio))
    print0(f"sft: stage {sc.stage}, init {init}, {len(examples)} examples "
           f"({sum(e['cot'] for e in examples)} cot), {len(stream.epoch(0))} batches/epoch, {steps} steps "
           f"({steps / len(stream.epoch(0)):.2f} epochs), {world_size} rank(s) on {device}")

    # the dev curve (sft.eval_every): greedy, the real tool, on rank 0 while the others wait
    curve = None
    if sc.stage not in ("sft2", "sft3"):  # cot, sft1 and pretrain never act alone: dev EM does not measure them
        sc = dataclasses.replace(sc, eval_every=0)
    if sc.eval_every:
        if world_size > 1 and sc.parallel == "fsdp":
            raise ConfigError("config: sft.eval_every runs on rank 0 alone: not with parallel=fsdp on several ranks")
        if rank == 0:
            real = dataclasses.replace(env, env="real")
            curve = (load_qa(os.path.join(run.data_dir, "dev.jsonl"))[:sc.eval_n], real,
                     make_environment(real, run, tokenizer))

    # 3) resume: weights, optimizer, scheduler, RNG; the data position follows from the step
    meta = resume_run(ckpt, ckpt_dir, ddp_model, optimizer, scheduler, metrics_path, "sft", rank)
    start, last = (steps if meta.get("stopped") else meta["step"]), meta["step"]  # one sft.patience stopped: done
    best = DevBest(sc.patience, sc.stop_em, metrics_path if sc.eval_every else None)

    # 4) the loop (from_pretrained hands the model over in eval mode: activation checkpointing acts in train mode)
    ddp_model.train()
    bar = progress_bar(range(start, steps), initial=start, total=steps, disable=rank != 0, desc=f"sft {sc.stage}")
    t_last = time.time()
    for step in bar:
        stats = train_step(ddp_model, examples, stream.batch(step), sc, rank, world_size, device,
                           tokenizer.pad_token_id)
        grad_norm = clip_grad_norm(ddp_model, sc.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.time()
        epoch, index = stream.position(step)
        row = {"step": step + 1, **stats, "lr": lr, "grad_norm": grad_norm, "epoch": epoch,
               "tok_s": stats["tokens"] / max(now - t_last, 1e-9)}
        t_last = now
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_s']:.0f}")
        evaluated = sc.eval_every and ((step + 1) % sc.eval_every == 0 or step + 1 == steps)
        stop, last = False, step + 1
        if evaluated:
            if curve:
                row |= dev_em(ddp_model, tokenizer, *curve)
                print0(f"sft: step {step + 1} dev EM " + " ".join(f"{k[7:] or 'all'} {v:.3f}" for k, v in
                                                                   row.items() if k.startswith("dev_em")))
            best.update(step + 1, broadcast0(row.get("dev_em")))
            stop = best.stop()
        if rank == 0:
            log_line(metrics_path, row)
        # the last step's too: --resume of a finished run knows it is finished, and more steps= continue it
        if (sc.save_every and (step + 1) % sc.save_every == 0) or step + 1 == steps or evaluated:
            save_checkpoint(ckpt_dir, step + 1, ddp_model, optimizer, scheduler, keep=sc.keep_ckpts,
                            meta={"config": cfg.to_dict(), "init": init, "data_position": [epoch, index + 1],
                                  "stopped": stop}, also_keep=best.step)
        if stop:
            print0(f"sft: stopped at step {step + 1}: {best.since} dev evals without a new best "
                   f"({best.em:.3f} at step {best.step}; sft.patience={sc.patience})")
            break
    if best.step is not None and best.step != last:  # the output: the weights of the best dev step
        load_checkpoint(os.path.join(ckpt_dir, f"step_{best.step:06d}"), ddp_model)
        print0(f"sft: the output is step {best.step}'s weights, the best dev EM ({best.em:.3f})")

    # 5) held-out metrics, then the output folder
    finish(ddp_model, tokenizer, cfg, out, steps, metrics_path, device, rank, world_size)


if __name__ == "__main__":
    cli(main)
