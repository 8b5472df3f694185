"""Synthesis (data.py section 5): the oracle's CoT / CoA / CoT+A rows, the real teachers' rejection sampling
(an HF model through rollout.py, an OpenAI-compatible endpoint mocked on 127.0.0.1), malformed rows.

    .venv/bin/python -m pytest -q tests/test_synth.py
"""
import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

import pytest

import data
import sft
from conftest import send_json
from config import ConfigError, RunConfig, RunError, cli, load_config
from tools import EnvConfig, SearchEnv, make_tool, parse, reward

ENV = EnvConfig()


def rows_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def text(segments):
    return data.completion_text(segments)


def synth_config(root, *extra):
    return load_config({"run": RunConfig, "env": EnvConfig, "model": data.ModelConfig, "synth": data.SynthConfig},
                       ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                        f"run.data_dir={root}/data", f"run.runs_dir={root}/runs", "run.name=test", "run.device=cpu",
                        *extra])


def test_oracle_writes_every_kind_and_logs_its_real_calls(tiny_synth):
    folder, stats = tiny_synth
    train = rows_of(os.path.join(folder, "train.jsonl"))
    kinds = {r["type"] for r in train}
    assert kinds == {"cot", "coa", "pair"}
    assert stats["train"]["real_calls"] > 0
    with open(os.path.join(folder, "calls_train.jsonl")) as f:
        calls = [json.loads(line) for line in f]
    assert len(calls) == stats["train"]["real_calls"]
    assert all(c["question"] and c["observation"].startswith(ENV.obs_open) for c in calls)


def test_oracle_coa_observations_are_the_real_tool_output(tiny_synth, tiny_root, tiny_base):
    from transformers import AutoTokenizer
    folder, _ = tiny_synth
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    search = SearchEnv(make_tool(ENV, RunConfig(data_dir=f"{tiny_root}/data")), tokenizer, ENV)
    coa = [r for r in rows_of(os.path.join(folder, "train.jsonl")) if r["type"] == "coa"]
    for row in random.Random(0).sample(coa, 30):
        parsed = parse(text(row["segments"]), ENV)
        assert parsed.format_ok and parsed.answer == row["golden_answers"][0]
        observations = [s["text"] for s in row["segments"] if s["who"] == "env"]
        assert observations == search(parsed.actions)  # one observation per action, exactly what the tool returns
        assert len(parsed.actions) <= ENV.max_actions


