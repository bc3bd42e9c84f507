"""GRPO and RLOO seconds per iteration: grpo.py (with and without --share-prompt) against TRL 1.16's GRPOTrainer and
RLOOTrainer on the same work. Run by hand, never in CI:

    python benchmarks/bench_grpo.py --trl-python /tmp/trl116/bin/python        # see trl_grpo_bench.py for the venv
    python benchmarks/bench_grpo.py --trl-python /tmp/trl116/bin/python --workload smollm2 --algorithms grpo
    python benchmarks/bench_grpo.py --trl-python /tmp/trl116/bin/python --workload long

Workloads, fp32 on both sides, 8 prompts x 8 responses per iteration at temperature 0.7, 2 optimizer steps per
iteration (so both compute the rollout's log-probs in a separate pass):
- tiny: bench_ppo.py's random-init tiny Llama policy (hidden 256, 4 layers: every response runs the full length) and a
  reward model of the same shape, or with `--models DIR` any DIR/policy and DIR/reward (the default chain's models/sft
  and models/reward_model: responses that end early and unequal); the reviews prompts, at most 48 new tokens.
- smollm2: SmolLM2-135M-Instruct (`--smollm2`, the folder benchmarks/convert_smollm2.py writes) on the arithmetic task's
  prompts in its chat template (about 38 tokens with its default system turn), scored by the task's verifier (no reward
  model), at most 48 new tokens, learning rate 1e-5.
- long: the tiny pair on prompts of 256 tokens (the reviews prompts run together, cut), 64-token responses.
GRPO: no KL term (no reference model), token-level loss, group std. RLOO: k1 in the reward with beta 0.05 (a reference
pass), leave-one-out baseline. Runs interleave (ours, ours without sharing, TRL, ours, ...); each run's first
iteration is a warm-up and dropped; we report medians over the rest, the peak RSS of each process and the mean
response length each side sampled (the same work only if those agree).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import REPO, build_models, run_script  # noqa: E402


@dataclass
class Args:
    trl_python: str = ""
    """python of a venv with trl==1.16.0 (empty: ours alone, with and without sharing)"""
    workload: Literal["tiny", "smollm2", "long"] = "tiny"
    """the models, prompts and lengths (above)"""
    algorithms: tuple[str, ...] = ("grpo", "rloo")
    runs: int = 3
    """interleaved runs per side"""
    iterations: int = 5
    """iterations per run, the first dropped as warm-up"""
    models: str = "benchmarks/.models"
    """tiny and long: policy/ and reward/ here; made (random-init, bench_ppo.py's) when missing"""
    smollm2: str = "/tmp/smollm2"
    """smollm2: the converted SmolLM2-135M-Instruct folder"""
    sides: tuple[str, ...] = ("ours", "unshared", "trl")
    """ours (--share-prompt, the default), unshared (--no-share-prompt), trl"""
    label: str = ""
    """name of the results file: benchmarks/results/grpo_{label}.json (default: the workload's name)"""


FLAGS = {"grpo": ["--kl-coef", "0"],  # TRL's beta 0; ours would default to 0.05 with a reward model
         "rloo": ["--advantage", "rloo", "--kl-coef", "0.05", "--kl-in", "reward", "--kl-estimator", "k1"]}


def workload(args: Args) -> dict:
    """The policy, the reward (a reward model's folder or the verifier), the prompts file, lengths, learning rate."""
    if args.workload == "smollm2":
        prompts = os.path.join(REPO, "benchmarks/.data/arithmetic_prompts.jsonl")
        if not os.path.exists(prompts):
            sys.path.insert(0, REPO)
            import arithmetic_task

            arithmetic_task.generate(os.path.dirname(prompts) + "/arithmetic")
            os.replace(os.path.dirname(prompts) + "/arithmetic/prompts_train.jsonl", prompts)
        return dict(policy=args.smollm2, reward="arithmetic_task.py:verify", prompts=prompts, response_length=48,
                    prompt_length=128, learning_rate=1e-5)
    build_models(args.models)
    models = os.path.abspath(args.models)
    prompts = os.path.join(REPO, "data/reviews/prompts_train.jsonl")
    if args.workload == "long":
        prompts = long_prompts(f"{models}/policy", prompts, 256)
    return dict(policy=f"{models}/policy", reward=f"{models}/reward", prompts=prompts,
                response_length=64 if args.workload == "long" else 48, prompt_length=256 if args.workload == "long"
                else 64, learning_rate=1e-4)


def long_prompts(tokenizer_dir: str, source: str, length: int) -> str:
    """64 prompts of exactly `length` tokens each: the reviews prompts run together and cut, written once."""
    out = os.path.join(REPO, f"benchmarks/.data/long_prompts_{length}.jsonl")
    if not os.path.exists(out):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ids = [t for line in open(source) for t in tokenizer(json.loads(line)["prompt"] + " ")["input_ids"]]
        ids = ids * (64 * length // len(ids) + 1)  # round again as often as it takes
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            for k in range(64):
                chunk = ids[k * length: (k + 1) * length]  # re-encoding the decoded text gives these tokens back
                f.write(json.dumps({"prompt": tokenizer.decode(chunk)}) + "\n")
    return out


def run_ours(args: Args, work: dict, algorithm: str, share: bool) -> dict:
    reward = ["--reward-fn", work["reward"]] if work["reward"].endswith(":verify") else [
        "--reward-model-path", work["reward"]]
    flags = ["--sft-model-path", work["policy"], *reward, "--rollout-batch-size", "8", "--num-generations", "8",
             "--response-length", str(work["response_length"]), "--max-prompt-length", str(work["prompt_length"]),
             "--num-mini-batches", "2", "--temperature", "0.7", "--num-iterations", str(args.iterations),
             "--eval-steps", "1000000", "--save-steps", "1000000", "--num-eval-prompts", "0", "--no-eval-kl",
             "--eval-reward-fn", "", "--dataset", work["prompts"], "--learning-rate", str(work["learning_rate"]),
             "--missing-eos-penalty", "0", "--share-prompt" if share else "--no-share-prompt", *FLAGS[algorithm]]
    rows, peak = run_script("grpo.py", flags)
    rows = [r for r in rows if "time/update" in r]
    return {"iterations": [{"total": r["time/generate"] + r["time/score"] + r["time/logprobs"] + r["time/update"],
                            "generate": r["time/generate"]} for r in rows],
            "response_length": statistics.mean(r["val/response_length"] for r in rows[1:]), "peak_rss_mb": peak}


def run_trl(args: Args, work: dict, algorithm: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([args.trl_python, os.path.join(REPO, "benchmarks/trl_grpo_bench.py"), "--trainer",
                               algorithm, "--policy", work["policy"], "--reward", work["reward"], "--iterations",
                               str(args.iterations), "--prompts", work["prompts"], "--response-length",
                               str(work["response_length"]), "--learning-rate", str(work["learning_rate"]),
                               "--out", f.name], cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.load(open(f.name))


if __name__ == "__main__":
    args = tyro.cli(Args)
    sides = [s for s in args.sides if s != "trl" or args.trl_python]
    work = workload(args)
    results = {"workload": args.workload}
    for algorithm in args.algorithms:
        runs = {side: [] for side in sides}
        for _ in range(args.runs):
            for side in sides:
                runs[side].append(run_trl(args, work, algorithm) if side == "trl" else
                                  run_ours(args, work, algorithm, side == "ours"))
                print(algorithm, side, [round(r["total"], 3) for r in runs[side][-1]["iterations"]], flush=True)
        summary = {}
        for side, side_runs in runs.items():
            times = [r["total"] for run in side_runs for r in run["iterations"][1:]]
            summary[side] = {"median_s": statistics.median(times), "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs),
                             "response_length": statistics.mean(r["response_length"] for r in side_runs),
                             "iterations": len(times),
                             "runs_median_s": [statistics.median(r["total"] for r in run["iterations"][1:])
                                               for run in side_runs]}
            if side != "trl":
                summary[side]["generate_s"] = statistics.median(r["generate"] for run in side_runs
                                                                for r in run["iterations"][1:])
        for side in sides[1:]:
            summary[f"ours_vs_{side}"] = summary[side]["median_s"] / summary[sides[0]]["median_s"]
        results[algorithm] = summary
        print(algorithm, json.dumps(summary), flush=True)
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    json.dump(results, open(os.path.join(REPO, "benchmarks", "results", f"grpo_{args.label or args.workload}.json"), "w"),
              indent=1)
