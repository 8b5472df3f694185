"""bench/gpu_check.py at CPU size: the GPU check script runs end to end, so it cannot rot between GPU visits.

    .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_every_part_at_cpu_size_and_ends_with_one_json_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu",
                           "--out", str(tmp_path / "gc")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = report["pipeline"], report["rl_1p5b"]
    assert set(a["seconds"]) == {"data", "sft", "worldmodel", "rl_torchrun_1", "eval"}
    assert a["rl_envs"] == ["worldmodel", "real"] and len(a["rl_eval_em"]) == 2
    assert len(b["steps"]) == 3 and all(s["rollout_dtype"] == "bfloat16" for s in b["steps"])  # bf16 rollouts
    assert all(s["model_tokens"] > 0 and s["update_s"] > 0 for s in b["steps"])
    assert set(report["memory"]["predicted_gb"]) == {"state", "rollout", "update"}  # GB: ~0 at CPU size
    assert report["rollout"][0]["model"] == "tiny" and report["rollout"][0]["tokens_per_s"]["a"] > 0
