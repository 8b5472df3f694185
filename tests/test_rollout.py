"""Tests for rollout.py: the KV-cached engine against HF generate and a from-scratch reference.

    .venv/bin/python -m pytest -q tests/test_rollout.py

The model is the untrained tiny model with its weights scaled up (so greedy text varies instead of repeating
one token) and an LM-head bias towards the CoA tags (so it acts, thinks, closes and answers often enough to
exercise every branch). It is still a plain HF Qwen2ForCausalLM: model(...) and model.generate work on it.
"""
import dataclasses

import pytest
import torch

from rollout import NOTE, Episode, encode_prompt, generate, rollout, sample
from tools import EnvConfig, SearchEnv, ToolError, answer_text, build_prompt, extract_boxed, make_tool


@pytest.fixture(scope="module")
def agent(tiny_base):
    """(model, tokenizer): the tiny model, weights x4, LM head untied with a bias towards the tags."""
    from plumbing import load_model
    model, tok = load_model(tiny_base, device=torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.zero_()
        for tag, b in [("</end_search>", 4.0), ("<begin_search>", 6.0), ("</think>", 2.5), ("\\boxed{", 3.0)]:
            head.bias[tok.convert_tokens_to_ids(tag)] = b
        head.bias[tok.convert_tokens_to_ids("}")] = 5.0
        head.bias[tok.eos_token_id] = 1.0
        model.lm_head = head
    model.config.tie_word_embeddings = False
    return model.eval(), tok


@pytest.fixture(scope="module")
def questions(tiny_cfg):
    from data import load_qa
    return load_qa(f"{tiny_cfg.run.data_dir}/test.jsonl")


@pytest.fixture(scope="module")
def search(tiny_cfg, agent):
    env = EnvConfig(max_new_tokens=96, max_actions=2, obs_max_tokens=40)
    return env, SearchEnv(make_tool(env, tiny_cfg.run), agent[1], env)


# -----------------------------------------------------------------------------
# A slow reference: recompute the whole sequence from scratch at every step, find tags in the decoded text

def reference_rollout(model, tok, question, env, environment, max_new):
    """Greedy CoA loop with no cache: one full forward of prompt + completion per new token."""
    prompt = encode_prompt(tok, question, env)
    ids, mask, actions = [], [], []
    seg = 0  # start of the model's current stretch of writing
    answer_from, forced = None, False

    def add_env(new):
        nonlocal seg
        new = new[:max_new - len(ids)]
        ids.extend(new)
        mask.extend([0] * len(new))
        seg = len(ids)

    while True:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, -1]
        token = int(logits.argmax())
        ids.append(token)
        mask.append(1)
        if token == tok.eos_token_id:
            return ids, mask, actions, "eos"
        if len(ids) >= max_new:
            return ids, mask, actions, "length"
        if answer_from is not None:
            if extract_boxed(tok.decode(ids[answer_from:]), env.answer_open) is not None:
                return ids, mask, actions, "max_actions" if forced else "answer"
            continue
        stretch = tok.decode(ids[seg:])
        if env.think_close in stretch:
            answer_from = len(ids)
        elif stretch.endswith(env.action_close):  # the model just closed an action
            _, opened, query = stretch[:-len(env.action_close)].rpartition(env.action_open)
            if not opened:  # a closer with no opener is no action
                continue
            if len(actions) >= env.max_actions:
                forced, answer_from = True, len(ids)
                add_env(tok.encode(NOTE + answer_text(env), add_special_tokens=False))
            else:
                query = query.strip()
                actions.append(query)
                add_env(tok.encode(environment([query])[0], add_special_tokens=False))
            if len(ids) >= max_new:
                return ids, mask, actions, "length"


