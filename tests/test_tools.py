"""tools.py: the parser, metrics, reward and the search tools; config.py's loader; server.py's HTTP client.

    .venv/bin/python -m pytest -q tests/test_tools.py
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings, strategies as st

from server import HTTPSearch
from plumbing import load_model, model_path
import tools
from config import ConfigError, RunConfig, cli, load_config, read_argv, read_jsonl
from tools import EnvConfig, exact_match, extract_boxed, f1_score, lenient_match, parse, reward

ENV = EnvConfig()
TAGS = [ENV.think_open, ENV.think_close, ENV.action_open, ENV.action_close, ENV.obs_open, ENV.obs_close,
        ENV.answer_open, "{", "}", " ", "\n", "x"]


# -----------------------------------------------------------------------------
# the parser

def test_parse_well_formed_trajectory():
    text = (" I need it. <begin_search> Ada Brun </end_search><search_result> Ada Brun was born in Lorn. "
            "</search_result> Lorn. <begin_search> Lorn </end_search><search_result> Lorn is in Vess. "
            "</search_result> </think> \\boxed{Vess}")
    p = parse(text, ENV)
    assert p.format_ok and p.reason == ""
    assert p.actions == ["Ada Brun", "Lorn"]
    assert p.answer == "Vess"


@pytest.mark.parametrize("text, reason", [
    (" thinking \\boxed{x}", "no think_close"),
    (" a </think> b </think> \\boxed{x}", "repeated think_close"),
    (" a <think> b </think> \\boxed{x}", "nested think_open"),
    (" a </think> <begin_search> q </end_search> \\boxed{x}", "action after think_close"),
    (" <begin_search> q </think> \\boxed{x}", "unbalanced action tags"),
    (" <begin_search> q </end_search> </end_search> </think> \\boxed{x}", "unbalanced action tags"),
    (" a </think> no box", "no answer"),
    (" a </think> \\boxed{x", "no answer"),
    (" <begin_search>   </end_search> </think> \\boxed{x}", "empty query"),
])
def test_parse_names_the_broken_format(text, reason):
    p = parse(text, ENV)
    assert not p.format_ok
    assert p.reason == reason


def test_tags_inside_an_observation_are_not_actions():
    text = (" <begin_search> q </end_search><search_result> fake <begin_search> evil </end_search> </think> "
            "\\boxed{wrong} </search_result> </think> \\boxed{right}")
    p = parse(text, ENV)
    assert p.format_ok and p.actions == ["q"] and p.answer == "right"


def test_unclosed_observation_swallows_the_rest():
    p = parse(" <begin_search> q </end_search><search_result> never closed </think> \\boxed{x}", ENV)
    assert not p.format_ok and p.reason == "no think_close"


def test_boxed_keeps_nested_braces_and_takes_the_last():
    assert extract_boxed("\\boxed{a} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{ok} \\boxed{unclosed") == "ok"
    assert extract_boxed("nothing") is None


def test_prompt_may_or_may_not_include_the_think_opener():
    assert parse("<think> a </think> \\boxed{x}", ENV).format_ok
    assert parse(" a </think> \\boxed{x}", ENV).format_ok


def test_custom_tags_from_config():
    env = EnvConfig(think_open="<reason>", think_close="</reason>", action_open="<tool>", action_close="</tool>",
                    obs_open="<obs>", obs_close="</obs>", answer_open="ANSWER{")
    p = parse("<reason> <tool> who </tool><obs> him </obs> </reason> ANSWER{Bo}", env)
    assert p.format_ok and p.actions == ["who"] and p.answer == "Bo"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=8)), max_size=40))
def test_parser_never_raises_on_adversarial_text(pieces):
    p = parse("".join(pieces), ENV)
    assert isinstance(p.format_ok, bool)
    assert p.format_ok == (p.reason == "")
    if p.format_ok:  # whatever it accepts really has the shape of a trajectory
        assert p.answer is not None and all(q for q in p.actions)


def test_parser_handles_huge_and_unicode_input():
    huge = " " + ENV.action_open + "q" * 200_000 + ENV.action_close + " \u202e\U0001F600\x00 </think> \\boxed{\u00e9}"
    p = parse(huge, ENV)
    assert p.format_ok and len(p.actions[0]) == 200_000 and p.answer == "\u00e9"


# -----------------------------------------------------------------------------
# metrics and reward

@pytest.mark.parametrize("hostile", [
    "<think> x </think> " + "\\boxed{" * 15_000,  # unclosed answers: each used to rescan the rest of the text
    "<think> x </think> " + "\\boxed{a" * 12_500 + "}",
    "<think> " + "<begin_search> q " * 7_000 + "</think> \\boxed{x}",  # unclosed actions: a lazy regex rescans
    "<think> x </think> \\boxed{" + "The, a! " * 12_500 + "}",  # a huge answer to normalise
    "<think> " + "<search_result> " * 6_500 + "</think>",
    "{" * 50_000 + "}" * 50_000,
], ids=["unclosed-boxed", "nested-boxed", "unclosed-actions", "huge-answer", "unclosed-observations", "braces"])
def test_parser_and_reward_take_linear_time_on_hostile_text(hostile):
    assert len(hostile) >= 100_000
    t0 = time.perf_counter()
    parse(hostile, ENV)
    reward(hostile, ["x"], ENV)
    assert time.perf_counter() - t0 < 0.5  # quadratic: 4,000 unclosed \\boxed{ alone took 15 s


def test_boxed_picks_the_last_balanced_answer_past_unclosed_ones():
    assert extract_boxed("\\boxed{a} \\boxed{b{c}} \\boxed{d") == "b{c}"
    assert extract_boxed("\\boxed{a} } \\boxed{{}") == "a"  # the last opener's brace is closed by nothing
    assert extract_boxed("\\boxed{ x {y} \\boxed{z} }") == "z"  # the innermost closes first, as before
    assert extract_boxed("no answer }{") is None


def test_empty_prediction_never_matches():
    assert reward(" x </think> \\boxed{}", ["A"], ENV) == 0.0  # "A" normalises to "" as the empty answer does
    assert exact_match("", ["A"]) == 0.0 and exact_match("the", ["an"]) == 0.0
    assert exact_match("", [""]) == 0.0 and lenient_match("", ["A"]) == 0.0 and f1_score("", ["A"]) == 0.0


def test_squad_normalisation_em_and_f1():
    assert exact_match("The  Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert f1_score("Paris, France", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("Berlin", ["Paris"]) == 0.0
    assert f1_score("e b c", ["x", "b c d"]) == pytest.approx(2 / 3)  # best of the golds


def test_lenient_match_is_em_or_seventy_percent_of_gold_tokens():
    assert lenient_match("born in the city of New York in 1950", ["New York City"]) == 1.0  # 3/3 tokens
    assert lenient_match("Joanne Harris", ["Joanne Michele Sylvie Harris"]) == 0.0  # 2/4 < 0.7
    assert lenient_match("Joanne Sylvie Harris", ["Joanne Michele Sylvie Harris"]) == 1.0  # 3/4 >= 0.7
    assert lenient_match("no", ["yes"]) == 0.0


def test_lenient_match_reads_number_words_fillers_and_quotes_as_the_paper_does():
    assert exact_match("two", ["2"]) == 0.0 and lenient_match("two", ["2"]) == 1.0
    assert lenient_match("Chapter 3", ["chapter three"]) == 1.0
    assert lenient_match("far away", ["So Far Away"]) == 1.0  # "so" is a filler: 2 of 2 gold words
    assert lenient_match("\u201cParis\u201d", ["Paris"]) == 1.0 and exact_match("\u201cParis\u201d", ["Paris"]) == 0.0
    assert lenient_match("just", ["so"]) == 0.0  # nothing but fillers is no answer
    assert lenient_match("Joanne Harris", ["Joanne Michele Sylvie Harris"]) == 0.0


def test_reward_lenient_is_the_papers_correctness_under_the_format_rules():
    good, broken = " x </think> \\boxed{Chapter three}", " x \\boxed{Chapter three}"
    assert reward(good, ["chapter 3"], ENV, "lenient") == 1.0 and reward(good, ["chapter 3"], ENV, "em") == 0.0
    assert reward(broken, ["chapter 3"], ENV, "lenient") == 0.0  # no </think>: 0 as for em
    with pytest.raises(ConfigError, match="rl.reward"):
        reward(good, ["chapter 3"], ENV, "bleu")


def test_reward_is_zero_for_broken_format_even_with_right_answer():
    assert reward(" x </think> \\boxed{Paris}", ["paris"], ENV) == 1.0
    assert reward(" x </think> \\boxed{Rome}", ["paris"], ENV) == 0.0
    assert reward(" x \\boxed{Paris}", ["paris"], ENV) == 0.0  # no </think>
    assert reward(" x </think> <begin_search> q </end_search> \\boxed{Paris}", ["paris"], ENV) == 0.0
    assert reward(" x </think> \\boxed{Paris France}", ["paris"], ENV, kind="f1") == pytest.approx(2 / 3)


# -----------------------------------------------------------------------------
# config

def write_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_config_file_then_overrides(tmp_path):
    path = write_yaml(tmp_path, "run:\n  seed: 3\nenv:\n  topk: 5\n")
    cfg = load_config({"run": RunConfig, "env": EnvConfig}, ["--config", path, "env.topk=7", "seed=4"],
                            own="run")
    assert cfg.run.seed == 4 and cfg.env.topk == 7 and cfg.env.tool == "bm25"
    assert cfg.to_dict()["env"]["topk"] == 7


@pytest.mark.parametrize("yaml_text, argv, message", [
    ("env:\n  topk: 5\n", ["env.top_k=3"], "unknown key 'env.top_k'"),
    ("env:\n  tpok: 5\n", [], "unknown key 'env.tpok'"),
    ("rll:\n  lr: 1\n", [], "unknown section 'rll'"),
    ("env:\n  topk: five\n", [], "env.topk must be int"),
    ("env: 3\n", [], "section 'env'"),
    ("{}\n", ["env.timeout_s=slow"], "env.timeout_s must be float"),
    ("{}\n", ["sft.lr=1"], "names no section"),
    ("env:\n  topk: [5\n", [], "not valid YAML"),
    ("{}\n", ["env.topk=[5"], "env.topk='\\[5' is not a value"),
    ("{}\n", ["--resum"], "unknown flag --resum"),
    ("{}\n", ["--config"], "--config needs a file"),
])
def test_config_errors_name_the_culprit(tmp_path, yaml_text, argv, message):
    path = write_yaml(tmp_path, yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config({"run": RunConfig, "env": EnvConfig}, ["--config", path, *argv], own="run")


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*nope.yaml"):
        load_config({"run": RunConfig}, ["--config", str(tmp_path / "nope.yaml")])


def test_only_the_flags_a_script_takes_are_accepted():
    cfg = load_config({"run": RunConfig}, ["--resume"], flags=("resume", "overwrite"))
    assert cfg.flags == ["resume"]
    with pytest.raises(ConfigError, match=r"unknown flag --resmue \(this script takes: --resume, --overwrite\)"):
        load_config({"run": RunConfig}, ["--resmue"], flags=("resume", "overwrite"))


def test_one_command_line_reader_serves_the_stages_and_the_demo_flags_with_a_value():
    demo_flags = {"seeds N": "", "quick": ""}  # demo.py's kind: "--seeds N" takes the next word
    argv = ["--config=c.yaml", "--seeds", "3", "--quick", "--run.seed=2", "sft.lr=1"]
    assert read_argv(argv, demo_flags) == ("c.yaml", ["run.seed=2", "sft.lr=1"], {"seeds": "3", "quick": True})
    with pytest.raises(ConfigError, match=r"unknown flag --quik \(this script takes: --seeds N, --quick\)"):
        read_argv(["--quik"], demo_flags)
    with pytest.raises(ConfigError, match="cannot read argument 'quick'"):
        read_argv(["quick"], demo_flags)


def test_cli_turns_a_config_error_into_one_line_and_exit_status_2(capsys):
    def main(argv):
        load_config({"run": RunConfig}, argv)
    with pytest.raises(SystemExit) as stop:
        cli(main, ["run.sead=1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "unknown key 'run.sead'" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):  # a real bug keeps its traceback
        cli(lambda argv: 1 / 0, [])


def test_int_config_value_is_accepted_for_float_field(tmp_path):
    cfg = load_config({"env": EnvConfig}, ["env.timeout_s=3"], own="env")
    assert cfg.env.timeout_s == 3.0 and isinstance(cfg.env.timeout_s, float)


# -----------------------------------------------------------------------------
# the HTTP retrieval client against a real server on 127.0.0.1

class Handler(BaseHTTPRequestHandler):
    mode = "ok"
    hits = 0

    def do_POST(self):
        Handler.hits += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Handler.mode == "slow":
            time.sleep(1.0)
        if Handler.mode == "trickle":  # a whole, valid reply, one byte every 50 ms: no single read waits long
            payload = json.dumps({"result": [[{"document": {"contents": "x" * 40}}] for _ in body["queries"]]})
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for byte in payload.encode():
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
            return
        if Handler.mode == "500" or (Handler.mode == "flaky" and Handler.hits == 1):
            self.send_response(500)
            self.end_headers()
            return
        if Handler.mode == "garbage":
            payload = b"<html>not json"
        elif Handler.mode == "short":
            payload = json.dumps({"result": []}).encode()
        else:
            payload = json.dumps({"result": [[{"document": {"contents": f"doc about {q}"}, "score": 1.0}] * body["topk"]
                                             for q in body["queries"]]}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client hung up on a slow reply: expected here


@pytest.fixture
def server():
    srv = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    Handler.hits = 0
    yield f"http://127.0.0.1:{srv.server_address[1]}/retrieve"
    srv.shutdown()
    srv.server_close()


def test_http_search_returns_passages(server):
    Handler.mode = "ok"
    out = HTTPSearch(server, timeout_s=2)(["a", "b"], k=2)
    assert out == [["doc about a"] * 2, ["doc about b"] * 2]


def test_http_search_retries_then_succeeds(server):
    Handler.mode = "flaky"
    out = HTTPSearch(server, timeout_s=2, retries=2, backoff_s=0.01)(["a"], k=1)
    assert out == [["doc about a"]] and Handler.hits == 2


@pytest.mark.parametrize("mode, tries", [("500", 2), ("garbage", 2), ("short", 2), ("slow", 1), ("trickle", 1)])
def test_http_search_fails_clearly_within_bounded_time(server, mode, tries):
    Handler.mode = mode
    t0 = time.time()
    with pytest.raises(tools.ToolError, match=f"failed after {tries} tr"):
        HTTPSearch(server, timeout_s=0.3, retries=1, backoff_s=0.01)(["a"], k=1)
    assert time.time() - t0 < 0.6  # the deadline is the whole call's: a slow first try leaves no time for a retry


def test_a_trickling_reply_costs_one_deadline_however_slowly_it_comes(server):
    """The reply (~90 bytes at 50 ms a byte: 4.5 s) never pauses longer than a read timeout would allow; the call's
    deadline covers connect, send and the whole reply, retries included, so it fails at 1 s naming the cause."""
    Handler.mode = "trickle"
    t0 = time.time()
    with pytest.raises(tools.ToolError) as failed:
        HTTPSearch(server, timeout_s=1.0, retries=2, backoff_s=0.01)(["a"], k=1)
    assert time.time() - t0 < 1.5 and failed.value.cause == "timeout" and server in str(failed.value)


def test_http_search_server_down():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tools.ToolError, match="retrieval server"):
        HTTPSearch(f"http://127.0.0.1:{port}/retrieve", timeout_s=0.5, retries=1, backoff_s=0.01)(["a"])


class WordTokenizer:
    """Whitespace 'tokenizer' for budget tests."""

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


def test_search_env_failed_observation_or_error():
    def broken(queries, k):
        raise ConnectionError("down")
    env = tools.SearchEnv(broken, WordTokenizer(), EnvConfig(on_error="observe"))
    obs = env(["q1", "q2"])
    assert obs == ["<search_result> search failed: ConnectionError </search_result>"] * 2 and env.calls == 2
    with pytest.raises(tools.ToolError):
        tools.SearchEnv(broken, WordTokenizer(), EnvConfig(on_error="raise"))(["q"])


def test_observation_fits_the_token_budget():
    env = tools.SearchEnv(lambda qs, k: [["w " * 500] for _ in qs], WordTokenizer(), EnvConfig(obs_max_tokens=20))
    (obs,) = env(["q"])
    assert obs.startswith(ENV.obs_open) and obs.endswith(ENV.obs_close)
    assert len(obs[len(ENV.obs_open):-len(ENV.obs_close)].split()) == 20


def test_number_results_numbers_the_passages_as_the_papers_observations():
    tool = lambda qs, k: [["Ada was born in Lorn.", "Lorn is in Vell."] for _ in qs]  # noqa: E731
    plain = tools.SearchEnv(tool, WordTokenizer(), EnvConfig())(["q"])
    numbered = tools.SearchEnv(tool, WordTokenizer(), EnvConfig(number_results=True))(["q"])
    assert plain == ["<search_result> Ada was born in Lorn.\nLorn is in Vell. </search_result>"]
    assert numbered == ["<search_result> result 1: Ada was born in Lorn.\nresult 2: Lorn is in Vell. </search_result>"]
    # a world model's body is already in the observation's shape: never numbered twice
    body = "result 1: Ada was born in Lorn."
    assert tools.format_observation([body], WordTokenizer(), EnvConfig(number_results=True), numbered=False) == \
        f"<search_result> {body} </search_result>"
    assert tools.format_observation([], WordTokenizer(), EnvConfig(number_results=True)) == \
        "<search_result> no results </search_result>"


# -----------------------------------------------------------------------------
# BM25 never touches JAX: on a GPU box, JAX's first use preallocates 75% of the card (bm25s imports it if it can)

JAX_TRAP = """
import os
open(os.path.join(os.path.dirname(__file__), "..", "jax_was_imported"), "w").close()
raise AssertionError("jax was imported")  # not ImportError: bm25s catches that and carries on
"""

BM25_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import tools
docs = [{{"id": "1", "contents": "Ada\\nAda was born in Lorn."}}, {{"id": "2", "contents": "Cy\\nCy was born in Vess."}}]
with open({corpus!r}, "w") as f:
    f.writelines(json.dumps(d) + "\\n" for d in docs)
hits = tools.BM25Search({corpus!r})(["Cy born"], k=1)  # builds the index
hits += tools.BM25Search({corpus!r})(["Ada born"], k=1)  # loads it from disk
print(json.dumps({{"hits": hits, "jax_imported": "jax" in sys.modules}}))
"""


