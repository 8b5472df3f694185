"""sft.py: masks come from segments, the losses are their formulas, the data stream, and the two promises of
the training loop: torchrun with 2 CPU ranks gives the losses of 1 process at the same global batch, and a run
killed with SIGKILL then resumed ends with the weights of an uninterrupted run.

    .venv/bin/python -m pytest -q tests/test_sft.py
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import data
import sft
from config import ConfigError
import tools
from conftest import finished
from plumbing import cosine_lr
from tools import EnvConfig

ENV = EnvConfig()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_base)


def synth_rows(tiny_synth, split="train"):
    return sft.read_synth(os.path.join(tiny_synth[0], f"{split}.jsonl"))


# -----------------------------------------------------------------------------
# masks

def test_observation_mask_covers_exactly_the_env_segments(tiny_synth, tokenizer):
    from rollout import encode_prompt
    row = next(r for r in synth_rows(tiny_synth) if r["type"] == "coa" and len(r["segments"]) >= 5)
    ex = sft.encode_trajectory(tokenizer, ENV, row["question"], row["segments"])
    n_prompt = len(encode_prompt(tokenizer, row["question"], ENV))
    assert ex["ids"][:n_prompt] == encode_prompt(tokenizer, row["question"], ENV) and not any(ex["mask"][:n_prompt])
    pos = n_prompt
    for seg in row["segments"]:  # walk the segments: each one's tokens carry its writer's mask
        ids = tokenizer.encode(seg["text"], add_special_tokens=False)
        assert ex["ids"][pos:pos + len(ids)] == ids
        assert ex["mask"][pos:pos + len(ids)] == [int(seg["who"] == "model")] * len(ids)
        pos += len(ids)
    assert ex["ids"][pos:] == [tokenizer.eos_token_id] and ex["mask"][pos:] == [1]
    unmasked = sft.encode_trajectory(tokenizer, ENV, row["question"], row["segments"], observation_weight=1)
    assert unmasked["ids"] == ex["ids"] and unmasked["mask"] == [0] * n_prompt + [1] * (len(ex["ids"]) - n_prompt)


def test_pair_prefix_is_context_and_only_continuation_model_tokens_are_scored(tiny_synth, tokenizer):
    pair = next(r for r in synth_rows(tiny_synth) if r["type"] == "pair" and r["needs_search"] and r["prefix"])
    ex = sft.build_examples([pair], "sft1", tokenizer, ENV, 512)[0]
    chosen = ex["chosen"]
    scored = tokenizer.decode([i for i, m in zip(chosen["ids"], chosen["mask"]) if m])
    model_text = "".join(s["text"] for s in pair["chosen"] if s["who"] == "model")
    assert scored == model_text + tokenizer.eos_token
    assert pair["prefix"][0]["text"] not in scored


def test_sft2_mixes_only_well_known_cot_and_sft3_unmasks_observations(tiny_synth, tokenizer):
    rows = synth_rows(tiny_synth)
    two = sft.build_examples(rows, "sft2", tokenizer, ENV, 512)
    three = sft.build_examples(rows, "sft3", tokenizer, ENV, 512)
    cot_rows = [r for r in rows if r["type"] == "cot"]
    assert sum(e["cot"] for e in two) == sum(not r["needs_search"] for r in cot_rows)
    assert sum(e["cot"] for e in sft.build_examples(rows, "cot", tokenizer, ENV, 512)) == len(cot_rows)
    coa2 = [e for e in two if not e["cot"]]
    coa3 = [e for e in three if not e["cot"]]
    assert all(a["ids"] == b["ids"] for a, b in zip(coa2, coa3))
    assert sum(map(sum, (e["mask"] for e in coa3))) > sum(map(sum, (e["mask"] for e in coa2)))


def test_sft3_weighs_observations_by_obs_weight_and_draws_its_own_cot_share(tiny_synth, tokenizer):
    """sft.obs_weight: an observation token counts that much in L3 (the model's own tokens 1, as in SFT-2);
    sft.sft3_cot_share: SFT-3's stream has its own share of CoT rows (0: CoA only), -1 keeps cot_share."""
    rows = synth_rows(tiny_synth)
    two = [e for e in sft.build_examples(rows, "sft2", tokenizer, ENV, 512) if not e["cot"]]
    light = sft.build_examples(rows, "sft3", tokenizer, ENV, 512, obs_weight=0.3)
    for a, b in zip(two, [e for e in light if not e["cot"]]):
        assert a["ids"] == b["ids"] and 0 in a["mask"]
        assert b["mask"] == [m if m else (0.3 if i >= a["mask"].index(1) else 0) for i, m in enumerate(a["mask"])]
    share = lambda stage, **kw: sft.SFTConfig(stage=stage, cot_share=0.15, **kw).stage_cot_share()
    assert share("sft3", sft3_cot_share=0.0) == 0.0 and share("sft2", sft3_cot_share=0.0) == 0.15
    assert share("sft3") == 0.15
    order = lambda stage, cot_share: [i for b in sft.epoch_order(light, stage, cot_share, 8, 4, seed=0, epoch=0)
                                      for i in b]
    assert any(light[i]["cot"] for i in order("sft3", 0.15))
    assert not any(light[i]["cot"] for i in order("sft3", 0.0))


# -----------------------------------------------------------------------------
# losses

def test_pretrain_examples_are_one_document_search_results_repeated_by_popularity(tiny_root, tiny_synth, tokenizer):
    """stage=pretrain: a document reads exactly as the real tool's one-document observation, every token learnt,
    and an epoch holds it `repeats` times."""
    rows = data.read_pretrain(os.path.join(tiny_root, "data", "pretrain.jsonl"))[:40]
    examples = sft.pretrain_examples(rows, tokenizer, ENV, 512)
    text = tokenizer.decode(examples[0]["ids"][:-1])
    assert text == tools.format_observation([rows[0]["contents"]], tokenizer, ENV)
    assert text.startswith("<search_result> ") and examples[0]["ids"][-1] == tokenizer.eos_token_id
    assert all(all(e["mask"]) for e in examples)
    batches = sft.epoch_order(examples, "pretrain", 0.15, 4, 4, seed=0, epoch=0)
    seen = Counter(i for b in batches for i in b)
    total = sum(r["repeats"] for r in rows)
    assert sum(seen.values()) == total - total % 4  # the whole weighted corpus, less the ragged tail batch
    assert all(abs(seen[i] - r["repeats"]) <= 3 for i, r in enumerate(rows))
    # replay (sft.pretrain_share): documents join a later stage's stream, drawn by their repeats
    trajectories = sft.build_examples(synth_rows(tiny_synth), "sft3", tokenizer, ENV, 512)
    mixed = trajectories + [{**e, "doc": True} for e in examples]
    order = [i for b in sft.epoch_order(mixed, "sft3", 0.15, 8, 4, seed=0, epoch=0, doc_share=0.25) for i in b]
    drawn = Counter(i - len(trajectories) for i in order if i >= len(trajectories))
    assert abs(sum(drawn.values()) / len(order) - 0.25) < 0.02
    heavy = max(range(len(rows)), key=lambda i: rows[i]["repeats"])
    assert drawn[heavy] > sum(drawn.values()) * rows[heavy]["repeats"] / total / 2  # popular documents come often


def test_sft1_loss_equals_its_formula_on_hand_made_logprobs():
    lp_c = torch.tensor([-0.5, -2.0, -1.0])
    lp_r = torch.tensor([-1.5, -1.0, -1.0])
    alpha = 0.2
    loss, stats = sft.sft1_loss(lp_c, lp_r, alpha, n_pairs=3)
    by_hand = sum(-math.log(1 / (1 + math.exp(-(c - r)))) - alpha * c for c, r in zip(lp_c.tolist(), lp_r.tolist())) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert stats["acc_sum"] == 1.0  # only the first pair prefers chosen; the tie counts as not preferred
    half, _ = sft.sft1_loss(lp_c[:2], lp_r[:2], alpha, n_pairs=3)  # micro-batches add up to the global mean
    rest, _ = sft.sft1_loss(lp_c[2:], lp_r[2:], alpha, n_pairs=3)
    assert (half + rest).item() == pytest.approx(loss.item(), rel=1e-6)


def test_continuation_logp_is_the_mean_over_scored_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    target = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert sft.continuation_logp(logps, target).tolist() == [-3.0, -1.0]


def test_next_token_loss_is_the_masked_mean_of_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    target = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})()
    logps = sft.token_logps(Fixed(), ids, torch.ones_like(ids))
    loss, _ = sft.next_token_loss(logps, target[:, 1:], target[:, 1:].sum())
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none").view(2, 4)
    assert loss.item() == pytest.approx(((ce * target[:, 1:]).sum() / target[:, 1:].sum()).item(), rel=1e-6)


