"""
rl.py -- stage 4: reinforcement learning of the agent with GRPO (AutoCoA, arXiv 2503.06580, Sec. 3.3).

The SFT model already writes Chains of Action; RL sharpens *when* to act and *what* to answer. Each step:

    1. rollout   every rank takes its shard of the step's prompts and samples `group_size` trajectories per
                 prompt (rollout.py). Tool calls go to the environment of the schedule: the paper's RL-1 runs
                 in a simulated environment (the policy writes its own <search_result>, or a world model does),
                 RL-2 in the real one. `sim_share` of the steps are simulated, the rest real.
    2. reward    r = 1 if the trajectory is well formed and its \\boxed{} answer matches a gold answer, else 0
                 (tools.reward; `reward: f1` gives the answer's F1 instead).
    3. advantage A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6), std off with scale_std=false (Dr. GRPO);
                 one number per trajectory, broadcast over the tokens the model wrote.
    4. update    `updates_per_step` optimizer steps on mini-batches of the episodes, each minimising

        L = agg_t [ -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A) + beta KL3_t - alpha H_t ]
        rho_t  = exp(logp_t - logp_old_t)            logp_old: the log-prob recorded at sampling (rollout.py)
        KL3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (k3 estimator, >= 0; needs a frozen reference)
        H_t    = entropy of the policy at token t (optional bonus)

       over the tokens with mask 1: prompt, padding and observation tokens (written by the environment) never
       enter the loss. The aggregation agg is one switch in grpo_loss():
         grpo     mean over a trajectory's tokens, then mean over trajectories (DeepSeekMath)
         dapo     mean over all tokens of the batch (DAPO)
         dr_grpo  sum over tokens / (trajectories x max_new_tokens), a constant normaliser (Dr. GRPO)
       Normalisers are counted over the whole mini-batch on all ranks, so 1 process and N processes give the
       same update for the same global batch.

Departures from the paper: the reward is binary EM (the paper's correctness uses a lenient match, available in
tools.lenient_match); groups whose rewards are all equal can be dropped (`drop_zero_var`); the KL coefficient may
be 0, and then no reference model is loaded.

Inputs: a model folder (`init`, default <run.dir>/sft) and QA rows (`train`, default <run.data_dir>/train.jsonl).
Outputs: <run.dir>/<out>/ (HF folder), <run.dir>/<out>.ckpt/step_XXXXXX/ (resume), <run.dir>/<out>.metrics.jsonl.

    python rl.py --config configs/tiny.yaml                                   # CPU, the tiny world
    python rl.py --config configs/tiny.yaml sim_share=0.8333 steps=60         # RL-1 (simulated) then RL-2 (real)
    python rl.py --config configs/tiny.yaml --resume                          # after a crash: same weights
    torchrun --nproc_per_node 2 rl.py --config configs/tiny.yaml              # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 rl.py --config configs/qwen7b.yaml            # 8 GPUs, FSDP2 + bf16

Not here: value functions (GRPO has none), vLLM or any separate inference engine (rollouts run on the training
weights through rollout.py's KV cache), sequence packing, multi-node launch scripts.
"""
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class RLConfig:
    # model and data
    init: str = ""  # model folder to start from; empty = <run.dir>/sft
    out: str = "rl"  # output folder name under <run.dir>
    train: str = ""  # QA JSONL to sample prompts from; empty = <run.data_dir>/train.jsonl
    eval: str = ""  # held-out QA JSONL for the eval in the log; empty = <run.data_dir>/dev.jsonl
    eval_n: int = 100  # held-out questions per eval (greedy); 0 = no eval
    eval_every: int = 0  # steps between evals; 0 = only before the first and after the last step
    # schedule
    steps: int = 60  # optimizer rounds (one rollout batch each)
    sim_share: float = 0.0  # the first round(sim_share*steps) steps use a simulated environment (paper: 5/6)
    sim_env: str = "auto"  # simulated environment: auto (worldmodel if env.worldmodel is set, else policy) | policy | worldmodel
    # rollout
    prompts_per_step: int = 16  # prompts per step, all ranks together (the paper: 48)
    group_size: int = 4  # trajectories per prompt (the paper: 5)
    temperature: float = 1.0  # sampling temperature (the paper: 0.6); the loss scores tokens at the same temperature
    top_p: float = 1.0
    # loss
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo (see the docstring)
    scale_std: bool = True  # divide advantages by the group's std (false: Dr. GRPO)
    drop_zero_var: bool = False  # drop groups whose rewards are all equal (no signal; saves compute)
    eps_low: float = 0.2  # clip range below 1 of the importance ratio
    eps_high: float = 0.2  # clip range above 1 (DAPO's clip-higher: 0.28)
    kl_coef: float = 0.0  # beta of the k3 KL to the frozen start model; 0 = no reference model at all
    entropy_coef: float = 0.0  # alpha of the entropy bonus
    reward: str = "em"  # em | f1
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: str = "0.9,0.99"  # AdamW betas, "b1,b2"
    warmup_steps: int = 0  # linear warm-up, then constant (RL keeps the lr flat)
    grad_clip: float = 1.0  # max grad norm; 0 = off
    updates_per_step: int = 1  # optimizer steps per rollout batch (mini-batches); >1 makes the ratio/clip matter
    micro_batch: int = 64  # episodes per forward/backward on one rank (gradient accumulation inside a mini-batch)
    max_bad_steps: int = 3  # NaN/inf losses in a row before the run stops
    # scale
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per decoder layer)
    bf16: bool = False  # fsdp: bf16 parameters in forward/backward, fp32 master weights and reductions
    grad_checkpointing: bool = False  # recompute activations in backward (large models)
    # bookkeeping
    save_every: int = 20  # steps between resumable checkpoints; 0 = only at the end
    keep_ckpts: int = 2  # newest checkpoints kept
    log_every: int = 1  # steps between metric lines


