"""DPO training throughput: dpo.py against TRL 1.16's DPOTrainer on the same model and data. By hand:

    python benchmarks/bench_dpo.py --trl-python /tmp/trl116/bin/python     # the venv: see trl_sft_rm_bench.py

Equal work on both sides: the random-init tiny Llama of bench_ppo.py (hidden 256, 4 layers) as policy and reference,
fp32, 32 independent prompt/chosen/rejected pairs per step (no shared responses, so neither side can reuse a
forward), the sigmoid loss at beta 0.1, AdamW, and the reference's log-probs computed the same way: in the loop
("inline"), or before training ("precomputed"). Then TRL at its own defaults (bf16 autocast and gradient
checkpointing on; one round only). Runs interleave (ours, TRL, ours, ...); each is `--steps` optimizer steps, the
first `--warmup` dropped; the median step time is reported as pairs per second, with the peak RSS of each run's
process. Ratios are paired: taken within a round, then their median, because this machine's speed drifts.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench_ppo import build_models, run_script  # noqa: E402
from bench_sft_rm import pairwise_data  # noqa: E402


@dataclass
class Args:
    trl_python: str = ""
    """python of a venv with trl==1.16.0"""
    runs: int = 3
    """interleaved rounds"""
    steps: int = 20
    """optimizer steps per run"""
    warmup: int = 4
    """steps dropped at the start of each run"""
    batch: int = 32
    """pairs per step"""
    models: str = "benchmarks/.models"
    """where the benchmark's random-init models are written"""


def run_ours(data: str, args: Args, precompute: bool) -> dict:
    flags = ["--model-name-or-path", f"{args.models}/policy", "--dataset", data, "--max-steps", str(args.steps),
             "--per-device-train-batch-size", str(args.batch), "--eval-steps", "1000000", "--save-steps", "1000000",
             "--eval-dataset", "none", "--eval-prompts", "none", "--eval-reward-fn", "", "--learning-rate", "1e-4"]
    rows, peak = run_script("dpo.py", flags + ["--precompute-ref-logprobs"] * precompute)
    steps = [r["time/step"] for r in rows if "time/step" in r]
    return {"steps": steps[1:], "peak_rss_mb": peak}  # the first interval has no previous step end, as in TRL's


def run_trl(data: str, args: Args, precompute: bool, defaults: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([args.trl_python, os.path.join(REPO, "benchmarks/trl_sft_rm_bench.py"), "--stage", "dpo",
                               "--model", f"{args.models}/policy", "--data", data, "--steps", str(args.steps),
                               "--batch", str(args.batch), "--out", f.name] + ["--precompute-ref"] * precompute
                              + ["--trl-defaults"] * defaults, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.load(open(f.name))


if __name__ == "__main__":
    args = tyro.cli(Args)
    args.models = os.path.abspath(args.models)  # the runs start in scratch folders
    build_models(args.models)
    data = pairwise_data(args.models)
    sides = {"ours, inline": lambda: run_ours(data, args, False), "TRL, inline": lambda: run_trl(data, args, False),
             "ours, precomputed": lambda: run_ours(data, args, True),
             "TRL, precomputed": lambda: run_trl(data, args, True),
             "TRL, its defaults": lambda: run_trl(data, args, False, defaults=True)}
    results = {name: [] for name in sides}
    for round_ in range(args.runs):
        for name, run in sides.items():
            if name == "TRL, its defaults" and round_ > 0:
                continue  # bf16 autocast without bf16 units and recomputation: slow, and far from the others
            out = run()
            results[name].append({"median_s": statistics.median(out["steps"][args.warmup:]), "rss": out["peak_rss_mb"]})
            print(f"round {round_ + 1}: {name:18s} {args.batch / results[name][-1]['median_s']:7.1f} pairs/s  "
                  f"peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)
    print(f"\n| side | pairs/s (median of {args.runs}) | ours / side (paired median) | peak RSS MB |\n|---|---|---|---|")
    for name, runs in results.items():
        ours = results["ours, precomputed" if "precomputed" in name else "ours, inline"]
        ratio = statistics.median(r["median_s"] / o["median_s"] for r, o in zip(runs, ours))  # zip: paired rounds
        print(f"| {name} | {statistics.median(args.batch / r['median_s'] for r in runs):.1f} | {ratio:.2f}x | "
              f"{statistics.median(r['rss'] for r in runs):.0f} |")
