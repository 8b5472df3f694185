"""
rl.py -- stage 4: reinforcement learning of the agent with GRPO (AutoCoA, arXiv 2503.06580, Sec. 3.3).

The SFT model already writes Chains of Action; RL sharpens *when* to act and *what* to answer. Each step:

    1. rollout   every rank takes its shard of the step's prompts and samples `group_size` trajectories per
                 prompt (rollout.py). Tool calls go to the environment of the schedule: the paper's RL-1 runs
                 in a simulated environment (the policy writes its own <search_result>, or a world model does),
                 RL-2 in the real one. `sim_share` of the steps are simulated, the rest real (with sim_share
                 below 1, at least the last step is real: a short run still spends real calls).
                 RL-1's prompts can be drawn where the simulator knows the world (`sim_popular`: questions about
                 people the pre-training corpus repeated often; tiny world only).
    2. reward    r = 1 if the trajectory is well formed and its \\boxed{} answer matches a gold answer, else 0
                 (tools.reward; `reward: lenient` is the paper's match: EM, or >= 70% of the gold answer's words in
                 the answer, number words as digits and filler words dropped; `reward: f1` gives the answer's F1).
    3. advantage A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6), std off with scale_std=false (Dr. GRPO);
                 one number per trajectory, broadcast over the tokens the model wrote. std is the sample std
                 (Bessel's correction, as in TRL and verl): a group {0, 1} gets -0.71 and +0.71.
    4. update    `updates_per_step` optimizer steps on mini-batches of the episodes, each minimising

        L = agg_t [ -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A) + kl_coef KL3_t - entropy_coef H_t ]
        rho_t  = exp(logp_t - logp_old_t)            logp_old: the log-prob recorded at sampling (rollout.py)
        KL3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (k3 estimator, >= 0; needs a frozen reference)
        H_t    = entropy of the policy at token t (optional bonus)

       over the tokens with mask 1: prompt, padding and observation tokens (whoever wrote them: see "Why
       observations are masked") never enter the loss. The aggregation agg is one switch in grpo_loss():
         grpo     mean over a trajectory's tokens, then mean over trajectories (DeepSeekMath): grpo_loss sums
                  the token means and divides by the global mini-batch's trajectory count (loss_denominator)
         dapo     mean over all tokens of the batch (DAPO)
         dr_grpo  sum over tokens / (trajectories x max_new_tokens), a constant normaliser (Dr. GRPO)
       Normalisers are counted over the whole mini-batch on all ranks, so 1 process and N processes give the
       same update for the same global batch. Every log-prob is taken at the sampling temperature tau:
       logp_t = log softmax(z_t / tau) at the token, for the policy, the reference and the entropy alike (as verl
       does; TRL's PR 3029 fixed the same bias), and logp_old is rollout.py's record of the same quantity when
       the token was sampled (before top-p), so the first ratio of a step is 1 and the samples come from the
       distribution the loss scores. tau = 1 (and greedy) divides by nothing: the arithmetic of an untempered run.

Why the group mean, not a critic. A policy gradient weights each trajectory's log-prob by its reward minus a
baseline; the baseline changes no expectation but cuts the variance. PPO learns the baseline, a value model as
large as the policy, trained beside it. GRPO instead samples a group of trajectories for the same prompt and takes
their mean reward: a Monte Carlo estimate of the prompt's value under the current policy, with no second model and
no value loss. A trajectory is pushed up only when it did better than its siblings; a group that all scored the
same (all right, or all wrong) has A = 0 everywhere and teaches nothing (`zero_var` in the metrics).

Why observations are masked. The loss sums over the tokens with mask 1, the ones the policy wrote as an agent
(thoughts, actions, the answer). Observation tokens have mask 0 whoever wrote them: text from the search tool or a
world model was never sampled from the policy, so it has no policy log-prob to raise or lower, and no ratio. Under
env=policy the policy does write its own observations (RL-1's simulation), and they stay masked: trained on them,
it would learn to write the answer into its own search results, which the reward cannot tell from finding it
there (reward hacking of a simulator it controls).

A worked group of 4 (group_size=4, scale_std=true; group_advantages gives these numbers, to 1e-5):

    rewards r = (1, 0, 0, 0): mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    A = (r - 0.25) / (0.5 + 1e-6) = (+1.5, -0.5, -0.5, -0.5)       (scale_std=false: +0.75, -0.25, -0.25, -0.25)

  Trajectory 1, the completion after its prompt, with its mask (rollout.py sets it as each token is made):

    <think> I need to search. <begin_search> Ada Brun </end_search>       mask 1: the loss sees these, A = +1.5
    <search_result> Ada Brun was born in Lorn ... </search_result>       mask 0: the environment's, never seen
    Ada Brun was born in Lorn. </think> \\boxed{Lorn}                      mask 1: A = +1.5

  On policy (ratio 1) with loss_type=grpo, L = -(1/4) sum_i mean over trajectory i's mask-1 tokens of A_i: every
  token trajectory 1 wrote has its log-prob pushed up, those of 2-4 down, and the observation is left alone.
  The tests that pin each part, in tests/test_rl.py unless named (they read as lecture notes):
    the group's numbers   test_group_advantages_divide_by_the_sample_std_as_trl_and_verl,
                          test_the_docstrings_worked_group_of_4, test_zero_variance_flags_every_member_of_uniform_groups
    the mask              test_observation_tokens_never_reach_the_loss; in tests/test_rollout.py
                          test_mask_covers_exactly_the_model_written_tokens_and_logps_match_a_full_forward,
                          test_policy_env_writes_its_own_observation_under_mask_zero
    the loss              test_on_policy_gradient_equals_reinforce_gradient,
                          test_clip_removes_gradient_past_the_bound_on_the_advantage_side,
                          test_k3_kl_matches_hand_value_and_is_zero_at_the_reference
    ratio 1 on policy     test_rollout_logps_are_what_the_training_forward_recomputes
    1 rank = N ranks      test_micro_batches_with_the_global_denominator_sum_to_the_full_batch_loss,
                          test_same_global_batch_gives_the_same_update_on_one_and_two_processes
  The step reads top to bottom in grpo_step -> learn -> update.

Scale. Each rank rolls out its shard of the prompts (prompt i goes to rank i % world_size), rollout_batch
trajectories (whole groups) per rollout call when set, so the KV cache of long trajectories fits. parallel=ddp keeps a
whole model per rank (small models); parallel=fsdp shards it with FSDP2 (fully_shard per decoder layer, then the
root; bf16=true adds a bf16 MixedPrecisionPolicy with fp32 master weights and reductions; grad_checkpointing
recomputes activations). Under FSDP2 the rollout gathers the whole policy once and frees it afterwards: ranks
generate different lengths, so gathering per forward would leave them waiting on each other. The policy always
trains in fp32 weights (an RL learning rate like 7e-7 vanishes in bf16 weights); the reference is bf16 on GPU.
bf16=true (with parallel=fsdp) is one path on 1 and N GPUs: FSDP2 wraps the model on one process too
(plumbing.wrap_model starts a 1-rank group), so training computes in bf16 from fp32 masters and rollouts read the
gathered bf16 weights. lora_rank > 0 (one GPU at 7B) trains LoRA adapters (peft, plumbing.add_lora) in fp32 on a
frozen base held in its compute dtype (bf16 on GPU); the KL's reference is then the same model with its adapters
off, not a second copy, and the output folder holds the adapters merged into the weights.

Robustness. A NaN/inf loss or gradient skips that optimizer step (counted in `skipped`); max_bad_steps of them in
a row stop the run with a message. A real search that fails (after env.retries, within env.timeout_s) gives the
model a "search failed: <cause>" observation and is counted (`tool_failures`); the call that takes the failed share
of a step's real calls past `max_tool_failures` stops the run there, naming the server's URL and the cause: a
retriever that is down must not train the policy on failure messages, and a slow one costs at most env.timeout_s a
call. A run never deletes an earlier run's output under the same out= unless asked (`--overwrite`; `--resume`
continues it), and a lock refuses a second live run on it (plumbing.claim_run).
Checkpoints (plumbing.save_checkpoint: weights, optimizer, scheduler, RNG, config, call counters) are atomic and
checked at load; `--resume` continues from the newest intact one with the same weights as an unbroken run, because
a step's prompts and sampling seed follow from the step number alone. steps=0, or --resume of a finished run, has
nothing to do: it says so and writes nothing.

Metrics (<run.dir>/<out>.metrics.jsonl, one line per step): env, reward, em, actions (per trajectory),
real_calls / sim_calls / tool_failures (this step and running totals), zero_var (share of groups with one
reward), trajectories, truncated (share stopped at env.max_new_tokens: their answers were cut; above
env.truncation_warn the step says so in one line), kl, clip_frac, ratio, entropy (when used), loss, grad_norm,
tokens_per_s (model tokens), rollout_s, step_s; eval_em, eval_format, eval_actions, eval_truncated, eval_em_<kind>,
eval_s (greedy, held-out, real tool: the curve to watch, as the training reward moves with each step's prompt mix)
before the first step, every eval_every steps and after the last.

Departures from the paper, by default (configs/qwen7b.yaml sets the paper's): the reward is binary EM
(reward=lenient is the paper's lenient match); a search past env.max_actions forces the answer
(env.limit_observation="Reach the limit of search times." is the paper's); observations are not numbered
(env.number_results); groups whose rewards are all equal can be dropped (`drop_zero_var`); the KL coefficient may
be 0, and then no reference model is loaded.

Inputs: a model folder (`init`: a path or a stage name under <run.dir>, default sft123, the SFT-1&2&3 model of
demo.py) and QA rows (`train`, default <run.data_dir>/train.jsonl).
Outputs: <run.dir>/<out>/ (HF folder), <run.dir>/<out>.ckpt/step_XXXXXX/ (resume), <run.dir>/<out>.metrics.jsonl.

    python rl.py --config configs/tiny.yaml                                   # CPU, the tiny world
    python rl.py --config configs/tiny.yaml sim_share=0.8333 steps=60         # RL-1 (simulated) then RL-2 (real)
    python rl.py --config configs/tiny.yaml --resume                          # after a crash: same weights
    python rl.py --config configs/tiny.yaml --overwrite                       # start over: deletes runs/tiny/rl*
    torchrun --nproc_per_node 2 rl.py --config configs/tiny.yaml              # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 rl.py --config configs/qwen7b.yaml            # 8 GPUs, FSDP2 + bf16
    python rl.py --config configs/tiny.yaml run.device=cuda parallel=fsdp bf16=true   # 1 GPU, FSDP2 + bf16
    python rl.py --config configs/tiny.yaml lora_rank=8 kl_coef=0.01                  # LoRA, reference = adapters off

Not here: value functions (GRPO has none), vLLM or any separate inference engine (rollouts run on the training
weights through rollout.py's KV cache), sequence packing, multi-node launch scripts.
"""
import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import torch

