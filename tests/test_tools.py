"""tools.py: the parser, metrics, reward, config and the search clients.

    .venv/bin/python -m pytest -q tests/test_tools.py
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings, strategies as st

import tools
from tools import EnvConfig, RunConfig, exact_match, extract_boxed, f1_score, lenient_match, parse, reward

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
    cfg = tools.load_config({"run": RunConfig, "env": EnvConfig}, ["--config", path, "env.topk=7", "seed=4"],
                            own="run")
    assert cfg.run.seed == 4 and cfg.env.topk == 7 and cfg.env.tool == "bm25"
    assert cfg.to_dict()["env"]["topk"] == 7


@pytest.mark.parametrize("yaml_text, argv, message", [
    ("env:\n  topk: 5\n", ["env.top_k=3"], "unknown key 'env.top_k'"),
    ("env:\n  tpok: 5\n", [], "unknown key 'env.tpok'"),
    ("rll:\n  lr: 1\n", [], "unknown section 'rll'"),
    ("env:\n  topk: five\n", [], "env.topk must be int"),
    ("env: 3\n", [], "section 'env'"),
    ("", ["env.timeout_s=slow"], "env.timeout_s must be float"),
    ("", ["sft.lr=1"], "names no section"),
])
def test_config_errors_name_the_culprit(tmp_path, yaml_text, argv, message):
    path = write_yaml(tmp_path, yaml_text)
    with pytest.raises(ValueError, match=message):
        tools.load_config({"run": RunConfig, "env": EnvConfig}, ["--config", path, *argv], own="run")


def test_int_config_value_is_accepted_for_float_field(tmp_path):
    cfg = tools.load_config({"env": EnvConfig}, ["env.timeout_s=3"], own="env")
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
    out = tools.HTTPSearch(server, timeout_s=2)(["a", "b"], k=2)
    assert out == [["doc about a"] * 2, ["doc about b"] * 2]


def test_http_search_retries_then_succeeds(server):
    Handler.mode = "flaky"
    out = tools.HTTPSearch(server, timeout_s=2, retries=2, backoff_s=0.01)(["a"], k=1)
    assert out == [["doc about a"]] and Handler.hits == 2


@pytest.mark.parametrize("mode", ["500", "garbage", "short", "slow"])
def test_http_search_fails_clearly_within_bounded_time(server, mode):
    Handler.mode = mode
    t0 = time.time()
    with pytest.raises(tools.ToolError, match="failed after 2 tries"):
        tools.HTTPSearch(server, timeout_s=0.3, retries=1, backoff_s=0.01)(["a"], k=1)
    assert time.time() - t0 < 5


def test_http_search_server_down():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tools.ToolError, match="retrieval server"):
        tools.HTTPSearch(f"http://127.0.0.1:{port}/retrieve", timeout_s=0.5, retries=1, backoff_s=0.01)(["a"])


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
