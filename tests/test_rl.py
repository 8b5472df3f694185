"""Tests of rl.py: the GRPO loss against hand computations, then the loop on the tiny model.

    .venv/bin/python -m pytest -q tests/test_rl.py
"""
import math

import pytest
import torch

import rl


# -----------------------------------------------------------------------------
# The loss, alone

def test_group_advantages_divide_by_the_sample_std_as_trl_and_verl():
    rewards = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.])
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # sample std of {1, 0, 0, 0}: divided by G - 1
    expected = torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0, 0, 0, 0])
    assert torch.allclose(rl.group_advantages(rewards, 4), expected, atol=1e-4)
    assert torch.allclose(rl.group_advantages(torch.tensor([0., 1.]), 2), torch.tensor([-0.7071, 0.7071]), atol=1e-4)
    unscaled = rl.group_advantages(rewards, 4, scale_std=False)
    assert torch.allclose(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert rl.group_advantages(torch.tensor([1., 0.]), 1).tolist() == [0.0, 0.0]  # a group of one: no NaN


def test_group_advantages_sum_to_zero_within_each_group():
    rewards = torch.rand(30)
    adv = rl.group_advantages(rewards, 5).view(6, 5)
    assert torch.allclose(adv.sum(1), torch.zeros(6), atol=1e-4)



def test_the_docstrings_worked_group_of_4():
    """rl.py's worked group: rewards (1, 0, 0, 0) -> A = (+1.5, -0.5, -0.5, -0.5); on policy, grpo's gradient moves
    each trajectory's mask-1 log-probs by A_i / (its token count x 4) and never touches its mask-0 observation."""
    adv = rl.group_advantages(torch.tensor([1., 0., 0., 0.]), 4)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
    assert rl.group_advantages(torch.tensor([1., 0., 0., 0.]), 4, scale_std=False).tolist() == [0.75, -0.25, -0.25,
                                                                                               -0.25]
    mask = torch.tensor([[1., 1., 0., 0., 1.], [1., 1., 1., 0., 0.], [1., 0., 0., 0., 0.], [1., 1., 1., 1., 1.]])
    logps = (-torch.rand(4, 5)).requires_grad_()
    loss, _ = rl.grpo_loss(logps, logps.detach(), None, adv, mask, loss_type="grpo")
    grad = torch.autograd.grad(loss, logps)[0]
    expected = -adv.unsqueeze(1) * mask / (mask.sum(1, keepdim=True) * 4)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert (grad[0, 2:4] == 0).all()  # trajectory 1's observation tokens

def test_zero_variance_flags_every_member_of_uniform_groups():
    rewards = torch.tensor([1., 1., 0., 1., 0., 0.])
    assert rl.zero_variance(rewards, 2).tolist() == [True, True, False, False, True, True]


def batch(seed=0, b=4, t=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g) * 3
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[:, 0] = 1  # every trajectory has a model token
    adv = torch.randn(b, generator=g)
    return logps, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_on_policy_loss_is_minus_the_aggregated_advantage(loss_type):
    logps, mask, adv = batch()
    loss, stats = rl.grpo_loss(logps, logps.clone(), None, adv, mask, loss_type=loss_type, max_tokens=10)
    n = mask.sum(1)
    expected = {"grpo": -adv.mean(),  # every token of trajectory i contributes -A_i: its token mean is -A_i
                "dapo": -(adv * n).sum() / n.sum(),
                "dr_grpo": -(adv * n).sum() / (4 * 10)}[loss_type]
    assert torch.allclose(loss, expected, atol=1e-6)
    assert stats["clip_frac"] == 0 and stats["ratio"] == pytest.approx(1.0)


def test_on_policy_gradient_equals_reinforce_gradient():
    """With ratio 1 and no KL, grad of the grpo loss = grad of -(1/B) sum_i A_i mean_t logp_it (REINFORCE)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)  # (B, T, V): a stand-in policy
    targets = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]).float()
    adv = torch.tensor([1.5, -0.5, -1.0])

    def logp():
        return torch.log_softmax(logits, -1).gather(2, targets.unsqueeze(-1)).squeeze(-1)

    loss, _ = rl.grpo_loss(logp(), logp().detach(), None, adv, mask, loss_type="grpo")
    grad = torch.autograd.grad(loss, logits)[0]
    reinforce = -((logp() * mask).sum(1) / mask.sum(1) * adv).mean()
    expected = torch.autograd.grad(reinforce, logits)[0]
    assert torch.allclose(grad, expected, atol=1e-6)


def test_clip_removes_gradient_past_the_bound_on_the_advantage_side():
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], requires_grad=True)  # ratios e^.5 = 1.65 and e^-.5 = 0.61
    adv = torch.tensor([1.0, -1.0])
    loss, stats = rl.grpo_loss(new, old, None, adv, torch.ones(2, 2), eps_low=0.2, eps_high=0.2)
    grad = torch.autograd.grad(loss, new)[0]
    assert grad[0, 0] == 0 and grad[1, 0] == 0  # clipped: pushing further would not pay
    assert grad[0, 1] != 0 and grad[1, 1] != 0
    assert stats["clip_frac"] == pytest.approx(0.5)
    # the other side is not clipped: a ratio above 1+eps with a negative advantage still gets its gradient
    loss, stats = rl.grpo_loss(new, old, None, -adv, torch.ones(2, 2))
    assert torch.autograd.grad(loss, new)[0][0, 0] != 0 and stats["clip_frac"] == 0


def test_eps_high_separately_from_eps_low():
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(1.25), requires_grad=True)
    adv = torch.ones(1)
    _, low_clip = rl.grpo_loss(new, old, None, adv, torch.ones(1, 1), eps_low=0.2, eps_high=0.2)
    _, high_clip = rl.grpo_loss(new, old, None, adv, torch.ones(1, 1), eps_low=0.2, eps_high=0.28)
    assert low_clip["clip_frac"] == 1 and high_clip["clip_frac"] == 0


def test_k3_kl_matches_hand_value_and_is_zero_at_the_reference():
    logps = torch.full((1, 2), -1.0)
    ref = torch.tensor([[-1.5, -1.0]])
    adv = torch.zeros(1)  # the policy term vanishes: the loss is the KL term alone
    loss, stats = rl.grpo_loss(logps, logps, ref, adv, torch.ones(1, 2), kl_coef=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert stats["kl"] == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(0.1 * k3 / 2)
    _, stats = rl.grpo_loss(logps, logps, logps.clone(), adv, torch.ones(1, 2), kl_coef=0.1)
    assert stats["kl"] == 0


def test_entropy_bonus_lowers_the_loss():
    logps, mask, adv = batch()
    entropy = torch.rand_like(logps)
    base, _ = rl.grpo_loss(logps, logps, None, adv, mask)
    bonus, stats = rl.grpo_loss(logps, logps, None, adv, mask, entropy=entropy, entropy_coef=0.5)
    expected = ((entropy * mask).sum(1) / mask.sum(1)).mean() * 0.5
    assert (base - bonus).item() == pytest.approx(expected.item(), rel=1e-5)
    assert "entropy" in stats


def test_observation_tokens_never_reach_the_loss():
    logps, mask, adv = batch()
    old = logps - 0.1
    changed = logps.clone()
    changed[mask == 0] = -50.0  # whatever the policy thinks of the environment's tokens
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        a, _ = rl.grpo_loss(logps, old, logps - 0.2, adv, mask, kl_coef=0.5, loss_type=loss_type)
        b, _ = rl.grpo_loss(changed, old, logps - 0.2, adv, mask, kl_coef=0.5, loss_type=loss_type)
        assert torch.allclose(a, b)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_with_the_global_denominator_sum_to_the_full_batch_loss(loss_type):
    """The property that makes N ranks x M micro-batches give the update of one big batch."""
    logps, mask, adv = batch(b=6)
    old = logps + 0.05 * torch.randn_like(logps)
    full, _ = rl.grpo_loss(logps, old, None, adv, mask, loss_type=loss_type, max_tokens=8)
    denom = rl.loss_denominator(mask, loss_type, 8)
    parts = sum(rl.grpo_loss(logps[s], old[s], None, adv[s], mask[s], loss_type=loss_type, max_tokens=8,
                             denominator=denom)[0] for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
    assert torch.allclose(full, parts, atol=1e-6)


def test_unknown_loss_type_is_refused():
    logps, mask, adv = batch()
    with pytest.raises(ValueError, match="loss_type"):
        rl.grpo_loss(logps, logps, None, adv, mask, loss_type="ppo")


# -----------------------------------------------------------------------------
# The update on the tiny model

import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_episodes(model, n, seed, vocab):
    """n episodes of random tokens with an observation span (mask 0) and the model's own log-probs."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(n):
        p, t = int(torch.randint(3, 8, (1,), generator=g)), int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(10, vocab, (t,), generator=g).tolist()
        mask = [1] * t
        mask[1:3] = [0, 0]  # an observation
        episodes.append(SimpleNamespace(prompt_ids=torch.randint(10, vocab, (p,), generator=g).tolist(), ids=ids,
                                        mask=mask, logps=[0.0] * t))
    inp, att, m, _, T = rl.collate(episodes, 0, torch.device("cpu"))
    with torch.no_grad():
        logps, _ = rl.token_logps(model, inp, att, T)
    for i, ep in enumerate(episodes):  # old log-probs: the model's, slightly off, as after an earlier update
        ep.logps = [(lp + 0.05 * float(torch.randn(1, generator=g))) * k
                    for lp, k in zip(logps[i, :len(ep.ids)].tolist(), ep.mask)]
    return episodes


def test_sim_popular_keeps_the_questions_about_people_pretraining_repeated_often(tiny_cfg):
    import data
    rows = data.load_qa(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))
    with open(os.path.join(tiny_cfg.run.data_dir, "pretrain.jsonl")) as f:
        repeats = {r["name"]: r["repeats"] for r in map(json.loads, f) if r.get("name")}
    assert rl.popular_rows(rows, tiny_cfg.run.data_dir, 0) == rows
    popular = rl.popular_rows(rows, tiny_cfg.run.data_dir, 30)
    assert 0 < len(popular) < len(rows) and all(repeats[r["queries"][0]] >= 30 for r in popular)
    assert len(popular) == sum(repeats.get(r["queries"][0], 0) >= 30 for r in rows)
    with pytest.raises(rl.ConfigError, match="sim_popular"):
        rl.popular_rows(rows, os.path.join(tiny_cfg.run.data_dir, "nowhere"), 30)