from data import load_qa, pretrain_repeats, save_atomic
from rollout import rollout, truncation_warning
from plumbing import (RUN_FLAGS, all_reduce, barrier, check_bf16, claim_and_resume, full_state_dict,
                      latest_checkpoint, load_sharded, log_line, nothing_left, print0, progress_bar, release_run,
                      resume_run, save_checkpoint, save_pretrained, setup_dist, start_logging, unwrap)
from plumbing import (add_token_weighted, backward_global, clip_grad_norm, grad_sync, max_over_ranks, pad,
                      token_weighted_means)
from plumbing import (check_worldmodel_folder, generation_mode, is_lora, load_trainee, master_dtype, model_path,
                      plain_copy)
from config import ConfigError, RunConfig, cli, load_config
from tools import REWARDS, EnvConfig, SearchEnv, make_environment, make_tool, parse, reward


@dataclass
class RLConfig:
    # model and data
    init: str = "sft123"  # model to start from: a folder, or a stage output under <run.dir> (sft123 = SFT-1&2&3)
    out: str = "rl"  # output folder name under <run.dir>
    train: str = ""  # QA JSONL to sample prompts from; empty = <run.data_dir>/train.jsonl
    eval: str = ""  # held-out QA JSONL for the eval in the log; empty = <run.data_dir>/dev.jsonl
    eval_n: int = 100  # held-out questions per eval (greedy); 0 = no eval
    eval_every: int = 0  # steps between evals; 0 = only before the first and after the last step
    # schedule
    steps: int = 60  # optimizer rounds (one rollout batch each)
    sim_share: float = 0.0  # the first round(sim_share*steps) steps use a simulated environment (paper: 5/6); below 1
                            # the last step is always real
    sim_popular: int = 0  # simulated steps draw their prompts from questions about people whose document the
                          # pre-training corpus (<run.data_dir>/pretrain.jsonl) repeats at least this often: where
                          # the simulator knows the world (0 = every training question)
    sim_train: str = ""  # QA JSONL the simulated steps draw their prompts from; empty = train's. E.g. the questions
                         # SFT-3 trained on: the people whose facts the policy's own simulation can know
    sim_env: str = "auto"  # simulated environment: auto (worldmodel if env.worldmodel is set, else policy) | policy
                           # | worldmodel
    hop2_repeat: int = 1  # each training question whose oracle searched twice or more (its "queries") is drawn this
                          # many times an epoch: where most prompts are 1-hop, one search wins and the second hop
                          # is unlearnt (tiny world: 71% 1-hop). Rows without "queries" (real QA sets): no change
    # rollout
    prompts_per_step: int = 16  # prompts per step, all ranks together (the paper: 48)
    group_size: int = 4  # trajectories per prompt (the paper: 5)
    temperature: float = 1.0  # sampling temperature (the paper: 0.6); the recorded log-probs, ratio, KL, reference
                              # and entropy are scored at the same temperature
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    rollout_batch: int = 0  # trajectories decoded together in one rollout call on a rank, in whole groups (at least
                            # one); 0 = all of the rank's at once. Bounds the KV cache: 48 x 5 long trajectories do
                            # not fit one GPU's
    # loss
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo (see the docstring)
    scale_std: bool = True  # divide advantages by the group's std (false: Dr. GRPO)
    drop_zero_var: bool = False  # drop groups whose rewards are all equal (no signal; saves compute)
    eps_low: float = 0.2  # clip range below 1 of the importance ratio
    eps_high: float = 0.2  # clip range above 1 (DAPO's clip-higher: 0.28)
    kl_coef: float = 0.0  # weight of the k3 KL to the frozen start model (the papers' beta); 0 = no reference model
    entropy_coef: float = 0.0  # weight of the entropy bonus
    reward: str = "em"  # em | lenient (the paper's: EM or >= 70% of the gold words) | f1
    # optimisation
    lr: float = 1e-4  # learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: str = "0.9,0.99"  # AdamW betas, "b1,b2"
    warmup_steps: int = 0  # linear warm-up, then constant (RL keeps the lr flat); a shorter run ends warming up
    grad_clip: float = 1.0  # max grad norm; 0 = off
    updates_per_step: int = 1  # optimizer steps per rollout batch (mini-batches); >1 makes the ratio/clip matter
    micro_batch: int = 16  # episodes per forward/backward on one rank (length-sorted; gradient accumulation)
    max_bad_steps: int = 3  # NaN/inf losses in a row before the run stops
    max_tool_failures: float = 0.5  # share of a step's real calls that may fail (after env.retries): the call that
                                    # takes it past this stops the run; 1 = never stop (the failures are still
                                    # counted)
    # scale
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per decoder layer)
    bf16: bool = False  # fsdp: bf16 parameters in forward/backward and rollouts; fp32 master weights, reductions
    grad_checkpointing: bool = False  # recompute activations in backward (large models)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen base (plumbing.add_lora; one GPU at 7B);
                        # the KL's reference is the base with the adapters off; 0 = every weight trains
    lora_alpha: float = 32.0  # LoRA: the adapters' output is scaled by lora_alpha / lora_rank; one alpha for every
                              # rank keeps the best lr about the same across ranks ("LoRA Without Regret", which
                              # also finds it ~10x full fine-tuning's lr)
    # bookkeeping
    save_every: int = 20  # steps between resumable checkpoints; 0 = only at the end
    keep_ckpts: int = 2  # newest checkpoints kept
    log_every: int = 1  # steps between metric lines

    RANGES = {"eval_n": "[0, inf)", "eval_every": "[0, inf)", "steps": "[0, inf)", "sim_share": "[0, 1]",
              "prompts_per_step": "[1, inf)", "group_size": "[2, inf)", "temperature": "[0, inf)", "top_p": "(0, 1]",
              "rollout_batch": "[0, inf)",
              "eps_low": "[0, 1]", "eps_high": "[0, inf)", "kl_coef": "[0, inf)", "entropy_coef": "[0, inf)",
              "lr": "(0, inf)", "weight_decay": "[0, inf)", "warmup_steps": "[0, inf)", "grad_clip": "[0, inf)",
              "updates_per_step": "[1, inf)", "micro_batch": "[1, inf)", "max_bad_steps": "[1, inf)",
              "sim_popular": "[0, inf)", "hop2_repeat": "[1, inf)",
              "max_tool_failures": "[0, 1]", "save_every": "[0, inf)", "keep_ckpts": "[0, inf)",
              "log_every": "[1, inf)", "lora_rank": "[0, inf)", "lora_alpha": "(0, inf)"}
    CHOICES = {"sim_env": ("auto", "policy", "worldmodel"), "loss_type": ("grpo", "dapo", "dr_grpo"),
               "reward": tuple(REWARDS), "parallel": ("ddp", "fsdp")}