def test_imperfect_share_controls_vague_and_wasted_searches(tiny_root, tiny_base, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    minimal = {"city": 1, "employer": 1, "country": 2, "comparison": 2, "yesno": 2}
    shares = {}
    for share in (0.0, 0.5):
        cfg = synth_config(tiny_root, f"synth.out={tmp_path}/s{share}", f"synth.imperfect_share={share}",
                           "synth.splits=train", "synth.limit=200")
        data.synthesize(cfg, tokenizer)
        coa = [r for r in rows_of(f"{tmp_path}/s{share}/train.jsonl") if r["type"] == "coa"]
        extra = [len(parse(text(r["segments"]), ENV).actions) > minimal[r["kind"]] for r in coa]
        for e, r in zip(extra, coa):
            assert e == (r["imperfect"] == "wasted") or r["imperfect"] == "vague"  # a vague query may get lucky
        shares[share] = (sum(extra) / len(coa), sum(bool(r["imperfect"]) for r in coa) / len(coa))
    assert shares[0.0] == (0.0, 0.0)
    assert 0.3 < shares[0.5][1] < 0.7 and shares[0.5][0] > 0.2


def test_pairs_choose_the_right_continuation_and_skip_wasted_searches(tiny_synth):
    folder, _ = tiny_synth
    pairs = [r for r in rows_of(os.path.join(folder, "train.jsonl")) if r["type"] == "pair"]
    assert any(r["needs_search"] for r in pairs) and any(not r["needs_search"] for r in pairs)
    for row in pairs:
        full = {part: text(row["prefix"]) + text(row[part]) for part in ("chosen", "rejected")}
        acts = {part: parse(full[part], ENV).actions for part in full}
        assert reward(full["chosen"], row["golden_answers"], ENV) == 1.0
        if row["needs_search"]:  # the no-tool attempt failed: searching is chosen
            assert acts["chosen"] and not acts["rejected"]
            assert reward(full["rejected"], row["golden_answers"], ENV) == 0.0
        else:  # a well-known fact: both are right, the search was wasted
            assert acts["rejected"] and not acts["chosen"]
            assert reward(full["rejected"], row["golden_answers"], ENV) == 1.0
        assert all(s["who"] == "model" for s in row["prefix"])


def test_cot_rows_answer_right_without_searching(tiny_synth):
    folder, _ = tiny_synth
    cot = [r for r in rows_of(os.path.join(folder, "train.jsonl")) if r["type"] == "cot"]
    for row in cot:
        assert reward(text(row["segments"]), row["golden_answers"], ENV) == 1.0
        assert not parse(text(row["segments"]), ENV).actions


def test_teacher_words_are_whole_tokens_of_the_tiny_tokenizer(tiny_synth, tiny_base):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    for phrase in (" I need to search for this.", " I know this one.", " I should check.", " Let me search again."):
        words = phrase.split()
        assert len(tokenizer.encode(phrase, add_special_tokens=False)) <= len(words) + 1  # "." may be its own


@pytest.mark.parametrize("row, problem", [
    ({"question": "q?", "golden_answers": ["a"], "type": "coa"}, "segments"),
    ({"question": "q?", "golden_answers": ["a"], "type": "coa", "segments": [{"who": "tool", "text": "x"}]},
     "segment"),
    ({"question": "q?", "golden_answers": ["a"], "type": "pair", "prefix": [], "chosen": [{"who": "model", "text": "x"}]},
     "rejected"),
    ({"question": "q?", "golden_answers": ["a"], "type": "essay", "segments": []}, "type"),
    ({"question": "", "golden_answers": ["a"], "type": "cot", "segments": [{"who": "model", "text": "x"}]}, "question"),
    ({"question": "q?", "golden_answers": "a", "type": "cot", "segments": [{"who": "model", "text": "x"}]}, "golden"),
])
def test_check_synth_row_names_the_problem(row, problem):
    assert problem in data.check_synth_row(row)


def test_malformed_synth_rows_are_reported_with_file_and_line(tmp_path, capsys):
    good = {"id": "1", "question": "q?", "golden_answers": ["a"], "type": "cot",
            "segments": [{"who": "model", "text": " I know this one. </think> \\boxed{a}"}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "segments": "x"}) + "\n")
    rows = sft.read_synth(str(path))
    assert rows == [good]
    out = capsys.readouterr().out
    assert f"{path}:2" in out and f"{path}:3" in out
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="no usable rows"):
        sft.read_synth(str(path))


# -----------------------------------------------------------------------------
# the real teachers

def test_judged_keeps_right_samples_and_pairs_a_wrong_one_that_differs_in_searching():
    row = {"id": "x", "question": "Where was Ada Brun born?", "golden_answers": ["Lorn"], "kind": "city",
           "needs_search": True}
    m = lambda t: {"who": "model", "text": t}
    right_search = [m(" <begin_search> Ada Brun </end_search>"), {"who": "env", "text": "<search_result> Ada Brun "
                    "was born in Lorn. </search_result>"}, m(" </think> \\boxed{Lorn}")]
    wrong_cot = [m(" I know this one. </think> \\boxed{Kovar}")]
    broken = [m(" I know this one. \\boxed{Lorn}")]  # right answer, no </think>: rejected
    out = data.judged(row, [wrong_cot, right_search, broken, right_search], ENV)
    assert [r["type"] for r in out] == ["coa", "pair"]
    pair = out[1]
    assert pair["chosen"] == right_search and pair["rejected"] == wrong_cot and pair["chosen_searches"]
    assert data.judged(row, [wrong_cot, broken], ENV) == []


def test_hf_teacher_through_rollout_keeps_only_right_trajectories(tiny_root, tiny_base, tmp_path):
    cfg = synth_config(tiny_root, f"synth.teacher={tiny_base}", f"synth.out={tmp_path}/hf", "synth.splits=dev",
                       "synth.limit=6", "synth.samples=2", "synth.batch_size=3", "env.max_new_tokens=40",
                       "run.device=cpu")
    try:
        stats = data.synthesize(cfg)
    except ConfigError as e:  # an untrained model is rarely right: keeping nothing is the one-line error
        assert "kept no row of the 6 dev questions" in str(e) and not os.path.exists(f"{tmp_path}/hf/dev.jsonl")
        return
    assert stats["dev"]["questions"] == 6
    for row in rows_of(f"{tmp_path}/hf/dev.jsonl"):  # an untrained model is rarely right: whatever is kept is
        if row["type"] != "pair":
            assert reward(text(row["segments"]), row["golden_answers"], ENV) == 1.0