def test_logps_of_a_padded_batch_equal_those_of_each_row_alone(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    episodes = fake_episodes(model, 4, 0, model.config.vocab_size)
    inp, att, mask, _, T = rl.collate(episodes, 0, torch.device("cpu"))
    with torch.no_grad():
        batched, _ = rl.token_logps(model, inp, att, T)
        for i, ep in enumerate(episodes):
            one = torch.tensor([ep.prompt_ids + ep.ids])
            alone, _ = rl.token_logps(model, one, torch.ones_like(one), len(ep.ids))
            assert torch.allclose(batched[i, :len(ep.ids)], alone[0], atol=1e-5)


def test_non_finite_loss_skips_the_update_and_leaves_the_weights(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    episodes = fake_episodes(model, 4, 1, model.config.vocab_size)
    episodes[2].logps[0] = float("nan")  # e.g. a broken rollout
    cfg = rl.RLConfig(group_size=2, lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    totals = {"skipped": 0, "bad_in_row": 0}
    rl.learn(model, None, opt, sched, episodes, torch.tensor([1., 0., 0., 1.]), [0, 1], cfg, 16, 0,
             torch.device("cpu"), totals)
    assert totals == {"skipped": 1, "bad_in_row": 1}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    episodes[2].logps[0] = -1.0  # the same batch, finite: it trains
    rl.learn(model, None, opt, sched, episodes, torch.tensor([1., 0., 0., 1.]), [0, 1], cfg, 16, 0,
             torch.device("cpu"), totals)
    assert totals == {"skipped": 1, "bad_in_row": 0}
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
import plumbing, rl
from config import RunConfig
from tests.test_rl import fake_episodes
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)

def main():  # the models are locals, freed before plumbing.end_dist tears the group down at exit
    rank, world_size, device = plumbing.setup_dist(RunConfig(device="cpu"))
    for parallel, loss_type in [(p, l) for p in {parallel!r} for l in ("grpo", "dapo", "dr_grpo")]:
        cfg = rl.RLConfig(group_size=2, updates_per_step=2, micro_batch=2, kl_coef=0.1, entropy_coef=0.01,
                          loss_type=loss_type, drop_zero_var=True, grad_clip=0.0, parallel=parallel)
        model = AutoModelForCausalLM.from_pretrained({base!r})
        ref = AutoModelForCausalLM.from_pretrained({base!r}).requires_grad_(False)
        episodes = fake_episodes(model, 16, 3, model.config.vocab_size)  # 8 prompts x 2: the global batch
        rewards = torch.tensor([1., 0., 1., 1., 0., 1., 0., 0., 1., 0., 0., 1., 1., 1., 0., 1.])
        model = plumbing.wrap_model(model, device, parallel)
        ref = plumbing.wrap_model(ref, device, "fsdp" if parallel == "fsdp" else "none")  # no gradients: never DDP
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # SGD: the update is the gradient itself, scale included
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        prompt_index = list(range(rank, 8, world_size))  # this rank's prompts, as main() shards them
        mine = [episodes[2 * p + j] for p in prompt_index for j in range(2)]
        mine_r = torch.stack([rewards[2 * p + j] for p in prompt_index for j in range(2)])
        totals = {{"skipped": 0, "bad_in_row": 0}}
        rl.learn(model, ref, opt, sched, mine, mine_r, prompt_index, cfg, 16, 0, device, totals)  # 2 updates
        state_dict = plumbing.full_state_dict(model)  # a collective under FSDP2
        if rank == 0:
            torch.save(state_dict, f"{out}.{{parallel}}.{{loss_type}}")


main()
"""


def test_same_global_batch_gives_the_same_update_on_one_and_two_processes(tiny_base, tmp_path):
    """Two updates from 8 prompts x 2 (one group with equal rewards dropped), with KL and entropy, per loss type:
    1 process vs 2 gloo processes that each hold half of the prompts, with DDP and with FSDP2."""
    for n, parallel in ((1, ["ddp"]), (2, ["ddp", "fsdp"])):
        script = tmp_path / f"worker{n}.py"
        script.write_text(WORKER.format(root=ROOT, base=tiny_base, out=str(tmp_path / f"n{n}"), parallel=parallel))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        one = torch.load(tmp_path / f"n1.ddp.{loss_type}")
        assert max((one[k] - base[k]).abs().max() for k in base) > 1e-4  # the update did something
        for name in ("ddp", "fsdp"):
            two = torch.load(tmp_path / f"n2.{name}.{loss_type}")
            for k in base:
                delta1, delta2 = one[k] - base[k], two[k] - base[k]
                assert torch.allclose(delta1, delta2, rtol=1e-4, atol=1e-6), (name, loss_type, k)


# -----------------------------------------------------------------------------
# The loop, end to end on the tiny model

def rl_argv(tiny_root, base, runs_dir, *extra):
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.data_dir={tiny_root}/data",
            f"run.runs_dir={runs_dir}", "run.name=t", "run.device=cpu", f"init={base}", "prompts_per_step=4",
            "group_size=2", "env.max_new_tokens=40", "env.obs_max_tokens=20", "temperature=1.0", "entropy_coef=0.05",
            "lr=1e-3",
            "drop_zero_var=false",  # the untrained model earns no reward: only the entropy term trains it
            *extra]


def read_metrics(runs_dir, out="rl"):
    with open(os.path.join(runs_dir, "t", f"{out}.metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_rollout_logps_are_what_the_training_forward_recomputes(tiny_cfg, tiny_base):
    """rollout.py's recorded log-probs are the old log-probs of the loss: on-policy, the ratio must be 1."""
    from rollout import rollout
    from plumbing import load_model
    from tools import SearchEnv, make_tool
    model, tokenizer = load_model(tiny_base, tiny_cfg.run)
    env = SearchEnv(make_tool(tiny_cfg.env, tiny_cfg.run), tokenizer, tiny_cfg.env)
    rows = [json.loads(line) for line in open(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))][:3]
    episodes = rollout(model, tokenizer, rows, tiny_cfg.env, env, group_size=2, temperature=1.0, max_new_tokens=40,
                       generator=torch.Generator().manual_seed(0))
    inp, att, mask, old, T = rl.collate(episodes, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logps, _ = rl.token_logps(model, inp, att, T)
    assert torch.allclose(logps * mask, old, atol=1e-4)


def test_at_temperature_0_6_recorded_logps_are_the_tempered_ones_the_update_scores(tiny_cfg, tiny_base):
    """Sampling at 0.6: each recorded log-prob is log_softmax(logits / 0.6) at the sampled token (a plain forward
    recomputes it), rl.token_logps at 0.6 scores the same on the collated ids (the first ratio of a step is 1),
    and both differ from temperature 1's (the samples come from the tempered distribution, not the raw one)."""
    from rollout import rollout
    from plumbing import load_model
    from tools import SearchEnv, make_tool
    model, tokenizer = load_model(tiny_base, tiny_cfg.run)
    env = SearchEnv(make_tool(tiny_cfg.env, tiny_cfg.run), tokenizer, tiny_cfg.env)
    rows = [json.loads(line) for line in open(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))][:3]
    episodes = rollout(model, tokenizer, rows, tiny_cfg.env, env, group_size=2, temperature=0.6, max_new_tokens=40,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for ep in episodes:
            logits = model(torch.tensor([ep.prompt_ids + ep.ids])).logits[0, len(ep.prompt_ids) - 1:-1].float()
            ids, m = torch.tensor(ep.ids)[:, None], torch.tensor(ep.mask, dtype=torch.bool)
            tempered = torch.log_softmax(logits / 0.6, -1).gather(-1, ids).squeeze(-1)
            raw = torch.log_softmax(logits, -1).gather(-1, ids).squeeze(-1)
            assert torch.allclose(torch.tensor(ep.logps)[m], tempered[m], atol=1e-4)
            assert (tempered[m] - raw[m]).abs().max() > 1e-2
        inp, att, mask, old, T = rl.collate(episodes, tokenizer.pad_token_id, torch.device("cpu"))
        scored, _ = rl.token_logps(model, inp, att, T, temperature=0.6)
        untempered, _ = rl.token_logps(model, inp, att, T)
    assert torch.allclose(scored * mask, old, atol=1e-4)
    assert torch.exp((scored - old) * mask).sub(1).abs().max() < 1e-3  # the first ratio of a step
    assert ((untempered - old) * mask).abs().max() > 1e-2


def test_a_step_at_temperature_0_6_scores_policy_and_reference_at_it_ratio_1_kl_0(tiny_root, tiny_base, tmp_path):
    """One update right after the rollout: policy, recorded log-probs and the reference (the same start weights) are
    all at 0.6, so the ratio is 1 and the KL 0; a reference scored at temperature 1 would show a KL."""
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=1", "eval_n=0", "temperature=0.6", "updates_per_step=1",
                    "kl_coef=0.1"))
    (row,) = read_metrics(tmp_path)
    assert abs(row["ratio"] - 1) < 1e-4 and row["clip_frac"] == 0 and row["kl"] < 1e-4  # the reference is the start


