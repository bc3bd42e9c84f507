"""How ppo_rlhf.py's seconds per iteration grow with response length and with batch size (same models and settings
as bench_ppo.py otherwise). Run by hand:

    python benchmarks/bench_growth.py
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import REPO, Args, build_models, run_ours  # noqa: E402

import reviews_task  # noqa: E402

if __name__ == "__main__":
    os.chdir(REPO)
    reviews_task.ensure_data()
    base = Args(models=os.path.abspath("benchmarks/.models"), iterations=3)
    build_models(base.models)
    rows = []
    for batch, length in [(32, 16), (32, 32), (32, 64), (32, 128), (8, 48), (16, 48), (32, 48), (64, 48)]:
        run = run_ours(Args(**(vars(base) | {"batch": batch, "response_length": length})))
        its = run["iterations"][1:]  # drop the warm-up iteration
        med = {k: statistics.median(r[k] for r in its) for k in ("generate", "rollout_forward", "update")}
        med["total"] = sum(med.values())
        rows.append({"batch": batch, "response_length": length, **med})
        print(f"batch {batch:>3} x {length:>3} tokens: {med['total']:6.2f} s/iter (generate {med['generate']:.2f}, "
              f"rollout fw {med['rollout_forward']:.2f}, update {med['update']:.2f}), "
              f"{med['total'] / (batch * length) * 1000:.2f} ms per generated token", flush=True)
    os.makedirs("benchmarks/results", exist_ok=True)
    json.dump(rows, open("benchmarks/results/ppo_growth_cpu_fp32.json", "w"), indent=1)