def full_forward_logps(model, prompt_ids, ids):
    """log p(ids[t] | prompt, ids[:t]) from one plain forward of the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(prompt_ids) - 1:-1]
    return logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


# -----------------------------------------------------------------------------
# Equivalence

@pytest.mark.parametrize("batch", [1, 3, 8])
def test_generate_without_tools_equals_hf_generate_greedy(agent, questions, batch):
    model, tok = agent
    env = EnvConfig()
    # ragged prompts: different questions, and a few extra words on some
    prompts = [encode_prompt(tok, q["question"] + " please" * (i % 3), env) for i, q in enumerate(questions[:batch])]
    assert batch == 1 or len({len(p) for p in prompts}) > 1
    ids, logps = generate(model, tok, prompts, 24)
    padded = tok.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(**padded, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    for i in range(batch):
        hf = out[i, padded["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in hf:  # HF pads after EOS; ours stops at EOS (kept)
            hf = hf[:hf.index(tok.eos_token_id) + 1]
        assert ids[i] == hf
        assert len(logps[i]) == len(ids[i])


def test_generate_stops_after_a_stop_string(agent, questions):
    model, tok = agent
    prompts = [encode_prompt(tok, q["question"], EnvConfig()) for q in questions[:6]]
    free, _ = generate(model, tok, prompts, 40)
    stopped, _ = generate(model, tok, prompts, 40, stop_strings=("}",))
    for a, b in zip(free, stopped):
        text = tok.decode(a)
        if "}" in text:  # the stopped run is the free run cut right after the token that wrote the "}"
            cut = next(i for i in range(1, len(a) + 1) if "}" in tok.decode(a[:i]))
            assert b == a[:cut]
        else:
            assert b == a
    assert any("}" in tok.decode(a) for a in free)  # the test saw a stop at least once


@pytest.mark.parametrize("batch,group", [(1, 1), (3, 1), (4, 2)])
def test_rollout_with_tool_calls_equals_from_scratch_reference(agent, questions, search, batch, group):
    model, tok = agent
    env, environment = search
    rows = questions[batch:2 * batch]
    episodes = rollout(model, tok, rows, env, environment, group_size=group)
    assert len(episodes) == batch * group
    for i, ep in enumerate(episodes):
        assert ep.question == rows[i // group]["question"]
        ids, mask, actions, finish = reference_rollout(model, tok, ep.question, env, environment, env.max_new_tokens)
        assert ep.ids == ids
        assert ep.mask == mask
        assert ep.actions == actions
        assert ep.finish == finish
        assert ep.real_calls == len(actions) and ep.sim_calls == 0
    assert any(ep.actions for ep in episodes)  # the tool really was called


def test_rollout_builds_no_autograd_graph_whoever_calls_it(agent, questions, search):
    """rollout() turns gradients off itself: a caller outside torch.no_grad (synthesis with a local teacher, the
    world model's report, the benches) would otherwise keep every step's activations alive through the KV cache."""
    model, tok = agent
    env, environment = search
    seen = []
    head = model.get_output_embeddings()  # rollout calls the decoder and the head, not model.forward
    hook = head.register_forward_hook(lambda module, args, out: seen.append(torch.is_grad_enabled()))
    try:
        assert torch.is_grad_enabled()
        rollout(model, tok, questions[:2], env, environment)
    finally:
        hook.remove()
    assert seen and not any(seen)


def test_rollout_covers_every_finish_reason(agent, questions, search):
    model, tok = agent
    env, environment = search
    env = dataclasses.replace(env, max_actions=1)
    episodes = rollout(model, tok, questions[:16], env, environment, group_size=2, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    finishes = {ep.finish for ep in episodes}
    assert {"answer", "length", "eos"} <= finishes, finishes  # max_actions: see test_action_limit_forces_an_answer


# -----------------------------------------------------------------------------
# Mask, log-probs, sampling

def test_mask_covers_exactly_the_model_written_tokens_and_logps_match_a_full_forward(agent, questions, search):
    model, tok = agent
    env, environment = search
    episodes = rollout(model, tok, questions[:6], env, environment, group_size=2, temperature=1.0,
                       generator=torch.Generator().manual_seed(1))
    n_env = 0
    for ep in episodes:
        assert len(ep.ids) == len(ep.mask) == len(ep.logps) <= env.max_new_tokens
        # every environment token sits inside an observation or the forced note, each right after an action
        text_env = tok.decode([t for t, m in zip(ep.ids, ep.mask) if m == 0])
        assert text_env.count(env.obs_open) == len(ep.actions) == ep.real_calls
        if ep.finish == "max_actions":
            assert text_env.count(env.think_close) == 1  # the forced note
        ref = full_forward_logps(model, ep.prompt_ids, ep.ids)
        got = torch.tensor(ep.logps)
        m = torch.tensor(ep.mask, dtype=torch.bool)
        assert torch.allclose(got[m], ref[m], atol=1e-4)
        assert (got[~m] == 0).all()
        n_env += int((~m).sum())
        assert ep.text == tok.decode(ep.ids)
    assert n_env > 0


def test_sampling_is_reproducible_given_a_generator(agent, questions, search):
    model, tok = agent
    env, environment = search
    runs = [rollout(model, tok, questions[:4], env, environment, group_size=3, temperature=1.0, top_p=0.9,
                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert [ep.ids for ep in runs[0]] == [ep.ids for ep in runs[1]]
    other = rollout(model, tok, questions[:4], env, environment, group_size=3, temperature=1.0, top_p=0.9,
                    generator=torch.Generator().manual_seed(8))
    assert [ep.ids for ep in other] != [ep.ids for ep in runs[0]]
    assert len({tuple(ep.ids) for ep in runs[0][:3]}) > 1  # group members differ


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, 1.0, 0.7, g)[0]) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 >= 0.7: the tail is never drawn
    tokens, logps = sample(logits.repeat(3, 1), 0.0)
    assert tokens.tolist() == [0, 0, 0] and torch.allclose(logps, torch.log(torch.tensor(0.5)))


# -----------------------------------------------------------------------------
# Limits and failures

def test_action_limit_forces_an_answer(agent, questions, search):
    model, tok = agent
    env = dataclasses.replace(search[0], max_actions=0, max_new_tokens=80)
    episodes = rollout(model, tok, questions[:12], env, search[1])
    note = NOTE + answer_text(env)
    forced = [ep for ep in episodes if ep.finish == "max_actions"]
    assert forced
    for ep in episodes:
        assert ep.actions == [] and ep.real_calls == 0  # no action ever reaches the tool
    for ep in forced:
        after = ep.text.partition(note.strip())[2]
        assert after and extract_boxed(env.answer_open + after) is not None and ep.text.endswith("}")
        # the note is the loop's: masked, right after the refused action's closing tag (the model's)
        first = ep.mask.index(0)
        assert tok.decode(ep.ids[:first]).endswith(env.action_close) and ep.mask[first - 1] == 1


LIMIT = "Reach the limit of search times."


def test_limit_observation_answers_a_search_past_the_limit_and_the_model_goes_on(agent, questions, search):
    """env.limit_observation (the paper's code): a search past max_actions is not run, gets the limit text as its
    observation (mask 0) and the model writes on; the default forces the answer instead."""
    model, tok = agent
    env, environment = search
    env = dataclasses.replace(env, max_actions=1, max_new_tokens=120, limit_observation=LIMIT)
    episodes = rollout(model, tok, questions[:12], env, environment)
    limit_obs = f"{env.obs_open} {LIMIT} {env.obs_close}"
    limited = [ep for ep in episodes if limit_obs in ep.text]
    assert limited and all(ep.finish != "max_actions" for ep in episodes)
    for ep in limited:
        assert len(ep.actions) == ep.real_calls == 1  # the search past the limit reached no tool
        start = ep.text.index(limit_obs)
        assert tok.decode(ep.ids).count(env.obs_open) == 1 + ep.text.count(limit_obs)
        at = next(i for i in range(len(ep.ids)) if len(tok.decode(ep.ids[:i + 1])) > start)  # its first token
        end = at + len(tok.encode(limit_obs, add_special_tokens=False))
        assert set(ep.mask[at:end]) == {0} and tok.decode(ep.ids[at:end]) == limit_obs
        assert ep.finish == "length" or ep.mask[end] == 1  # the model goes on after it (or the budget is spent)
    forced = rollout(model, tok, questions[:12], dataclasses.replace(env, limit_observation=""), environment)
    assert any(ep.finish == "max_actions" for ep in forced) and not any(LIMIT in ep.text for ep in forced)
    closed = rollout(model, tok, questions[:12], dataclasses.replace(env, max_actions=0), environment)
    assert any(ep.finish == "max_actions" for ep in closed) and not any(LIMIT in ep.text for ep in closed)  # no tool


class Broken:
    simulated = False

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, queries, contexts=None):
        self.calls += 1
        if isinstance(self.error, Exception):
            raise self.error
        return self.error  # a malformed reply


@pytest.mark.parametrize("error", [ConnectionError("down"), ["one"] * 99, 42])
def test_a_failing_tool_yields_the_failed_observation_not_a_crash(agent, questions, search, error):
    model, tok = agent
    env = search[0]
    tool = Broken(error)
    episodes = rollout(model, tok, questions[:8], env, tool)
    acted = [ep for ep in episodes if ep.actions]
    assert acted and tool.calls >= 1
    for ep in acted:
        assert f"{env.obs_open} search failed:" in ep.text


def test_a_failing_tool_raises_with_on_error_raise(agent, questions, search):
    model, tok = agent
    env = dataclasses.replace(search[0], on_error="raise")
    with pytest.raises(ToolError):
        rollout(model, tok, questions[:8], env, Broken(ConnectionError("down")))


def test_length_limit_counts_observations(agent, questions, search):
    model, tok = agent
    env, environment = search
    episodes = rollout(model, tok, questions[:8], env, environment, max_new_tokens=30)
    assert all(len(ep.ids) <= 30 for ep in episodes)
    assert any(ep.finish == "length" for ep in episodes)


# -----------------------------------------------------------------------------
# Simulated environments

class FakeWorldModel:
    """Stands in for worldmodel.py's environment: same interface, simulated = True, sees the contexts."""
    simulated = True

    def __init__(self, env):
        self.env, self.contexts = env, []

    def __call__(self, queries, contexts):
        self.contexts += contexts
        return [f"{self.env.obs_open} {q} was born in Lorn {self.env.obs_close}" for q in queries]


def test_world_model_env_counts_simulated_calls_and_sees_the_context(agent, questions, search):
    model, tok = agent
    env = search[0]
    wm = FakeWorldModel(env)
    episodes = rollout(model, tok, questions[:6], dataclasses.replace(env, env="worldmodel"), wm)
    acted = [ep for ep in episodes if ep.actions]
    assert acted
    for ep in episodes:
        assert ep.real_calls == 0 and ep.sim_calls == len(ep.actions)
    prompt = build_prompt(tok, acted[0].question, env)
    assert any(c.startswith(prompt) and c.rstrip().endswith(env.action_close) for c in wm.contexts)


def test_policy_env_writes_its_own_observation_under_mask_zero(agent, questions, search):
    model, tok = agent
    env = dataclasses.replace(search[0], env="policy", obs_max_tokens=10)
    episodes = rollout(model, tok, questions[:8], env, None, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    acted = [ep for ep in episodes if ep.actions]
    assert acted
    for ep in episodes:
        assert ep.real_calls == 0 and ep.sim_calls == len(ep.actions)
        ref = full_forward_logps(model, ep.prompt_ids, ep.ids)
        m = torch.tensor(ep.mask, dtype=torch.bool)
        assert torch.allclose(torch.tensor(ep.logps)[m], ref[m], atol=1e-4)
    for ep in acted:
        # after the action close comes the observation opener (the loop's), then the policy's own words, masked
        first = ep.mask.index(0)
        assert tok.decode(ep.ids[:first]).rstrip().endswith(env.action_close)
        assert tok.decode(ep.ids[first:first + 1]) == env.obs_open
        span = ep.ids[first:]
        end = next((i for i in range(1, len(span) + 1) if env.obs_close in tok.decode(span[:i])), len(span))
        assert all(m == 0 for m in ep.mask[first:first + end])
        assert end <= env.obs_max_tokens + 2


def test_policy_env_with_sim_greedy_writes_the_likeliest_observation_and_samples_its_own_words(agent, questions,
                                                                                              search):
    """env.sim_greedy: inside a self-written observation every token is the argmax of a plain forward (the
    opener excepted: the loop writes it); the model's own tokens are still sampled (not all argmax)."""
    model, tok = agent
    env = dataclasses.replace(search[0], env="policy", obs_max_tokens=10, sim_greedy=True)
    episodes = rollout(model, tok, questions[:8], env, None, temperature=1.0, group_size=2,
                       generator=torch.Generator().manual_seed(0))
    opener, closer = (tok.convert_tokens_to_ids(t) for t in (env.obs_open, env.obs_close))  # one id each here
    written = sampled = own = 0
    for ep in [ep for ep in episodes if ep.actions]:
        with torch.no_grad():
            logits = model(torch.tensor([ep.prompt_ids + ep.ids])).logits[0, len(ep.prompt_ids) - 1:-1]
        best, inside = logits.argmax(-1).tolist(), False
        for t, (token, m) in enumerate(zip(ep.ids, ep.mask)):
            if m == 1:
                own += 1
                sampled += token != best[t]
            elif inside and token != closer:  # the policy's own observation (the loop closes one over budget)
                written += 1
                assert token == best[t]
            inside = (inside or token == opener) and m == 0 and token != closer
    assert written > 0 and sampled > 0 and own > sampled


def test_episode_defaults_and_prompt_encoding(agent):
    _, tok = agent
    env = EnvConfig()
    ep = Episode(question="q", golds=["a"], prompt_ids=encode_prompt(tok, "q", env))
    assert ep.ids == [] and ep.reward == 0.0 and ep.finish == ""
    assert tok.decode(ep.prompt_ids) == build_prompt(tok, "q", env)


# -----------------------------------------------------------------------------
# Teacher forcing: a known trajectory replayed through the loop comes back token for token

class ForcedHead(torch.nn.Module):
    """An LM head that makes every row write `script` (one token per forward: rows stay in lockstep)."""

    def __init__(self, head, script):
        super().__init__()
        self.head, self.script, self.step = head, script, 0

    def forward(self, hidden):
        logits = self.head(hidden)
        forced = torch.full_like(logits, -1e9)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return forced


class FixedEnv:
    simulated = False

    def __init__(self, obs):
        self.obs, self.queries = obs, []

    def __call__(self, queries, contexts=None):
        self.queries += queries
        return [self.obs] * len(queries)


def replay(model, tok, questions):
    """Force a CoA trajectory with two searches; return (episodes, expected ids, expected mask)."""
    env = EnvConfig(max_new_tokens=400, max_actions=4)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    said = [encode(" Who was it? <begin_search> Ada Brun </end_search>"),
            encode(" Now the city. <begin_search> Lorn city </end_search>"),
            encode(" Ada Brun was born in Lorn. </think> \\boxed{Lorn}")]
    obs = "<search_result> Ada Brun\nAda Brun was born in Lorn in 1950. </search_result>"
    ids, mask = [], []
    for i, seg in enumerate(said):
        ids += seg
        mask += [1] * len(seg)
        if i < 2:
            ids += encode(obs)
            mask += [0] * len(encode(obs))
    original = model.lm_head
    model.lm_head = ForcedHead(original, [t for seg in said for t in seg])
    try:
        episodes = rollout(model, tok, questions, env, FixedEnv(obs))
    finally:
        model.lm_head = original
    return episodes, ids, mask


def test_teacher_forced_replay_gives_back_identical_ids(agent, questions):
    model, tok = agent
    episodes, ids, mask = replay(model, tok, questions[:5])
    for ep in episodes:
        assert ep.ids == ids and ep.mask == mask
        assert ep.actions == ["Ada Brun", "Lorn city"] and ep.real_calls == 2 and ep.finish == "answer"


def test_multi_piece_tags_on_a_random_llama_with_smollm2s_tokenizer(smol_tokenizer, questions):
    """Llama architecture, chat-template prompts, tags of several tokens: replay, HF generate, log-probs."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = smol_tokenizer
    assert len(tok.encode("</end_search>", add_special_tokens=False)) > 1
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked logits: greedy ties would make the comparison meaningless
    episodes, ids, mask = replay(model, tok, questions[:3])
    for ep in episodes:
        assert ep.ids == ids and ep.mask == mask and ep.finish == "answer"
        assert ep.actions == ["Ada Brun", "Lorn city"]
    prompts = [encode_prompt(tok, q["question"] + " ok" * i, EnvConfig()) for i, q in enumerate(questions[:3])]
    got, logps = generate(model, tok, prompts, 12)
    padded = tok.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(**padded, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    for i in range(3):
        hf = out[i, padded["input_ids"].shape[1]:].tolist()
        hf = hf[:hf.index(tok.eos_token_id) + 1] if tok.eos_token_id in hf else hf
        assert got[i] == hf
        ref = full_forward_logps(model, prompts[i], got[i])
        assert torch.allclose(torch.tensor(logps[i]), ref, atol=1e-4)


# -----------------------------------------------------------------------------
# Static decode (env.static_decode): the preallocated cache and fixed-shape step give the eager path's ids

def static_env(env):
    return dataclasses.replace(env, static_decode=True)


@pytest.fixture
def small_kv_step(monkeypatch):
    """KV_STEP 16: the step's key length changes bucket within a rollout (256 would cover the tiny runs whole)."""
    import rollout as R
    monkeypatch.setattr(R, "KV_STEP", 16)
    return R


def test_static_decode_greedy_ids_equal_the_eager_paths_with_tool_calls(agent, questions, search, small_kv_step):
    model, tok = agent
    env, environment = search
    eager = rollout(model, tok, questions[:16], env, environment)
    static = rollout(model, tok, questions[:16], static_env(env), environment)
    for a, b in zip(eager, static):
        assert (b.ids, b.mask, b.actions, b.finish) == (a.ids, a.mask, a.actions, a.finish)
        assert torch.allclose(torch.tensor(b.logps), torch.tensor(a.logps), atol=1e-4)
    assert sum(len(ep.actions) for ep in eager) >= 8  # observation chunks came in the middle of decoding
    assert len({len(ep.ids) for ep in eager}) >= 3  # rows finished at different steps: finished rows were masked
    decoder = small_kv_step._DECODERS[model]
    assert decoder.cache.used < 16  # ... and compacted into a smaller bucket at least once


def test_static_decode_generate_equals_eager_generate(agent, questions):
    model, tok = agent
    prompts = [encode_prompt(tok, q["question"] + " ok" * i, EnvConfig()) for i, q in enumerate(questions[:5])]
    ids, logps = generate(model, tok, prompts, 30, stop_strings=("}",), static_decode=True)
    ref_ids, ref_logps = generate(model, tok, prompts, 30, stop_strings=("}",))
    assert ids == ref_ids and len({len(i) for i in ids}) > 1  # some stopped early
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4) for a, b in zip(logps, ref_logps))


def test_static_decode_logps_match_a_full_forward_and_sampling_is_reproducible(agent, questions, search):
    model, tok = agent
    env, environment = static_env(search[0]), search[1]
    runs = [rollout(model, tok, questions[:4], env, environment, group_size=3, temperature=1.0, top_p=0.9,
                    generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert [ep.ids for ep in runs[0]] == [ep.ids for ep in runs[1]]
    assert [ep.ids for ep in runs[0]] != [ep.ids for ep in runs[2]]
    for ep in runs[0] + runs[2]:
        ref = full_forward_logps(model, ep.prompt_ids, ep.ids)
        m = torch.tensor(ep.mask, dtype=torch.bool)
        assert torch.allclose(torch.tensor(ep.logps)[m], ref[m], atol=1e-4)
        assert (torch.tensor(ep.logps)[~m] == 0).all()
    assert any(ep.actions for ep in runs[0])


def test_static_decoder_is_reused_across_calls_until_the_weights_move(agent, questions, search):
    import rollout as R
    model, tok = agent
    env, environment = static_env(search[0]), search[1]
    rollout(model, tok, questions[:6], env, environment)
    first = R._DECODERS[model]
    smaller = rollout(model, tok, questions[:3], env, environment)
    assert R._DECODERS[model] is first  # big enough: same buffers (and graphs, on cuda)
    assert [ep.ids for ep in smaller] == [ep.ids for ep in rollout(model, tok, questions[:3], search[0], environment)]
    norm = model.get_decoder().norm
    norm.weight.data = norm.weight.data.clone()  # same values, new storage: a captured graph would read the old one
    again = rollout(model, tok, questions[:3], env, environment)
    assert R._DECODERS[model] is not first and [ep.ids for ep in again] == [ep.ids for ep in smaller]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_gives_the_eager_paths_greedy_ids(agent, questions, search):
    import copy as copying
    import rollout as R
    model, tok = agent
    gpu = copying.deepcopy(model).cuda()
    env, environment = search
    eager = rollout(gpu, tok, questions[:8], env, environment, group_size=2)
    static = rollout(gpu, tok, questions[:8], static_env(env), environment, group_size=2)
    assert R._DECODERS[gpu].graphs  # the steps were captured and replayed
    for a, b in zip(eager, static):
        assert (b.ids, b.mask, b.actions, b.finish) == (a.ids, a.mask, a.actions, a.finish)
        assert torch.allclose(torch.tensor(b.logps), torch.tensor(a.logps), atol=1e-4)


def test_a_closing_tag_with_no_opener_runs_no_search(agent, questions):
    """`</end_search>` alone is no action: the whole thought must not go to the tool as a query."""
    model, tok = agent
    said = tok.encode(" I think it is Lorn </end_search> so. </think> \\boxed{Lorn}", add_special_tokens=False)
    env, original = FixedEnv("<search_result> x </search_result>"), model.lm_head
    model.lm_head = ForcedHead(original, said)
    try:
        ep = rollout(model, tok, questions[:1], EnvConfig(max_new_tokens=60), env)[0]
    finally:
        model.lm_head = original
    assert env.queries == [] and ep.actions == [] and ep.real_calls == 0 and all(ep.mask)
    assert ep.ids == said and ep.finish == "answer"