def test_episode_segments_split_model_and_environment_tokens(tiny_base):
    from transformers import AutoTokenizer
    from rollout import Episode
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model_ids = tokenizer.encode(" I need to search for this. <begin_search> Ada </end_search>", add_special_tokens=False)
    obs_ids = tokenizer.encode("<search_result> Ada was born in Lorn. </search_result>", add_special_tokens=False)
    end_ids = tokenizer.encode(" </think> \\boxed{Lorn}", add_special_tokens=False)
    ep = Episode(question="q", golds=["Lorn"], prompt_ids=[], ids=model_ids + obs_ids + end_ids + [tokenizer.eos_token_id],
                 mask=[1] * len(model_ids) + [0] * len(obs_ids) + [1] * (len(end_ids) + 1))
    segments = data.episode_segments(ep, tokenizer)
    assert [s["who"] for s in segments] == ["model", "env", "model"]
    assert segments[1]["text"] == "<search_result> Ada was born in Lorn. </search_result>"
    assert sft.encode_segments(tokenizer, segments)[0] == ep.ids[:-1]


class ScriptedTeacher(BaseHTTPRequestHandler):
    """/v1/completions: searches the person named in the question, then answers from the observation."""
    prompts = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        ScriptedTeacher.prompts.append(prompt)
        assert body["stop"] == [ENV.action_close] and body["model"] == "scripted"
        name = prompt.split("Where was ")[1].split(" born?")[0] if "Where was " in prompt else None
        if name is None:  # not a city question: a wrong answer from memory
            reply = f" I know this one. {ENV.think_close} {ENV.answer_open}nowhere}}"
        elif ENV.obs_open not in prompt:
            reply = f" I need to search for this. {ENV.action_open} {name} "
        else:
            city = prompt.split(f"{name} was born in ")[1].split(" in ")[0]
            reply = f" {name} was born in {city}. {ENV.think_close} {ENV.answer_open}{city}}}"
        send_json(self, {"choices": [{"text": reply, "finish_reason": "stop"}]})

    def log_message(self, *args):
        pass


def test_endpoint_teacher_searches_with_the_real_tool_and_keeps_right_answers(tiny_root, tiny_base, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), ScriptedTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = synth_config(tiny_root, f"synth.teacher=http://127.0.0.1:{server.server_port}", "synth.api_model=scripted",
                           f"synth.out={tmp_path}/ep", "synth.splits=dev", "synth.samples=1", "synth.limit=40")
        stats = data.synthesize(cfg, __import__("transformers").AutoTokenizer.from_pretrained(tiny_base))
        rows = rows_of(f"{tmp_path}/ep/dev.jsonl")
        coa = [r for r in rows if r["type"] == "coa"]
        n_city = sum(r["kind"] == "city" for r in data.load_qa(f"{tiny_root}/data/dev.jsonl", limit=40))
        assert len(coa) == n_city > 0  # the scripted teacher is right exactly on "Where was X born?"
        for row in coa:
            assert [s["who"] for s in row["segments"]] == ["model", "env", "model"]
            assert row["segments"][0]["text"].endswith(ENV.action_close)
            assert reward(text(row["segments"]), row["golden_answers"], ENV) == 1.0
        assert any(row["segments"][1]["text"] in p for row in coa for p in ScriptedTeacher.prompts)
        assert stats["dev"]["real_calls"] >= n_city
    finally:
        server.shutdown()


def test_endpoint_teacher_that_is_down_fails_with_a_clear_error(tiny_root, tiny_base, tmp_path):
    from transformers import AutoTokenizer
    cfg = synth_config(tiny_root, "synth.teacher=http://127.0.0.1:9", f"synth.out={tmp_path}/down",
                       "synth.splits=dev", "synth.limit=40", "synth.retries=0", "synth.concurrency=2")
    # stops at the 10th question, not after all 40
    with pytest.raises(RunError, match="10 of the first 10 questions: teacher endpoint http://127.0.0.1:9/v1/"
                                             "completions failed after 1 tries: .*Connection refused"):
        data.synthesize(cfg, AutoTokenizer.from_pretrained(tiny_base))


