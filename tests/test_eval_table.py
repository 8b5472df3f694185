"""eval.py over several QA sets (the paper's Table 1 in one command), in one process and data-parallel under
torchrun (2 CPU ranks, gloo), on the untrained tiny model: what the plumbing writes, not what the model knows.

    .venv/bin/python -m pytest -q tests/test_eval_table.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import eval as ev
from config import ConfigError
from conftest import finished

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_merge_puts_strided_shards_back_in_row_order():
    rows, samples, world = list(range(7)), 2, 3
    parts = [{"records": [(r, s) for r in rows[k::world] for s in range(samples)]} for k in range(world)]
    assert ev.merge_shards(parts, samples) == [(r, s) for r in rows for s in range(samples)]


def test_table_has_a_column_per_set_and_their_unweighted_average():
    summaries = {"nq": {"em": 0.2, "f1": 0.4, "lenient": 0.3, "format_error": 0.5, "actions": 1.0, "questions": 10},
                 "bamboogle": {"em": 0.6, "f1": 0.8, "lenient": 0.7, "format_error": 0.0, "actions": 3.0,
                               "questions": 2}}
    tab = ev.table(summaries)
    assert list(tab) == ["EM", "F1", "lenient acc.", "format errors", "actions/question"]
    assert tab["EM"] == pytest.approx({"nq": 0.2, "bamboogle": 0.6, "average": 0.4})  # as the paper: per-set mean
    md = ev.table_markdown(tab, "t")
    assert "| | nq | bamboogle | average |" in md and "| EM | 20.0 | 60.0 | 40.0 |" in md
    assert "| actions/question | 1.00 | 3.00 | 2.00 |" in md and "| format errors | 50.0 | 0.0 | 25.0 |" in md


@pytest.fixture(scope="module")
def qa_dir(tiny_root, tmp_path_factory):
    """Two named QA sets in their own folder: 'alpha' (from test.jsonl) and 'beta' (from dev.jsonl)."""
    out = tmp_path_factory.mktemp("qa")
    shutil.copy(os.path.join(tiny_root, "data", "test.jsonl"), out / "alpha.jsonl")
    shutil.copy(os.path.join(tiny_root, "data", "dev.jsonl"), out / "beta.jsonl")
    return str(out)


def argv(tiny_root, tiny_base, qa_dir, name, *extra):
    return ["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data", f"run.runs_dir={tiny_root}/runs",
            f"run.name={name}", f"init={tiny_base}", "mode=workflow", "workflow=fixed", "env.max_new_tokens=16",
            f"qa_dir={qa_dir}", "limit=5", "run.device=cpu", *extra]


def test_several_sets_by_name_and_path_give_one_table(tiny_root, tiny_base, qa_dir):
    out = ev.main(argv(tiny_root, tiny_base, qa_dir, "table1", f"data=alpha,{qa_dir}/beta.jsonl", "tag=t"))
    folder = os.path.join(tiny_root, "runs", "table1", "eval")
    with open(os.path.join(folder, "t.table.json")) as f:
        saved = json.load(f)
    assert saved["questions"] == {"alpha": 5, "beta": 5}
    assert set(saved["table"]["EM"]) == {"alpha", "beta", "average"}
    for label, key in [("EM", "em"), ("F1", "f1"), ("actions/question", "actions")]:
        per_set = [out["summaries"][n][key] for n in ("alpha", "beta")]
        assert saved["table"][label]["average"] == pytest.approx(sum(per_set) / 2)
    assert saved["table"]["actions/question"]["alpha"] > 0  # the workflow searched: real calls went through
    assert os.path.exists(os.path.join(folder, "t-alpha.summary.json"))
    assert os.path.exists(os.path.join(folder, "t-beta.jsonl"))
    assert "| EM |" in open(os.path.join(folder, "t.table.md")).read()


def test_an_unknown_set_name_is_a_clear_error(tiny_root, tiny_base, qa_dir):
    with pytest.raises(ConfigError, match=f"no QA file 'gamma' nor '{qa_dir}/gamma.jsonl' \\(eval.qa_dir\\)"):
        ev.main(argv(tiny_root, tiny_base, qa_dir, "table1", "data=alpha,gamma"))


def test_two_torchrun_ranks_write_what_one_process_writes(tiny_root, tiny_base, qa_dir):
    """5 questions per set over 2 ranks (3 + 2): one gather, the same records in the same order."""
    one = argv(tiny_root, tiny_base, qa_dir, "dp1", "data=alpha,beta", "tag=t")
    two = argv(tiny_root, tiny_base, qa_dir, "dp2", "data=alpha,beta", "tag=t")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "eval.py", *two], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    stdout = finished(proc, timeout=240)
    ev.main(one)
    for name in ("alpha", "beta"):
        rows = []
        for run in ("dp1", "dp2"):
            with open(os.path.join(tiny_root, "runs", run, "eval", f"t-{name}.jsonl")) as f:
                rows.append([(x["id"], x["answer"], x["em"], x["queries"], x["text"]) for x in map(json.loads, f)])
        assert rows[0] == rows[1] and len(rows[0]) == 5
    with open(os.path.join(tiny_root, "runs", "dp2", "eval", "t-alpha.summary.json")) as f:
        assert json.load(f)["ranks"] == 2
    assert stdout.count("table ->") == 1  # rank 0 alone writes and prints
