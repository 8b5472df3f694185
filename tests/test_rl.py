"""Tests of rl.py: the GRPO loss against hand computations, then the loop on the tiny model.

    .venv/bin/python -m pytest -q tests/test_rl.py
"""
import math

import pytest
import torch

import rl


# -----------------------------------------------------------------------------
# The loss, alone

def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.])
    std = math.sqrt(0.25 * 0.75)  # population std of {1, 0, 0, 0}
    expected = torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0, 0, 0, 0])
    assert torch.allclose(rl.group_advantages(rewards, 4), expected, atol=1e-4)
    unscaled = rl.group_advantages(rewards, 4, scale_std=False)
    assert torch.allclose(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_group_advantages_sum_to_zero_within_each_group():
    rewards = torch.rand(30)
    adv = rl.group_advantages(rewards, 5).view(6, 5)
    assert torch.allclose(adv.sum(1), torch.zeros(6), atol=1e-4)


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
