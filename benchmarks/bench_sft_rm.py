"""SFT and reward-model training throughput: sft.py and reward_model.py against TRL 1.16's SFTTrainer and
RewardTrainer on the same model and data, and both against a plain PyTorch loop doing the same work. By hand:

    python benchmarks/bench_sft_rm.py --trl-python /tmp/trl116/bin/python      # see trl_sft_rm_bench.py for the venv

Same work on every side: the random-init tiny Llama (hidden 256, 4 layers), fp32, batches of 32 examples (SFT:
prompt/completion rows of the embedded task, loss on the completion only; reward model: 32 independent
prompt/chosen/rejected pairs, chosen and rejected in one forward pass, Bradley-Terry loss), AdamW. Runs interleave
(ours, TRL, plain, ours, ...); each run is `--steps` optimizer steps, the first `--warmup` dropped; we report the
median step time as samples per second, and the peak RSS of each run's process. Ratios are paired: taken between
the runs of one round, then their median, because this machine's speed drifts between rounds.

Ours packs each batch without padding by default (`--padding-free`), so besides the padded rows (ours with
--no-padding-free, TRL's defaults, a padded plain loop) there are padding-free ones: a plain loop packing the same
way, and, for SFT, TRL with `padding_free=True` (it flattens the whole batch into one row).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import reviews_task  # noqa: E402
from bench_ppo import build_models, run_script  # noqa: E402
from common import encode_prompt, encode_response, last_token_index  # noqa: E402
from common import pad  # noqa: E402
from plumbing import pack  # noqa: E402


@dataclass
class Args:
    trl_python: str = ""
    """python of a venv with trl==1.16.0 (empty: skip TRL)"""
    runs: int = 3
    """interleaved runs per side"""
    steps: int = 25
    """optimizer steps per run"""
    warmup: int = 5
    """steps dropped at the start of each run"""
    batch: int = 32
    """examples (SFT) or pairs (reward model) per step"""
    models: str = "benchmarks/.models"
    """where the benchmark's random-init models are written"""
    label: str = "cpu_fp32"
    """name of the results file: benchmarks/results/sft_rm_{label}.json"""


def pairwise_data(models: str) -> str:
    """Independent preference pairs (no shared responses, so no side can reuse a forward pass)."""
    path = f"{models}/pairwise/preference_train.jsonl"
    if not os.path.exists(path):
        reviews_task.generate(f"{models}/pairwise", sizes=reviews_task.Sizes(
            sft_train=10, sft_eval=10, pref_train=4000, pref_eval=10, prompts_eval=8, ranking_size=2))
    return path


def run_ours(stage: str, data: str, args: Args, padding_free: bool = True) -> dict:
    flags = [] if padding_free else ["--no-padding-free"]
    flags += ["--model-name-or-path", f"{args.models}/policy", "--dataset", data, "--max-steps", str(args.steps),
             "--per-device-train-batch-size", str(args.batch), "--eval-steps", "1000000", "--save-steps", "1000000",
             "--eval-reward-fn", ""]
    if stage == "sft":
        flags += ["--num-eval-generations", "0", "--num-samples", "0",
                  "--eval-dataset", os.path.join(REPO, reviews_task.DATA_DIR, "sft_eval.jsonl")]
    else:
        flags += ["--normalize-on", "none",
                  "--eval-dataset", os.path.join(REPO, reviews_task.DATA_DIR, "preference_eval.jsonl")]
    rows, peak = run_script("sft.py" if stage == "sft" else "reward_model.py", flags)
    steps = [r["time/step"] for r in rows if "time/step" in r]
    return {"steps": steps[1:], "peak_rss_mb": peak}  # the first interval has no previous step end, as in TRL's


