"""GRPO and RLOO seconds per iteration: grpo.py against TRL 1.16's GRPOTrainer and RLOOTrainer on the same work. Run by
hand, never in CI:

    python benchmarks/bench_grpo.py --trl-python /tmp/trl116/bin/python        # see trl_grpo_bench.py for the venv

Same work on both sides: bench_ppo.py's random-init tiny Llama policy (hidden 256, 4 layers: every response runs the
full length) and a reward model of the same shape, or with `--models DIR` any DIR/policy and DIR/reward (the default
chain's models/sft and models/reward_model: responses that end early and unequal), fp32; 8 prompts x 8 responses per
iteration, at most 48 tokens, temperature 0.7, 2 optimizer steps per iteration (so both compute the rollout's
log-probs in a separate pass). GRPO: no KL term (no reference model), token-level loss, group std. RLOO: k1 in the
reward with beta 0.05 (a reference pass), leave-one-out baseline. Runs interleave (ours, TRL, ours, TRL, ...); each
run's first iteration is a warm-up and dropped; we report medians over the rest, and the peak RSS of each process.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import REPO, build_models, run_script  # noqa: E402


@dataclass
class Args:
    trl_python: str
    """python of a venv with trl==1.16.0"""
    runs: int = 3
    """interleaved runs per side"""
    iterations: int = 5
    """iterations per run, the first dropped as warm-up"""
    models: str = "benchmarks/.models"
    """policy/ and reward/ here; made (random-init, bench_ppo.py's) when missing"""
    prompts: str = "data/reviews/prompts_train.jsonl"
    label: str = "cpu_fp32"
    """name of the results file: benchmarks/results/grpo_{label}.json"""


FLAGS = {"grpo": ["--kl-coef", "0"],  # TRL's beta 0; ours would default to 0.05 with a reward model
         "rloo": ["--advantage", "rloo", "--kl-coef", "0.05", "--kl-in", "reward", "--kl-estimator", "k1"]}


def run_ours(args: Args, algorithm: str) -> dict:
    models = os.path.abspath(args.models)
    flags = ["--sft-model-path", f"{models}/policy", "--reward-model-path", f"{models}/reward",
             "--rollout-batch-size", "8", "--num-generations", "8", "--response-length", "48", "--num-mini-batches", "2",
             "--temperature", "0.7", "--num-iterations", str(args.iterations), "--eval-steps", "1000000",
             "--save-steps", "1000000", "--num-eval-prompts", "0", "--no-eval-kl", "--eval-reward-fn", "",
             "--dataset", os.path.abspath(args.prompts), "--learning-rate", "1e-4", *FLAGS[algorithm]]
    rows, peak = run_script("grpo.py", flags)
    return {"iterations": [{"total": r["time/generate"] + r["time/score"] + r.get("time/logprobs", 0) + r["time/update"]}
                           for r in rows if "time/update" in r], "peak_rss_mb": peak}


def run_trl(args: Args, algorithm: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([args.trl_python, os.path.join(REPO, "benchmarks/trl_grpo_bench.py"), "--trainer",
                               algorithm, "--models", os.path.abspath(args.models), "--iterations", str(args.iterations),
                               "--prompts", os.path.abspath(args.prompts), "--out", f.name],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.load(open(f.name))


if __name__ == "__main__":
    args = tyro.cli(Args)
    build_models(args.models)
    results = {}
    for algorithm in ("grpo", "rloo"):
        runs = {"ours": [], "trl": []}
        for _ in range(args.runs):
            runs["ours"].append(run_ours(args, algorithm))
            runs["trl"].append(run_trl(args, algorithm))
        summary = {}
        for side, side_runs in runs.items():
            times = [r["total"] for run in side_runs for r in run["iterations"][1:]]
            summary[side] = {"median_s": statistics.median(times), "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs),
                             "iterations": len(times)}
        summary["speedup"] = summary["trl"]["median_s"] / summary["ours"]["median_s"]
        results[algorithm] = summary
        print(algorithm, json.dumps(summary))
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    json.dump(results, open(os.path.join(REPO, "benchmarks", "results", f"grpo_{args.label}.json"), "w"), indent=1)
