"""bench/draws.py: every draw's row and findings, the spread over all draws, and how far the other float path moved
the shared seeds, read from two demo results.json files (here hand-made, so every number is known).

    .venv/bin/python -m pytest -q tests/test_draws.py
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import draws  # noqa: E402


def results(path, capability, sft2, gold):
    """A results.json with two seeds: SFT-2's EM per seed, the gold-shown row's per seed, the rest fixed."""
    em = {"workflow": [0.6, 0.6], "SFT-2": sft2, "SFT-1&2": [0.97, 0.97], "SFT-1&2&3": [0.95, 0.95],
          "+RL real only": [0.99, 0.99], "+RL-2 alone (control)": [0.96, 0.96],
          "+RL simulated then real": [0.93, 0.93], "+RL gold-shown world model then real": gold}
    rows = {label: {"em": v, **{f"em_{k}": v for k in draws.KINDS}} for label, v in em.items()}
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"commit": "abc1234", "seeds": [0, 1], "rows": rows,
                   "float_path": {"cpu": "test CPU", "aten_cpu_capability": capability, "jobs": 2}}, f)
    return str(path)


def test_report_gives_each_draw_its_findings_and_the_move_between_paths(tmp_path):
    a = results(tmp_path / "a", "AVX512", [0.95, 0.90], [0.99, 0.99])
    b = results(tmp_path / "b", "AVX2", [0.93, 0.90], [0.99, 0.95])
    text = draws.report(a, b)
    lines = [line for line in text.splitlines() if line.startswith("| AVX")]
    assert [line.split(" | ")[0] for line in lines] == ["| AVX512/jobs 2 seed 0", "| AVX512/jobs 2 seed 1",
                                                        "| AVX2/jobs 2 seed 0", "| AVX2/jobs 2 seed 1"]
    first = lines[0].split(" | ")
    assert first[2] == "0.950" and first[-6] == "+0.350" and first[-1].rstrip(" |") == "+0.030"  # F1 and F6
    assert "| all 4: mean ± std | 0.600 ± 0.000 | 0.920 ± 0.024 |" in text
    # finding 1 >= 0.15 on every draw, 4 > 0 on every draw, 6 > 0 on 3 of 4 (0.95 - 0.96 on the last)
    assert "Finding 1 >= 0.15 on 4 of 4 draws, 4 > 0 on 4, 6 > 0 on 3." in text
    assert "SFT-2 0.010" in text and "moved each row's EM by 0.000 to 0.020" in text  # |0.95-0.93|/2, |0.99-0.95|/2
    assert "2 seeds on test CPU, ATen AVX512, --jobs 2 (commit abc1234)" in text


def test_bad_flags_are_one_line_errors(capsys):
    for argv, said in ((["--seed", "3"], "unrecognized arguments: --seed 3"),  # no prefix match for --seeds
                       (["--seeds", "five"], "argument --seeds: invalid int value: 'five'")):
        with pytest.raises(SystemExit) as e:
            draws.flags(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
    f = draws.flags(["--seeds", "2", "--other-seeds", "1", "--other", "default", "--report"])
    assert (f.seeds, f.other_seeds, f.other, f.report, f.readme) == (2, 1, "default", True, False)


def test_paper_protocol_evaluates_every_row_of_every_draw_on_its_own_float_path(tmp_path, monkeypatch):
    """--paper: eval.py with 3 samples at 0.7 on each row's model of each draw, ATen capped for the other path's
    draws only; the table and the findings' counts come from the summaries those evals write."""
    runs = tmp_path / "runs"
    results(runs / "tiny", "AVX512", [0.95, 0.90], [0.99, 0.99])  # the two paths' results.json: seeds and labels
    results(runs / "tiny_avx2", "AVX2", [0.93, 0.90], [0.99, 0.95])
    sampled = {"sft123": 0.85, "rl_real": 0.93, "rl_rl2": 0.90, "rl_zs": 0.92}  # by model folder; the rest 0.80
    calls = []

    def fake_eval(cmd, cwd, env, capture_output, text):  # writes the summary eval.py would
        over = dict(arg.split("=", 1) for arg in cmd if "=" in arg)
        calls.append((over, env.get("ATEN_CPU_CAPABILITY")))
        assert env["OMP_NUM_THREADS"] == "1"  # one thread: the same floats on a machine with more cores
        em = sampled.get(over["eval.init"], 0.80) - 0.01 * int(over["run.seed"])
        out = os.path.join(tmp_path, "runs", over["run.name"], "eval")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, over["eval.tag"] + ".summary.json"), "w") as f:
            json.dump({"em": em, "by_kind": {k: {"em": em} for k in draws.KINDS}}, f)
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(draws, "HERE", str(tmp_path))
    monkeypatch.setattr(draws.subprocess, "run", fake_eval)
    text = draws.paper_report("avx2")
    assert len(calls) == 4 * len(draws.ROWS)  # 2 draws a path, every row
    for over, capability in calls:
        assert over["eval.samples"] == "3" and over["eval.temperature"] == "0.7" and over["eval.data"] == "test"
        assert over["eval.tag"].endswith("_paper") and over["run.data_dir"] == f"data/{over['run.name']}"
        assert capability == ("avx2" if over["run.name"].startswith("tiny_avx2/") else None)
    assert {over["run.name"] for over, _ in calls} == {"tiny/seed0", "tiny/seed1", "tiny_avx2/seed0", "tiny_avx2/seed1"}
    lines = [line for line in text.splitlines() if line.startswith("| AVX")]
    assert lines[1].split(" | ")[4] == "0.840"  # SFT-1&2&3 on seed 1: 0.85 - 0.01
    # F4 = 0.93 - 0.85 > 0 on every draw; F6 = 0.92 - 0.90 > 0 on every draw; F1 = 0.80 - 0.80 on none
    assert "Finding 1 >= 0.15 on 0 of 4 draws, 4 > 0 on 4, 6 > 0 on 4." in text
