"""plumbing.py's optional metric loggers (run.log=none|wandb|tensorboard): the JSONL rows every stage writes go to the
asked-for logger too; a missing package costs one warning line, never the run.

    .venv/bin/python -m pytest -q tests/test_logging.py
"""
import io
import json
import os
import sys
import types

import pytest

import plumbing
import sft
from config import ConfigError, RunConfig


class FakeWandb(types.ModuleType):
    """The two calls WandbLogger makes, recorded."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda metrics, step=None: self.logged.append((step, metrics)))


@pytest.fixture(autouse=True)
def reset_logger():
    yield
    plumbing.LOGGER = plumbing.NullLogger()  # a test's logger must not leak into the next test's log_line


def test_default_is_no_logger_and_the_jsonl_alone(tmp_path):
    assert isinstance(plumbing.start_logging(RunConfig(runs_dir=str(tmp_path)), "sft2", {}), plumbing.NullLogger)
    plumbing.log_line(str(tmp_path / "m.jsonl"), {"step": 1, "loss": 2.0})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": 2.0}


def test_wandb_gets_every_numeric_metric_at_its_step(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunConfig(runs_dir=str(tmp_path), name="exp", log="wandb")
    plumbing.start_logging(run, "rl", {"rl": {"lr": 1e-6}})
    plumbing.log_line(str(tmp_path / "m.jsonl"), {"step": 3, "loss": 0.5, "reward": 1, "stage": "rl", "final": True})
    assert fake.inits[0]["name"] == "exp/rl" and fake.inits[0]["config"] == {"rl": {"lr": 1e-6}}
    assert fake.logged == [(3, {"loss": 0.5, "reward": 1, "final": True})]  # strings are left to the JSONL


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert isinstance(plumbing.start_logging(RunConfig(log="wandb"), "sft2", {}, rank=1), plumbing.NullLogger)
    assert fake.inits == []


def test_a_missing_package_is_one_warning_and_a_no_op(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None in sys.modules: ImportError
    logger = plumbing.start_logging(RunConfig(runs_dir=str(tmp_path), log="tensorboard"), "sft2", {})
    assert isinstance(logger, plumbing.NullLogger)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: run.log=tensorboard")
    plumbing.log_line(str(tmp_path / "m.jsonl"), {"step": 1, "loss": 2.0})  # and the run goes on


def test_an_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="run.log must be none, wandb or tensorboard"):
        plumbing.start_logging(RunConfig(log="mlflow"), "sft2", {})


def test_sft_main_sends_its_metric_rows_to_the_logger(tiny_root, tiny_base, tiny_synth, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sft.main(["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data", f"run.runs_dir={tmp_path}",
              "run.name=t", "run.log=wandb", f"init={tiny_base}", "stage=sft2", "steps=2", "batch_size=4",
              "device_batch_size=4", "heldout=none", "save_every=0"])
    with open(os.path.join(tmp_path, "t", "sft2.metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [step for step, _ in fake.logged] == [row["step"] for row in rows] == [1, 2]
    assert [m["loss"] for _, m in fake.logged] == [row["loss"] for row in rows]


def test_worldmodel_writes_a_metrics_row_a_step_and_sends_it_to_the_logger(tiny_root, tiny_base, tmp_path,
                                                                            monkeypatch):
    import worldmodel
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    argv = ["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data", f"run.runs_dir={tmp_path}",
            "run.name=t", "run.log=wandb", f"model.base={tiny_base}", "run.device=cpu", "calls=oracle", "steps=3",
            "batch_size=4", "eval_calls=0", "history_max_tokens=32"]
    worldmodel.main(argv)
    with open(os.path.join(tmp_path, "t", "worldmodel.metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [step for step, _ in fake.logged] == [1, 2, 3]
    assert all(row["loss"] > 0 and "lr" in row for row in rows)
    assert fake.inits[0]["name"] == "t/worldmodel"


def test_progress_yields_every_slice_and_shows_rate_calls_and_failures(capsys):
    env = types.SimpleNamespace(calls=0, failures=0)
    seen = []
    for part in plumbing.progress(list(range(5)), 2, "eval", env):
        seen.append(part)
        env.calls, env.failures = env.calls + 2, 1
    err = capsys.readouterr().err
    assert seen == [[0, 1], [2, 3], [4]]
    assert "eval: 100%" in err and "5/5" in err and "q/s" in err and "calls=6, failures=1" in err


# -----------------------------------------------------------------------------
# Progress: a terminal keeps its redrawn bar, a log file gets a line now and then

class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_in_a_log_file_is_a_line_now_and_then_without_redraws_and_a_terminal_keeps_the_bar(monkeypatch):
    for tty in (False, True):
        stream = Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        bar = plumbing.progress_bar(range(200), total=200, desc="rl", mininterval=0)
        for step in bar:
            bar.set_postfix(loss=f"{step:.4f}")  # each one redraws the bar
        bar.close()
        text = stream.getvalue()
        if tty:
            assert text.count("\r") > 100  # redrawn in place, as before
        else:
            lines = text.splitlines()
            assert "\r" not in text and 1 <= len(lines) <= 3, lines  # the start, then the end (within 30 s)
            assert lines[-1].startswith("rl: 100%") and "200/200" in lines[-1] and "loss=199.0000" in lines[-1]


def test_a_log_line_is_written_once_the_period_has_passed(monkeypatch):
    stream, now = io.StringIO(), [100.0]
    monkeypatch.setattr(plumbing.time, "monotonic", lambda: now[0])
    log = plumbing.LineLog(stream, every_s=30)
    log.write("\rstep 1")
    log.write("\rstep 2")  # within the period: kept pending
    now[0] += 31
    log.write("\rstep 3")
    log.write("\rstep 4")
    log.write("\n")  # the bar ends: the last state is written
    assert stream.getvalue() == "step 1\nstep 3\nstep 4\n"
