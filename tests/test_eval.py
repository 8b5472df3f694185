"""Tests for eval.py: metrics on fixed predictions, the summary's spread and groups, the LLM judge against a local
server, the ReAct workflow's parsing, the trajectory printout, and the modes on the tiny model.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

import eval as ev
from conftest import send_json
from tools import EnvConfig


@dataclass
class FakeEpisode:
    """The fields of rollout.Episode that scoring reads."""
    text: str
    actions: list = field(default_factory=list)
    real_calls: int = 0
    sim_calls: int = 0
    ids: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    prompt_ids: list = field(default_factory=list)
    logps: list = field(default_factory=list)
    finish: str = "answer"
    reward: float = 0.0


ENV = EnvConfig()


def coa(answer, queries=()):
    acts = "".join(f" <begin_search> {q} </end_search> <search_result> doc </search_result>" for q in queries)
    return f"<think> thinking{acts} done </think> \\boxed{{{answer}}}"


def test_metrics_on_fixed_predictions():
    rows = [{"id": "a", "question": "q1", "golden_answers": ["Lorn"], "kind": "city"},
            {"id": "b", "question": "q2", "golden_answers": ["Ada Brun", "A. Brun"], "kind": "comparison"},
            {"id": "c", "question": "q3", "golden_answers": ["New York City"], "kind": "city"},
            {"id": "d", "question": "q4", "golden_answers": ["yes"], "kind": "yesno"}]
    episodes = [FakeEpisode(coa("the Lorn", ["Ada"]), actions=["Ada"], real_calls=1, mask=[1, 1, 0, 1]),
                FakeEpisode(coa("Ada"), mask=[1, 1]),
                FakeEpisode(coa("New York City Hall"), mask=[1]),
                FakeEpisode("<think> no close \\boxed{yes}", finish="length", mask=[1, 1, 1])]
    records = ev.score(episodes, rows, ENV, samples=1)
    assert [r["em"] for r in records] == [1.0, 0.0, 0.0, 1.0]  # article dropped; a broken format is still scored
    assert records[1]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # "ada" vs "ada brun": precision 1, recall 0.5
    assert records[2]["lenient"] == 1.0 and records[1]["lenient"] == 0.0  # all gold tokens present vs half
    assert [r["format_error"] for r in records] == [0.0, 0.0, 0.0, 1.0]
    assert records[3]["reward"] == 0.0 and records[0]["reward"] == 1.0  # the training rule: broken format -> 0
    assert [r["gen_tokens"] for r in records] == [3, 2, 1, 3]  # observation tokens (mask 0) are not counted
    s = ev.summarize(records)
    assert s["em"] == 0.5 and s["actions"] == 0.25 and s["real_calls"] == 0.25 and s["format_error"] == 0.25
    assert s["by_kind"]["city"]["n"] == 2 and s["by_kind"]["city"]["em"] == 0.5
    assert s["by_kind"]["city"]["f1"] == pytest.approx((1 + 2 * 0.75 / 1.75) / 2)
    assert "em_std" not in s  # greedy: no spread


def test_summary_counts_trajectories_cut_at_the_length_budget_and_warns_above_the_share():
    rows = [{"question": f"q{i}", "golden_answers": ["x"]} for i in range(4)]
    finishes = ["answer", "length", "eos", "length"]
    records = ev.score([FakeEpisode(coa("x"), finish=f) for f in finishes], rows, ENV, samples=1)
    s = dict(ev.summarize(records), wall_s=1)
    assert [r["truncated"] for r in records] == [0.0, 1.0, 0.0, 1.0] and s["truncated"] == 0.5
    assert "truncated 0.500" in ev.summary_line(s)
    assert ev.truncation_warning(s["truncated"], ENV, "eval t").startswith("eval t: warning: 50% of trajectories")
    assert ev.truncation_warning(0.5, EnvConfig(truncation_warn=0.5), "eval t") == ""


def test_samples_give_mean_and_spread_over_samples():
    rows = [{"question": "q1", "golden_answers": ["x"]}, {"question": "q2", "golden_answers": ["y"]}]
    # question-major, samples adjacent: q1 s0, q1 s1, q2 s0, q2 s1; sample 0 gets both right, sample 1 none
    episodes = [FakeEpisode(coa("x")), FakeEpisode(coa("z")), FakeEpisode(coa("y")), FakeEpisode(coa("z"))]
    records = ev.score(episodes, rows, ENV, samples=2)
    assert [(r["question"], r["sample"]) for r in records] == [("q1", 0), ("q1", 1), ("q2", 0), ("q2", 1)]
    s = ev.summarize(records, samples=2)
    assert s["questions"] == 2 and s["em"] == 0.5
    assert s["em_std"] == pytest.approx(0.7071, abs=1e-4)  # std of the per-sample means (1.0, 0.0)


def test_well_known_questions_get_their_own_group():
    rows = [{"question": "q", "golden_answers": ["x"], "kind": "city", "needs_search": False},
            {"question": "r", "golden_answers": ["y"], "kind": "city", "needs_search": True}]
    records = ev.score([FakeEpisode(coa("x")), FakeEpisode(coa("x", ["r"]), actions=["r"])], rows, ENV, 1)
    s = ev.summarize(records)
    assert s["by_kind"]["well_known"] == {"n": 1, "em": 1.0, "f1": 1.0, "actions": 0.0}
    assert s["by_kind"]["city"]["n"] == 2 and s["by_kind"]["city"]["actions"] == 0.5


def test_when_to_act_counts_skipped_and_needless_searches_by_whether_the_question_needs_one():
    marks = [True, True, True, True, False, False, False, None]  # None: a row no tiny world marks (real QA sets)
    rows = [{"question": f"q{i}", "golden_answers": ["x"], "kind": "city", "needs_search": m}
            for i, m in enumerate(marks)]
    searched = [[], ["a"], ["a", "b"], [], ["a"], [], [], []]  # needs one: skip, 1, 2, skip; well-known: 1, 0, 0
    records = ev.score([FakeEpisode(coa("x", q), actions=list(q)) for q in searched], rows, ENV, 1)
    s = ev.summarize(records)
    assert s["needed_search_skipped"] == 0.5 and s["needless_search"] == pytest.approx(1 / 3)  # unmarked: in neither
    assert "when to act:  needed search skipped 0.500  needless search 0.333" in ev.summary_line(dict(s, wall_s=1))
    unmarked = ev.summarize(records[-1:])  # no question marked: no number, and nothing printed
    assert unmarked["needed_search_skipped"] is None and unmarked["needless_search"] is None
    assert "when to act" not in ev.summary_line(dict(unmarked, wall_s=1))
    tab = ev.table({"dev": s, "test": ev.summarize(records[:5])})  # a table row when every set has the number
    assert tab["needed search skipped"] == {"dev": 0.5, "test": 0.5, "average": 0.5}
    assert tab["needless search"]["test"] == 1.0
    assert "needless search" not in ev.table({"dev": s, "nq": unmarked})


@pytest.mark.parametrize("text, expected", [
    (" I need the author.\nAction: Search[Dracula author]\nObservation:", ("search", "Dracula author")),
    (" done.\nAction: Finish[Bram Stoker]", ("finish", "Bram Stoker")),
    (" a\nAction: Search[first]\nAction: search [second]", ("search", "second")),  # the last action counts
    (" I know it.\nFinal Answer: Ireland.\nmore", ("answer", "Ireland")),
    (" so the answer is Paris", ("answer", "Paris")),
    (" Action: Finish[unclosed answer", ("finish", "unclosed answer")),  # cut by the token limit
    (" Action: Search[]\n", (None, "")),  # an empty query is a broken turn
    (" just rambling", (None, "")),
])
def test_react_turn_parsing(text, expected):
    assert ev.parse_react(text) == expected


def test_loop_answers_are_scored_from_finish():
    ep = FakeEpisode(" Action: Finish[Paris]")
    ep.loop_answer = "Paris"
    broken = FakeEpisode(" rambling", finish="length")
    broken.loop_answer = None
    records = ev.score([ep, broken], [{"question": "q", "golden_answers": ["paris"]}] * 2, ENV, 1)
    assert records[0]["em"] == 1.0 and records[0]["format_error"] == 0.0
    assert records[1]["em"] == 0.0 and records[1]["format_error"] == 1.0


class Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: 'yes' when the predicted answer appears among the golds, 500 on 'crash'."""
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append((self.headers.get("Authorization"), body))
        user = body["messages"][-1]["content"]
        if "crash" in user:
            self.send_response(500)
            self.end_headers()
            return
        golds = user.split("Gold answers: ")[1].split("\n")[0].lower()
        pred = user.split("Predicted answer: ")[1].split("\n")[0].lower()
        send_json(self, {"choices": [{"message": {"role": "assistant", "content": "Yes" if pred in golds else "no"}}]})

    def log_message(self, *args):
        pass


