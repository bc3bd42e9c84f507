"""Iterative RLHF: label the current policy's samples, retrain the reward model on every label so far, run PPO again.

    python iterate.py                                       # round 0 + 3 rounds, embedded task, simulated annotator
    python iterate.py --kl-coef 0 --out-dir models/iterative_kl0
    python iterate.py --annotator human --label-passes 1 --num-label-prompts 50        # you label each round

Round 0 is the plain pipeline's PPO: the SFT policy against the reward model of the initial preferences. Each later
round r (Stiennon et al. 2020, sec. 3.3; Bai et al. 2022, sec. 4.5, "iterated online RLHF"):
1. sample pairs of responses from round r-1's policy (label.py: the stages' sampling at PPO's temperature);
2. label them with --annotator (a person, or a function such as the embedded task's simulated annotator);
3. train the reward model on all labels so far: the initial file plus every round's (reward_model.py), continuing
   round r-1's reward model or afresh from the SFT model;
4. run PPO from round r-1's policy (or the SFT policy) against the new reward model, the SFT policy staying the
   KL reference (ppo_rlhf.py --init-policy-path);
5. evaluate: ppo_rlhf.py's held-out evaluation (proxy and gold score, KL to SFT, stutter rate), gathered per round
   into {out_dir}/rounds.jsonl.
It runs the stage scripts and reads their outputs; it implements none of their math. A step whose output exists is
not run again, so an interrupted loop continues where it stopped when run with the same arguments.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while tyro loads: one line, no traceback

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    out_dir: str = "models/iterative"
    """round_{r}/ holds each round's labels, reward model and policy; rounds.jsonl the per-round evaluation"""
    sft_model_path: str = "models/sft"
    """the SFT model: the KL reference of every round (and the start of round 0's policy)"""
    reward_model_path: str = "models/reward_model"
    """round 0's reward model, trained on --preference-data (python reward_model.py)"""
    preference_data: tuple[str, ...] = ("data/reviews/preference_train.jsonl",)
    """the labels round 0's reward model was trained on; every later reward model trains on them plus all new labels"""
    prompts: str = "data/reviews/prompts_train.jsonl"
    """prompts for labelling and for PPO: any data source the stages read (file, saved folder, Hub dataset id)"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --prompts"""
    dataset_split: str = "train"
    """the split of --prompts when it has splits"""
    rounds: int = 3
    """rounds after round 0"""
    annotator: str = "reviews_task.py:annotate"
    """'human' (you answer in the terminal) or 'file.py:fn' (prompt, a, b) -> 'A' | 'B' | 'Tie'"""
    num_label_prompts: int = 1000
    """prompts labelled per pass (at most the prompt file's)"""
    label_passes: int = 3
    """passes over the prompts per round, each with new samples (more labels from a small prompt set)"""
    label_against: Literal["policy", "sft"] = "policy"
    """the second response of a pair: another sample of the current policy, or one of the SFT policy"""
    rm_init: Literal["continue", "sft"] = "continue"
    """'continue': train the previous round's reward model further; 'sft': a fresh one from the SFT model"""
    ppo_from: Literal["policy", "sft"] = "policy"
    """'policy': PPO continues from the previous round's policy; 'sft': every round starts from the SFT policy"""
    ppo_iterations: int = 50
    """PPO iterations per round (round 0 included)"""
    kl_coef: float = 0.05
    """PPO's KL coefficient, to the SFT policy"""
    seed: int = 1
    """seed of every stage run (labelling draws new prompts and samples each round and pass)"""
    ppo_args: str = ""
    """more ppo_rlhf.py flags, as one string after '=' (--ppo-args="--rollout-batch-size 32 --vf-coef 0.2")"""
    rm_args: str = ""
    """more reward_model.py flags, as one string after '=' (--rm-args="--learning-rate 1e-4")"""
    label_args: str = ""
    """more label.py flags, as one string after '=' (--label-args="--temperature 1.0")"""


def run(script: str, *flags) -> None:
    """Run a stage script with this Python; its output goes to the terminal, a failure stops the loop."""
    command = [sys.executable, os.path.join(HERE, script), *map(str, flags)]
    print(f"\n$ python {script} {shlex.join(command[2:])}", flush=True)
    if wait_for(command) != 0:
        raise SystemExit(f"error: {script} failed or was stopped (see above); rerun the same command to continue "
                         "from this step")