def test_bm25_build_and_query_never_import_jax(tmp_path):
    """A stand-in `jax` first on the path fails loudly when imported; BM25Search must build, load and query
    without it (a fresh process, so no earlier import of bm25s hides the check)."""
    import os
    import subprocess
    import sys
    (tmp_path / "site" / "jax").mkdir(parents=True)
    (tmp_path / "site" / "jax" / "__init__.py").write_text(JAX_TRAP)
    (tmp_path / "site" / "jax" / "lax.py").write_text(JAX_TRAP)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = BM25_CHILD.format(root=root, corpus=str(tmp_path / "corpus.jsonl"))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site"), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"hits": [["Cy\nCy was born in Vess."], ["Ada\nAda was born in Lorn."]],
                                       "jax_imported": False}
    assert not (tmp_path / "site" / "jax_was_imported").exists()


@pytest.mark.parametrize("mode, cause", [("500", "HTTP 500"), ("garbage", "bad JSON"), ("slow", "timeout"),
                                         ("short", "malformed reply")])
def test_http_failure_names_its_cause_and_the_url(server, mode, cause):
    Handler.mode = mode
    with pytest.raises(tools.ToolError) as failed:
        HTTPSearch(server, timeout_s=0.3, retries=0)(["a"], k=1)
    assert failed.value.cause == cause and server in str(failed.value) and cause in str(failed.value)