class WrongTeacher(BaseHTTPRequestHandler):
    """/v1/completions: always a wrong answer from memory."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        send_json(self, {"choices": [{"text": f" I know. {ENV.think_close} {ENV.answer_open}nowhere}}",
                                      "finish_reason": "stop"}]})

    def log_message(self, *args):
        pass


def test_a_teacher_that_keeps_no_rows_is_one_line_and_exit_2_before_writing(tiny_root, tiny_base, tmp_path, capsys):
    server = HTTPServer(("127.0.0.1", 0), WrongTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SystemExit) as stop:
            cli(data.main, ["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data",
                                  f"model.base={tiny_base}", "--synth", f"synth.out={tmp_path}/none",
                                  f"synth.teacher=http://127.0.0.1:{server.server_port}", "synth.splits=dev",
                                  "synth.samples=1", "synth.limit=5"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    last = err.rstrip().split("\n")[-1].split("\r")[-1]  # after the progress bar
    assert stop.value.code == 2 and "Traceback" not in err
    assert "kept no row of the 5 dev questions" in last and "synth.teacher=oracle" in last
    assert not os.path.exists(f"{tmp_path}/none/dev.jsonl")


# -----------------------------------------------------------------------------
# the endpoint teacher at scale: concurrent requests, budgets and timeouts of its own, the needs_search rule

class StandInTeacher(BaseHTTPRequestHandler):
    """/v1/completions answering after a latency, scripted like a reasoning teacher that searches once: the first
    turn searches the question, the turn after the observation answers it right. Each server gets its own
    subclass (start_teacher) holding the answers (question -> gold), the latency (`slow`: question -> its own),
    every request's body and the most requests in flight at once. bench/synth.py measures with it."""
    answers, latency_s, slow = {}, 0.0, {}

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = next(q for q in cls.answers if q in body["prompt"])
        with cls.lock:
            cls.bodies.append(body)
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
        time.sleep(cls.slow.get(question, cls.latency_s))
        with cls.lock:
            cls.in_flight -= 1
        if ENV.obs_open not in body["prompt"]:
            reply = f" I need to search for this. {ENV.action_open} {question} "
        else:
            reply = f" I found it. {ENV.think_close} {ENV.answer_open}{cls.answers[question]}}}"
        try:
            send_json(self, {"choices": [{"text": reply, "finish_reason": "stop"}]})
        except OSError:  # the client gave up (its timeout): nothing to answer
            pass

    def log_message(self, *args):
        pass


