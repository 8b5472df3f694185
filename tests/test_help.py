"""--help on every script, generated from the config dataclasses, and chat.py (asking a model one question).

    .venv/bin/python -m pytest -q tests/test_help.py
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import chat
import data
import demo
import eval as ev
import rl
import sft
from config import ConfigError, SECTIONS, cli, field_help, read_key_values
import worldmodel
from test_rollout import ForcedHead

BENCHES = ("rl_step", "serve", "sim_rewards", "real_model", "synth")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # inspect finds its source there
    spec.loader.exec_module(module)
    return module


def test_every_field_of_every_config_section_has_a_help_line():
    sections = demo.all_sections()
    assert set(sections) | {"chat"} == set(SECTIONS)
    classes = [*sections.values(), chat.ChatConfig, *(bench(b).Args for b in BENCHES)]
    for cls in classes:
        meanings = field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if len(meanings.get(f.name, "")) < 3]
        assert not missing, f"{cls.__name__}: no `# meaning` comment for {missing}"


def test_a_continued_comment_joins_its_field_and_a_heading_does_not():
    meanings = field_help(rl.RLConfig)
    assert meanings["max_tool_failures"].endswith("1 = never stop (the failures are still counted)")
    assert "schedule" not in meanings["eval_every"]  # `# schedule` is the heading of the fields below it
    assert "a name with a file <qa_dir>/<name>.jsonl" in field_help(ev.EvalConfig)["data"]


@pytest.mark.parametrize("main, sections", [
    (data.main, ("run", "env", "world", "model", "synth")), (sft.main, ("run", "env", "model", "sft")),
    (rl.main, ("run", "env", "rl")), (ev.main, ("run", "env", "model", "eval")),
    (worldmodel.main, ("run", "env", "model", "worldmodel")), (chat.main, ("run", "env", "model", "chat")),
    (demo.main, tuple(demo.all_sections()))])
def test_help_lists_every_key_with_type_default_and_meaning_and_exits_0(main, sections, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(main, ["--config", "nope.yaml", "--help"])  # help first: nothing else is read
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: python ")
    classes = demo.all_sections() | {"chat": chat.ChatConfig}
    for name in sections:
        for f in dataclasses.fields(classes[name]):
            line = next(ln for ln in out.splitlines() if ln.startswith(f"  {name}.{f.name}  "))
            assert f" {f.type.__name__} = " in line
    assert "-h, --help" in out
    if main in (sft.main, rl.main, worldmodel.main):
        assert "--resume" in out and "--overwrite" in out


@pytest.mark.parametrize("name", BENCHES)
def test_bench_help_lists_its_keys(name, capsys):
    module = bench(name)
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert all(f"  {f.name}  " in out for f in dataclasses.fields(module.Args))


def test_bench_keys_keep_their_types():
    args = read_key_values(bench("serve").Args, ["clients=3", "time_limit_s=2"], "config")
    assert args["clients"] == 3 and args["time_limit_s"] == 2.0 and args["topk"] == 3
    with pytest.raises(ConfigError, match="unknown argument 'client'"):
        read_key_values(bench("serve").Args, ["client=3"], "config")


@pytest.mark.parametrize("script, args, says", [("rollout.py", ["--help"], "python chat.py asks"),
                                                ("tools.py", ["--help"], "python server.py --help"),
                                                ("tools.py", [], "tools.py is a library")])
def test_library_files_answer_help(script, args, says):
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and says in done.stdout


@pytest.mark.parametrize("script, own", [("rl.py", "rl"), ("data.py", "world"), ("chat.py", "chat")])
def test_help_gives_an_example_and_the_scripts_own_keys_before_the_shared_ones(script, own):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    example, flags = lines.index("for example:"), lines.index("flags:")
    assert lines[example + 1].startswith(f"  python {script} --config configs/")  # a command from its docstring
    own_at = next(i for i, line in enumerate(lines) if line.startswith(f"{own}: (a bare key=value means {own}.key)"))
    shared_at = next(i for i, line in enumerate(lines) if line.startswith("shared sections (run, env"))
    assert example < flags < own_at < shared_at < lines.index("run:") < lines.index("env:")


def test_demo_reads_its_flags_with_the_stages_reader():
    assert demo.parse_flags(["--seeds", "2", "--quick", "run.seed=1"]) == (True, 2, 2, False, False,
                                                                          "configs/tiny.yaml", ["run.seed=1"])
    assert demo.parse_flags(["--config=configs/x.yaml", "--jobs", "1"])[2:6] == (1, False, False, "configs/x.yaml")
    with pytest.raises(ConfigError, match=r"--seeds takes a whole number >= 1, got '0'"):
        demo.parse_flags(["--seeds", "0"])


def test_help_read_in_part_ends_quietly():
    # `--help | head -1`: the reader is gone before the help is written (its end of the pipe closed first)
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run([sys.executable, "rl.py", "--help"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write_end)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-500:]


# -----------------------------------------------------------------------------
# chat.py

def chat_argv(root, base, *extra):
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.data_dir={root}/data",
            f"run.runs_dir={root}/runs", "run.name=chat", "run.device=cpu", f"init={base}", *extra]


def test_chat_prints_the_trajectory_with_the_real_tools_text_told_apart(tiny_root, tiny_base, monkeypatch, capsys):
    from plumbing import load_model as real_load
    person = next(r for r in data.load_qa(f"{tiny_root}/data/test.jsonl") if r["kind"] == "city")
    name = person["queries"][0]

    def forced(path, run=None, **kwargs):  # the tiny model made to search the person, then answer
        model, tok = real_load(path, run, device=torch.device("cpu"))
        said = tok.encode(f" <begin_search> {name} </end_search> I know. </think> \\boxed{{x}}",
                          add_special_tokens=False)
        model.lm_head = ForcedHead(model.lm_head, said)
        return model, tok
    monkeypatch.setattr(chat, "load_model", forced)
    episodes = chat.main(chat_argv(tiny_root, tiny_base, f"question={person['question']}"))
    out = capsys.readouterr().out
    assert len(episodes) == 1 and episodes[0].actions == [name] and episodes[0].real_calls == 1
    assert f"Question: {person['question']}" in out
    assert f"[[<search_result> {name}" in out  # the observation, marked as the environment's (BM25 found the person)
    assert "answer: 'x' (well formed); real calls 1, simulated calls 0" in out and "reward" not in out


def test_chat_asks_one_question_a_line_until_an_empty_one(tiny_root, tiny_base, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Where was A born?\nWhere was B born?\n\nnot asked\n"))
    episodes = chat.main(chat_argv(tiny_root, tiny_base, "env.max_new_tokens=6", "env.env=policy"))
    out = capsys.readouterr().out
    assert [ep.question for ep in episodes] == ["Where was A born?", "Where was B born?"]
    assert "not asked" not in out and out.count("answer: ") == 2


def test_chat_on_a_missing_model_is_one_line(tiny_root, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(chat.main, chat_argv(tiny_root, "rl", "question=hi"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "chat.init='rl': no model folder" in err
    assert f"nothing is trained under {tiny_root}/runs/chat yet (make demo trains every stage" in err