def test_temperature_1_scores_the_untempered_logits_bit_for_bit(tiny_base):
    """At temperature 1 (configs/tiny.yaml) the log-probs are those of the plain log-softmax, exactly: the demo's
    numbers do not move. Greedy (0) records temperature 1's too."""
    from rollout import sample
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (1.0, 0.0):
        tokens, logps = sample(logits, temperature, generator=torch.Generator().manual_seed(1))
        assert torch.equal(logps, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    tokens, logps = sample(logits, 0.6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logps, torch.log_softmax(logits / 0.6, -1).gather(-1, tokens[:, None]).squeeze(-1))
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    inp, att, _, _, T = rl.collate(fake_episodes(model, 3, 0, model.config.vocab_size), 0, torch.device("cpu"))
    with torch.no_grad():
        got, entropy = rl.token_logps(model, inp, att, T, with_entropy=True, temperature=1.0)
        z = model(input_ids=inp, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
        z = z[:, -T - 1:-1].float()
        log_z = torch.logsumexp(z, -1)
    assert torch.equal(got, z.gather(-1, inp[:, -T:, None]).squeeze(-1) - log_z)
    assert torch.equal(entropy, log_z - (torch.softmax(z, -1) * z).sum(-1))


def test_schedule_runs_simulated_steps_first_and_counts_calls(tiny_root, tiny_base, tmp_path):
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=3", "sim_share=0.67", "eval_n=4", "save_every=0",
                    "env.max_actions=2"))
    rows = read_metrics(tmp_path)
    assert "eval_em" in rows[0] and "eval_em" in rows[-1]  # the start and the end, on the same questions
    steps = [r for r in rows if "env" in r]
    assert [r["env"] for r in steps] == ["policy", "policy", "real"]
    assert all(r["real_calls"] == 0 for r in steps[:2])
    assert steps[-1]["real_calls_total"] == sum(r["real_calls"] for r in steps)
    for key in ("reward", "em", "actions", "sim_calls", "kl", "clip_frac", "tokens_per_s"):
        assert key in steps[-1]
    assert os.path.exists(os.path.join(tmp_path, "t", "rl", "model.safetensors"))


