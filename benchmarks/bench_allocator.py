"""What `keep_freed_memory()` (every stage, CPU runs) is worth: each stage on SmolLM2-135M-Instruct, run with it and
with glibc's defaults (MALLOC_MMAP_MAX_=65536, glibc's own value, set in the environment, which the stages leave
alone), interleaved round by round. By hand, after benchmarks/real_model_check.sh has made /tmp/smollm2_check:

    python benchmarks/bench_allocator.py --work /tmp/smollm2_check --rounds 3

Each run is a few optimizer steps (PPO: iterations) on the chat data real_model_check.sh writes; we report the
median seconds per step over its steps after the first (from the run's metrics.jsonl), and the peak RSS of its
process (os.wait4). Ratios are paired within a round, then their median, because this machine's speed drifts.
"""

import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    work: str = "/tmp/smollm2_check"
    """real_model_check.sh's folder: smollm2/, sft/, rm/ and the chat_*.jsonl files"""
    rounds: int = 3
    """rounds; each runs every stage once per setting, the order of the settings alternating"""
    stages: tuple[str, ...] = ("sft", "reward_model", "dpo", "ppo")
    steps: int = 4
    """optimizer steps per run (PPO: iterations, at least 3)"""
    output: str = ""
    """a JSON file for every run's numbers (empty: none)"""


def command(stage: str, work: str, out: str, steps: int) -> tuple[list[str], str]:
    """-> (the stage's command line, the metric every step logs once)."""
    common = ["--output-dir", out, "--seed", "1", "--eval-reward-fn", ""]
    if stage == "sft":
        return [f"{REPO}/sft.py", "--model-name-or-path", f"{work}/smollm2", "--dataset", f"{work}/chat_sft.jsonl",
                "--max-steps", str(steps), "--per-device-train-batch-size", "8", "--learning-rate", "1e-5",
                "--eval-steps", "1000", "--num-samples", "0", "--num-eval-generations", "0", *common], "train/sft/loss"
    if stage == "reward_model":
        return [f"{REPO}/reward_model.py", "--model-name-or-path", f"{work}/sft", "--dataset",
                f"{work}/chat_pref.jsonl", "--max-steps", str(steps), "--per-device-train-batch-size", "4",
                "--learning-rate", "1e-5", "--num-normalize-samples", "0", "--eval-steps", "1000", *common], \
            "train/rm/loss"
    if stage == "dpo":
        return [f"{REPO}/dpo.py", "--model-name-or-path", f"{work}/sft", "--dataset", f"{work}/chat_pref.jsonl",
                "--max-steps", str(steps), "--per-device-train-batch-size", "4", "--learning-rate", "1e-6",
                "--eval-steps", "1000", "--num-eval-prompts", "0", *common], "train/dpo/loss"
    return [f"{REPO}/ppo_rlhf.py", "--sft-model-path", f"{work}/sft", "--reward-model-path", f"{work}/rm",
            "--dataset", f"{work}/chat_prompts.jsonl", "--num-iterations", str(max(steps - 1, 3)),
            "--rollout-batch-size", "8", "--response-length", "24", "--eval-steps", "1000", "--num-eval-prompts", "0",
            "--learning-rate", "1e-6", *common], "objective/kl"


def run(stage: str, setting: str, args: Args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd, key = command(stage, args.work, f"{tmp}/out", args.steps)
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_MAX_", None)
        if setting == "glibc default":
            env["MALLOC_MMAP_MAX_"] = "65536"  # glibc's own default, and the stages then leave the allocator alone
        proc = subprocess.Popen([sys.executable, *cmd], cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            sys.exit(f"{stage} ({setting}) failed:\n{stderr[-3000:]}")
        rows = [json.loads(line) for path in glob.glob(f"{tmp}/runs/*/metrics.jsonl") for line in open(path)]
        times = [r["time"] for r in rows if key in r]
        steps = [b - a for a, b in zip(times, times[1:])]
        return {"stage": stage, "setting": setting, "step_s": statistics.median(steps), "steps": steps,
                "peak_rss_mb": usage.ru_maxrss / 1024}


if __name__ == "__main__":
    args = tyro.cli(Args)
    results = []
    for r in range(args.rounds):
        for stage in args.stages:
            settings = ["glibc default", "keep_freed_memory"]
            for setting in settings if r % 2 == 0 else settings[::-1]:
                results.append(run(stage, setting, args) | {"round": r})
                row = results[-1]
                print(f"round {r} {stage:12s} {setting:17s} {row['step_s']:6.2f} s/step  {row['peak_rss_mb']:6.0f} MB",
                      flush=True)
    print("\n| stage | glibc default (s/step) | keep_freed_memory | speed-up (paired median) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for stage in args.stages:
        pick = lambda setting: [x for x in results if x["stage"] == stage and x["setting"] == setting]  # noqa: E731
        base, kept = pick("glibc default"), pick("keep_freed_memory")
        ratio = statistics.median(b["step_s"] / k["step_s"] for b, k in zip(base, kept))
        rss = lambda rows: statistics.median(x["peak_rss_mb"] for x in rows)  # noqa: E731
        print(f"| {stage} | {statistics.median(x['step_s'] for x in base):.2f} | "
              f"{statistics.median(x['step_s'] for x in kept):.2f} | {ratio:.2f}x | {rss(base):,.0f} -> {rss(kept):,.0f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