def start_teacher(answers, latency_s=0.0, slow=None):
    """A threaded stand-in teacher on 127.0.0.1: (server, its handler class with the recorded requests)."""
    handler = type("Teacher", (StandInTeacher,), {"answers": answers, "latency_s": latency_s, "slow": slow or {},
                                                  "bodies": [], "in_flight": 0, "peak": 0, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.request_queue_size = 1024  # many workers connect at once
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def synth_with(tiny_root, tiny_base, out, answers, *extra, latency_s=0.0, slow=None):
    """data.synthesize on the dev questions against a stand-in teacher: (stats, rows, handler, wall seconds)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    server, handler = start_teacher(answers, latency_s, slow)
    try:
        cfg = synth_config(tiny_root, f"synth.teacher=http://127.0.0.1:{server.server_port}", f"synth.out={out}",
                           "synth.splits=dev", f"synth.limit={len(answers)}", "synth.samples=1", *extra)
        t0 = time.perf_counter()
        stats = data.synthesize(cfg, tokenizer)
        return stats, rows_of(f"{out}/dev.jsonl"), handler, time.perf_counter() - t0
    finally:
        server.shutdown()


def dev_answers(tiny_root, n):
    return {r["question"]: r["golden_answers"][0] for r in data.load_qa(f"{tiny_root}/data/dev.jsonl", limit=n)}


def test_endpoint_requests_overlap_up_to_the_concurrency(tiny_root, tiny_base, tmp_path):
    answers, latency_s = dev_answers(tiny_root, 8), 0.5
    chain_s = 2 * latency_s  # search, then answer
    _, rows, handler, wall_s = synth_with(tiny_root, tiny_base, f"{tmp_path}/c8", answers, "synth.concurrency=8",
                                          latency_s=latency_s)
    assert 4 < handler.peak <= 8 and len(handler.bodies) == 16  # all 8 at once but on a very loaded machine
    assert wall_s < 4 * chain_s  # about one chain, where one request at a time takes 8 chains
    assert [r["question"] for r in rows] == list(answers)  # every question kept, one coa row each
    _, _, handler, wall_s = synth_with(tiny_root, tiny_base, f"{tmp_path}/c2", answers, "synth.concurrency=2",
                                       latency_s=latency_s)
    assert handler.peak == 2 and wall_s >= 4 * chain_s  # the pool is bounded


def test_endpoint_rows_come_back_in_question_order_whatever_order_requests_finish(tiny_root, tiny_base, tmp_path):
    answers = dev_answers(tiny_root, 6)
    slow = {q: 0.05 * (len(answers) - i) for i, q in enumerate(answers)}  # the first question finishes last
    _, rows, _, _ = synth_with(tiny_root, tiny_base, f"{tmp_path}/all", answers, "synth.concurrency=6",
                               "synth.samples=2", slow=slow)
    _, alone, _, _ = synth_with(tiny_root, tiny_base, f"{tmp_path}/one", answers, "synth.concurrency=1",
                                "synth.samples=2", slow=slow)
    assert [r["question"] for r in rows] == list(answers)
    assert rows == alone


def test_endpoint_sends_the_first_and_later_turn_token_budgets(tiny_root, tiny_base, tmp_path):
    _, _, handler, _ = synth_with(tiny_root, tiny_base, f"{tmp_path}/b", dev_answers(tiny_root, 2),
                                  "synth.max_tokens=300", "synth.max_tokens_after_obs=70")
    budgets = sorted((ENV.obs_open in b["prompt"], b["max_tokens"]) for b in handler.bodies)
    assert budgets == [(False, 300), (False, 300), (True, 70), (True, 70)]


def test_endpoint_timeout_is_counted_per_question_and_the_rest_is_kept(tiny_root, tiny_base, tmp_path):
    answers = dev_answers(tiny_root, 8)
    late = list(answers)[1:3]
    stats, rows, _, _ = synth_with(tiny_root, tiny_base, f"{tmp_path}/t", answers, "synth.timeout_s=2",
                                   "synth.retries=0", "synth.samples=2", slow={q: 6.0 for q in late})
    assert stats["dev"]["teacher_failed_questions"] == 2 and stats["dev"]["teacher_failed_samples"] == 4
    assert [r["question"] for r in rows] == [q for q in answers if q not in late]


def test_unmarked_question_answered_right_without_search_is_marked_as_not_needing_one(tiny_base):
    from transformers import AutoTokenizer
    m = lambda t: {"who": "model", "text": t}
    cot = [m(f" I know this one. {ENV.think_close} {ENV.answer_open}Lorn}}")]
    coa = [m(f" {ENV.action_open} Ada Brun {ENV.action_close}"), {"who": "env", "text": f"{ENV.obs_open} Ada Brun "
           f"was born in Lorn. {ENV.obs_close}"}, m(f" {ENV.think_close} {ENV.answer_open}Lorn}}")]
    wrong = [m(f" I know this one. {ENV.think_close} {ENV.answer_open}Kovar}}")]
    real = {"id": "h1", "question": "Where was Ada Brun born?", "golden_answers": ["Lorn"]}  # FlashRAG: no mark
    known = data.judged(real, [cot, coa], ENV)
    assert [(r["type"], r["needs_search"]) for r in known] == [("cot", False), ("coa", False)]
    searched = data.judged(real, [wrong, coa], ENV)
    assert [(r["type"], r["needs_search"]) for r in searched] == [("coa", True), ("pair", True)]
    marked = data.judged({**real, "needs_search": True}, [cot, coa], ENV)  # the tiny world's own mark stays
    assert [r["needs_search"] for r in marked] == [True, True]
    examples = sft.build_examples(known + searched, "sft2", AutoTokenizer.from_pretrained(tiny_base), ENV, 256)
    assert [e["cot"] for e in examples] == [True, False, False]  # SFT-2 keeps the known question's CoT row


class HalfDownTeacher(BaseHTTPRequestHandler):
    """/v1/completions: HTTP 500 at once for the questions in `down`, no answer for a minute for the others."""
    down = set()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if any(q in body["prompt"] for q in self.down):
            self.send_error(500)
            return
        time.sleep(60)

    def log_message(self, *args):
        pass


def test_a_teacher_failing_most_questions_stops_at_once_with_requests_still_in_flight(tiny_root, tiny_base, tmp_path):
    import signal
    import subprocess
    import sys
    HalfDownTeacher.down = set(dev_answers(tiny_root, 10))
    server = ThreadingHTTPServer(("127.0.0.1", 0), HalfDownTeacher)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "data.py", "--config", "configs/tiny.yaml",
                             f"run.data_dir={tiny_root}/data", f"model.base={tiny_base}", "--synth",
                             f"synth.out={tmp_path}/half", "synth.splits=dev", "synth.limit=20",
                             f"synth.teacher=http://127.0.0.1:{server.server_port}",
                             "synth.samples=1", "synth.retries=0", "synth.concurrency=20"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    t0 = time.perf_counter()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        server.shutdown()
    # 10 requests hang for a minute: the process does not wait for them
    assert proc.returncode == 1 and time.perf_counter() - t0 < 40, err[-2000:]
    last = err.rstrip().split("\n")[-1].split("\r")[-1]
    assert "no sample came back for 10 of the first 10 questions" in last and "500" in last and "Traceback" not in err