def test_llm_judge_against_a_local_server(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
        cfg = ev.EvalConfig(judge=True, judge_url=f"http://127.0.0.1:{server.server_port}/v1/chat/completions",
                            judge_key_env="TEST_JUDGE_KEY", judge_timeout_s=5.0)
        records = [{"question": "q", "golden_answers": ["Lorn"], "answer": "lorn"},
                   {"question": "q", "golden_answers": ["Lorn"], "answer": "Kesh"},
                   {"question": "q", "golden_answers": ["Lorn"], "answer": ""},
                   {"question": "crash", "golden_answers": ["Lorn"], "answer": "Lorn"}]
        failures = ev.judge(records, cfg)
    finally:
        server.shutdown()
    assert [r["judge"] for r in records] == [1.0, 0.0, 0.0, None]  # no answer: no call; a dead call: None
    assert failures == 1
    assert Judge.seen[0][0] == "Bearer sk-test" and Judge.seen[0][1]["temperature"] == 0
    assert ev.summarize([dict(r, kind="all", sample=0, em=0.0, f1=0.0, lenient=0.0, reward=0.0, format_error=0.0,
                              actions=0, real_calls=0, sim_calls=0, gen_tokens=0) for r in records])["judge"] == \
        pytest.approx(1 / 3)  # failed judgements are left out of the mean


class SlowJudge(Judge):
    def do_POST(self):
        time.sleep(0.4)  # a judge model's latency
        super().do_POST()


def test_judge_requests_run_side_by_side_and_each_verdict_stays_with_its_answer():
    from http.server import ThreadingHTTPServer
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    records = [{"question": "q", "golden_answers": [f"a{i}"], "answer": f"a{i}" if i % 3 else "wrong"}
               for i in range(8)]
    try:
        cfg = ev.EvalConfig(judge=True, judge_url=f"http://127.0.0.1:{server.server_port}/v1/chat/completions",
                            judge_key_env="", judge_workers=8)
        start = time.time()
        assert ev.judge(records, cfg) == 0
        wall = time.time() - start
    finally:
        server.shutdown()
    assert [r["judge"] for r in records] == [0.0 if i % 3 == 0 else 1.0 for i in range(8)]
    assert wall < 8 * 0.4 / 2  # one at a time would take 3.2 s


class FakeTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_trajectory_printout_tells_model_and_environment_apart():
    text = "ab<obs>cd"
    ep = FakeEpisode(text, ids=[ord(c) for c in text], mask=[1, 1, 0, 0, 0, 0, 0, 1, 1], prompt_ids=[ord("Q")])
    plain = ev.show_trajectory(ep, FakeTokenizer(), color=False)
    assert plain.startswith("Qab[[<obs>]]cd\n")
    colored = ev.show_trajectory(ep, FakeTokenizer(), color=True)
    assert "\033[32mab\033[0m\033[90m<obs>\033[0m\033[32mcd\033[0m" in colored
    assert "reward: 0.0" in plain


# -----------------------------------------------------------------------------
# The modes on the (untrained) tiny model: what the loops do, not what the model knows

def tiny_eval_cfg(tiny_root, extra=()):
    from config import load_config, RunConfig
    import data
    return load_config({"run": RunConfig, "env": EnvConfig, "model": data.ModelConfig, "eval": ev.EvalConfig},
                       ["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data",
                        f"run.runs_dir={tiny_root}/runs", "run.name=evaltest", "run.device=cpu",
                        "env.max_new_tokens=48", *extra],
                       own="eval")


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from plumbing import load_model
    return load_model(tiny_base, device=torch.device("cpu"))


def test_fixed_workflow_writes_the_searches_itself(tiny_root, tiny_model):
    model, tokenizer = tiny_model
    cfg = tiny_eval_cfg(tiny_root, ["mode=workflow", "workflow=fixed", "samples=2", "temperature=1.0"])
    rows = ev.load_questions(cfg)[:3]
    summary, records, episodes = ev.evaluate(model, tokenizer, rows, cfg)
    assert len(episodes) == 6 and [r["sample"] for r in records] == [0, 1] * 3
    for ep, rec in zip(episodes, records):
        row = rows[records.index(rec) // 2]
        assert ep.actions == [row["question"]] and ep.real_calls == 1  # the loop's one search: the question
        n_forced = ep.mask.index(1) if 1 in ep.mask else len(ep.mask)
        forced = tokenizer.decode(ep.ids[:n_forced])
        assert forced.count(cfg.env.obs_open) == 1 and row["question"] in forced  # action, observation: mask 0
        assert all(lp == 0.0 for lp, m in zip(ep.logps, ep.mask) if m == 0)
    assert summary["real_calls"] == 1


def test_loop_made_calls_log_their_question(tiny_root, tiny_model, tmp_path):
    model, tokenizer = tiny_model
    log = tmp_path / "calls.jsonl"
    cfg = tiny_eval_cfg(tiny_root, ["mode=workflow", "workflow=fixed", f"log_calls={log}"])
    rows = ev.load_questions(cfg)[:2]
    ev.evaluate(model, tokenizer, rows, cfg)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["question"] for c in logged] == [r["question"] for r in rows]
    assert all(c["history"].strip() == f"{cfg.env.action_open} {c['query']} {cfg.env.action_close}" for c in logged)


def test_notool_never_calls_the_tool(tiny_root, tiny_model):
    model, tokenizer = tiny_model
    cfg = tiny_eval_cfg(tiny_root, ["mode=notool"])
    rows = ev.load_questions(cfg)[:4]
    summary, records, episodes = ev.evaluate(model, tokenizer, rows, cfg)  # NoTool raises if it is ever called
    assert summary["real_calls"] == 0 and summary["actions"] == 0
    assert all(ep.finish in ("answer", "eos", "length", "max_actions") for ep in episodes)


def test_main_writes_per_question_jsonl_and_summary(tiny_root, tiny_base):
    import os
    summary = ev.main(["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data",
                       f"run.runs_dir={tiny_root}/runs", "run.name=evaltest", f"init={tiny_base}", "limit=5",
                       "env.max_new_tokens=32", "tag=t", "run.device=cpu"])
    out = os.path.join(tiny_root, "runs", "evaltest", "eval")
    with open(os.path.join(out, "t.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "t.summary.json")) as f:
        saved = json.load(f)
    assert len(records) == 5 and {"id", "answer", "em", "f1", "actions", "gen_tokens", "text"} <= set(records[0])
    assert saved["questions"] == 5 and saved["em"] == summary["em"] and saved["mode"] == "agent"
    assert saved["config"]["eval"]["limit"] == 5  # the resolved config travels with the results


def test_main_prints_one_warning_line_when_most_trajectories_hit_the_length_budget(tiny_root, tiny_base, capsys):
    summary = ev.main(["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data",
                       f"run.runs_dir={tiny_root}/runs", "run.name=evaltest", f"init={tiny_base}", "limit=4",
                       "env.max_new_tokens=6", "tag=cut", "run.device=cpu"])
    assert summary["truncated"] > 0.2
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warning == [f"eval cut: warning: {summary['truncated']:.0%} of trajectories stopped at env.max_new_tokens=6 "
                       "(observations included), more than env.truncation_warn=0.2: raise max_new_tokens"]


def test_bad_mode_and_missing_model_are_clear_errors(tiny_root):
    from config import ConfigError
    missing = f"eval.init='nothing_here': no model folder '{tiny_root}/runs/tiny/nothing_here'"
    with pytest.raises(ConfigError, match=missing):
        ev.main(["--config", "configs/tiny.yaml", f"run.runs_dir={tiny_root}/runs", "init=nothing_here"])
    with pytest.raises(ValueError, match="eval.mode"):
        ev.evaluate(None, None, [], tiny_eval_cfg(tiny_root, ["mode=oracle"]))


# -----------------------------------------------------------------------------
# The demo, quick mode: every stage, the table, the plots, the trajectory

def test_quick_demo_writes_table_plots_trajectory_and_the_same_results_twice(tmp_path, capsys, monkeypatch):
    import json
    import os
    import demo

    def run(name, *flags):
        rows = demo.main(["--config", "configs/tiny.yaml", "--quick", f"run.data_dir={tmp_path}/{name}/data",
                          f"run.runs_dir={tmp_path}/{name}/runs", "run.device=cpu", *flags])
        with open(os.path.join(tmp_path, name, "runs", "tiny_quick", "results.json"), "rb") as f:
            return rows, f.read()

    rows, first = run("a")
    run_dir = os.path.join(tmp_path, "a", "runs", "tiny_quick")
    printed = capsys.readouterr().out
    with open(os.path.join(run_dir, "results.md")) as f:
        table = f.read()
    for label, _, _ in demo.ROWS:
        assert f"| {label} |" in table
        assert label in rows and len(rows[label]["em"]) == 1  # every stage ran and was evaluated, one seed
    assert "| method | city |" in table and "real calls in RL" in table and "commit" in table
    calls = {label: line.split("|")[-2].strip() for line in table.splitlines() for label, _, _ in demo.ROWS
             if line.startswith(f"| {label} |")}
    assert calls["SFT-2"] == "-" and int(calls["+RL real only"]) > 0 and calls["+RL simulated only"] == "0"
    simreal = demo.rl_metrics(os.path.join(run_dir, "seed0"), "rl_simreal")
    assert [r["env"] for r in simreal if "env" in r] == ["policy", "real"]  # 2 steps at 5/6: the last one is real
    control = demo.rl_metrics(os.path.join(run_dir, "seed0"), "rl_rl2")  # RL-2 alone: simreal's real steps, no more
    assert [r["env"] for r in control if "env" in r] == ["real"] and int(calls["+RL-2 alone (control)"]) > 0
    zs = demo.rl_metrics(os.path.join(run_dir, "seed0"), "rl_zs")  # RL-1 in the gold-shown world model, then real
    assert [r["env"] for r in zs if "env" in r] == ["worldmodel", "real"]
    with open(os.path.join(run_dir, "seed0", "worldmodel_gold", "config.json")) as f:
        assert json.load(f)["worldmodel_gold"] is True
    head = next(line for line in table.splitlines() if line.startswith("| method |")).split(" | ")
    assert ("F1" in head) == demo.f1_differs(rows) and (demo.F1_NOTE in table) != demo.f1_differs(rows)
    when = [head.index(name) for name in ("needed search skipped", "needless search")]  # the when-to-act columns
    cells = {label: line.split(" | ") for line in table.splitlines() for label, _, _ in demo.ROWS
             if line.startswith(f"| {label} |")}
    assert [cells["no tool"][i] for i in when] == ["-", "-"] and [cells["workflow"][i] for i in when] == ["-", "-"]
    assert cells["SFT-2"][when[0]] == demo.cell(rows["SFT-2"]["needed_search_skipped"]) != "-"  # its own choice
    assert demo.QUICK_NOTE in table and demo.QUICK_NOTE in printed  # quick numbers say they are not results
    assert "Written by `python demo.py --config configs/tiny.yaml --quick run.data_dir=" in table
    assert "--readme" not in table and "one seed (0): no spread" in table and "seeds 0 " not in table
    for png in ("rl_curves.png", "accuracy_by_stage.png"):
        assert os.path.getsize(os.path.join(run_dir, png)) > 1000
    assert "one held-out trajectory" in printed and "[[" in printed and "reward:" in printed  # not a tty: brackets
    assert os.path.isdir(os.path.join(run_dir, "seed0", "sft123"))
    saved = json.loads(first)
    assert saved["seeds"] == [0] and saved["rows"] == json.loads(json.dumps(rows))
    check_the_next_command(printed, tmp_path, capsys)
    readme, docs = tmp_path / "README.md", tmp_path / "docs"  # --readme: tables, headline, trajectory, plots written
    markers = lambda *parts: "".join(f"<!-- {part}: begin (written by demo.py --readme) -->\nSTALE\n"
                                     f"<!-- {part}: end -->\n" for part in parts)
    readme.write_text(markers("headline", "trajectory"))
    docs.mkdir()
    (docs / "results.md").write_text(markers("results"))
    monkeypatch.setattr(demo, "README", str(readme))
    monkeypatch.setattr(demo, "DOCS", str(docs))
    # everything again from nothing, in other folders, with a second seed: seed 0's cells are the same bits (make
    # demo's seed 0 is seed 0 of the multi-seed run), and the float path they ran on is written beside them
    _, second = run("b", "--seeds", "2", "--readme")
    first, second = json.loads(first), json.loads(second)
    assert second["seeds"] == [0, 1] and first["float_path"] == second["float_path"]
    assert first["float_path"]["jobs"] == 2 and first["float_path"]["aten_cpu_capability"]
    seed0 = lambda res: {label: {m: v[0] for m, v in cells.items() if v[0] is not None}
                         for label, cells in res["rows"].items()}  # None: a kind seed 0's test split lacks
    assert seed0(second) == seed0(first)
    written, results = readme.read_text(), (docs / "results.md").read_text()
    assert "STALE" not in written + results and "| +RL real only |" in results
    assert "| +RL-2 alone (control) |" in results
    assert "| method | test EM | actions/q | real calls in RL |" in written and "| +RL real only | " in written
    # the trajectory of the final model (6 steps a stage need not search: show_trajectory's own test marks [[...]])
    assert "The final model (+RL simulated then real), seed 0" in written and "question (test-" in written
    assert "--quick run.data_dir=" in results and " run.device=cpu --seeds 2 --readme` on commit" in results
    assert "float path " in results and "seeds 0, 1" in written
    assert sorted(os.listdir(docs)) == ["accuracy_by_stage.png", "results.md", "rl_curves.png"]


def check_the_next_command(printed, tmp_path, capsys):
    """The quick demo's last line is a chat.py command that answers as printed; the README's next command, its two
    folders mapped onto the quick run's, names the same model and data and answers too; a bare `init=rl` (the
    folder stage-by-stage runs write) is one line naming the demo's final model."""
    import os
    import re
    import shlex
    import chat
    from config import ConfigError
    argv = shlex.split(printed.strip().splitlines()[-1])
    assert argv[1] == "chat.py" and len(chat.main(argv[2:])) == 1
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        head = f.read().split("\n")[:40]  # the first screen says what to run next
    line = next(i for i, text in enumerate(head) if text.startswith(".venv/bin/python chat.py"))
    readme = shlex.split(head[line].rstrip("\\") + head[line + 1])
    mapped = [a.replace("=runs/tiny/", f"={tmp_path}/a/runs/tiny_quick/").replace("=data/tiny/",
                                                                                   f"={tmp_path}/a/data/")
              for a in readme[2:]]
    key = lambda args, name: next(a for a in args if a.startswith(name))
    assert [key(mapped, k) for k in ("run.data_dir=", "init=")] == [key(argv, k) for k in ("run.data_dir=", "init=")]
    assert readme[:4] == [".venv/bin/python", "chat.py", "--config", "configs/tiny.yaml"]
    assert len(chat.main(mapped + ["run.device=cpu"])) == 1
    with pytest.raises(ConfigError, match=re.escape(f"make demo's final model is {key(argv, 'init=')[5:]}")):
        chat.main(argv[2:-2] + ["init=rl", f"run.runs_dir={tmp_path}/a/runs", "run.name=tiny_quick"])
    capsys.readouterr()


def test_demo_aggregates_seeds_into_mean_and_spread():
    import demo
    per_seed = [{"SFT-2": {"em": 0.5, "real_calls_rl": None}}, {"SFT-2": {"em": 0.7, "real_calls_rl": None}},
                {"SFT-2": {"em": 0.6, "real_calls_rl": None}, "no tool": {"em": 0.1, "real_calls_rl": None}}]
    rows = demo.gather(per_seed)
    assert rows == {"SFT-2": {"em": [0.5, 0.7, 0.6], "real_calls_rl": [None, None, None]}}  # no tool: one seed only
    assert demo.cell(rows["SFT-2"]["em"], 3) == "0.600 ± 0.100" and demo.cell([0.25]) == "0.25"
    assert demo.cell(rows["SFT-2"]["real_calls_rl"]) == "-"


def test_demo_table_shows_f1_only_where_it_differs_from_em_and_when_to_act_only_for_the_agents():
    import demo
    row = {"em": [0.5, 0.7], "f1": [0.5, 0.7], "format_error": [0.0, 0.0], "actions": [1.0, 1.2],
           "needed_search_skipped": [0.1, 0.3], "needless_search": [0.0, 0.5], "real_calls_rl": [None, None]}
    rows = {"workflow": row, "SFT-2": row}
    table = demo.results_table(rows)
    assert "| method | EM | format errors | actions/q | needed search skipped | needless search |" in table
    assert "| SFT-2 | 0.600 ± 0.141 | 0.00 ± 0.00 | 1.10 ± 0.14 | 0.20 ± 0.14 | 0.25 ± 0.35 | - |" in table
    assert "| workflow | 0.600 ± 0.141 | 0.00 ± 0.00 | 1.10 ± 0.14 | - | - | - |" in table  # a loop decides
    assert demo.F1_NOTE in demo.table_note(rows)
    rows["SFT-2"] = dict(row, f1=[0.5, 0.8])  # one answer partly right: F1 says something EM does not
    assert "| EM | F1 | format errors |" in demo.results_table(rows) and demo.F1_NOTE not in demo.table_note(rows)


def test_demo_rewrites_only_the_readme_sections_it_owns(tmp_path):
    import pytest
    import demo
    path = tmp_path / "README.md"
    path.write_text("intro\n<!-- results: begin (written by demo.py --readme) -->\nold\n<!-- results: end -->\nrest\n"
                    "<!-- trajectory: begin (written by demo.py --readme) -->\nold\n<!-- trajectory: end -->\nend\n")
    demo.write_readme(str(path), "| new |")
    demo.write_readme(str(path), "Question: ...", "trajectory")
    assert path.read_text() == ("intro\n<!-- results: begin (written by demo.py --readme) -->\n| new |\n"
                                "<!-- results: end -->\nrest\n<!-- trajectory: begin (written by demo.py --readme) -->"
                                "\nQuestion: ...\n<!-- trajectory: end -->\nend\n")
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no results markers"):
        demo.write_readme(str(tmp_path / "plain.md"), "x")
    assert (tmp_path / "plain.md").read_text() == "no markers\n"


def test_demo_fidelity_table_has_a_row_for_the_gold_shown_world_model(tmp_path):
    import json
    import demo
    for out, kept in (("worldmodel", 0.4), ("worldmodel_gold", 0.99)):  # each report's own world model
        (tmp_path / f"{out}.report.json").write_text(json.dumps(
            {"fidelity": {"worldmodel": {"seen": {"answer_kept": kept}}, "policy": {"seen": {"answer_kept": 0.3}}}}))
    cells = demo.fidelity_cells(str(tmp_path))
    assert cells == {"worldmodel": {"answer_kept_seen": 0.4}, "policy": {"answer_kept_seen": 0.3},
                     "worldmodel_gold": {"answer_kept_seen": 0.99}}
    table = demo.fidelity_table(demo.gather([cells]))
    assert "| the gold-shown world model (worldmodel.py gold=true, ZeroSearch's kind) | 0.99 | - |" in table


def test_demo_skips_a_broken_rl_metrics_line(tmp_path, capsys):
    import demo
    (tmp_path / "rl_real.metrics.jsonl").write_text('{"step": 1, "real_calls_total": 3}\n{"step": 2, "real_ca\n')
    assert demo.train_calls(str(tmp_path), "rl_real") == "3"  # a run killed mid-line: the table still comes out
    assert "rl_real.metrics.jsonl:2" in capsys.readouterr().out


def test_a_tool_that_is_down_is_counted_not_fatal_when_max_tool_failures_allows_it(tiny_root, tiny_model):
    model, tokenizer = tiny_model
    cfg = tiny_eval_cfg(tiny_root, ["mode=workflow", "workflow=fixed", "env.tool=http", "env.retries=0",
                                    "env.timeout_s=0.5", "env.url=http://127.0.0.1:9/retrieve", "max_tool_failures=1"])
    rows = ev.load_questions(cfg)[:2]
    summary, records, episodes = ev.evaluate(model, tokenizer, rows, cfg)
    assert summary["tool_failures"] == 1 * 2  # one search a question, two questions
    assert "search failed: connection refused" in tokenizer.decode(episodes[0].ids)
    assert f"tool failures {summary['tool_failures']}" in ev.summary_line(summary)  # the printed line says so


def test_answer_without_boxed_falls_back_to_the_last_line_after_think():
    rows = [{"question": "q", "golden_answers": ["Paris"]}] * 3
    episodes = [FakeEpisode("<think> hmm </think>\nThe capital.\nParis"), FakeEpisode("<think> Paris, no close"),
                FakeEpisode("<think> a </think> \\boxed{Rome} </think>")]
    records = ev.score(episodes, rows, ENV, 1)
    assert [r["answer"] for r in records] == ["Paris", "", "Rome"]  # no think close: nothing to read
    assert [r["em"] for r in records] == [1.0, 0.0, 0.0] and all(r["format_error"] == 1.0 for r in records)
    assert all(r["reward"] == 0.0 for r in records)


def test_cut_before_keeps_no_piece_of_a_multi_token_tag():
    text = "abc <begin_search> q"
    ids = [ord(c) for c in text]  # one id per character: the tag is many pieces, as in SmolLM2
    n = ev.cut_before(FakeTokenizer(), ids, "<begin_search>")
    assert FakeTokenizer().decode(ids[:n]) == "abc "
    assert ev.cut_before(FakeTokenizer(), ids, "<nothing>") == len(ids)


def test_instruct_models_get_direct_prompting_without_tool(tiny_root, tiny_base):
    from plumbing import load_model
    model, tokenizer = load_model(tiny_base, device=torch.device("cpu"))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    cfg = tiny_eval_cfg(tiny_root, ["mode=notool"])
    rows = ev.load_questions(cfg)[:3]
    summary, records, episodes = ev.evaluate(model, tokenizer, rows, cfg)
    assert summary["real_calls"] == 0 and summary["actions"] == 0
    for ep in episodes:
        prompt = tokenizer.decode(ep.prompt_ids)
        assert ev.DIRECT_PROMPT in prompt and "<think>" not in prompt and len(ep.ids) <= 48
        assert all(m == 1 for m in ep.mask)  # nothing but the model's own answer


# -----------------------------------------------------------------------------
# The output guard: an earlier eval's results stay unless --overwrite; a summary always describes its rows

def test_a_second_eval_on_the_same_tag_is_refused_unless_overwrite(tiny_root, tiny_base, tmp_path):
    import os
    from config import ConfigError
    argv = ["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data", f"run.runs_dir={tmp_path}",
            "run.name=g", f"init={tiny_base}", "limit=2", "mode=notool", "env.max_new_tokens=8", "tag=t",
            "run.device=cpu"]
    ev.main(argv)
    summary = tmp_path / "g" / "eval" / "t.summary.json"
    first = summary.read_text()
    with pytest.raises(ConfigError, match=r"t.jsonl, .*t.summary.json exist\(s\), left by an earlier run: "
                                          r"--overwrite replaces it"):
        ev.main(argv[:-3] + ["limit=1", "tag=t", "run.device=cpu"])
    assert summary.read_text() == first  # untouched
    ev.main(argv[:-3] + ["limit=1", "tag=t", "run.device=cpu", "--overwrite"])
    assert json.loads(summary.read_text())["questions"] == 1
    assert sorted(os.listdir(tmp_path / "g" / "eval")) == ["t.jsonl", "t.summary.json"]  # no lock file left


def test_an_eval_on_a_tag_another_live_eval_holds_is_refused(tiny_root, tiny_base, tmp_path):
    import os
    import subprocess
    import sys
    from config import ConfigError
    out = tmp_path / "g" / "eval"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, plumbing; plumbing.claim_run(sys.argv[1], 't', "
                               "[], ('.jsonl',)); print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"is in use by a live run \\(PID {holder.pid};"):
            ev.main(["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data", f"run.runs_dir={tmp_path}",
                     "run.name=g", f"init={tiny_base}", "limit=1", "tag=t", "--overwrite"])
    finally:
        holder.kill()
        holder.wait()


def test_a_kill_between_rows_and_summary_never_leaves_new_rows_beside_the_old_summary(tmp_path, monkeypatch):
    import os
    ev.write_results([{"model": "old"}], {"model": "old"}, str(tmp_path), "t")
    real_replace = os.replace

    def killed_at_the_summary(src, dst):
        if dst.endswith(".summary.json"):
            raise KeyboardInterrupt  # the process dies here: the rows are in place, the summary not yet
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_the_summary)
    with pytest.raises(KeyboardInterrupt):
        ev.write_results([{"model": "new"}], {"model": "new"}, str(tmp_path), "t")
    rows = (tmp_path / "t.jsonl").read_text()
    summary = tmp_path / "t.summary.json"
    assert '"new"' in rows and not summary.exists()  # rows without a summary, never beside the old one