def test_dev_curve_logs_each_kind_every_eval_every_steps_and_the_kinds_make_the_whole(tiny_root, tiny_base,
                                                                                        tmp_path):
    """eval_every=2 over 4 steps: the held-out curve at steps 0, 2 and 4, each point with the EM of every question
    kind, weighted by the kinds' counts into eval_em (the same greedy answers, split)."""
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=4", "eval_every=2", "eval_n=12", "save_every=0"))
    evals = [r for r in read_metrics(tmp_path) if "eval_em" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    dev = data.load_qa(os.path.join(tiny_root, "data", "dev.jsonl"))[:12]
    counts = collections.Counter(r["kind"] for r in dev)
    assert len(counts) > 1
    for r in evals:
        assert sorted(k for k in r if k.startswith("eval_em_")) == sorted(f"eval_em_{k}" for k in counts)
        whole = sum(r[f"eval_em_{k}"] * n for k, n in counts.items()) / 12
        assert abs(whole - r["eval_em"]) < 1e-9


def test_hop2_repeat_draws_each_two_hop_question_that_many_times_an_epoch(tiny_root):
    """hop2_repeat=3: a question whose oracle searched twice (two queries) is in the epoch's stream three times,
    a 1-hop one once; the step prompts of one epoch hold them in that proportion."""
    run = SimpleNamespace(data_dir=os.path.join(tiny_root, "data"))
    plain, _, _ = rl.load_rows(rl.RLConfig(eval_n=0), run)
    more, _, _ = rl.load_rows(rl.RLConfig(eval_n=0, hop2_repeat=3), run)
    two_hop = [r for r in plain if len(r.get("queries", ())) > 1]
    assert 0 < len(two_hop) < len(plain)
    assert len(more) == len(plain) + 2 * len(two_hop)
    epoch = rl.step_prompts(more, 0, len(more), seed=0)
    assert collections.Counter(r["id"] for r in epoch) == collections.Counter(
        {r["id"]: 3 if r in two_hop else 1 for r in plain})


def test_sim_train_gives_the_simulated_steps_their_own_questions(tiny_root, tmp_path):
    """sim_train=FILE: the simulated steps draw from FILE's questions (bench/real_model.py: the ones SFT-3 trained
    on), the real steps from train's; a FILE with no usable row is a one-line error."""
    run = SimpleNamespace(data_dir=os.path.join(tiny_root, "data"))
    plain, sim_plain, _ = rl.load_rows(rl.RLConfig(eval_n=0), run)
    assert sim_plain is plain
    seen = os.path.join(tmp_path, "seen.jsonl")
    with open(seen, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in plain[:3])
    train, sim, _ = rl.load_rows(rl.RLConfig(eval_n=0, sim_train=seen), run)
    assert train == plain and [r["id"] for r in sim] == [r["id"] for r in plain[:3]]
    assert {r["id"] for r in rl.step_prompts(sim, 5, 4, seed=0)} <= {r["id"] for r in plain[:3]}
    open(seen, "w").close()
    with pytest.raises(rl.ConfigError, match="no usable QA rows"):
        rl.load_rows(rl.RLConfig(eval_n=0, sim_train=seen), run)


def test_rollout_batch_decodes_whole_groups_per_call_and_keeps_row_order(monkeypatch):
    calls = []

    def rollout(policy, tokenizer, rows, env_cfg, environment, group_size=1, **sampling):
        calls.append([r["question"] for r in rows])
        return [SimpleNamespace(question=r["question"], member=j) for r in rows for j in range(group_size)]
    monkeypatch.setattr(rl, "rollout", rollout)
    rows = [{"question": f"q{i}"} for i in range(5)]
    for rollout_batch, per_call in ((0, 5), (3, 1), (6, 2), (7, 2), (100, 5)):
        calls.clear()
        episodes = rl.rollout_chunks(None, None, rows, None, None, rollout_batch, 3, temperature=1.0)
        assert [len(c) for c in calls] == [per_call] * (5 // per_call) + ([5 % per_call] if 5 % per_call else [])
        # score() reads rows[i // group_size]: episode i must belong to that row
        assert [(ep.question, ep.member) for ep in episodes] == [(f"q{i}", j) for i in range(5) for j in range(3)]


def test_rollout_batch_of_one_group_trains_and_logs_every_trajectory_and_the_truncated_share(tiny_root, tiny_base,
                                                                                             tmp_path, capsys):
    """rollout_batch=group_size: one prompt per rollout call; the step logs all 4 x 2 trajectories. A budget of 6
    tokens cuts nearly all of them: the step logs the share and says so in one line."""
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=1", "eval_n=0", "rollout_batch=2",
                    "env.max_new_tokens=6"))
    (row,) = read_metrics(tmp_path)
    assert row["trajectories"] == 8 and row["truncated"] > 0.2 and "loss" in row
    assert os.path.exists(os.path.join(tmp_path, "t", "rl", "model.safetensors"))
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and "rl: step 1: warning:" in warning[0] and "env.max_new_tokens=6" in warning[0]