def test_lr_warms_up_then_follows_the_cosine_to_its_floor():
    """plumbing.cosine_lr, the schedule of sft.py (a LambdaLR factor, peak 1) and worldmodel.py (the lr itself)."""
    factors = [cosine_lr(s, 110, 10, 0.1) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[110] == pytest.approx(0.1)
    lrs = [cosine_lr(s, 110, 10, 0.1, peak=3e-3) for s in range(111)]
    assert lrs[3] == 3e-3 * 4 / 10 and lrs[60] == 3e-3 * factors[60]  # the same float operations as before
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


# -----------------------------------------------------------------------------
# the data stream

def test_stream_is_deterministic_mixes_cot_share_and_buckets_lengths(tiny_synth, tokenizer):
    examples = sft.build_examples(synth_rows(tiny_synth), "sft2", tokenizer, ENV, 512)
    sc = sft.SFTConfig(stage="sft2", batch_size=8, cot_share=0.3, bucket_batches=8)
    a, b = sft.Stream(examples, sc, seed=0), sft.Stream(examples, sc, seed=0)
    assert [a.batch(s) for s in range(30)] == [b.batch(s) for s in range(30)]
    n = len(a.epoch(0))
    assert a.batch(n) == a.epoch(1)[0] and a.epoch(1) != a.epoch(0)
    picked = [i for batch in a.epoch(0) for i in batch]
    assert sum(examples[i]["cot"] for i in picked) / len(picked) == pytest.approx(0.3, abs=0.05)

    def padding(stream):
        lens = [[len(examples[i]["ids"]) for i in batch] for batch in stream.epoch(0)]
        return sum(max(ls) * len(ls) - sum(ls) for ls in lens)
    unbucketed = sft.Stream(examples, sft.SFTConfig(stage="sft2", batch_size=8, cot_share=0.3, bucket_batches=1), 0)
    assert padding(a) < 0.7 * padding(unbucketed)


def test_a_trajectory_longer_than_max_len_is_dropped_and_counted_never_cut(tiny_synth, tokenizer, capsys):
    """A cut trajectory would lose its answer (the last thing it says): too long means dropped, said in one line,
    a warning when it is more than HIGH_DROP_SHARE of the data, and an error when nothing is left."""
    rows = synth_rows(tiny_synth)[:60]
    full = sft.build_examples(rows, "sft2", tokenizer, ENV, 10 ** 6)
    lengths = sorted(len(e["ids"]) for e in full)
    assert "longer than" not in capsys.readouterr().out  # nothing too long: nothing said
    limit = lengths[-2]  # the longest trajectory (and any tied with it) no longer fits
    kept = sft.build_examples(rows, "sft2", tokenizer, ENV, limit)
    n_long = sum(n > limit for n in lengths)
    assert len(kept) == len(full) - n_long and all(len(e["ids"]) <= limit for e in kept)
    assert all(e["ids"][-1] == tokenizer.eos_token_id for e in kept)  # whole trajectories, ending as they end
    out = capsys.readouterr().out.strip()
    assert f"stage sft2: {n_long} of {len(full)} trajectories" in out and f"sft.max_len={limit}" in out
    assert out.startswith("warning: ") == (n_long / len(full) > sft.HIGH_DROP_SHARE)
    many = sft.build_examples(rows, "sft2", tokenizer, ENV, lengths[len(lengths) // 2])
    assert len(many) < len(full) and capsys.readouterr().out.startswith("warning: ")  # half gone: a warning
    pairs = sft.build_examples(rows, "sft1", tokenizer, ENV, 10 ** 6)
    short = min(sft.longest(p) for p in pairs)
    assert all(sft.longest(p) <= short for p in sft.build_examples(rows, "sft1", tokenizer, ENV, short))
    with pytest.raises(ConfigError, match="every trajectory is longer than sft.max_len=4"):
        sft.build_examples(rows, "sft2", tokenizer, ENV, 4)


# -----------------------------------------------------------------------------
# the training loop, as its users run it

@pytest.fixture(scope="module")
def small_train(tiny_synth, tmp_path_factory):
    """The first 150 synthesised rows: enough for a few steps, quick to tokenize in each subprocess."""
    path = str(tmp_path_factory.mktemp("small") / "train.jsonl")
    with open(os.path.join(tiny_synth[0], "train.jsonl")) as f, open(path, "w") as out:
        out.writelines(line for _, line in zip(range(150), f))
    return path


def sft_args(tiny_root, tiny_base, runs_dir, data, *extra):
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.data_dir={tiny_root}/data",
            f"run.runs_dir={runs_dir}", "run.name=t", f"init={tiny_base}", f"data={data}", "batch_size=8",
            "device_batch_size=4", "warmup_steps=2", "heldout=none", "run.device=cpu", "eval_every=0", *extra]


def run_sft(runs, workdir, nproc=1):
    """sft.main for each argument list, in one fresh process (python, or torchrun with nproc CPU ranks)."""
    script = os.path.join(workdir, "sft_worker.py")
    with open(script, "w") as f:
        f.write("import json, sys\nimport sft\nfor args in json.loads(sys.argv[1]):\n    sft.main(args)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [PY]
    return subprocess.Popen(launcher + [script, json.dumps(runs)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def metrics(runs_dir, out):
    with open(os.path.join(runs_dir, "t", f"{out}.metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(runs_dir, out):
    return [row["loss"] for row in metrics(runs_dir, out) if "loss" in row]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def test_torchrun_two_cpu_ranks_give_the_losses_of_one_process(tiny_root, tiny_base, small_train, tmp_path):
    """sft2 (token-normalised) and sft1 (pair-normalised): batch 8 = 2 micro-batches of 4 in one process,
    one micro-batch of 4 on each of 2 ranks."""
    runs = lambda d: [sft_args(tiny_root, tiny_base, d, small_train, f"stage={stage}", "steps=3", "save_every=0",
                               f"heldout={heldout}")
                      for stage, heldout in (("sft2", f"{tiny_root}/data/synth/dev.jsonl"), ("sft1", "none"))]
    two = run_sft(runs(str(tmp_path / "two")), tmp_path, nproc=2)
    for args in runs(str(tmp_path / "one")):
        sft.main(args)
    finished(two)
    for stage in ("sft2", "sft1"):
        l1, l2 = losses(tmp_path / "one", stage), losses(tmp_path / "two", stage)
        assert len(l1) == len(l2) == 3
        assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
        w1, w2 = weights(tmp_path / "one" / "t" / stage), weights(tmp_path / "two" / "t" / stage)
        assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    # the held-out metrics: each rank scores its share on its own model (no gathered copy), the sums add up
    final = [metrics(tmp_path / d, "sft2")[-1] for d in ("one", "two")]
    assert final[0]["final"] and final[0]["heldout_loss"] == pytest.approx(final[1]["heldout_loss"], rel=1e-4)
    assert final[0]["heldout_obs_ppl"] == pytest.approx(final[1]["heldout_obs_ppl"], rel=1e-4)


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_root, tiny_base, small_train,
                                                                            tmp_path):
    args = lambda d, *x: sft_args(tiny_root, tiny_base, str(d), small_train, "stage=sft2", "steps=8", "save_every=2",
                                  *x)
    proc = run_sft([args(tmp_path / "b")], tmp_path)
    sft.main(args(tmp_path / "a"))  # the uninterrupted run, in this process while the other one starts
    ckpt = tmp_path / "b" / "t" / "sft2.ckpt"
    deadline = time.time() + 240
    while not (ckpt / "step_000004").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run: after the step-4 checkpoint, before the end
    proc.communicate()
    assert not (tmp_path / "b" / "t" / "sft2").exists(), "the run finished before it could be killed"
    out = finished(run_sft([args(tmp_path / "b", "--resume")], tmp_path))
    assert "resumed from" in out
    wa, wb = weights(tmp_path / "a" / "t" / "sft2"), weights(tmp_path / "b" / "t" / "sft2")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(tmp_path / "a", "sft2") == losses(tmp_path / "b", "sft2")


def test_steps_zero_is_nothing_to_do_and_epochs_count_passes_over_the_data(tiny_root, tiny_base, small_train,
                                                                             tmp_path, capsys):
    """steps=0: nothing to do, whatever the stage default; steps=-1 (the default): sft.epochs passes over the
    stage's examples when set (the paper's unit), else the stage's own default; an explicit steps wins."""
    argv = lambda *x: sft_args(tiny_root, tiny_base, str(tmp_path), small_train, "stage=sft2", "save_every=0", *x)
    sft.main(argv("steps=0", "sft2_steps=5", "out=zero"))
    assert "0 steps for stage sft2: nothing to do" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "t" / "zero")
    sft.main(argv("epochs=0.5", "out=half"))
    per_epoch = int(capsys.readouterr().out.split(" batches/epoch")[0].rsplit(" ", 1)[1])
    assert len(losses(tmp_path, "half")) == math.ceil(0.5 * per_epoch) > 0
    sft.main(argv("epochs=0.5", "steps=2", "out=both"))
    assert len(losses(tmp_path, "both")) == 2
    sft.main(argv("sft2_steps=3", "out=default"))
    assert len(losses(tmp_path, "default")) == 3


def test_grad_checkpointing_recomputes_each_layer_and_gives_the_same_losses_and_weights(tiny_root, tiny_base,
                                                                                      small_train, tmp_path,
                                                                                      monkeypatch):
    """sft.grad_checkpointing recomputes activations in backward: every decoder layer runs twice a micro-batch
    (memory for time), and the numbers are those of plain backward."""
    from transformers.models.qwen2 import modeling_qwen2
    calls, forward = [], modeling_qwen2.Qwen2MLP.forward  # inside each layer (the layer's own forward is the
    monkeypatch.setattr(modeling_qwen2.Qwen2MLP, "forward",  # checkpointed function: patched, it would not be)
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    counts = {}
    for d, extra in (("plain", ()), ("ckpt", ("grad_checkpointing=true",))):
        calls.clear()
        sft.main(sft_args(tiny_root, tiny_base, str(tmp_path / d), small_train, "stage=sft2", "steps=2",
                          "save_every=0", *extra))
        counts[d] = len(calls)
    assert counts["plain"] > 0 and counts["ckpt"] == 2 * counts["plain"]
    assert losses(tmp_path / "plain", "sft2") == pytest.approx(losses(tmp_path / "ckpt", "sft2"), rel=1e-6)
    w1, w2 = weights(tmp_path / "plain" / "t" / "sft2"), weights(tmp_path / "ckpt" / "t" / "sft2")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_bad_stage_and_unknown_flag_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sft.stage"):
        sft.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "stage=sft9", f"run.runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match="flag"):
        sft.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--resmue", f"run.runs_dir={tmp_path}"])


def test_bf16_on_one_process_saves_bf16_weights_that_moved(tiny_root, tiny_base, small_train, tmp_path,
                                                            one_rank_group):
    """sft.bf16 on one process: FSDP2 (1-rank group), bf16 compute, fp32 masters; the output folder is in bf16 (its
    config.json says so), the checkpoint keeps the fp32 masters."""
    sft.main(sft_args(tiny_root, tiny_base, str(tmp_path), small_train, "stage=sft2", "steps=2", "save_every=1",
                      "parallel=fsdp", "bf16=true"))
    out, base = weights(tmp_path / "t" / "sft2"), weights(tiny_base)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert json.load(open(tmp_path / "t" / "sft2" / "config.json"))["dtype"] == "bfloat16"
    assert any(not torch.equal(out[k], base[k].bfloat16()) for k in base)
    assert all(math.isfinite(x) for x in losses(tmp_path, "sft2"))
    shard = torch.load(tmp_path / "t" / "sft2.ckpt" / "step_000001" / "model_rank_0.pt")  # the rank's shard
    assert shard.keys() == base.keys() and all(v.dtype == torch.float32 for v in shard.values())
    with pytest.raises(ConfigError, match="sft.bf16=true needs sft.parallel=fsdp"):
        sft.main(sft_args(tiny_root, tiny_base, str(tmp_path), small_train, "bf16=true"))


# -----------------------------------------------------------------------------
# the dev curve and the best dev step (sft.eval_every, sft.patience)

def test_dev_best_keeps_the_first_best_and_stops_only_past_stop_em(tmp_path):
    best = sft.DevBest(patience=2, stop_em=0.5)
    assert [best.update(s, em) for s, em in ((10, 0.2), (20, 0.2), (30, 0.1), (40, 0.1))] == [True, False, False,
                                                                                            False]
    assert (best.step, best.em, best.since) == (10, 0.2, 3) and not best.stop()  # still on the plateau: no stop
    assert best.update(50, 0.6) and not best.stop()
    best.update(60, 0.6)  # an equal is not a new best: the earlier weights stay the output
    assert not best.stop()
    best.update(70, 0.55)
    assert best.stop() and best.step == 50
    assert not sft.DevBest(patience=0, stop_em=0.0).stop()  # patience 0: every step runs
    log = tmp_path / "m.jsonl"  # --resume rebuilds it from the metrics log (the final held-out row ignored)
    log.write_text("".join(json.dumps(r) + "\n" for r in ({"step": 1, "loss": 1.0}, {"step": 2, "dev_em": 0.3},
                                                           {"step": 4, "dev_em": 0.7}, {"step": 6, "dev_em": 0.1},
                                                           {"step": 6, "final": True, "dev_em": 0.9})))
    again = sft.DevBest(1, 0.5, str(log))
    assert (again.step, again.em, again.since, again.stop()) == (4, 0.7, 1, True)


def test_eval_every_logs_the_dev_curve_stops_on_patience_and_outputs_the_best_steps_weights(
        tiny_root, tiny_base, small_train, tmp_path, capsys):
    """sft2 with a dev eval every 2 steps: dev EM (overall and per kind) in the metrics, a checkpoint at each eval,
    the best one kept past keep_ckpts, the stop where DevBest says, and the output = the best step's weights;
    --resume of the stopped run trains nothing more. cot never evaluates (it does not act)."""
    args = lambda *x: sft_args(tiny_root, tiny_base, str(tmp_path), small_train, "stage=sft2", "steps=12",
                               "eval_every=2", "eval_n=6", "patience=1", "stop_em=0", "keep_ckpts=1", "lr=3e-3",
                               "save_every=0", *x)
    sft.main(args())
    rows = [r for r in metrics(tmp_path, "sft2") if "dev_em" in r]
    assert [r["step"] for r in rows][:2] == [2, 4] and all(0 <= r["dev_em"] <= 1 for r in rows)
    assert any(k.startswith("dev_em_") for k in rows[0])  # per question kind
    expect = sft.DevBest(1, 0.0)
    for r in rows:
        expect.update(r["step"], r["dev_em"])
        if expect.stop():
            break
    assert rows[-1]["step"] == r["step"] < 12  # stopped by patience, not by the step count
    assert len(losses(tmp_path, "sft2")) == r["step"]
    out = capsys.readouterr().out
    assert f"stopped at step {r['step']}" in out
    ckpt = tmp_path / "t" / "sft2.ckpt"
    kept = sorted(os.listdir(ckpt))
    assert f"step_{expect.step:06d}" in kept and f"step_{r['step']:06d}" in kept and len(kept) <= 2
    best = torch.load(ckpt / f"step_{expect.step:06d}" / "model.pt", weights_only=True)
    last = torch.load(ckpt / f"step_{r['step']:06d}" / "model.pt", weights_only=True)
    final = weights(tmp_path / "t" / "sft2")
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the two steps differ ...
    assert all(torch.equal(final[k], best[k]) for k in final if k in best)  # ... and the output is the best one's
    sft.main(args("--resume"))
    assert len(losses(tmp_path, "sft2")) == r["step"]  # stopped is finished: nothing trained again
    sft.main(args("stage=cot", "out=cot"))
    assert not any("dev_em" in r for r in metrics(tmp_path, "cot"))
