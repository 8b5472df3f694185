"""Tests of LoRA (plumbing.add_lora, lora_rank > 0 in rl.py and sft.py): only the adapters train, the base with
them off is rl.py's reference, and the output folder is a plain HF model holding the merged weights.

    .venv/bin/python -m pytest -q tests/test_lora.py
"""
import json
import math
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import plumbing
import rl
import sft
from tests.test_rl import ROOT, fake_episodes, read_metrics, rl_argv
from config import RunConfig
from plumbing import load_model

CPU = torch.device("cpu")


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def learn_once(model, optimizer, seed=0, kl_coef=0.1):
    """One rl.learn update (no reference model: under LoRA the adapters off are the reference) on fake episodes,
    with an entropy bonus so that the adapters move whatever the rewards; returns its stats."""
    episodes = fake_episodes(model, 4, seed, model.config.vocab_size)
    cfg = rl.RLConfig(group_size=2, kl_coef=kl_coef, entropy_coef=0.1, lora_rank=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    totals = {"skipped": 0, "bad_in_row": 0}
    stats = rl.learn(model, None, optimizer, scheduler, episodes, torch.tensor([1., 0., 0., 1.]), [0, 1], cfg, 16, 0,
                     CPU, totals)
    assert totals["skipped"] == 0
    return stats


def test_only_the_adapters_get_gradients_and_change(tiny_base):
    model = plumbing.add_lora(AutoModelForCausalLM.from_pretrained(tiny_base), 4, 8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n in trainable if ".lora_A." in n}
    assert adapted == set(plumbing.LORA_TARGETS)  # every linear projection of the decoder
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(10, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
    model.zero_grad()
    learn_once(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # the frozen base is bit for bit what it was


def test_adapters_off_give_the_base_models_logits_exactly(tiny_base):
    model = plumbing.add_lora(AutoModelForCausalLM.from_pretrained(tiny_base), 4, 8.0)
    learn_once(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    ids = torch.randint(10, model.config.vocab_size, (2, 12))
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_base), ids)
    assert not torch.allclose(logits_of(model, ids), base, atol=1e-4)  # the adapters learnt something
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base)


def test_adapters_train_in_fp32_on_a_bf16_base(tiny_base):
    run = RunConfig(device="cpu", dtype="bfloat16")  # the base's dtype that run.dtype=auto gives on a GPU
    model, _, _ = rl.build_models(rl.RLConfig(lora_rank=4), run, CPU, tiny_base)
    assert {(p.requires_grad, p.dtype) for p in model.parameters()} == {(True, torch.float32), (False, torch.bfloat16)}


def test_lora_policy_has_no_reference_copy_and_its_kl_is_0_until_the_adapters_move(tiny_cfg, tiny_base):
    run = RunConfig(device="cpu")
    model, ref, _ = rl.build_models(rl.RLConfig(lora_rank=4, kl_coef=0.1), run, CPU, tiny_base)
    assert ref is None and plumbing.is_lora(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert learn_once(model, optimizer, seed=1)["kl"] == 0.0  # the start: adapters off = adapters on, exactly
    assert learn_once(model, optimizer, seed=1)["kl"] > 0


def test_output_folder_is_a_plain_hf_model_with_the_lora_models_logits(tiny_base, tmp_path):
    model, tokenizer = load_model(tiny_base, RunConfig(device="cpu"), device=CPU)
    model = plumbing.add_lora(model, 4, 8.0)
    learn_once(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    ids = torch.randint(10, model.config.vocab_size, (2, 12))
    trained = logits_of(model, ids)
    rl.save_final(model, tokenizer, str(tmp_path / "out"), 0)
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(f"{tiny_base}/model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits_of(loaded, ids), trained, atol=1e-5)
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(tiny_base), ids), trained, atol=1e-4)


def test_rl_with_lora_and_kl_runs_with_kl_0_at_the_first_step(tiny_root, tiny_base, tmp_path):
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=2", "eval_n=0", "save_every=0", "updates_per_step=1",
                    "lora_rank=4", "kl_coef=0.1"))
    steps = [r for r in read_metrics(tmp_path) if "env" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0  # the entropy bonus moved the adapters in step 1
    out, base = load_file(tmp_path / "t" / "rl" / "model.safetensors"), load_file(f"{tiny_base}/model.safetensors")
    assert set(out) == set(base) and any(not torch.equal(out[k], base[k]) for k in base)


def test_lora_with_fsdp_bf16_on_one_process_trains_on_a_bf16_base(tiny_root, tiny_base, tmp_path, one_rank_group):
    """One GPU's LoRA path (configs/qwen7b.yaml's rl settings) on CPU with gloo: FSDP2 + bf16 MixedPrecisionPolicy
    over a bf16 base (run.dtype) with fp32 adapters (FSDP2 wants one dtype among the trainable parameters only),
    activation checkpointing, the reference with the adapters off."""
    rl.main(rl_argv(tiny_root, tiny_base, tmp_path, "steps=2", "eval_n=0", "save_every=0", "updates_per_step=1",
                    "lora_rank=4", "kl_coef=0.1", "parallel=fsdp", "bf16=true", "run.dtype=bfloat16",
                    "grad_checkpointing=true"))
    steps = [r for r in read_metrics(tmp_path) if "env" in r]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in steps)
    out, base = load_file(tmp_path / "t" / "rl" / "model.safetensors"), load_file(f"{tiny_base}/model.safetensors")
    assert set(out) == set(base) and all(v.dtype == torch.bfloat16 for v in out.values())
    assert any(not torch.equal(out[k], base[k].to(torch.bfloat16)) for k in base)