def test_too_many_non_finite_losses_stop_the_run_with_a_clear_message(tiny_root, tiny_base, tmp_path, monkeypatch):
    real_loss = rl.grpo_loss
    monkeypatch.setattr(rl, "grpo_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), real_loss(*a, **k)[1]))
    with pytest.raises(RuntimeError, match="NaN/inf"):
        rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=5", "eval_n=0", "max_bad_steps=2", "updates_per_step=1"))
    assert len(read_metrics(tmp_path)) == 1  # the first bad step was skipped and logged, the second stopped it


def test_sigkill_then_resume_ends_with_the_same_weights(tiny_root, tiny_base, tmp_path):
    argv = rl_argv(tiny_root, tiny_base, tmp_path / "a", "steps=4", "save_every=2", "eval_n=0", "updates_per_step=2",
                   "kl_coef=0.05")
    rl.main(argv)  # uninterrupted
    killed = rl_argv(tiny_root, tiny_base, tmp_path / "b", "steps=4", "save_every=2", "eval_n=0",
                     "updates_per_step=2", "kl_coef=0.05")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "rl.py"), *killed], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "b" / "t" / "rl.ckpt" / "step_000002"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "b" / "t" / "rl").exists()  # killed mid-run
    rl.main(killed + ["--resume"])
    a = load_file(tmp_path / "a" / "t" / "rl" / "model.safetensors")
    b = load_file(tmp_path / "b" / "t" / "rl" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training moved the weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 5))