def test_http_failure_of_a_server_that_is_down_says_connection_refused():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tools.ToolError) as failed:
        HTTPSearch(f"http://127.0.0.1:{port}/retrieve", timeout_s=0.5, retries=0)(["a"])
    assert failed.value.cause == "connection refused"


def test_failed_calls_are_counted_shown_and_logged_with_their_cause(server, tmp_path):
    Handler.mode = "500"
    log = tmp_path / "calls.jsonl"
    env = tools.SearchEnv(HTTPSearch(server, timeout_s=1, retries=0), WordTokenizer(), EnvConfig(), str(log))
    obs = env(["q1", "q2"])
    assert obs == ["<search_result> search failed: HTTP 500 </search_result>"] * 2
    assert (env.calls, env.failures) == (2, 2) and server in env.last_error
    Handler.mode = "ok"
    env(["q3"])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["query"], r.get("error")) for r in rows] == [("q1", "HTTP 500"), ("q2", "HTTP 500"), ("q3", None)]
    assert env.failures == 2


# -----------------------------------------------------------------------------
# JSONL readers, model loading

def test_undecodable_bytes_are_a_bad_row_with_file_and_line(tmp_path):
    import data
    path = tmp_path / "qa.jsonl"
    good = json.dumps({"id": "1", "question": "q?", "golden_answers": ["a"]}).encode()
    path.write_bytes(good + b"\n" + b'{"id": "2", "question": "caf\xe9?", "golden_answers": ["a"]}\n' + good + b"\n")
    warnings = []
    rows = read_jsonl(str(path), lambda row: None, warn=warnings.append)
    assert len(rows) == 2 and warnings == [f"warning: {path}:2: skipped bad row: not UTF-8 text"]
    assert len(data.load_qa(str(path))) == 2  # the QA reader skips it too, and says where
    with pytest.raises(ValueError, match=f"{path}:2: bad QA row: not UTF-8 text"):
        data.load_qa(str(path), on_bad="raise")


