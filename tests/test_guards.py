"""Nothing lost, nothing silent: the run guard and lock (plumbing.claim_run), and how every entry point refuses bad input.

    .venv/bin/python -m pytest -q tests/test_guards.py
"""
import importlib
import os
import subprocess
import sys

import pytest

import plumbing
from config import ConfigError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


# -----------------------------------------------------------------------------
# The run guard: an earlier run's output stays unless --resume or --overwrite says what to do with it

def test_an_earlier_runs_output_is_refused_without_resume_or_overwrite(tmp_path):
    ckpt = tmp_path / "rl.ckpt" / "step_000002"
    ckpt.mkdir(parents=True)
    with pytest.raises(ConfigError, match="rl.ckpt exist.*--resume continues it, --overwrite deletes it"):
        plumbing.claim_run(str(tmp_path), "rl", [])
    assert ckpt.exists()
    plumbing.claim_run(str(tmp_path), "rl", ["resume"])  # resuming keeps it
    plumbing.release_run(str(tmp_path), "rl")
    assert ckpt.exists()
    plumbing.claim_run(str(tmp_path), "other", [])  # another out= is another run
    plumbing.release_run(str(tmp_path), "other")


def test_overwrite_deletes_the_earlier_output_and_starts_over(tmp_path):
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl.ckpt" / "step_000002").mkdir(parents=True)
    (tmp_path / "rl.metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "rl_sim.metrics.jsonl").write_text('{"step": 1}\n')
    plumbing.claim_run(str(tmp_path), "rl", ["overwrite"])
    plumbing.release_run(str(tmp_path), "rl")
    assert sorted(os.listdir(tmp_path)) == ["rl_sim.metrics.jsonl"]  # only this out='s own files; the lock's file
    # goes at release
    with pytest.raises(ConfigError, match="not both"):
        plumbing.claim_run(str(tmp_path), "rl", ["resume", "overwrite"])


HOLDER = """
import sys, time
import plumbing
plumbing.claim_run(sys.argv[1], "rl", [])
open(sys.argv[1] + "/rl.metrics.jsonl", "w").write('{"step": 1}\\n')
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_live_run_on_the_same_out_is_refused_naming_the_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=CPU_ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by a live run \\(PID {holder.pid};"):
            plumbing.claim_run(str(tmp_path), "rl", ["overwrite"])
        assert (tmp_path / "rl.metrics.jsonl").exists()  # --overwrite never deletes a live run's files
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "rl.lock").read_text().strip() == str(holder.pid)  # a killed run's file, holding a dead PID,
    plumbing.claim_run(str(tmp_path), "rl", ["overwrite"])  # is no lock: fcntl locks die with their process
    assert (tmp_path / "rl.lock").read_text().strip() == str(os.getpid())
    plumbing.release_run(str(tmp_path), "rl")
    assert not (tmp_path / "rl.lock").exists()  # a run that ends leaves no lock file behind


# -----------------------------------------------------------------------------
# Every entry point: an unknown flag or key is one line and exit status 2, before any work

ENTRY_POINTS = ["data", "sft", "rl", "worldmodel", "eval", "demo", "bench.rl_step", "bench.serve", "bench.sim_rewards"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("bad", ["--resum", "run.sead=1"])
def test_every_entry_point_refuses_unknown_flags_and_keys_with_exit_2(module, bad, capsys, tmp_path):
    argv = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.runs_dir={tmp_path}", bad]
    if module.startswith("bench."):  # key=value is the only syntax of these benches
        argv = [bad.lstrip("-").split("=")[0] + "=1"]
    with pytest.raises(SystemExit) as stop:
        cli(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and bad.lstrip("-").split("=")[0].split(".")[-1] in err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def refused(module, bad, capsys, tmp_path):
    """stderr of `module` run on tiny.yaml plus the override `bad`, asserting it ended with one line and exit 2."""
    argv = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.runs_dir={tmp_path}",
            f"run.data_dir={tmp_path}/data", bad]
    with pytest.raises(SystemExit) as stop:
        cli(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    return err


@pytest.mark.parametrize("module, bad", [("rl", "rl.group_size=0"), ("rl", "rl.group_size=-2"), ("rl", "rl.steps=-1"),
                                         ("rl", "rl.max_tool_failures=1.5"), ("rl", "env.timeout_s=0"),
                                         ("sft", "sft.batch_size=0"), ("sft", "sft.lr=-0.001"),
                                         ("worldmodel", "worldmodel.heldout_share=1"), ("eval", "eval.samples=0"),
                                         ("eval", "eval.max_tool_failures=-0.1"), ("data", "world.n_people=0"),
                                         ("data", "world.pretrain_max=0")])
def test_a_value_out_of_range_is_one_line_and_exit_2_before_any_work(module, bad, capsys, tmp_path):
    err = refused(module, bad, capsys, tmp_path)
    key, value = bad.split("=")
    assert f"config: {key}={value}" in err.replace(".0 is", " is").replace("=0.0", "=0") and "out of range" in err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_bench_rollout_refuses_unknown_flags_with_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module("bench.rollout").main(["--modles", "tiny"])  # argparse: usage, then the error
    assert stop.value.code == 2 and "unrecognized arguments: --modles" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["rl.py", "demo.py"])
def test_a_typo_on_the_command_line_exits_2_without_a_traceback(script, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--config", "configs/tiny.yaml", "--resum",
                           "run.device=cpu", f"run.runs_dir={tmp_path}"], cwd=ROOT, env=CPU_ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: config: unknown flag --resum (")


# -----------------------------------------------------------------------------
# Enumerated keys: a string that is none of its choices is refused before any work, naming the key typed

@pytest.mark.parametrize("module, bad", [("rl", "rl.reward=bleu"), ("rl", "rl.reward=EM"), ("rl", "rl.loss_type=ppo"),
                                         ("rl", "rl.sim_env=foo"), ("rl", "rl.parallel=none"),
                                         ("sft", "sft.stage=sft4"), ("sft", "sft.parallel=zero3"),
                                         ("eval", "eval.mode=oracle"), ("eval", "eval.workflow=plan"),
                                         ("rl", "env.env=sim"), ("rl", "env.tool=google"), ("rl", "env.on_error=skip"),
                                         ("rl", "run.log=mlflow"), ("rl", "run.device=gpu"),
                                         ("sft", "run.dtype=fp16"), ("worldmodel", "env.tool=grep")])
def test_a_value_that_is_none_of_its_choices_is_one_line_naming_the_key_before_any_work(module, bad, capsys, tmp_path):
    err = refused(module, bad, capsys, tmp_path)
    key, value = bad.split("=")
    assert f"config: {key}={value!r} is none of" in err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_a_choice_typed_in_capitals_suggests_the_one_meant_and_a_device_index_is_a_choice():
    from config import RunConfig, build
    from rl import RLConfig
    with pytest.raises(ConfigError, match=r"rl.reward='EM' is none of em \| f1 \| lenient \(did you mean em\?\)"):
        build(RLConfig, {"reward": "EM"}, "rl")
    assert build(RunConfig, {"device": "cuda:1"}, "run").device == "cuda:1"


def test_chat_refuses_a_negative_temperature(capsys):
    import chat
    with pytest.raises(SystemExit) as stop:
        cli(chat.main, ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "temperature=-1"])
    assert stop.value.code == 2 and "chat.temperature=-1.0 is out of range" in capsys.readouterr().err


def test_an_unknown_key_suggests_the_closest_ones_instead_of_listing_all(capsys, tmp_path):
    import rl
    with pytest.raises(SystemExit):
        cli(rl.main, ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "group_sise=3"])
    err = capsys.readouterr().err
    assert "unknown key 'rl.group_sise' (did you mean rl.group_size?)" in err and "eval_every" not in err


@pytest.mark.parametrize("content, says", [(b"", "is empty (no settings): to run on the defaults, leave --config out"),
                                           (b"# all commented out\n", "is empty (no settings)"),
                                           (b"run:\n  name: caf\xe9\n", "is not UTF-8 text")])
def test_an_empty_or_undecodable_config_file_is_one_line_and_exit_2(content, says, capsys, tmp_path):
    import rl
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        cli(rl.main, ["--config", str(path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"config: {path} {says}" in err


# -----------------------------------------------------------------------------
# Path errors: a folder where a file belongs, a folder that is not a model, a corpus with nothing to search

def one_line_exit_2(module, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err[-2000:]
    return err


def tiny_argv(tiny_root, runs, *extra):
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.data_dir={tiny_root}/data",
            f"run.runs_dir={runs}", "run.device=cpu", *extra]


@pytest.mark.parametrize("module, key", [("sft", "data"), ("eval", "data"), ("rl", "train"), ("eval", "env.corpus")])
def test_a_folder_given_as_a_data_or_corpus_file_is_one_line_and_exit_2(module, key, tiny_root, tiny_base, tmp_path,
                                                                         capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    extra = [f"{key}={folder}", f"init={tiny_base}", "steps=1", "eval_n=0"] if module == "rl" else \
        [f"{key}={folder}", f"init={tiny_base}", "limit=1"] if module == "eval" else [f"{key}={folder}", "steps=1"]
    err = one_line_exit_2(module, tiny_argv(tiny_root, tmp_path / "runs", *extra), capsys)
    assert f"{folder} is a folder, not a JSONL file" in err


@pytest.mark.parametrize("module, key", [("eval", "init"), ("chat", "init"), ("rl", "init")])
@pytest.mark.parametrize("removed", ["model.safetensors", "config.json"])
def test_a_model_folder_missing_its_weights_or_config_is_one_line_and_exit_2(module, key, removed, tiny_root,
                                                                            tiny_base, tmp_path, capsys):
    import shutil
    folder = tmp_path / "broken"
    shutil.copytree(tiny_base, folder)
    (folder / removed).unlink()
    extra = ["question=hi"] if module == "chat" else ["eval_n=0"] if module == "rl" else []
    err = one_line_exit_2(module, tiny_argv(tiny_root, tmp_path / "runs", f"{key}={folder}", *extra), capsys)
    what = "weights (model.safetensors)" if removed == "model.safetensors" else "config.json"
    assert f"{module}.{key}='{folder}': '{folder}' is not a model folder: it has no {what}" in err


@pytest.mark.parametrize("module", ["eval", "rl"])
def test_a_policy_folder_given_as_the_world_model_is_one_line_before_the_policy_loads(module, tiny_root, tiny_base,
                                                                                      tmp_path, capsys):
    extra = ["env.env=worldmodel", f"init={tiny_base}", "limit=1"] if module == "eval" else \
        ["sim_share=0.5", "sim_env=worldmodel", f"init={tiny_base}", "eval_n=0"]
    err = one_line_exit_2(module, tiny_argv(tiny_root, tmp_path / "runs", f"env.worldmodel={tiny_base}", *extra),
                          capsys)
    assert f"env.worldmodel: '{tiny_base}' is not a world model" in err


def test_a_corpus_whose_rows_are_all_empty_is_one_line(tmp_path):
    from tools import BM25Search
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": 1, "contents": ""}\n{"id": 2, "contents": "the a"}\n')
    with pytest.raises(ConfigError, match="no corpus row has a word to search"):
        BM25Search(str(corpus))


def test_a_signal_before_any_checkpoint_says_so_and_an_eval_has_no_resume_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rl.py", "--config", "configs/tiny.yaml", "--overwrite", "steps=9"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    plumbing.claim_run(str(tmp_path), "rl", [])
    plumbing.claim_run(str(tmp_path / "eval"), "t", [], (".jsonl", ".summary.json"))
    note = plumbing.stop_runs("SIGINT")
    assert note == "no checkpoint yet: python rl.py --config configs/tiny.yaml steps=9 --resume starts it over"
    assert plumbing._LOCKS == {} and not (tmp_path / "rl.lock").exists() and not (tmp_path / "eval" / "t.lock").exists()


def test_a_hub_name_the_hub_cannot_serve_is_one_line_naming_it(monkeypatch):
    """No network, a typo or a gated model: transformers' OSError (a 40-line traceback after its retries) becomes
    one line with its first line as the cause."""
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # online: the hub is asked
    with pytest.raises(ConfigError, match=r"^model: cannot load 'org/model' from the Hugging Face hub: We "
                                          r"couldn't connect to 'https://huggingface.co' to load the files.$"):
        plumbing.load_tokenizer("org/model")