# -----------------------------------------------------------------------------
# The loss: pure functions from tensors to (loss, stats)

def group_advantages(rewards, group_size, scale_std=True, eps=1e-6):
    """A_i = r_i - mean(group), divided by the group's std when scale_std. rewards: (B,), group members adjacent.

    The std is the sample std (correction 1, torch's default, as TRL and verl compute it): a group {0, 1} gets
    advantages -0.71 and +0.71. A group of one has no spread: its std is taken as 0 (its advantage is 0 anyway).
    """
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        a = a / (r.std(dim=1, keepdim=True, correction=min(1, group_size - 1)) + eps)
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
    raise ConfigError(f"config: rl.loss_type must be grpo, dapo or dr_grpo, got {loss_type!r}")


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, eps_low=0.2, eps_high=0.2, kl_coef=0.0,
              loss_type="grpo", entropy=None, entropy_coef=0.0, max_tokens=None, denominator=None):
    """The clipped GRPO objective (docstring at the top), aggregated by loss_type. Returns (loss, stats).

    logps, old_logps, ref_logps (None when kl_coef is 0), entropy (None unless entropy_coef): (B, T) per token;
    advantages: (B,); mask: (B, T), 1 on the tokens the loss is taken on (the policy's own thoughts, actions and
    answer), 0 on observations whoever wrote them (env=policy too: see the top) and on padding. denominator: the
    aggregation's normaliser for the global mini-batch (loss_denominator summed over ranks and micro-batches);
    None = this batch's own.
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
    if loss_type == "grpo":  # each trajectory's token mean, summed; the trajectory count below makes it a mean
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


def token_logps(model, input_ids, attention_mask, n_completion, with_entropy=False, temperature=1.0):
    """Log-probs (B, T) of the last T = n_completion tokens of each row under the model at `temperature`.

    Rows are [left padding | prompt | completion | right padding]; position ids count real tokens only, as in
    rollout.py's generation. Only the last T+1 logits are computed (logits_to_keep): a 150k vocabulary times the
    prompt length would not fit. Entropy (B, T) of the same distributions when with_entropy, else None.
    temperature: the rollout's, so these are the distributions the tokens were sampled from (rollout.sample records
    the same); 1 and 0 (greedy) score the logits as they are, with no division.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_completion + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, T, V): the logit at position t predicts token t+1
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    targets = input_ids[:, -n_completion:]
    log_z = torch.logsumexp(logits, dim=-1)
    logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = log_z - (probs * logits).sum(-1)
    return logps, entropy