# -----------------------------------------------------------------------------
# The loss: pure functions from tensors to (loss, stats)

def group_advantages(rewards, group_size, scale_std=True, eps=1e-6):
    """A_i = r_i - mean(group), divided by the group's std when scale_std. rewards: (B,), group members adjacent.

    The std is the population std (correction 0): a group {0, 1} gets advantages -1 and +1.
    """
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        a = a / (r.std(dim=1, keepdim=True, correction=0) + eps)
    return a.view(-1)


def zero_variance(rewards, group_size):
    """(B,) bool: True for every member of a group whose rewards are all equal (its advantages are all 0)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1).repeat_interleave(group_size)


def loss_denominator(mask, loss_type, max_tokens=None):
    """What the aggregation divides by, for this (B, T) mask: sum it over ranks and micro-batches for the global one."""
    if loss_type == "grpo":
        return float((mask.sum(1) > 0).sum())  # trajectories with at least one model token
    if loss_type == "dapo":
        return float(mask.sum())  # model tokens
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * (max_tokens or mask.shape[1]))  # trajectories x a constant length
    raise ValueError(f"config: rl.loss_type must be grpo, dapo or dr_grpo, got {loss_type!r}")


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, eps_low=0.2, eps_high=0.2, kl_coef=0.0,
              loss_type="grpo", entropy=None, entropy_coef=0.0, max_tokens=None, denominator=None):
    """The clipped GRPO objective (docstring at the top), aggregated by loss_type. Returns (loss, stats).

    logps, old_logps, ref_logps (None when kl_coef is 0), entropy (None unless entropy_coef): (B, T) per token;
    advantages: (B,); mask: (B, T), 1 where the model wrote the token. denominator: the aggregation's normaliser
    for the global mini-batch (loss_denominator summed over ranks and micro-batches); None = this batch's own.
    """
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (B, 1): one advantage for the whole trajectory
    log_ratio = (logps - old_logps) * mask  # masked first: exp of a padded position stays finite
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    kl = torch.zeros_like(logps)
    if kl_coef:
        delta = (ref_logps - logps) * mask
        kl = torch.exp(delta) - delta - 1  # k3: unbiased for KL(pi || ref), never negative
        per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy

    tokens_per_seq = mask.sum(1)  # (B,)
    if loss_type == "grpo":  # each trajectory's token mean, then the sum over trajectories
        total = ((per_token * mask).sum(1) / tokens_per_seq.clamp(min=1)).sum()
    else:  # dapo and dr_grpo: the sum over all tokens; they differ in the denominator only
        total = (per_token * mask).sum()
    if denominator is None:
        denominator = loss_denominator(mask, loss_type, max_tokens)
    loss = total / max(denominator, 1.0)

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        # tokens whose gradient the clip removed: ratio past the bound on the side the advantage pushes
        was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"kl": float((kl * mask).sum() / n), "clip_frac": float((was_clipped * mask).sum() / n),
                 "ratio": float((ratio * mask).sum() / n), "tokens": float(mask.sum())}
        if entropy is not None:
            stats["entropy"] = float((entropy * mask).sum() / n)
    return loss, stats


def token_logps(model, input_ids, attention_mask, n_completion, temperature=1.0, with_entropy=False):
    """Log-probs (B, T) of the last T = n_completion tokens of each row under the model at `temperature`.

    Rows are [left padding | prompt | completion | right padding]; position ids count real tokens only, as in
    rollout.py's generation. Only the last T+1 logits are computed (logits_to_keep): a 150k vocabulary times the
    prompt length would not fit. Entropy (B, T) of the same distributions when with_entropy, else None.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_completion + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / max(temperature, 1e-6)  # (B, T, V): logit at t predicts token t+1
    targets = input_ids[:, -n_completion:]
    log_z = torch.logsumexp(logits, dim=-1)
    logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = log_z - (probs * logits).sum(-1)
    return logps, entropy
