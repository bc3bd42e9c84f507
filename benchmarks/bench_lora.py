"""LoRA against full fine-tuning on a real model: peak memory and seconds per iteration of ppo_rlhf.py and dpo.py on
SmolLM2-135M-Instruct, the same work each way. Run by hand, never in CI:

    python benchmarks/convert_smollm2.py --gguf .../SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2
    pip install peft
    python benchmarks/bench_lora.py --model /tmp/smollm2 --rounds 2

PPO: 8 prompts of the embedded task per iteration, 32-token responses, a separate value model from the SFT model,
the reward a function (reward_functions.py:positivity, so no reward model is held), 4 iterations. DPO: 8 pairs per
step, 12 steps. fp32, one process. Full and LoRA runs alternate (full, LoRA, full, LoRA...); each run is a fresh
process, peak RSS from /usr/bin/time; seconds per iteration are the median over each run's iterations after the first
(a warm-up), then the median over rounds. With LoRA the reference is the policy with its adapters off: one copy of the
weights fewer, and AdamW's two moments for the adapters only.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    model: str = "/tmp/smollm2"
    """a Hugging Face folder: SmolLM2-135M-Instruct as benchmarks/convert_smollm2.py makes it"""
    rounds: int = 2
    """full/LoRA pairs per script"""
    lora_r: int = 16
    """LoRA rank"""


def run(script: str, flags: list[str], work: str) -> tuple[float, float]:
    """One fresh process -> (peak RSS in MiB, median seconds per iteration after the first)."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, os.path.join(REPO, script), *flags], cwd=work,
                          capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    (run_dir,) = [d for d in os.listdir(os.path.join(work, "runs"))]
    with open(os.path.join(work, "runs", run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    if script == "dpo.py":
        seconds = [r["time/step"] for r in rows if "time/step" in r]
    else:
        seconds = [r["time/generate"] + r["time/rollout_forward"] + r["time/update"] for r in rows if "time/update" in r]
    return peak, statistics.median(seconds[1:])


def main(args: Args) -> None:
    data = os.path.join(REPO, "data", "reviews")
    if not os.path.exists(os.path.join(data, "prompts_train.jsonl")):
        sys.path.insert(0, REPO)
        import reviews_task

        reviews_task.ensure_data()
    common = ["--eval-reward-fn", "", "--num-eval-prompts", "0", "--save-steps", "100000", "--eval-steps", "100000",
              "--no-resume"]
    scripts = {
        "ppo_rlhf.py": ["--sft-model-path", args.model, "--dataset", f"{data}/prompts_train.jsonl", "--eval-dataset",
                        "none", "--reward-fn", "reward_functions.py:positivity", "--rollout-batch-size", "8",
                        "--response-length", "32", "--num-iterations", "4", "--value-model", "separate", *common],
        "dpo.py": ["--model-name-or-path", args.model, "--dataset", f"{data}/preference_train.jsonl", "--eval-dataset",
                   "none", "--eval-prompts", "none", "--per-device-train-batch-size", "8", "--max-steps", "12", *common],
    }
    results = {}
    for script, flags in scripts.items():
        for _ in range(args.rounds):
            for name, extra in (("full", []), ("lora", ["--lora-r", str(args.lora_r)])):
                with tempfile.TemporaryDirectory() as work:
                    peak, seconds = run(script, [*flags, *extra, "--output-dir", f"{work}/out"], work)
                results.setdefault((script, name), []).append((peak, seconds))
                print(f"{script} {name}: peak {peak:.0f} MiB, {seconds:.2f} s/iteration", flush=True)
    print("\n| script | training | peak RSS (MiB) | s / iteration | LoRA / full, time |")
    print("| --- | --- | --- | --- | --- |")
    for script in scripts:
        full_time = statistics.median(s for _, s in results[(script, "full")])
        for name in ("full", "lora"):
            peak = statistics.median(p for p, _ in results[(script, name)])
            seconds = statistics.median(s for _, s in results[(script, name)])
            print(f"| {script} | {name} | {peak:.0f} | {seconds:.2f} | {seconds / full_time:.2f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