def test_a_typo_or_a_rerun_never_wipes_an_earlier_runs_checkpoints(tiny_root, tiny_base, tmp_path):
    from config import ConfigError
    ckpt = tmp_path / "t" / "rl.ckpt" / "step_000002"
    ckpt.mkdir(parents=True)
    with pytest.raises(ConfigError, match="unknown flag --resum"):
        rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=1", "eval_n=0", "--resum"))
    with pytest.raises(ConfigError, match="--resume continues it, --overwrite deletes it"):
        rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=1", "eval_n=0"))
    assert ckpt.exists()


def test_a_missing_init_folder_names_the_folder_and_its_stage(tiny_root, tiny_base, tmp_path):
    from config import ConfigError
    with pytest.raises(ConfigError, match=f"rl.init='sft123': no model folder '{tmp_path}/t/sft123' "
                                          f"\\(sft.py \\(sft.out=sft123\\) writes it"):
        rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "init=sft123"))


def searching_rollout(monkeypatch):
    """rl.rollout, but every trajectory also sends one query to the step's environment (an untrained model seldom
    searches): a real step spends exactly one real call per trajectory (env.max_actions=0 stops the model's own)."""
    real_rollout = rl.rollout

    def rollout(policy, tokenizer, rows, env_cfg, environment, **kwargs):
        episodes = real_rollout(policy, tokenizer, rows, env_cfg, environment, **kwargs)
        for ep in episodes if environment is not None else []:
            environment(["who founded Vexa"])
            ep.real_calls += 1
        return episodes
    monkeypatch.setattr(rl, "rollout", rollout)