def run_trl(stage: str, data: str, args: Args, padding_free: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([args.trl_python, os.path.join(REPO, "benchmarks/trl_sft_rm_bench.py"), "--stage",
                               "sft" if stage == "sft" else "reward", "--model", f"{args.models}/policy", "--data",
                               data, "--steps", str(args.steps), "--batch", str(args.batch), "--out", f.name]
                              + ["--padding-free"] * padding_free, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.load(open(f.name))


def run_plain(stage: str, data: str, args: Args, padding_free: bool = False) -> dict:
    """The same steps as a bare loop: tokenise, pad (or pack), forward, loss, backward, AdamW. Runs in a child
    process so its peak RSS is its own."""
    code = f"import sys; sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r}); import bench_sft_rm as b; b._plain_child()"
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([sys.executable, "-c", code, stage, data, args.models, str(args.steps), str(args.batch),
                               f.name, str(int(padding_free))], cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.load(open(f.name))


def _plain_child() -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    stage, data, models, steps, batch, out, packed = sys.argv[1:]
    steps, batch, packed = int(steps), int(batch), bool(int(packed))
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(f"{models}/policy")
    rows = [json.loads(line) for line in open(data)][: steps * batch]
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(f"{models}/policy")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(f"{models}/policy", num_labels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times, last = [], time.perf_counter()
    for s in range(steps):
        chunk = rows[s * batch: (s + 1) * batch]
        prompts = [encode_prompt(tok, r["prompt"], 64)[0] for r in chunk]
        if stage == "sft":
            completions = [encode_response(tok, r["completion"], 48)[0] for r in chunk]
            seqs = [p + c for p, c in zip(prompts, completions)]
            if packed:  # rows of several examples, positions restarting with each
                ids, positions, starts = pack(seqs, tok.pad_token_id)
                inputs = dict(input_ids=ids, position_ids=positions, use_cache=False)
            else:
                ids, mask = pad(seqs, tok.pad_token_id)
                inputs, starts = dict(input_ids=ids, attention_mask=mask), [(i, 0) for i in range(len(seqs))]
            labels = torch.full_like(ids, -100)
            for (r, c), p, s in zip(starts.tolist() if packed else starts, prompts, seqs):
                labels[r, c + len(p): c + len(s)] = ids[r, c + len(p): c + len(s)]
            logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        else:
            seqs = [p + encode_response(tok, r[k], 48)[0] for k in ("chosen", "rejected") for p, r in zip(prompts, chunk)]
            if packed:
                ids, positions, starts = pack(seqs, tok.pad_token_id)
                hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
                scores = model.score(hidden[starts[:, 0], starts[:, 1] + torch.tensor([len(s) - 1 for s in seqs])])
            else:
                ids, mask = pad(seqs, tok.pad_token_id)
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                scores = model.score(hidden[torch.arange(len(seqs)), last_token_index(mask)])
            scores = scores.squeeze(-1)
            chosen, rejected = scores.chunk(2)
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    json.dump({"steps": times[1:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
              open(out, "w"))


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.chdir(REPO)
    args.models = os.path.abspath(args.models)
    reviews_task.ensure_data()
    build_models(args.models)
    data = {"sft": os.path.join(REPO, reviews_task.DATA_DIR, "sft_train.jsonl"), "reward": pairwise_data(args.models)}
    sides = {"ours": (run_ours, True), "plain loop, packed": (run_plain, True),
             "ours, --no-padding-free": (run_ours, False), "plain loop": (run_plain, False)}
    if args.trl_python:
        sides |= {"TRL 1.16": (run_trl, False), "TRL 1.16, padding_free=True": (run_trl, True)}
    results = {stage: {side: [] for side in sides if stage == "sft" or "padding_free=" not in side} for stage in data}
    for i in range(args.runs):
        for stage in data:
            for side in results[stage]:
                fn, padding_free = sides[side]
                results[stage][side].append(fn(stage, data[stage], args, padding_free))
        print(f"run {i + 1}/{args.runs} done", flush=True)
    summary = {}
    for stage, by_side in results.items():
        # medians per run; ratios are taken within each round of runs (paired) and then their median, since this
        # machine's speed drifts by 20% between rounds
        per_run = {side: [statistics.median(run["steps"][args.warmup - 1:]) for run in runs]
                   for side, runs in by_side.items()}
        summary[stage] = {}
        for side, runs in by_side.items():
            med = statistics.median(t for run in runs for t in run["steps"][args.warmup - 1:])
            summary[stage][side] = {"median_step_s": med, "samples_per_s": args.batch / med,
                                    "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                                    "paired": {other: statistics.median(b / a for a, b in zip(per_run[side],
                                                                                               per_run[other]))
                                               for other in by_side}}  # speed of side relative to other
    os.makedirs("benchmarks/results", exist_ok=True)
    json.dump({"args": vars(args), "summary": summary, "raw": results},
              open(f"benchmarks/results/sft_rm_{args.label}.json", "w"), indent=1)
    for stage, by_side in summary.items():
        print(f"\n| {stage} | samples / s | peak RSS MB | vs plain loop | vs packed loop |"
              + (" vs TRL |" if args.trl_python else ""))
        print("| --- | --- | --- | --- | --- |" + (" --- |" if args.trl_python else ""))
        for side, r in by_side.items():
            line = (f"| {side} | {r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['paired']['plain loop']:.2f} | {r['paired']['plain loop, packed']:.2f} |")
            if args.trl_python:
                line += f" {r['paired']['TRL 1.16']:.2f}x |"
            print(line)
