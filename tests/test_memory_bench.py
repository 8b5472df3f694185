"""bench/memory.py at a tiny shape: the fake-tensor memory bench runs every setup, and what it measures moves the way
memory must (tokens, ranks, LoRA) and agrees with a real step.

    .venv/bin/python -m pytest -q tests/test_memory_bench.py
"""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["big=tiny", "small=tiny", "sft1_tokens=48", "prompt_tokens=16", "new_tokens=48", "prompts=4", "group=2",
        "lora_rank=4", "check_hidden=32"]


@pytest.fixture(scope="module")
def memory():
    # by path: bench/ on sys.path would shadow rollout.py with bench/rollout.py
    spec = importlib.util.spec_from_file_location("memory_bench", os.path.join(ROOT, "bench", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(memory):
    """The bench at two SFT-2 lengths (the second: fsdp only), with what each printed."""
    import contextlib
    import io
    out = {}
    for tokens, setups in ((64, "fsdp,lora,full"), (256, "fsdp")):  # full_small: full's code at another shape
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            report = memory.main(TINY + [f"sft2_tokens={tokens}", f"setups={setups}"])
        out[tokens] = report, printed.getvalue()
    return out


def test_memory_bench_prints_a_table_per_phase_and_ends_with_one_json_line(runs):
    report, printed = runs[64]
    lines = printed.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(report))
    for phase in ("sft2", "sft1", "rl_update", "rl_rollout"):
        assert any(line.startswith(f"{phase} (peak per rank") for line in lines)
    for name in ("fsdp", "lora", "full"):
        setup = report["setups"][name]
        assert all(setup[p]["peak_bytes"] > 0 and setup[p]["fits"] for p in ("sft2", "sft1", "rl_update"))
    assert report["setups"]["fsdp"]["rl_rollout"]["trajectories"] == 4 * 2 // 8  # this rank's share of the step
    assert report["setups"]["lora"]["rl_rollout"]["trajectories"] == 4 * 2  # a tiny model: all of them fit


def test_more_sft_tokens_take_more_activation_memory(runs):
    short, long = runs[64][0]["setups"]["fsdp"]["sft2"], runs[256][0]["setups"]["fsdp"]["sft2"]
    assert long["peak_bytes"] > short["peak_bytes"]
    activations = [m["at_peak_bytes"].get("Activation", 0) + m["at_peak_bytes"].get("Temp", 0) for m in (short, long)]
    assert activations[1] > 2 * activations[0]  # 4x the tokens


def test_eight_ranks_hold_an_eighth_of_the_weights_and_lora_trains_a_small_state(runs):
    setups = runs[64][0]["setups"]
    sharded, whole = (setups[s]["sft1"]["at_peak_bytes"]["Sharded Param"] for s in ("fsdp", "full"))
    assert 0.12 <= sharded / whole <= 0.14  # 1/8, and a little padding where a dimension does not divide by 8
    assert setups["lora"]["trainable"] < setups["lora"]["params"] / 2
    lora_adam = setups["lora"]["sft1"]["at_peak_bytes"]["Optstate"]
    assert lora_adam < 0.25 * setups["full"]["sft1"]["at_peak_bytes"]["OptState"]


def test_fake_tensor_peak_agrees_with_a_real_step_and_adam_takes_16_bytes_a_parameter(memory):
    check = memory.agreement(hidden=64)
    assert 0.999 <= check["fake_over_real"] <= 1.001  # the same tensors: fake ones have sizes, not values
    assert check["state_over_16_bytes_a_param"] == 1.0


def test_memory_bench_refuses_an_unknown_setup_in_one_line(memory):
    from config import ConfigError
    with pytest.raises(ConfigError, match="unknown setup or shape"):
        memory.main(["setups=fsdp,zero3"])