def test_a_retriever_that_is_down_stops_the_run_naming_url_and_cause(tiny_root, tiny_base, tmp_path, monkeypatch):
    import socket
    from tools import ToolError
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"
    searching_rollout(monkeypatch)
    with pytest.raises(ToolError, match=f"step 1: 1 of 1 real tool calls failed.*{url}.*connection refused"):
        rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=2", "eval_n=0", "env.max_actions=0", "env.tool=http",
                        f"env.url={url}", "env.retries=0", "env.timeout_s=1"))
    assert not (tmp_path / "t" / "rl").exists()  # stopped before any update on "search failed" observations


def test_tool_failures_below_the_limit_are_counted_and_training_goes_on(tiny_root, tiny_base, tmp_path,
                                                                         monkeypatch):
    import tools
    from tools import ToolError
    calls = []

    def flaky(queries, k=2):  # every fourth call fails
        calls.append(queries)
        if len(calls) % 4 == 0:
            raise ToolError("retrieval server http://x/retrieve failed after 3 tries: HTTP 500", "HTTP 500")
        return [["Vexa was founded by Ada Brun."] for _ in queries]
    monkeypatch.setattr(tools, "make_tool", lambda env, run: flaky)
    searching_rollout(monkeypatch)
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=2", "eval_n=0", "env.max_actions=0", "save_every=0"))
    rows = read_metrics(tmp_path)
    assert [(r["real_calls"], r["tool_failures"], r["tool_failures_total"]) for r in rows] == [(8, 2, 2), (8, 2, 4)]
    assert os.path.exists(os.path.join(tmp_path, "t", "rl", "model.safetensors"))


