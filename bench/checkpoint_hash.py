"""
bench/checkpoint_hash.py -- what a checkpoint's SHA-256s cost (plumbing.write_hashed while saving, file_sha256 at
resume) on this machine; ends with one JSON line.

The same in-memory state (--gb GB of fp32 tensors) is written with torch.save into a plain file and through
plumbing.write_hashed (each block is hashed on its way to the file); the difference is the checksum's cost per save.
hashlib's throughput alone (SHA-256, and BLAKE2b, the other candidate) and re-reading the file to check it (what
resume_checkpoint does) are measured too. The 1.5B shape's state (1.5e9 parameters: fp32 weights and two Adam
moments, 18 GB) does not fit here, so the cost is measured on --gb and scaled linearly to its per-rank share: 8 ranks
(2.25 GB a rank) and 1 rank.
Writes go to the page cache, as a save's do (nothing calls fsync): on a slower disk the hash's share is smaller.

    python bench/checkpoint_hash.py [--gb 2] [--dir /tmp] [--repeats 3]
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import file_sha256, write_hashed  # noqa: E402

STATE_1P5B_GB = 1.5e9 * 4 * 3 / 1e9  # fp32 weights + Adam's two moments


def best(fn, repeats):
    """The fastest of `repeats` runs, in seconds (the machine is shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="state written per measurement, in GB")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the test file goes (removed after)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    chunk = 2 ** 24  # 64 MB fp32 tensors, like a 7B layer's matrices
    state = {f"t{i}": torch.randn(chunk) for i in range(max(1, round(args.gb * 1e9 / (4 * chunk))))}
    gb = sum(t.numel() * 4 for t in state.values()) / 1e9
    path = os.path.join(args.dir, f"checkpoint_hash_{os.getpid()}.pt")
    try:
        raw = bytes(memoryview(next(iter(state.values())).numpy()).cast("B"))
        hash_s = best(lambda: hashlib.sha256(raw).hexdigest(), args.repeats) * gb * 1e9 / len(raw)
        blake2b_s = best(lambda: hashlib.blake2b(raw).hexdigest(), args.repeats) * gb * 1e9 / len(raw)  # the other

        def plain():
            with open(path, "wb") as f:
                torch.save(state, f)
        write_s = best(plain, args.repeats)
        hashed_s = best(lambda: write_hashed(path, lambda f: torch.save(state, f)), args.repeats)
        check_s = best(lambda: file_sha256(path), args.repeats)
    finally:
        if os.path.exists(path):
            os.remove(path)
    per_gb = {"hash_s": hash_s / gb, "write_s": write_s / gb, "hashed_write_s": hashed_s / gb, "check_s": check_s / gb}
    scaled = {f"{ranks}_ranks": {"state_gb_per_rank": STATE_1P5B_GB / ranks,
                                 "write_ms": 1000 * per_gb["write_s"] * STATE_1P5B_GB / ranks,
                                 "hash_cost_ms": 1000 * (per_gb["hashed_write_s"] - per_gb["write_s"]) * STATE_1P5B_GB
                                 / ranks,
                                 "check_at_resume_ms": 1000 * per_gb["check_s"] * STATE_1P5B_GB / ranks}
              for ranks in (8, 1)}
    print(json.dumps({"measured_gb": round(gb, 3), "sha256_gb_s": gb / hash_s, "blake2b_gb_s": gb / blake2b_s,
                      "write_gb_s": gb / write_s,
                      "hashed_write_gb_s": gb / hashed_s, "check_gb_s": gb / check_s,
                      "hash_share_of_save": (hashed_s - write_s) / hashed_s, "scaled_1p5b": scaled,
                      "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
