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