def test_sft2_with_lora_lowers_the_loss_of_smollm2(smol_path, tiny_root, tiny_synth, tmp_path):
    """3 steps on the same 2 CoA rows (one batch an epoch): SmolLM2-135M with rank-8 adapters fits them."""
    data = tmp_path / "two.jsonl"
    with open(os.path.join(tiny_synth[0], "train.jsonl")) as f:
        rows = sorted((line for line in f if json.loads(line)["type"] == "coa"), key=len)[:2]  # the shortest
    data.write_text("".join(rows))
    sft.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"run.data_dir={tiny_root}/data",
              f"run.runs_dir={tmp_path}", "run.name=t", "run.device=cpu", f"init={smol_path}", f"data={data}",
              "stage=sft2", "steps=3", "batch_size=2", "device_batch_size=2", "max_len=512", "lr=1e-3",
              "warmup_steps=0", "heldout=none", "save_every=0", "lora_rank=8", "lora_alpha=16"])
    with open(tmp_path / "t" / "sft2.metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and losses[2] < losses[0]
    print("sft2 lora smollm2 losses", losses, "tok_s", [round(r["tok_s"]) for r in rows])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "sft2")
    assert type(merged).__name__ == "LlamaForCausalLM"  # a plain HF model: the adapters are in its weights


def test_a_lora_run_checkpoints_only_its_adapters_and_resumes_to_the_same_weights(tiny_root, tiny_base, tmp_path,
                                                                                   capsys):
    """A checkpoint holds what trains (plumbing.trained_state): under LoRA the adapters, the frozen base comes back
    from init; --resume from step 2 of 4 ends with the weights of the unbroken run."""
    argv = lambda d, *x: rl_argv(tiny_root, tiny_base, tmp_path / d, "steps=4", "eval_n=0", "save_every=2",
                                 "keep_ckpts=3", "lora_rank=4", "kl_coef=0.1", *x)
    rl.main(argv("a"))
    saved = torch.load(tmp_path / "a" / "t" / "rl.ckpt" / "step_000002" / "model.pt", weights_only=True)
    assert saved and all("lora_" in name for name in saved)  # the adapters alone, not the 1M frozen weights
    rl.main(argv("b", "steps=2"))
    rl.main(argv("b", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    a, b = (load_file(tmp_path / d / "t" / "rl" / "model.safetensors") for d in ("a", "b"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