# -----------------------------------------------------------------------------
# One step: which environment, which prompts, rollout, reward

def sim_steps(rcfg):
    """How many of the first steps are simulated: round(sim_share * steps), but with sim_share < 1 at least the
    last step is real (2 steps at 5/6 round to 2 simulated, and the "then real" run would spend no real call)."""
    n = round(rcfg.sim_share * rcfg.steps)
    return min(n, rcfg.steps - 1) if rcfg.sim_share < 1 else n


def step_env(step, rcfg, env_cfg):
    """The environment kind of this step: simulated for the first sim_steps(rcfg), then env.env."""
    if step < sim_steps(rcfg):
        if rcfg.sim_env == "auto":
            return "worldmodel" if env_cfg.worldmodel else "policy"
        return rcfg.sim_env
    return env_cfg.env


def step_environment(kind, env_cfg, run, tokenizer, cache):
    """The callable rollout.py sends queries to for this kind of step (tools.make_environment), built once."""
    if kind not in cache:  # SearchEnv, None (policy) or the world-model LM
        cache[kind] = make_environment(dataclasses.replace(env_cfg, env=kind), run, tokenizer)
    return cache[kind]


def popular_rows(rows, data_dir, min_repeats):
    """The rows whose first oracle query (the person asked about) the pre-training corpus repeats >= min_repeats
    times; all rows when min_repeats is 0."""
    if not min_repeats:
        return rows
    path = os.path.join(data_dir, "pretrain.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"config: rl.sim_popular needs the pre-training corpus {path} (the tiny world's data.py)")
    repeats = pretrain_repeats(path)
    out = [r for r in rows if repeats.get((r.get("queries") or [""])[0], 0) >= min_repeats]
    if not out:
        raise ConfigError(f"config: no training question is about a person repeated {min_repeats}+ times")
    return out


def step_prompts(rows, step, n, seed):
    """The n prompts of a step: consecutive slices of a stream of per-epoch shuffles (resume needs only the step)."""
    out, start = [], step * n
    for i in range(start, start + n):
        epoch, pos = divmod(i, len(rows))
        if pos == 0 or not out:
            order = list(range(len(rows)))
            random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(rows[order[pos]])
    return out


def rollout_chunks(policy, tokenizer, rows, env_cfg, environment, rollout_batch, group_size, **sampling):
    """rollout() of group_size trajectories per row, rollout_batch // group_size rows (at least one) per call, so
    one KV cache holds at most rollout_batch trajectories (0: all rows in one call); the episodes come back in row
    order, groups whole. sampling: rollout()'s temperature, top_p, generator."""
    per_call = max(rollout_batch // group_size, 1) if rollout_batch else max(len(rows), 1)
    episodes = []
    for i in range(0, len(rows), per_call):
        episodes += rollout(policy, tokenizer, rows[i:i + per_call], env_cfg, environment, group_size=group_size,
                            **sampling)
    return episodes


def score(episodes, rows, group_size, env_cfg, kind="em"):
    """Fill ep.reward (tools.reward) and return (rewards (B,), em (B,), actions (B,))."""
    rewards, em, actions = [], [], []
    for i, ep in enumerate(episodes):
        golds = rows[i // group_size]["golden_answers"]
        ep.reward = reward(ep.text, golds, env_cfg, kind)
        rewards.append(ep.reward)
        em.append(reward(ep.text, golds, env_cfg, "em") if kind != "em" else ep.reward)
        actions.append(len(ep.actions))
    return torch.tensor(rewards), torch.tensor(em), torch.tensor(actions, dtype=torch.float)


# -----------------------------------------------------------------------------
# One GRPO step, top to bottom: grpo_step (rollout, reward) -> learn (advantages, mini-batches) -> update (loss,
# backward, optimizer step). The distributed bookkeeping (filler passes, global normalisers, the gradient mean over
# ranks, token-weighted stats) is behind named helpers of plumbing.py.

def grpo_step(model, ref, optimizer, scheduler, tokenizer, rows, prompt_index, env_cfg, environment, rcfg, generator,
              device, totals):
    """One step on this rank's prompts (rows; prompt_index: their global indices). env_cfg.env is the step's
    environment kind. Returns (episodes, rewards, em, actions, stats of the last update, rollout seconds)."""
    t0 = time.time()
    # 1) rollout: group_size trajectories per prompt, group members adjacent; rollout.py records each token's mask
    #    (1 = the policy's own, 0 = an observation) and its log-prob at sampling (logp_old), as the token is made
    with generation_mode(model) as policy:
        episodes = rollout_chunks(policy, tokenizer, rows, env_cfg, environment, rcfg.rollout_batch, rcfg.group_size,
                                  temperature=rcfg.temperature, top_p=rcfg.top_p, generator=generator)
    rollout_s = time.time() - t0
    # 2) reward: one number per trajectory (rl.reward: em, lenient or f1)
    rewards, em, actions = score(episodes, rows, rcfg.group_size, env_cfg, rcfg.reward)
    # 3), 4) advantages, then updates_per_step optimizer steps; logp_old = the rollout's
    stats = learn(model, ref, optimizer, scheduler, episodes, rewards, prompt_index, rcfg, env_cfg.max_new_tokens,
                  tokenizer.pad_token_id, device, totals)
    return episodes, rewards, em, actions, stats, rollout_s


def learn(model, ref, optimizer, scheduler, episodes, rewards, prompt_index, rcfg, max_tokens, pad_id, device,
          totals):
    """Advantages, then `updates_per_step` optimizer steps on this rank's episodes; returns the last stats.

    Groups live on one rank, so advantages need no communication. prompt_index[i]: the global index of this
    rank's i-th prompt. totals["skipped"] and totals["bad_in_row"] count NaN/inf updates.
    """
    # 3) advantages: A_i = (r_i - mean of its group) / std, one number per trajectory; the group mean is the baseline
    advantages = group_advantages(rewards, rcfg.group_size, rcfg.scale_std)
    keep = ~zero_variance(rewards, rcfg.group_size) if rcfg.drop_zero_var else torch.ones(len(episodes), dtype=bool)
    stats = {}
    # 4) one optimizer step per mini-batch, each cut into micro-batches (gradient accumulation)
    for micro in minibatches(episodes, advantages, keep, prompt_index, rcfg.group_size, rcfg.updates_per_step,
                             rcfg.micro_batch):
        s, ok = update(model, ref, optimizer, scheduler, micro, rcfg, max_tokens, pad_id, device, episodes[0])
        totals["skipped"] += not ok
        totals["bad_in_row"] = 0 if ok else totals["bad_in_row"] + 1
        stats = s or stats
    return stats


def update(model, ref_model, optimizer, scheduler, micro_batches, rcfg, max_tokens, pad_id, device, filler):
    """One optimizer step on one global mini-batch. Returns (stats, ok); ok False = non-finite loss, step skipped.

    A rank with fewer micro-batches than the busiest runs `filler` episodes with their mask zeroed (max_over_ranks
    says why): they add nothing to the gradient.
    """
    micro_batches = micro_batches + [(None, None)] * (max_over_ranks(len(micro_batches)) - len(micro_batches))
    # the aggregation's normaliser over the whole global mini-batch (grpo_loss), counted before any forward
    denominator = all_reduce([sum(loss_denominator(torch.tensor(e.mask, dtype=torch.float).view(1, -1),
                                                   rcfg.loss_type, max_tokens)
                                  for eps, _ in micro_batches if eps for e in eps)])[0]
    if denominator == 0:
        return {}, True
    model.train()
    sums, loss_sum = {}, 0.0
    for j, (eps, adv) in enumerate(micro_batches):
        input_ids, attention, mask, old_logps, T = collate(eps or [filler], pad_id, device)
        if eps is None:  # a filler pass: no token reaches the loss
            adv, mask = torch.zeros(1), torch.zeros_like(mask)
        ref_logps = reference_logps(model, ref_model, input_ids, attention, T, rcfg.temperature) \
            if rcfg.kl_coef else None
        # at the sampling temperature, as rollout.py records logp_old: the first ratio of a step is 1
        logps, entropy = token_logps(model, input_ids, attention, T, rcfg.entropy_coef > 0, rcfg.temperature)
        loss, s = grpo_loss(logps, old_logps, ref_logps, adv.to(device), mask, rcfg.eps_low, rcfg.eps_high,
                            rcfg.kl_coef, rcfg.loss_type, entropy, rcfg.entropy_coef, max_tokens, denominator)
        # under DDP the forwards above, outside grad_sync, already chose to all-reduce in this backward: every
        # micro-batch reduces (the same sum; holding them inside too would reduce once, a change of float order)
        with grad_sync(model, last=j == len(micro_batches) - 1):
            backward_global(loss)
        loss_sum += loss.item()
        add_token_weighted(sums, s)
    out = token_weighted_means(sums)
    out["loss"] = all_reduce([loss_sum])[0]
    out["grad_norm"] = clip_grad_norm(model, rcfg.grad_clip)
    ok = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    if ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out, ok


def reference_logps(model, ref_model, input_ids, attention, T, temperature):
    """The frozen reference's token_logps for the KL; called before the policy's forward, because under LoRA
    (ref_model None) the reference is the policy itself with its adapters off."""
    reference = unwrap(model) if ref_model is None else ref_model
    with torch.no_grad(), reference.disable_adapter() if ref_model is None else contextlib.nullcontext():
        ref_logps, _ = token_logps(reference, input_ids, attention, T, temperature=temperature)
    return ref_logps


def collate(episodes, pad_id, device):
    """Episodes -> (input_ids, attention_mask) of [left pad | prompt | completion | right pad], the (B, T)
    completion tensors mask and old_logps (0 on padding), and T."""
    completions = pad([ep.ids for ep in episodes], pad_id)  # (B, T)
    input_ids = torch.cat([pad([ep.prompt_ids for ep in episodes], pad_id, left=True), completions], 1)
    attention = torch.cat([pad([[1] * len(ep.prompt_ids) for ep in episodes], 0, left=True),
                           pad([[1] * len(ep.ids) for ep in episodes], 0)], 1)
    mask = pad([ep.mask for ep in episodes], 0, torch.float32)
    old_logps = pad([ep.logps for ep in episodes], 0, torch.float32)
    return input_ids.to(device), attention.to(device), mask.to(device), old_logps.to(device), completions.shape[1]


def minibatches(episodes, advantages, keep, prompt_index, group_size, n_updates, micro_batch):
    """Split this rank's episodes into n_updates mini-batches, each a list of micro-batches [(episodes, adv)].

    A group goes to mini-batch (global prompt index % n_updates), so 1 and N ranks build the same global
    mini-batches. Dropped episodes (keep False) are left out. Inside a mini-batch, episodes are sorted by length
    before they are cut into micro-batches: each micro-batch pads to its own longest, so less compute goes to
    padding, and the gradient (a sum with one global normaliser) is the same.
    """
    out = []
    for u in range(n_updates):
        idx = [i for i in range(len(episodes)) if keep[i] and prompt_index[i // group_size] % n_updates == u]
        idx.sort(key=lambda i: len(episodes[i].prompt_ids) + len(episodes[i].ids))
        out.append([([episodes[i] for i in idx[s:s + micro_batch]], advantages[idx[s:s + micro_batch]])
                    for s in range(0, len(idx), micro_batch)])
    return out


# -----------------------------------------------------------------------------
# Models, evaluation, logging, saving

def build_models(rcfg, run, device, init):
    """(policy, reference or None, tokenizer). The policy trains in float32 (an RL learning rate of 1e-6 vanishes
    in bf16 weights); FSDP2 with rl.bf16 computes in bf16 with fp32 master weights and gradient reductions.
    LoRA (rl.lora_rank): fp32 adapters on a frozen base in its compute dtype, and no reference model: the KL's
    reference is the policy with its adapters off (update), which is the start model exactly."""
    train_dtype = master_dtype(run)
    model, tokenizer = load_trainee(init, run, device, rcfg)
    ref = None
    if rcfg.kl_coef and not rcfg.lora_rank:  # frozen copy of the start; with kl_coef 0 it is never loaded
        ref_dtype = torch.bfloat16 if (rcfg.bf16 or device.type == "cuda") and run.dtype == "auto" else train_dtype
        ref, _ = load_sharded(init, run, device, ref_dtype, "fsdp" if rcfg.parallel == "fsdp" else "none", rcfg.bf16)
        ref.eval().requires_grad_(False)  # no gradients: FSDP2 shards it like the policy, never DDP
    return model, ref, tokenizer


def evaluate(model, tokenizer, rows, cfg, environment, rank, world_size):
    """Greedy held-out EM, format rate, actions per question and the share stopped at the length budget, over all
    ranks (each rank its shard); where the rows name their kind (the tiny world's city/employer/country), the EM of
    each kind too (eval_em_<kind>): a skill RL unlearns, such as the second hop, shows there first."""
    t0 = time.time()
    mine = rows[rank::world_size]
    kinds = sorted({row.get("kind", "all") for row in rows})  # from all the rows: every rank reduces the same list
    env_cfg = dataclasses.replace(cfg.env, env="real")
    em = fmt = acts = cut = 0.0
    by_kind = {k: [0.0, 0] for k in kinds}  # kind -> [EM sum, questions]
    if mine:
        with generation_mode(model) as policy:
            episodes = rollout_chunks(policy, tokenizer, mine, env_cfg, environment, cfg.rl.rollout_batch, 1,
                                      temperature=0.0)
        for ep, row in zip(episodes, mine):
            parsed = parse(ep.text, cfg.env)
            right = reward(ep.text, row["golden_answers"], cfg.env, "em")
            em += right
            cell = by_kind[row.get("kind", "all")]
            cell[0], cell[1] = cell[0] + right, cell[1] + 1
            fmt += parsed.format_ok
            acts += len(ep.actions)
            cut += ep.finish == "length"
    em, fmt, acts, cut, n, *per_kind = all_reduce([em, fmt, acts, cut, len(mine), *sum(by_kind.values(), [])])
    out = {"eval_em": em / max(n, 1), "eval_format": fmt / max(n, 1), "eval_actions": acts / max(n, 1),
           "eval_truncated": cut / max(n, 1), "eval_s": time.time() - t0}
    if len(kinds) > 1:
        out.update({f"eval_em_{k}": per_kind[2 * i] / max(per_kind[2 * i + 1], 1) for i, k in enumerate(kinds)})
    return out


def save_final(model, tokenizer, out_dir, rank, dtype=None):
    """The trained policy as an HF folder (full weights gathered from FSDP2 shards, in dtype), written atomically;
    under LoRA the adapters merged into the weights, on the CPU (a second copy of a 7B model would not fit beside
    the first)."""
    if is_lora(model):
        final = plain_copy(model, torch.device("cpu"), dtype)  # FSDP2: every rank takes part
        if rank == 0:
            save_atomic(out_dir, final, tokenizer)
        barrier()
        return
    state_dict = full_state_dict(model, dtype)
    if rank == 0:
        class Weights:  # save_atomic calls save_pretrained on each object it is given
            def save_pretrained(self, path):
                save_pretrained(model, path, state_dict)
        save_atomic(out_dir, Weights(), tokenizer)
    barrier()


def load_rows(rcfg, run):
    """(training rows, the simulated steps' rows, held-out rows for the eval in the log)."""
    def rows_of(path):  # hop2_repeat: a 2-hop question is drawn that many times an epoch
        rows = [row for row in load_qa(path) for _ in range(rcfg.hop2_repeat if len(row.get("queries", ())) > 1 else 1)]
        if not rows:  # step_prompts would divide by zero
            raise ConfigError(f"rl: {path}: no usable QA rows (empty, or every row bad: each is named above)")
        return rows
    train_rows = rows_of(rcfg.train or os.path.join(run.data_dir, "train.jsonl"))
    sim_rows = popular_rows(rows_of(rcfg.sim_train) if rcfg.sim_train else train_rows, run.data_dir, rcfg.sim_popular)
    eval_rows = load_qa(rcfg.eval or os.path.join(run.data_dir, "dev.jsonl"))[:rcfg.eval_n] if rcfg.eval_n else []
    return train_rows, sim_rows, eval_rows


def step_metrics(step, kind, episodes, rewards, em, actions, calls, totals, env_cfg, group_size, t0, rollout_s):
    """The step's metrics row over all ranks (means per trajectory, call counts, speed); adds the calls to totals.
    calls: this rank's (real calls, failed calls) of the step; t0: when the step began."""
    flat = zero_variance(rewards, group_size)
    n_model_tokens = sum(sum(ep.mask) for ep in episodes)
    sums = all_reduce([*calls, rewards.sum().item(), em.sum().item(), actions.sum().item(), len(episodes),
                       sum(ep.sim_calls for ep in episodes), n_model_tokens, flat.float().sum().item(),
                       sum(ep.finish == "length" for ep in episodes)])
    real, failed, r_sum, em_sum, act_sum, n, sim, n_tokens, n_flat, n_cut = sums
    if warning := truncation_warning(n_cut / n, env_cfg, f"rl: step {step + 1}"):
        print0(warning)
    totals["real_calls"] += int(real)
    totals["sim_calls"] += int(sim)
    totals["tool_failures"] += int(failed)
    dt = time.time() - t0
    return {"step": step + 1, "env": kind, "reward": r_sum / n, "em": em_sum / n, "actions": act_sum / n,
            "real_calls": int(real), "sim_calls": int(sim), "real_calls_total": totals["real_calls"],
            "sim_calls_total": totals["sim_calls"], "tool_failures": int(failed),
            "tool_failures_total": totals["tool_failures"], "zero_var": n_flat / n, "truncated": n_cut / n,
            "trajectories": int(n), "skipped": totals["skipped"], "tokens_per_s": n_tokens / dt,
            "rollout_s": rollout_s, "step_s": dt}


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "rl": RLConfig}, argv, own="rl", flags=RUN_FLAGS)
    run, env_cfg, rcfg = cfg.run, cfg.env, cfg.rl
    check_bf16(rcfg.bf16, rcfg.parallel, "rl")
    if rcfg.steps == 0:
        print0("rl: rl.steps=0: nothing to do")
        return
    rank, world_size, device = setup_dist(run)
    if rcfg.prompts_per_step % world_size:
        raise ConfigError(f"config: rl.prompts_per_step ({rcfg.prompts_per_step}) must divide by the number of "
                          f"ranks ({world_size})")
    torch.manual_seed(run.seed)
    init = model_path(rcfg.init, run.dir, f"rl.init={rcfg.init!r}")  # a folder, or a stage name: sft2, sft123, ...
    if env_cfg.worldmodel:  # a policy folder there would be refused only at the first simulated step
        check_worldmodel_folder(env_cfg.worldmodel)
    out_dir, ckpt_dir = os.path.join(run.dir, rcfg.out), os.path.join(run.dir, rcfg.out + ".ckpt")
    ckpt = claim_and_resume(run.dir, rcfg.out, cfg.flags, rank)  # an earlier run's output, or a live run on out=
    if nothing_left(run.dir, rcfg.out, ckpt, rcfg.steps, "rl", rank):
        return
    train_rows, sim_rows, eval_rows = load_rows(rcfg, run)
    start_logging(run, rcfg.out, cfg.to_dict(), rank)
    model, ref, tokenizer = build_models(rcfg, run, device, init)
    betas = tuple(float(b) for b in rcfg.betas.split(","))
    optimizer = torch.optim.AdamW(model.parameters(), lr=rcfg.lr, betas=betas, weight_decay=rcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (rcfg.warmup_steps + 1)))
    metrics_path = os.path.join(run.dir, rcfg.out + ".metrics.jsonl")
    # resume: weights, optimizer, scheduler from the newest checkpoint; prompts and sampling seeds follow the step
    meta = resume_run(ckpt, ckpt_dir, model, optimizer, scheduler, metrics_path, "rl", rank)
    start = meta["step"]
    totals = {"real_calls": 0, "sim_calls": 0, "tool_failures": 0, "skipped": 0, "bad_in_row": 0,
              **meta.get("totals", {})}
    envs, eval_env = {}, None
    if eval_rows:
        eval_env = SearchEnv(make_tool(env_cfg, run), tokenizer, env_cfg)  # its calls are not training's
    if eval_rows and start == 0:  # the starting point, on the same questions as the final eval
        ev = evaluate(model, tokenizer, eval_rows, cfg, eval_env, rank, world_size)
        print0(f"rl: start {ev}")
        if rank == 0:
            log_line(metrics_path, {"step": 0, **ev})
    bar = progress_bar(range(start, rcfg.steps), initial=start, total=rcfg.steps, disable=rank != 0, desc="rl")
    for step in bar:
        t0 = time.time()
        # this rank's prompts (prompt i goes to rank i % world_size), in the environment of the schedule
        kind = step_env(step, rcfg, env_cfg)
        environment = step_environment(kind, env_cfg, run, tokenizer, envs)
        prompts = step_prompts(train_rows if kind == env_cfg.env else sim_rows, step, rcfg.prompts_per_step, run.seed)
        prompt_index = list(range(rank, rcfg.prompts_per_step, world_size))
        generator = torch.Generator(device=device).manual_seed(run.seed * 1_000_003 + step * 1009 + rank)
        failures_before = getattr(environment, "failures", 0)  # a SearchEnv counts its failed calls
        if isinstance(environment, SearchEnv):  # a retriever that is down stops the run at the call that shows it
            environment.limit_failures(rcfg.max_tool_failures, "rl.max_tool_failures", f"rl: step {step + 1}: ")
        episodes, rewards, em, actions, stats, t_rollout = grpo_step(
            model, ref, optimizer, scheduler, tokenizer, [prompts[i] for i in prompt_index], prompt_index,
            dataclasses.replace(env_cfg, env=kind), environment, rcfg, generator, device, totals)
        if totals["bad_in_row"] >= rcfg.max_bad_steps:
            raise RuntimeError(f"rl: {totals['bad_in_row']} updates in a row had a NaN/inf loss or gradient "
                               f"(step {step + 1}); lower rl.lr or check the model {init}; the last good "
                               f"checkpoint is {latest_checkpoint(ckpt_dir)}")
        calls = (sum(ep.real_calls for ep in episodes), getattr(environment, "failures", 0) - failures_before)
        row = step_metrics(step, kind, episodes, rewards, em, actions, calls, totals, env_cfg, rcfg.group_size, t0,
                           t_rollout)
        row.update({"lr": scheduler.get_last_lr()[0], **stats})
        if eval_rows and (step + 1 == rcfg.steps or (rcfg.eval_every and (step + 1) % rcfg.eval_every == 0)):
            row.update(evaluate(model, tokenizer, eval_rows, cfg, eval_env, rank, world_size))
        if rank == 0 and ((step + 1) % rcfg.log_every == 0 or "eval_em" in row):
            log_line(metrics_path, row)
            bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row.get('kl', 0):.3f}", env=kind,
                            real=row["real_calls"], failed=row["tool_failures"])
        # checkpoint: everything a resumed run needs; the step is the data position
        if (rcfg.save_every and (step + 1) % rcfg.save_every == 0) or step + 1 == rcfg.steps:
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, scheduler,
                            meta={"config": cfg.to_dict(), "totals": totals, "init": init}, keep=rcfg.keep_ckpts)
    save_final(model, tokenizer, out_dir, rank, torch.bfloat16 if rcfg.bf16 else None)
    print0(f"rl: wrote {out_dir}; real calls {totals['real_calls']} "
           f"({totals['tool_failures']} failed), simulated calls {totals['sim_calls']}, "
           f"skipped updates {totals['skipped']}")
    if rank == 0:
        release_run(run.dir, rcfg.out)


if __name__ == "__main__":
    cli(main)
