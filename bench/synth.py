"""
bench/synth.py -- synthesis through an endpoint teacher (data.py section 5) at several synth.concurrency levels,
against a stand-in OpenAI-compatible /v1/completions server on 127.0.0.1 that answers each request after
`latency_s` (a 32B reasoning teacher's 1-2k-token turn on a loaded vLLM takes tens of seconds): questions per hour
per level and the time the paper's 20k questions would take at that rate.

What runs:
  world     a small tiny world and its tokenizer in a temporary folder (the fixtures' world, tests/conftest.py)
  teacher   tests/test_synth.py's stand-in (the synthesis tests' own, not a copy): every trajectory searches the
            question once, then answers it right, so each takes 2 requests, 2 x latency_s
  levels    data.synthesize on the train questions, the tiny world's real BM25 tool, synth.samples per question,
            at each concurrency in `levels`; each level gets `waves` x concurrency / samples questions, so it
            takes about waves x 2 request latencies, whatever the level
The rate is bound by the teacher's latency, not by this machine (a request costs it a few milliseconds of BM25 and
bookkeeping): a shared or loaded machine changes it little. One request at a time (the code before the pool) is
given beside, computed: 3600 / (samples x 2 x latency_s) questions per hour.

    python bench/synth.py                          # 20 s a request, concurrency 16, 32, 64, 128 (about 3 min)
    python bench/synth.py latency_s=2 levels=4,8   # quicker
    python bench/synth.py samples=1 waves=2

Ends with one JSON line.
"""
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import data  # noqa: E402
from config import ConfigError, cli, read_key_values  # noqa: E402
import tools  # noqa: E402
from conftest import tiny_config  # noqa: E402
from test_synth import start_teacher, synth_config  # noqa: E402


@dataclass
class Args:
    latency_s: float = 20.0  # the stand-in teacher's time to answer one request
    levels: str = "16,32,64,128"  # synth.concurrency levels measured, comma-separated
    samples: int = 4  # synth.samples: trajectories per question (data.SynthConfig's default)
    waves: int = 1  # questions per level = waves x concurrency / samples (every worker busy `waves` times)
    questions: int = 20000  # the run extrapolated to (the paper's 20k HotpotQA questions)


def main(argv=None):
    args = read_key_values(Args, sys.argv[1:] if argv is None else argv, "config")
    levels = [int(x) for x in args["levels"].split(",") if x.strip()]
    if not levels or min(levels) < 1 or args["latency_s"] <= 0 or args["samples"] < 1 or args["waves"] < 1:
        raise ConfigError("config: levels must be positive integers, latency_s > 0, samples and waves >= 1")
    from transformers import AutoTokenizer
    root = tempfile.mkdtemp(prefix="bench_synth_")
    cfg = tiny_config(root)
    data.build_world(cfg.world, cfg.run.seed, cfg.run.data_dir)
    data.build_tiny(cfg, os.path.join(root, "base"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "base"))
    train = data.load_qa(os.path.join(cfg.run.data_dir, "train.jsonl"))
    tools.make_tool(cfg.env, cfg.run)  # the BM25 index is built here, not inside the first level's time
    per_turn = 2  # the stand-in searches once, then answers
    sequential_qph = 3600 / (args["samples"] * per_turn * args["latency_s"])
    rows = []
    for level in levels:
        n = min(len(train), max(1, args["waves"] * level // args["samples"]))
        answers = {r["question"]: r["golden_answers"][0] for r in train[:n]}
        server, handler = start_teacher(answers, args["latency_s"])
        try:
            run = synth_config(root, f"synth.teacher=http://127.0.0.1:{server.server_port}", "synth.splits=train",
                               f"synth.out={root}/synth_{level}", f"synth.limit={n}", f"synth.concurrency={level}",
                               f"synth.samples={args['samples']}")
            t0 = time.perf_counter()
            stats = data.synthesize(run, tokenizer)["train"]
            wall_s = time.perf_counter() - t0
        finally:
            server.shutdown()
        qph = n / wall_s * 3600
        rows.append({"concurrency": level, "questions": n, "requests": len(handler.bodies), "peak_in_flight":
                     handler.peak, "wall_s": wall_s, "questions_per_hour": qph,
                     "hours_for_questions": args["questions"] / qph, "rows_kept": stats.get("coa", 0),
                     "failed_questions": stats["teacher_failed_questions"]})
        print(f"concurrency {level:4d}: {n} questions x {args['samples']} samples, {len(handler.bodies)} requests "
              f"(at most {handler.peak} in flight) in {wall_s:.1f}s: {qph:,.0f} questions/hour; "
              f"{args['questions']:,} questions in {args['questions'] / qph:.1f} h")
    print(f"one request at a time (computed): {sequential_qph:,.0f} questions/hour; {args['questions']:,} questions "
          f"in {args['questions'] / sequential_qph / 24:.1f} days")
    print(json.dumps({"bench": "synth", "latency_s": args["latency_s"], "samples": args["samples"],
                      "requests_per_trajectory": per_turn, "target_questions": args["questions"],
                      "sequential_questions_per_hour": sequential_qph, "levels": rows}))


if __name__ == "__main__":
    cli(main)