def wait_for(command: list[str]) -> int:
    """Run `command` to its end and return its exit status. A stop is the child's to make: Ctrl-C in the terminal
    reaches it too (one process group), so this process only waits; a SIGTERM sent to this process is passed on. Either
    way the stage checkpoints at the end of its step, and the rerun goes on from there."""
    child = subprocess.Popen(command)
    handlers = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))}
    try:
        return child.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def split_flags(flags: str, name: str) -> list[str]:
    """--ppo-args and the like, split as a shell would; a quote left open is one line, not a traceback."""
    try:
        return shlex.split(flags)
    except ValueError as e:
        raise SystemExit(f"error: {name} {flags!r}: {e}") from None


def final_eval(model_dir: str) -> dict:
    """The last evaluation row of the run that wrote `model_dir` (its args.json names the run)."""
    with open(os.path.join(model_dir, "args.json")) as f:
        run_name = json.load(f)["run_name"]
    path = os.path.join("runs", run_name, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {model_dir} was trained by the run {run_name}, whose logs are not at {path} (moved, or "
                         "another working folder?): run iterate.py from the folder it ran in")
    rows = [json.loads(line) for line in open(path)]
    out = {}
    for row in rows:
        out.update({k: v for k, v in row.items() if k.startswith("eval/")})
    return out


if __name__ == "__main__":
    args = tyro.cli(Args)
    for flags, name in [(args.ppo_args, "--ppo-args"), (args.rm_args, "--rm-args"), (args.label_args, "--label-args")]:
        split_flags(flags, name)  # all checked before the first round starts
    for path, command in [(args.sft_model_path, "python sft.py"), (args.reward_model_path, "python reward_model.py")]:
        if not os.path.isdir(path):
            raise SystemExit(f"error: {path} does not exist: run `{command}` first, or point the flag at a model")
    source = ["--dataset-split", args.dataset_split, *(["--dataset-config", args.dataset_config]
                                                       if args.dataset_config else [])]  # of --prompts
    ppo_flags = ["--sft-model-path", args.sft_model_path, "--dataset", args.prompts, *source, "--kl-coef", args.kl_coef,
                 "--num-iterations", args.ppo_iterations, "--eval-steps", args.ppo_iterations, "--seed", args.seed,
                 *split_flags(args.ppo_args, "--ppo-args")]  # the later of two equal flags wins: --ppo-args can override these
    labels = list(args.preference_data)
    reward_model, policy = args.reward_model_path, args.sft_model_path
    summary = []
    for r in range(args.rounds + 1):
        round_dir = os.path.join(args.out_dir, f"round_{r}")
        if r > 0:
            # 1.-2. sample pairs from the current policy and label them
            for p in range(args.label_passes):
                out = os.path.join(round_dir, f"labels_{p}.jsonl")
                run("label.py", "--policy-path", policy, "--prompts", args.prompts, *source, "--output", out,
                    "--annotator", args.annotator, "--num-prompts", args.num_label_prompts,
                    "--seed", args.seed * 1000 + r * 10 + p,
                    *(["--policy-b-path", args.sft_model_path] if args.label_against == "sft" else []),
                    *split_flags(args.label_args, "--label-args"))
                if os.path.exists(out):  # all ties: nothing to add
                    labels.append(out)
            # 3. the reward model on every label so far
            new_reward_model = os.path.join(round_dir, "reward_model")
            if not os.path.exists(os.path.join(new_reward_model, "config.json")):
                run("reward_model.py", "--model-name-or-path", args.sft_model_path, "--dataset", *labels,
                    *(["--continue-from", reward_model] if args.rm_init == "continue" else []),
                    "--output-dir", new_reward_model, "--exp-name", f"{os.path.basename(args.out_dir)}_rm{r}",
                    "--seed", args.seed, *split_flags(args.rm_args, "--rm-args"))
            reward_model = new_reward_model
        # 4. PPO against this round's reward model, from the last policy (or SFT); the reference is always SFT
        ppo_dir = os.path.join(round_dir, "ppo")
        if not os.path.exists(os.path.join(ppo_dir, "config.json")):
            run("ppo_rlhf.py", *ppo_flags, "--reward-model-path", reward_model, "--output-dir", ppo_dir,
                "--exp-name", f"{os.path.basename(args.out_dir)}_ppo{r}",
                *(["--init-policy-path", policy] if r > 0 and args.ppo_from == "policy" else []))
        policy = ppo_dir
        # 5. this round's held-out figures
        row = {"round": r, "labels": labels[len(args.preference_data):], **final_eval(ppo_dir)}
        summary.append(row)
        print(f"round {r}: " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/")))
    with open(os.path.join(args.out_dir, "rounds.jsonl"), "w") as f:
        for row in summary:
            f.write(json.dumps(row) + "\n")
    print(f"\nper-round evaluation in {os.path.join(args.out_dir, 'rounds.jsonl')}")