# -----------------------------------------------------------------------------
# bf16 on one process: FSDP2's MixedPrecisionPolicy with a 1-rank group, the same path as on N GPUs

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)])
def test_bf16_on_one_process_trains_fp32_masters_and_rolls_out_with_bf16_weights(tiny_cfg, tiny_base, device,
                                                                                   one_rank_group):
    from torch.distributed.tensor import DTensor
    from plumbing import wrap_model
    from rollout import rollout
    from plumbing import load_model
    from tools import SearchEnv, make_tool
    device = torch.device(device)
    cfg = rl.RLConfig(group_size=2, lr=1e-2, parallel="fsdp", bf16=True)
    model, tokenizer = load_model(tiny_base, tiny_cfg.run, device=device, dtype=torch.float32)
    model = wrap_model(model, device, cfg.parallel, cfg.bf16)
    masters = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
    env = SearchEnv(make_tool(tiny_cfg.env, tiny_cfg.run), tokenizer, tiny_cfg.env)
    rows = [json.loads(line) for line in open(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))][:2]
    with rl.generation_mode(model) as policy:
        seen = {(type(p).__name__, p.dtype, p.device.type) for p in policy.parameters()}
        episodes = rollout(policy, tokenizer, rows, tiny_cfg.env, env, group_size=2, temperature=1.0,
                           max_new_tokens=24, generator=torch.Generator(device=device).manual_seed(0))
    assert seen == {("Parameter", torch.bfloat16, device.type)}  # the gathered bf16 weights, not the fp32 masters
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())  # resharded
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    totals = {"skipped": 0, "bad_in_row": 0}
    stats = rl.learn(model, None, opt, sched, episodes, torch.tensor([1., 0., 0., 1.]), [0, 1], cfg, 24,
                     tokenizer.pad_token_id, device, totals)
    assert totals["skipped"] == 0 and math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    after = {n: p.full_tensor() for n, p in model.named_parameters()}
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(after[n], masters[n]) for n in masters)  # the fp32 masters took the step


def test_bf16_needs_fsdp_and_says_so(tmp_path):
    with pytest.raises(rl.ConfigError, match="rl.bf16=true needs rl.parallel=fsdp"):
        rl.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.runs_dir={tmp_path}", "bf16=true"])


def test_sim_rewards_splits_reward_by_whether_the_question_needs_a_search_and_the_trajectory_searched(tmp_path):
    import importlib
    bench = importlib.import_module("bench.sim_rewards")
    from rollout import Episode
    from tools import EnvConfig
    env = EnvConfig()
    right, wrong = " </think> \\boxed{Lorn}", " </think> \\boxed{Kesh}"
    eps = [Episode("q", ["Lorn"], [], text=right, actions=["Ada"], row={"needs_search": True}),
           Episode("q", ["Lorn"], [], text=wrong, actions=["Ada"], row={"needs_search": True}),
           Episode("q", ["Lorn"], [], text=wrong, actions=[], row={"needs_search": True}),
           Episode("q", ["Lorn"], [], text=right, actions=[], row={"needs_search": False})]
    assert bench.reward_table(eps, env) == {"needs search": {"searched": [2, 0.5], "no search": [1, 0.0]},
                                            "well-known": {"searched": [0, None], "no search": [1, 1.0]}}
    (tmp_path / "eval").mkdir()
    rows = [{"needs_search": True, "actions": 0}, {"needs_search": True, "actions": 2},
            {"needs_search": False, "actions": 0}, {"needs_search": True, "actions": 1}]
    (tmp_path / "eval" / "sft_2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval" / "sft_2.summary.json").write_text("{}")
    assert bench.when_to_act_on_test(str(tmp_path / "eval")) == {  # eval.when_to_act's shares, per eval
        "sft_2": {"needed_search_skipped": 0.333, "needless_search": 0.0}}
    assert bench.when_to_act_on_test(str(tmp_path / "missing")) == {}


def test_a_schedule_with_sim_share_below_1_keeps_a_real_step():
    from tools import EnvConfig
    env = EnvConfig()
    kinds = lambda steps, share: [rl.step_env(s, rl.RLConfig(steps=steps, sim_share=share), env) for s in range(steps)]
    assert kinds(2, 5 / 6) == ["policy", "real"]  # round(1.67) = 2 would have left no real step
    assert kinds(1, 0.5) == ["real"] and kinds(2, 1.0) == ["policy", "policy"] and kinds(3, 0.0) == ["real"] * 3
    assert kinds(6, 5 / 6) == ["policy"] * 5 + ["real"]
