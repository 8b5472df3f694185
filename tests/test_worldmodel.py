"""worldmodel.py: the real-call log, the world model's data and loss, fidelity metrics; the served environment
(tools.WorldModelEnv, tools.make_environment)."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import data
import tools
import worldmodel as wmod
from config import ConfigError
from plumbing import load_model
from tools import EnvConfig, SearchEnv, build_prompt, make_tool

ENV = EnvConfig()


def wm_argv(root, base, name, *extra):
    here = os.path.dirname(__file__)
    return ["--config", os.path.join(here, "..", "configs", "tiny.yaml"), f"run.data_dir={root}/data",
            f"run.runs_dir={root}/runs", f"run.name={name}", f"model.base={base}", "run.device=cpu", *extra]


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_model(tiny_base, device=torch.device("cpu"))


# -----------------------------------------------------------------------------
# Data: the real-call log, oracle calls, histories, examples

def test_search_env_logs_one_row_per_real_call_with_question_and_history(tiny_cfg, base, tmp_path):
    _, tok = base
    log = tmp_path / "calls.jsonl"
    env = SearchEnv(make_tool(ENV, tiny_cfg.run), tok, ENV, log_path=str(log))
    corpus = open(f"{tiny_cfg.run.data_dir}/corpus.jsonl")
    people = [json.loads(line)["contents"].split("\n")[0] for line in corpus][:2]
    contexts = [build_prompt(tok, f"Where was {p} born?", ENV) + " I should check." + tools.action_text(p, ENV)
                for p in people]
    obs = env(people, contexts)
    rows = wmod.read_calls(str(log))
    assert [r["query"] for r in rows] == people and [r["observation"] for r in rows] == obs
    assert rows[0]["question"] == f"Where was {people[0]} born?"
    assert rows[0]["history"].startswith(" I should check.")
    assert people[0] in obs[0]


def test_read_calls_skips_malformed_rows_and_refuses_a_missing_file(tmp_path, capsys):
    path = tmp_path / "calls.jsonl"
    good = {"question": "q", "history": "", "query": "x", "observation": "<search_result> x </search_result>"}
    path.write_text(json.dumps(good) + "\nnot json\n" + json.dumps({"question": "q"}) + "\n")
    assert wmod.read_calls(str(path)) == [good]
    assert f"{path}:2" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no file matches"):
        wmod.read_calls(str(tmp_path / "missing-*.jsonl"))


def test_oracle_calls_carry_earlier_calls_as_history(tiny_cfg, base):
    _, tok = base
    search = SearchEnv(make_tool(ENV, tiny_cfg.run), tok, ENV)
    rows = [r for r in data.load_qa(f"{tiny_cfg.run.data_dir}/train.jsonl") if r["kind"] == "country"][:3]
    calls = wmod.oracle_calls(rows, search)
    assert search.calls == len(calls) == 6
    first, second = [c for c in calls if c["question"] == rows[0]["question"]]
    assert first["history"] == tools.action_text(first['query'], ENV)  # the text so far, as SearchEnv logs it
    assert second["query"] == rows[0]["queries"][1]
    assert second["history"] == f"{first['history']}{first['observation']}{tools.action_text(second['query'], ENV)}"
    assert tools.interaction_history(second["history"], ENV) == f"{first['history']}{first['observation']}"
    assert wmod.oracle_calls([], search) == [] and search.calls == 6  # an empty question file: no calls


def test_history_keeps_calls_and_drops_thoughts_and_the_pending_action():
    obs = "<search_result> Ada Brun\nAda Brun was born in Lorn. </search_result>"
    text = (f" I need to search. <begin_search> Ada Brun </end_search>{obs} Now the city. "
            "<begin_search> Lorn </end_search>")
    assert tools.interaction_history(text, ENV) == f" <begin_search> Ada Brun </end_search>{obs}"
    assert tools.interaction_history(" just thinking", ENV) == ""


def test_example_trains_on_the_observation_tokens_only(base):
    _, tok = base
    call = {"question": "Where was Ada Brun born?", "history": "", "query": "Ada Brun",
            "observation": "<search_result> Ada Brun was born in Lorn. </search_result>"}
    prompt, target = wmod.make_example(tok, call, ENV, 64)
    ids, attn, labels = wmod.collate([(prompt, target), (prompt[:3], target[:2])], tok.pad_token_id)
    assert (labels[0, :len(prompt)] == -100).all()
    assert tok.decode(labels[0, len(prompt):].tolist()) == call["observation"] + tok.eos_token
    assert attn[1].sum() == 5 and (labels[1, 5:] == -100).all()
    assert tok.decode(prompt).endswith("<begin_search> Ada Brun </end_search>")


def test_gold_shown_prompt_holds_the_answer_after_the_question_and_the_target_is_unchanged(base):
    _, tok = base
    call = {"question": "Where was Ada Brun born?", "history": "", "query": "Ada Brun",
            "observation": "<search_result> Ada Brun was born in Lorn. </search_result>"}
    plain_prompt, plain_target = wmod.make_example(tok, call, ENV, 64)
    prompt, target = wmod.make_example(tok, call, ENV, 64, {call["question"]: ["Lorn", "Lorne"]})
    assert target == plain_target
    assert tok.decode(prompt).startswith("Question: Where was Ada Brun born?\nAnswer: Lorn | Lorne\n <begin_search>")
    assert "Answer:" not in tok.decode(plain_prompt)
    with pytest.raises(ConfigError, match="Where was Ada Brun born"):  # no gold: an error, not a gold-less prompt
        wmod.make_example(tok, call, ENV, 64, {"Another question?": ["Kesh"]})


# -----------------------------------------------------------------------------
# Fidelity metrics on hand-made pairs

REAL = "<search_result> Ada Brun\nAda Brun was born in Lorn in 1950. Ada Brun works for Vexa. </search_result>"
KNOWN = {"Ada", "Brun", "Lorn", "Vexa", "Kesh"}


def test_fidelity_of_a_perfect_copy():
    m = wmod.fidelity(REAL, REAL, "Ada Brun", ["Lorn"], KNOWN, ENV)
    assert m == {"answer_kept": 1.0, "fact_recall": 1.0, "token_f1": 1.0, "invented": 0.0, "unsupported": 0.0,
                 "well_formed": 1.0}


def test_fidelity_of_a_wrong_and_invented_fact():
    sim = "<search_result> Ada Brun\nAda Brun was born in Zorp in 1950. Ada Brun works for Vexa. </search_result>"
    m = wmod.fidelity(sim, REAL, "Ada Brun", ["Lorn"], KNOWN, ENV)
    assert m["answer_kept"] == 0.0
    assert m["fact_recall"] == pytest.approx(1 / 2)  # the employer sentence is kept, the birth sentence is not
    assert 0.5 < m["token_f1"] < 1.0
    names = ["Ada", "Brun", "Ada", "Brun", "Zorp", "Ada", "Brun", "Vexa"]
    assert m["invented"] == m["unsupported"] == pytest.approx(1 / len(names))


def test_fidelity_answer_applies_only_when_the_real_observation_holds_an_answer_the_query_lacks():
    # the real observation lacks the answer (first hop of a bridge question): nothing to keep
    assert wmod.fidelity(REAL, REAL, "Ada Brun", ["Kesh"], KNOWN, ENV)["answer_kept"] is None
    # the gold is the queried name (comparison questions): copying the query is no evidence
    assert wmod.fidelity(REAL, REAL, "Ada Brun", ["Ada Brun"], KNOWN, ENV)["answer_kept"] is None


def test_fidelity_of_a_broken_simulation():
    m = wmod.fidelity("<search_result> Ada", REAL, "Ada Brun", ["Lorn"], KNOWN, ENV)
    assert m["well_formed"] == 0.0 and m["answer_kept"] == 0.0 and m["fact_recall"] == 0.0
    assert wmod.fidelity("<search_result> </search_result>", REAL, "Ada Brun", ["Lorn"], KNOWN, ENV)["token_f1"] == 0


def test_mean_metrics_averages_where_a_metric_applies():
    rows = [{"answer_kept": 1.0, "token_f1": 0.5}, {"answer_kept": None, "token_f1": 1.0}]
    out = wmod.mean_metrics(rows)
    assert out == {"calls": 2, "answer_kept": 1.0, "n_answer_kept": 1, "token_f1": 0.75}


# -----------------------------------------------------------------------------
# Serving and the config

def test_served_environment_returns_well_formed_observations_for_a_batch(base):
    model, tok = base
    env = dataclasses.replace(ENV, obs_max_tokens=6)
    world = tools.WorldModelEnv(model, tok, env, tok, batch_size=2)
    queries = ["Ada Brun", "Lorn", "Olo Vess"]
    contexts = [build_prompt(tok, f"Where was {q} born?", env) + tools.action_text(q, env) for q in queries]
    obs = world(queries, contexts)
    assert len(obs) == 3 and world.calls == 3 and world.simulated
    for o in obs:  # an untrained model writes anything: the format and the budget hold all the same
        assert o.startswith(env.obs_open) and o.endswith(env.obs_close)
        assert len(tok.encode(" " + tools.observation_body(o, env), add_special_tokens=False)) <= 6
    assert world(queries[1:2], contexts[1:2]) == obs[1:2]  # batched = alone (greedy, per-row KV cache)


def test_config_picks_the_environment(tiny_cfg, tiny_base, base):
    _, tok = base
    real = tools.make_environment(dataclasses.replace(ENV, env="real"), tiny_cfg.run, tok)
    assert isinstance(real, SearchEnv) and not real.simulated
    with pytest.raises(ValueError, match="env.worldmodel: .* is not a world model .*a policy's folder"):
        tools.make_environment(dataclasses.replace(ENV, env="worldmodel", worldmodel=tiny_base), tiny_cfg.run, tok)
    folder = os.path.join(tiny_cfg.run.dir, "plain_worldmodel")  # the untrained base, marked as worldmodel.py marks
    if not os.path.exists(folder):
        shutil.copytree(tiny_base, folder)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, "worldmodel_gold": False}, f)
    world = tools.make_environment(dataclasses.replace(ENV, env="worldmodel", worldmodel=folder), tiny_cfg.run, tok)
    assert isinstance(world, tools.WorldModelEnv) and world.simulated and world.golds is None  # a plain world model
    assert tools.make_environment(dataclasses.replace(ENV, env="policy"), tiny_cfg.run, tok) is None
    with pytest.raises(ValueError, match="env.worldmodel"):
        tools.make_environment(dataclasses.replace(ENV, env="worldmodel"), tiny_cfg.run, tok)
    with pytest.raises(ValueError, match="real, policy or worldmodel"):
        tools.make_environment(dataclasses.replace(ENV, env="oracle"), tiny_cfg.run, tok)


def test_knowledge_curve_buckets_people_by_popularity_and_scores_a_faithful_simulator_1(tiny_cfg, base):
    """Buckets hold the people whose pre-training repeats fall in them (dev/test: 0); the real tool standing in
    for a simulator keeps every birth city, and the untrained policy answers none closed-book."""
    buckets = wmod.popularity_buckets(tiny_cfg.run.data_dir, 3, seed=0)
    with open(os.path.join(tiny_cfg.run.data_dir, "pretrain.jsonl")) as f:
        repeats = {r["name"]: r["repeats"] for r in map(json.loads, f) if r.get("name")}
    assert "0 (after cut-off)" in buckets and len(buckets) >= 4
    for (lo, hi), (name, group) in zip([b for b in wmod.BUCKETS if wmod.bucket_name(*b) in buckets], buckets.items()):
        assert name == wmod.bucket_name(lo, hi) and 1 <= len(group) <= 3
        assert all(lo <= n <= hi and repeats.get(p["name"], 0) == n for p, n in group)
    assert all(p["split"] in ("dev", "test") for p, _ in buckets["0 (after cut-off)"])
    assert wmod.popularity_buckets(tiny_cfg.run.data_dir, 0, seed=0) == {}  # knowledge_people=0: no curve, no crash
    model, tok = base
    search = SearchEnv(make_tool(ENV, tiny_cfg.run), tok, ENV)
    curve = wmod.knowledge_curve(model, tok, buckets, ENV, search, world_env=search)
    assert list(curve) == list(buckets)
    for m in curve.values():
        assert m["kept_worldmodel"] == 1.0 and m["closed_book"] == 0.0 and 0.0 <= m["kept_policy"] <= 1.0


# -----------------------------------------------------------------------------
# The script: training, the report, resume

def test_world_model_loss_falls_and_the_report_covers_every_simulator(tiny_root, tiny_base, tiny_synth):
    calls = os.path.join(tiny_synth[0], "calls_train.jsonl")  # the real calls synthesis logged
    report = wmod.main(wm_argv(tiny_root, tiny_base, "wm", f"calls={calls}", "steps=60", "batch_size=16",
                               "log_every=10", "eval_calls=6", f"policy={tiny_base}", "eval_questions=3",
                               "knowledge_people=2"))
    losses = [loss for _, loss in report["train_loss"]]
    assert losses[-1] < 0.6 * losses[0]
    assert set(report["fidelity"]) == {"worldmodel", "policy"}
    for groups in report["fidelity"].values():
        assert set(groups) == {"seen", "unseen"} and all(g["well_formed"] == 1.0 for g in groups.values())
    runs = report["end_to_end"]["unseen"]
    assert set(runs) == {"real", "worldmodel", "policy"}
    assert runs["real"]["sim_calls"] == 0 and runs["worldmodel"]["real_calls"] == 0
    assert runs["policy"]["real_calls"] == 0
    assert "0 (after cut-off)" in report["knowledge"] and all(m["people"] <= 2 for m in report["knowledge"].values())
    assert os.path.exists(os.path.join(tiny_root, "runs", "wm", "worldmodel", "config.json"))


def test_gold_world_model_folder_is_served_with_the_gold_of_the_trajectorys_question(tiny_root, tiny_base, tiny_synth,
                                                                                    tiny_cfg, base):
    _, tok = base
    calls = os.path.join(tiny_synth[0], "calls_train.jsonl")
    wmod.main(wm_argv(tiny_root, tiny_base, "wm_gold", f"calls={calls}", "steps=2", "batch_size=4", "eval_calls=0",
                      "gold=true"))
    folder = os.path.join(tiny_root, "runs", "wm_gold", "worldmodel")  # rl.py's env.worldmodel=<folder>, nothing else
    world = tools.make_environment(dataclasses.replace(ENV, env="worldmodel", worldmodel=folder), tiny_cfg.run, tok)
    row = data.load_qa(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))[0]
    prompts = []  # generation stubbed out: what is checked is the prompt the served path builds
    world.write = lambda batch: prompts.extend(batch) or ["<search_result> x </search_result>"] * len(batch)
    context = lambda q: build_prompt(tok, q, ENV) + tools.action_text("Ada Brun", ENV)
    world(["Ada Brun"], [context(row["question"])])
    shown = f"Question: {row['question']}\nAnswer: {' | '.join(row['golden_answers'])}\n"
    assert tok.decode(prompts[0]).startswith(shown)
    with pytest.raises(ConfigError, match="'Where was Nobody Known born\\?'") as err:
        world(["Nobody Known"], [context("Where was Nobody Known born?")])
    assert "\n" not in str(err.value)
    test_question = data.load_qa(os.path.join(tiny_cfg.run.data_dir, "test.jsonl"))[0]["question"]
    with pytest.raises(ConfigError, match="no gold answer known"):  # an eval with it never shows test answers
        world(["Ada Brun"], [context(test_question)])


@pytest.mark.parametrize("bf16", ["false", "true"])  # true: FSDP2 on one process, checkpoints from its shards
def test_resume_after_a_kill_gives_the_same_weights(tiny_root, tiny_base, bf16, one_rank_group):
    argv = wm_argv(tiny_root, tiny_base, f"wmresume{bf16}", "calls=oracle", "steps=6", "batch_size=4",
                   "save_every=3", "keep_ckpts=3", "eval_calls=0", "history_max_tokens=32", f"bf16={bf16}")
    wmod.main(argv)
    run_dir = os.path.join(tiny_root, "runs", f"wmresume{bf16}")
    straight = load_model(os.path.join(run_dir, "worldmodel"), device=torch.device("cpu"))[0].state_dict()
    import shutil
    shutil.rmtree(os.path.join(run_dir, "worldmodel.ckpt", "step_000006"))  # as if killed after step 3
    shutil.rmtree(os.path.join(run_dir, "worldmodel"))
    wmod.main(argv + ["--resume"])
    resumed = load_model(os.path.join(run_dir, "worldmodel"), device=torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_init_names_a_stage_folder_under_the_run_and_a_missing_one_is_one_clear_error(tiny_root, tiny_base):
    import shutil
    from config import ConfigError
    run_dir = os.path.join(tiny_root, "runs", "wminit")
    start = os.path.join(run_dir, "sft123")  # a stand-in policy: the base with one weight changed
    shutil.copytree(tiny_base, start, dirs_exist_ok=True)
    model, tok = load_model(start, device=torch.device("cpu"))
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)
    model.save_pretrained(start)
    argv = wm_argv(tiny_root, tiny_base, "wminit", "calls=oracle", "steps=1", "batch_size=4", "lr=0",
                   "eval_calls=0", "history_max_tokens=32")
    wmod.main(argv + ["init=sft123"])
    trained = load_model(os.path.join(run_dir, "worldmodel"), device=torch.device("cpu"))[0]
    assert torch.equal(trained.model.norm.weight, torch.full_like(trained.model.norm.weight, 0.5))  # lr 0: the start
    with pytest.raises(ConfigError, match="worldmodel.init='sft9'.*wminit"):
        wmod.main(argv + ["init=sft9", "--overwrite"])


def test_without_init_the_run_says_it_fine_tunes_the_base_model_and_steps_0_does_nothing(tiny_root, tiny_base,
                                                                                         capsys):
    argv = wm_argv(tiny_root, tiny_base, "wmbase", "calls=oracle", "batch_size=4", "eval_calls=0",
                   "history_max_tokens=32")
    assert wmod.main(argv + ["steps=0"]) is None
    assert "worldmodel.steps=0: nothing to do" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(tiny_root, "runs", "wmbase"))  # nothing written
    wmod.main(argv + ["steps=1"])
    assert f"worldmodel: no worldmodel.init: fine-tuning the base model {tiny_base}\n" in capsys.readouterr().out