def test_a_missing_model_folder_is_one_line_before_any_hub_call(tmp_path, monkeypatch):
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError("from_pretrained was called: it would try the hub")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub)
    run_dir = str(tmp_path / "runs" / "tiny")
    for path in (f"{run_dir}/sft123", "sft123", "./sft123"):
        with pytest.raises(ConfigError, match=f"no model folder '{path}' \\(sft.py \\(sft.out=sft123\\)"):
            load_model(path)
    with pytest.raises(ConfigError, match=f"rl.init='sft123': no model folder '{run_dir}/sft123' .*sft.py"):
        model_path("sft123", run_dir, "rl.init='sft123'")
    with pytest.raises(ConfigError, match=f"'{run_dir}/rl_sim' \\(rl.py \\(rl.out=rl_sim\\)"):
        model_path("rl_sim", run_dir)
    assert model_path("Qwen/Qwen2.5-7B", run_dir) == "Qwen/Qwen2.5-7B"  # a hub id is left to the hub


def test_bm25_gives_no_passage_for_a_query_that_matches_nothing(tmp_path):
    docs = [{"id": str(i), "contents": f"Person{i}\nPerson{i} was born in City{i}."} for i in range(3)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    search = tools.BM25Search(str(tmp_path / "corpus.jsonl"))
    assert search(["Zzyzx quux", "Person1 City2", "the of"], k=2) == [
        [], ["Person1\nPerson1 was born in City1.", "Person2\nPerson2 was born in City2."], []]
    idx, scores = search.search(["quux"], k=3)
    assert idx == [[]] and scores == [[]]
