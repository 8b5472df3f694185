"""Checkpoints at scale: nothing gathered to save (each FSDP2 rank writes its own shard), nothing whole per rank to
load (rank 0 reads, the others receive their shards), a bf16 output folder for a bf16 run, and checkpoints written
before checksums and shards still resume. Same-size damage is in test_faults.py with the other damage.

    .venv/bin/python -m pytest -q tests/test_checkpoints.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import plumbing
import rl
from conftest import finished
from test_faults import ckpt_argv, killed_after_step_3, unbroken  # noqa: F401 (a fixture)
from test_sft import sft_args, small_train, weights  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD = """
import json, sys, torch
sys.path.insert(0, {root!r})
import plumbing, sft
from config import RunConfig
from safetensors.torch import load_file
torch.set_num_threads(1)

def main():  # the models are locals, freed before plumbing.end_dist tears the group down at exit
    rank, world_size, device = plumbing.setup_dist(RunConfig(device="cpu"))
    real, devices = plumbing.load_model, []
    plumbing.load_model = lambda path, run, device, dtype: devices.append(device.type) or real(path, run, device, dtype)
    model, _ = plumbing.load_sharded({base!r}, RunConfig(device="cpu"), device, torch.float32, "fsdp")
    whole = plumbing.full_state_dict(model)
    folder = load_file({base!r} + "/model.safetensors")
    line = json.dumps({{"rank": rank, "read": devices, "equal": rank > 0 or all(torch.equal(whole[k], folder[k])
                                                                               for k in folder)}})
    sys.stdout.write(line + "\\n")  # one write: print's text and newline, written apart, interleave across ranks
    sys.stdout.flush()
    for args in json.loads(sys.argv[1]):
        sft.main(args)


main()
"""


def test_two_fsdp_ranks_load_from_rank_0_save_their_own_shards_and_resume_exactly(tiny_root, tiny_base, small_train,
                                                                                   tmp_path):
    """torchrun, 2 gloo ranks, sft parallel=fsdp: after load_sharded the weights are the folder's, rank 0 having
    read them and rank 1 having built only the structure (meta); each rank's checkpoint holds its half; a run
    resumed from step 2 ends with the weights of the uninterrupted one."""
    args = lambda d, *x: sft_args(tiny_root, tiny_base, str(tmp_path / d), small_train, "stage=sft2", "steps=4",
                                  "save_every=2", "parallel=fsdp", *x)
    script = tmp_path / "worker.py"
    script.write_text(LOAD.format(root=ROOT, base=tiny_base))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = lambda runs: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         json.dumps(runs)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    out = finished(torchrun([args("a"), args("b")]))
    loaded = sorted((json.loads(line) for line in out.splitlines() if line.startswith('{"rank"')),
                    key=lambda r: r["rank"])
    assert loaded == [{"rank": 0, "read": ["cpu"], "equal": True}, {"rank": 1, "read": ["meta"], "equal": True}]
    step2 = tmp_path / "a" / "t" / "sft2.ckpt" / "step_000002"
    assert sorted(os.listdir(step2)) == ["manifest.json", "meta.json", "model_rank_0.pt", "model_rank_1.pt",
                                         "rank_0.pt", "rank_1.pt"]
    whole = sum(t.numel() for t in load_file(os.path.join(tiny_base, "model.safetensors")).values())
    for rank in (0, 1):
        shard = torch.load(step2 / f"model_rank_{rank}.pt")
        assert 0.4 * whole < sum(t.numel() for t in shard.values()) < 0.6 * whole  # about half the model each

    shutil.rmtree(tmp_path / "b" / "t" / "sft2.ckpt" / "step_000004")  # as if killed after step 2's checkpoint
    shutil.rmtree(tmp_path / "b" / "t" / "sft2")
    assert "resumed from" in finished(torchrun([args("b", "--resume")]))
    wa, wb = weights(tmp_path / "a" / "t" / "sft2"), weights(tmp_path / "b" / "t" / "sft2")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_bf16_run_saves_its_output_folder_in_bf16(tiny_base, tmp_path, one_rank_group):
    """rl.bf16 (FSDP2, one process): the gathered weights are cast one by one, config.json names bfloat16, and the
    folder loads with the bf16 of the fp32 masters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = plumbing.wrap_model(AutoModelForCausalLM.from_pretrained(tiny_base), torch.device("cpu"), "fsdp", True)
    masters = {k: v.full_tensor() for k, v in model.state_dict().items()}
    rl.save_final(model, AutoTokenizer.from_pretrained(tiny_base), str(tmp_path / "rl"), 0, torch.bfloat16)
    saved = load_file(tmp_path / "rl" / "model.safetensors")
    assert saved and all(v.dtype == torch.bfloat16 and torch.equal(v, masters[k].bfloat16()) for k, v in saved.items())
    assert json.load(open(tmp_path / "rl" / "config.json"))["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "rl").dtype == torch.bfloat16


def test_a_checkpoint_written_before_checksums_and_shards_still_resumes(tiny_root, tiny_base, tmp_path, monkeypatch,
                                                                         capsys, unbroken):  # noqa: F811
    """Step 3's checkpoint rewritten as 3ec4c1d wrote them: HF weights (config.json, model.safetensors) instead of
    model.pt, a manifest of sizes only. --resume takes it and ends with the uninterrupted run's weights."""
    from transformers import AutoModelForCausalLM
    ckpts = killed_after_step_3(tiny_root, tiny_base, tmp_path, monkeypatch)
    old = ckpts / "step_000003"
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.load_state_dict(torch.load(old / "model.pt"), strict=False)  # the tied lm_head follows the embedding
    model.save_pretrained(old)
    os.remove(old / "model.pt")
    os.remove(old / "manifest.json")
    plumbing.write_json(old / "manifest.json", {"sizes": {n: os.path.getsize(old / n) for n in os.listdir(old)}})
    assert plumbing.check_checkpoint(str(old)) is None
    capsys.readouterr()
    rl.main(ckpt_argv(tiny_root, tiny_base, tmp_path) + ["--resume"])
    assert f"resumed from {old} at step 3" in capsys.readouterr().out
    resumed = load_file(tmp_path / "t" / "rl" / "model.safetensors")
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


def test_a_checkpoint_given_as_a_model_is_one_line_naming_the_runs_model_folder(tiny_root, tiny_base, tmp_path,
                                                                                 capsys):
    """A checkpoint is no HF folder any more: eval init=<out>.ckpt/step_X says which folder is the model, exit 2."""
    import eval as ev
    from test_faults import TINY, tiny_trainer
    from config import cli
    model, optimizer = tiny_trainer(tiny_base)
    ckpt = plumbing.save_checkpoint(str(tmp_path / "t" / "rl.ckpt"), 1, model, optimizer)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(ev.main, ["--config", TINY, f"run.data_dir={tiny_root}/data", f"run.runs_dir={tmp_path}", "run.name=t",
                      "run.device=cpu", f"init={ckpt}", "limit=2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"{ckpt} is a checkpoint to resume from, not a model folder: the run's model is {tmp_path}/t/rl " in err
