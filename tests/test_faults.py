"""Faults and bad input, each the way a user meets it: a retriever that answers a byte at a time or not at all, a
checkpoint cut short, a disk that fills during a save, a run with nothing to do, an empty or broken data file.

    .venv/bin/python -m pytest -q tests/test_faults.py
"""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
import plumbing
import rl
from test_rl import read_metrics, rl_argv, searching_rollout
from config import ConfigError, RunError, cli
from tools import FailureLimit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


# -----------------------------------------------------------------------------
# A retriever that fails: every call costs at most its deadline, and the run stops at the call that shows it

class Retriever(BaseHTTPRequestHandler):
    """mode "trickle": a whole valid reply, one byte every 50 ms (~5 s); "500": an error at once. Each request's
    time, from its start until the client hung up or the reply ended, goes to `held`."""
    mode, held = "500", []

    def do_POST(self):
        t0 = time.time()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            if Retriever.mode == "500":
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = json.dumps({"result": [[{"document": {"contents": "Vexa was founded by Ada Brun."}}]
                                             for _ in body["queries"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for byte in payload:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client hung up
            pass
        finally:
            Retriever.held.append(time.time() - t0)

    def log_message(self, *args):
        pass


@pytest.fixture
def retriever():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Retriever)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Retriever.held = []
    yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    server.shutdown()
    server.server_close()


def test_a_trickling_retriever_costs_rl_one_deadline_and_stops_it_at_that_call(tiny_root, tiny_base, tmp_path,
                                                                               monkeypatch, retriever):
    Retriever.mode = "trickle"
    searching_rollout(monkeypatch)  # every trajectory sends one query: 8 calls in step 1
    with pytest.raises(FailureLimit, match=f"rl: step 1: 1 of 1 real tool calls failed, more than "
                                           f"rl.max_tool_failures=0.5: retrieval server {retriever} .*timeout"):
        rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=2", "eval_n=0", "env.max_actions=0", "env.tool=http",
                        f"env.url={retriever}", "env.timeout_s=0.5", "env.retries=2"))
    time.sleep(0.2)  # the server notices the hang-up at its next byte
    assert len(Retriever.held) == 1 and Retriever.held[0] < 0.5 + 0.3  # one call, cut at its deadline
    assert not (tmp_path / "t" / "rl").exists()


def test_eval_names_the_server_and_the_cause_and_exits_1_when_too_many_calls_fail(tiny_root, tiny_base, tmp_path,
                                                                                  retriever, capsys):
    Retriever.mode = "500"
    argv = ["--config", TINY, f"run.data_dir={tiny_root}/data", f"run.runs_dir={tmp_path}", "run.name=t",
            "run.device=cpu", f"init={tiny_base}", "limit=6", "mode=workflow", "workflow=fixed",
            "env.max_new_tokens=24", "env.tool=http", f"env.url={retriever}", "env.retries=0"]
    with pytest.raises(SystemExit) as stop:
        cli(ev.main, argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' bar of loading weights)
    assert stop.value.code == 1 and "Traceback" not in err
    assert f"6 of 6 real tool calls failed, more than eval.max_tool_failures=0.05: retrieval server {retriever}" \
           in err and "HTTP 500" in err
    assert not list((tmp_path / "t").rglob("*.json*"))  # no results that would measure the failures
    assert not list((tmp_path / "t").rglob("*.lock"))  # and the lock is gone with the run


# -----------------------------------------------------------------------------
# Checkpoints: checked at load; a damaged newest one is passed over, a failed save is one line and leaves no trace

def crash_after_step(monkeypatch, last):
    """rl.py stops (as if killed) once the checkpoint of step `last` is written."""
    real = rl.save_checkpoint

    def save(ckpt_dir, step, *args, **kwargs):
        path = real(ckpt_dir, step, *args, **kwargs)
        if step == last:
            raise RuntimeError("killed")
        return path
    monkeypatch.setattr(rl, "save_checkpoint", save)


def ckpt_argv(tiny_root, tiny_base, runs_dir):
    return rl_argv(tiny_root, tiny_base, runs_dir, "steps=4", "save_every=1", "keep_ckpts=2", "eval_n=0")


@pytest.fixture(scope="module")
def unbroken(tiny_root, tiny_base, tmp_path_factory):
    """The final weights of ckpt_argv's run, uninterrupted."""
    runs_dir = tmp_path_factory.mktemp("unbroken")
    rl.main(ckpt_argv(tiny_root, tiny_base, runs_dir))
    return load_file(runs_dir / "t" / "rl" / "model.safetensors")


def killed_after_step_3(tiny_root, tiny_base, runs_dir, monkeypatch):
    """ckpt_argv's run, stopped after the checkpoint of step 3; returns the checkpoint folder."""
    with monkeypatch.context() as patch:
        crash_after_step(patch, 3)
        with pytest.raises(RuntimeError, match="killed"):
            rl.main(ckpt_argv(tiny_root, tiny_base, runs_dir))
    ckpts = runs_dir / "t" / "rl.ckpt"
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000003"]
    return ckpts


@pytest.mark.parametrize("damaged, damage", [("model.pt", "cut"), ("rank_0.pt", "cut"), ("model.pt", "flip"),
                                             ("rank_0.pt", "flip"), ("meta.json", "flip")])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_to_the_same_weights(tiny_root, tiny_base, tmp_path,
                                                                                      monkeypatch, capsys, unbroken,
                                                                                      damaged, damage):
    """cut: the file cut short. flip: the same size, 4 KiB inverted in its middle (meta.json: its step 3 made 2,
    still valid JSON, which would resume at step 2 from step 3's weights)."""
    ckpts = killed_after_step_3(tiny_root, tiny_base, tmp_path, monkeypatch)
    file = ckpts / "step_000003" / damaged
    content = file.read_bytes()
    size, middle = len(content), len(content) // 2
    if damage == "cut":
        file.write_bytes(content[:middle])
    elif damaged == "meta.json":
        file.write_bytes(content.replace(b'"step": 3', b'"step": 2'))
    else:
        file.write_bytes(content[:middle] + bytes(b ^ 0xFF for b in content[middle:middle + 4096])
                         + content[middle + 4096:])
    assert file.read_bytes() != content
    capsys.readouterr()
    rl.main(ckpt_argv(tiny_root, tiny_base, tmp_path) + ["--resume"])
    out = capsys.readouterr().out
    problem = f"{damaged} has {middle} bytes, {size} were written" if damage == "cut" else \
        f"{damaged} has other contents than were written (same size, SHA-256 differs)"
    assert f"warning: checkpoint {ckpts}/step_000003 is damaged: {problem}" in out
    assert f"resuming from {ckpts}/step_000002, the newest intact checkpoint" in out
    b = load_file(tmp_path / "t" / "rl" / "model.safetensors")
    assert all(torch.equal(unbroken[k], b[k]) for k in unbroken)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def tiny_trainer(tiny_base):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()  # the optimizer has state to save
    return model, optimizer


def test_with_no_intact_checkpoint_resume_is_one_line_and_exit_2(tiny_root, tiny_base, tmp_path, capsys):
    model, optimizer = tiny_trainer(tiny_base)
    ckpts = tmp_path / "t" / "rl.ckpt"
    for step in (1, 2):
        path = plumbing.save_checkpoint(str(ckpts), step, model, optimizer)
        os.remove(os.path.join(path, "rank_0.pt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(rl.main, rl_argv(tiny_root, tiny_base, tmp_path, "steps=4", "eval_n=0", "--resume"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"no intact checkpoint in {ckpts}: all 2 are damaged" in err
    assert sorted(os.listdir(ckpts)) == ["step_000001", "step_000002"]  # nothing deleted


def test_a_save_on_a_full_disk_is_one_line_leaves_no_partial_files_and_keeps_the_earlier_ones(tiny_base, tmp_path,
                                                                                              monkeypatch, capsys):
    model, optimizer = tiny_trainer(tiny_base)
    first = plumbing.save_checkpoint(str(tmp_path), 1, model, optimizer)
    before = {name: (tmp_path / "step_000001" / name).read_bytes() for name in os.listdir(first)}

    def full_disk(obj, f):  # what the OS does when the disk fills: part of the file, then ENOSPC
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(plumbing.torch, "save", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(lambda argv: plumbing.save_checkpoint(str(tmp_path), 2, model, optimizer))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1 and "Traceback" not in err
    assert f"cannot write checkpoint {tmp_path}/step_000002: no space left on device" in err
    assert sorted(os.listdir(tmp_path)) == ["step_000001"]  # the partial step_000002.tmp is gone
    assert {name: (tmp_path / "step_000001" / name).read_bytes() for name in os.listdir(first)} == before
    assert plumbing.resume_checkpoint(str(tmp_path)) == first


FILE_LIMIT = """
import json, os, resource, signal, sys
import torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import plumbing
from test_faults import tiny_trainer
from config import RunError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
model, optimizer = tiny_trainer({base!r})
plumbing.save_checkpoint({ckpts!r}, 1, model, optimizer)
sizes = {{n: os.path.getsize(os.path.join({ckpts!r}, "step_000001", n)) for n in ("model.pt", "rank_0.pt")}}
errors = []
for step, limit in ((2, sizes["model.pt"] // 2), (3, sizes["model.pt"] + 4096)):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # the weights, then the optimizer
    try:
        plumbing.save_checkpoint({ckpts!r}, step, model, optimizer)
    except RunError as e:
        errors.append(str(e))
print(json.dumps({{"errors": errors, "sizes": sizes}}))
"""


def test_real_write_failures_of_both_writers_are_one_line_with_the_os_cause(tiny_base, tmp_path):
    """A real OS write failure (a file size limit: EFBIG, as ENOSPC would be) while writing the weights and while
    writing the optimizer (larger than the weights)."""
    ckpts = str(tmp_path / "ckpt")
    script = FILE_LIMIT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), base=tiny_base, ckpts=ckpts)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sizes"]["rank_0.pt"] > out["sizes"]["model.pt"] + 4096  # the second limit hits the optimizer's
    assert out["errors"] == [f"cannot write checkpoint {ckpts}/step_00000{s}: file too large" for s in (2, 3)]
    assert os.listdir(ckpts) == ["step_000001"] and plumbing.check_checkpoint(f"{ckpts}/step_000001") is None


# -----------------------------------------------------------------------------
# Nothing to do: said, exit 0, nothing written or rewritten

def snapshot(folder):
    return {os.path.join(d, f): (os.path.getmtime(os.path.join(d, f)), os.path.getsize(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files if not f.endswith(".lock")}


def test_rl_with_zero_steps_says_so_and_writes_nothing(tiny_root, tiny_base, tmp_path, capsys):
    assert rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=0")) is None
    assert "rl.steps=0: nothing to do" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def resumed_output(main, argv, runs_dir, capsys):
    """What `main(argv + ["--resume"])` prints, once it has left every file under runs_dir as it was."""
    before = snapshot(runs_dir)
    time.sleep(0.01)
    capsys.readouterr()
    main(argv + ["--resume"])
    assert snapshot(runs_dir) == before
    return capsys.readouterr().out


def test_resume_of_a_finished_run_says_so_and_rewrites_nothing(tiny_root, tiny_base, tmp_path, capsys):
    argv = rl_argv(tiny_root, tiny_base, tmp_path, "steps=2", "eval_n=0", "save_every=0")
    rl.main(argv)
    out = resumed_output(rl.main, argv, tmp_path, capsys)
    assert f"rl: {tmp_path}/t/rl is finished (2 steps): nothing to do" in out


def test_sft_keeps_its_last_checkpoint_so_a_finished_run_is_left_alone(tiny_root, tiny_base, tiny_synth, tmp_path,
                                                                        capsys):
    import sft
    from test_sft import sft_args
    argv = sft_args(tiny_root, tiny_base, tmp_path, os.path.join(tiny_synth[0], "train.jsonl"), "stage=sft2",
                    "steps=2", "save_every=0")
    sft.main(argv)
    assert os.listdir(tmp_path / "t" / "sft2.ckpt") == ["step_000002"]
    out = resumed_output(sft.main, argv, tmp_path, capsys)
    assert f"sft: {tmp_path}/t/sft2 is finished (2 steps): nothing to do" in out
    out = resumed_output(sft.main, argv + ["steps=0"], tmp_path, capsys)  # steps=0: nothing to do
    assert "sft: 0 steps for stage sft2: nothing to do" in out


# -----------------------------------------------------------------------------
# Empty or broken data files: one line naming the file (and the line), exit 2

def test_an_empty_or_unusable_qa_file_is_one_line_and_exit_2(tiny_root, tiny_base, tmp_path, capsys):
    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("")
    broken.write_text('{"question": "q?"}\nnot json\n')
    runs = tmp_path / "runs"
    cases = [(rl.main, rl_argv(tiny_root, tiny_base, runs, "eval_n=0", f"train={empty}"), empty),
             (rl.main, rl_argv(tiny_root, tiny_base, runs, "eval_n=0", f"train={broken}"), broken),
             (ev.main, ["--config", TINY, f"run.runs_dir={runs}", f"init={tiny_base}", f"data={empty}"], empty)]
    for main, argv, path in cases:
        with pytest.raises(SystemExit) as stop:
            cli(main, argv)
        captured = capsys.readouterr()
        assert stop.value.code == 2 and captured.err.count("\n") == 1 and "no usable" in captured.err
        assert str(path) in captured.err
        if path == broken:  # each bad row was named with its file and line on the way
            assert f"{broken}:1: skipped bad QA row" in captured.out and f"{broken}:2: skipped" in captured.out


def test_a_corpus_row_without_contents_stops_the_server_in_one_line_naming_file_and_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "contents": "Ada\\nAda was born in Lorn."}\n{"id": "2", "text": "no contents"}\n')
    proc = subprocess.run([sys.executable, "server.py", "--corpus", str(corpus), "--port", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"server.py: {corpus}:2: bad corpus row: needs 'id' and a string 'contents'")


def test_config_ranges_are_checked_before_any_work():
    from config import load_config
    from tools import EnvConfig
    cfg = load_config({"rl": rl.RLConfig, "env": EnvConfig}, ["group_size=2", "sim_share=1", "env.max_actions=0"],
                      own="rl")
    assert (cfg.rl.group_size, cfg.rl.sim_share, cfg.env.max_actions) == (2, 1.0, 0)  # the bounds themselves pass
    for bad, message in (("group_size=0", r"rl.group_size=0 is out of range: it must be in \[2, inf\)"),
                         ("sim_share=1.01", r"rl.sim_share=1.01 is out of range: it must be in \[0, 1\]"),
                         ("lr=0", r"rl.lr=0.0 is out of range: it must be in \(0, inf\)"),
                         ("env.timeout_s=-1", r"env.timeout_s=-1.0 is out of range")):
        with pytest.raises(ConfigError, match=message):
            load_config({"rl": rl.RLConfig, "env": EnvConfig}, [bad], own="rl")
    assert issubclass(FailureLimit, RunError)


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line naming the newest checkpoint and the --resume command, the lock released

@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_trainer_names_its_newest_checkpoint_and_the_resume_command(tiny_root, tiny_base, tmp_path, signum,
                                                                                 status):
    argv = rl_argv(tiny_root, tiny_base, tmp_path, "steps=1000", "save_every=1", "eval_n=0", "--overwrite")
    # Ctrl-C's default action, even where pytest itself was started in the background (`pytest &` in a script):
    # there SIGINT is ignored, and a child inherits that
    proc = subprocess.Popen([sys.executable, "rl.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt_dir = tmp_path / "t" / "rl.ckpt"
    deadline = time.time() + 120
    while not (ckpt_dir / "step_000001").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "t" / "rl.lock").exists()
    last = err.strip().splitlines()[-1]
    newest = plumbing.latest_checkpoint(str(ckpt_dir))
    resume = shlex.join(["python", "rl.py", *argv[:-1], "--resume"])
    assert last == (f"rl.py: stopped by {signal.Signals(signum).name}; newest checkpoint {newest} (the steps after it "
                    f"are lost): {resume} continues from it")


def test_a_run_stopped_by_a_one_line_error_leaves_no_lock_behind(tiny_root, tiny_base, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as stop:  # claim_run took the lock, then the training rows were found empty
        cli(rl.main, rl_argv(tiny_root, tiny_base, tmp_path, f"train={empty}", "steps=1"))
    assert stop.value.code == 2 and "no usable QA rows" in capsys.readouterr().err
    assert not (tmp_path / "t" / "rl.lock").exists() and plumbing._LOCKS == {}


def test_a_metrics_line_cut_by_a_kill_is_named_and_skipped_when_a_run_resumes(tmp_path, capsys):
    """A kill or a full disk can leave the metrics log's last line half written: --resume (plumbing.truncate_log)
    keeps the whole rows up to the checkpoint's step and names the broken line, and sft's dev-curve bookkeeping
    (DevBest) rebuilds from the whole rows, where json.loads would have stopped the resume."""
    import sft
    log = tmp_path / "sft2.metrics.jsonl"
    torn = '{"step": 1, "dev_em": 0.2}\n{"step": 2, "dev_em": 0.6}\n{"step": 3, "dev_em": 0.1}\n{"step": 4, "lo'
    log.write_text(torn)
    best = sft.DevBest(patience=1, stop_em=0.5, metrics_path=str(log))
    assert (best.step, best.em, best.since) == (2, 0.6, 1)
    assert f"{log}:4" in capsys.readouterr().out
    plumbing.truncate_log(str(log), 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1, "dev_em": 0.2},
                                                                          {"step": 2, "dev_em": 0.6}]
    assert f"{log}:4" in capsys.readouterr().out
