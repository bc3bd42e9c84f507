"""PPO seconds per iteration: ppo_rlhf.py against TRL 1.12's PPOTrainer on the same work, and both against the
plain-PyTorch floor for that work on this machine. Run by hand, never in CI:

    python benchmarks/bench_ppo.py --trl-python /tmp/trl112/bin/python        # see trl_ppo_bench.py for the venv

Same work on both sides: one tiny Llama policy (hidden 256, 4 layers, random init, so every response runs the full
48 tokens), a separate value model and a reward model of the same shape, fp32, 32 prompts per iteration, 48-token
responses, 4 PPO epochs, 2 minibatches, temperature 0.7. Runs interleave (ours, TRL, ours, TRL, ...); in each run
the first iteration is a warm-up and dropped; we report medians over the rest, split into generation, the other
rollout forwards and the update, plus generated tokens per second and peak RSS of the process. Two references
for "the limit": the same iteration written as a bare PyTorch loop (KV-cache decode, three no-grad forwards,
eight forward+backward+AdamW steps), and a compute bound (the iteration's matmul FLOPs at the measured peak).
"""

import json
import os
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
from common import encode_prompt, pad  # noqa: E402
from plumbing import keep_freed_memory  # noqa: E402


@dataclass
class Args:
    trl_python: str = ""
    """python of a venv with trl==1.12.0 (empty: skip TRL)"""
    runs: int = 3
    """interleaved runs per side"""
    iterations: int = 4
    """iterations per run, the first dropped as warm-up"""
    batch: int = 32
    """prompts per iteration"""
    response_length: int = 48
    """tokens per response"""
    models: str = "benchmarks/.models"
    """where the benchmark's random-init models are written"""
    ours_extra: str = ""
    """extra flags for ppo_rlhf.py, e.g. --ours-extra='--value-model shared' for the 'best configuration' row"""
    best_extra: str = ""
    """flags for a third side, interleaved with the others: ours in its best configuration, e.g.
    --best-extra='--value-model shared'"""
    prompts: str = f"{reviews_task.DATA_DIR}/prompts_train.jsonl"
    """prompt-only JSONL (rendered through the chat template on both sides when the model has one)"""
    floor: bool = True
    """also time the plain-PyTorch loop and the compute bound (tiny model only)"""
    trl_env: str = ""
    """environment variables for TRL's process, e.g. --trl-env='MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647'
    gives it the allocator setting our scripts make on CPU (keep_freed_memory)"""
    label: str = "cpu_fp32"
    """name of the results file: benchmarks/results/ppo_{label}.json"""


def build_models(out: str) -> None:
    """A random-init tiny Llama policy and a same-shape sequence classifier for reward and value."""
    if os.path.exists(f"{out}/reward/config.json"):
        return
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    reviews_task.ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(reviews_task.TINY_MODEL_DIR)
    policy = reviews_task.build_tiny_model(tokenizer, hidden_size=256, num_layers=4, seed=0)
    policy.save_pretrained(f"{out}/policy")
    tokenizer.save_pretrained(f"{out}/policy")
    config = policy.config
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(f"{out}/reward")
    tokenizer.save_pretrained(f"{out}/reward")


def run_script(script: str, flags: list[str]) -> tuple[list[dict], float]:
    """Run one of our scripts in a child process with progress bars off, in a scratch directory; return the rows of
    its metrics.jsonl and its peak RSS in MB. Shared with bench_sft_rm.py."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import resource, runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__'); "
                "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        proc = subprocess.run([sys.executable, "-c", code, REPO, os.path.join(REPO, script), *flags,
                               "--output-dir", f"{tmp}/out", "--no-resume"],
                              cwd=tmp, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        (run_dir,) = os.listdir(f"{tmp}/runs")
        rows = [json.loads(line) for line in open(f"{tmp}/runs/{run_dir}/metrics.jsonl")]
    return rows, float(proc.stdout.split("PEAK_RSS_MB")[-1])


def run_ours(args: Args, extra: str = "") -> dict:
    flags = ["--sft-model-path", f"{args.models}/policy", "--reward-model-path", f"{args.models}/reward",
             "--rollout-batch-size", str(args.batch), "--response-length", str(args.response_length),
             "--num-ppo-epochs", "4", "--num-mini-batches", "2", "--temperature", "0.7",
             "--num-iterations", str(args.iterations), "--eval-steps", "1000000", "--save-steps", "1000000",
             "--num-eval-prompts", "1", "--eval-reward-fn", "", "--dataset", os.path.abspath(args.prompts),
             "--eval-dataset", os.path.join(REPO, reviews_task.DATA_DIR, "prompts_eval.jsonl"),
             *(extra or args.ours_extra).split()]
    rows, peak = run_script("ppo_rlhf.py", flags)
    rows = [{"generate": r["time/generate"], "rollout_forward": r["time/rollout_forward"],
             "update": r["time/update"]} for r in rows if "time/update" in r]
    return {"iterations": rows, "peak_rss_mb": peak}


def run_trl(args: Args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([args.trl_python, os.path.join(REPO, "benchmarks/trl_ppo_bench.py"), "--models",
                               os.path.abspath(args.models), "--iterations", str(args.iterations), "--batch",
                               str(args.batch), "--response-length", str(args.response_length), "--out", f.name,
                               "--prompts", os.path.abspath(args.prompts)],
                              cwd=REPO, capture_output=True, text=True,
                              env=os.environ | dict(pair.split("=", 1) for pair in args.trl_env.split()))
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.load(open(f.name))


@torch.no_grad()
def plain_pytorch_floor(args: Args) -> dict:
    """The same iteration's work in the plainest PyTorch: a KV-cache decode loop, three no-grad forwards (reference,
    value, reward: the policy's log-probs can come from generation), and 8 forward+backward+AdamW steps on
    16 sequences for policy and value."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(f"{args.models}/policy")
    ref = AutoModelForCausalLM.from_pretrained(f"{args.models}/policy")
    value = AutoModelForSequenceClassification.from_pretrained(f"{args.models}/reward")
    reward = AutoModelForSequenceClassification.from_pretrained(f"{args.models}/reward")
    prompts = [json.loads(line)["prompt"] for line in open(args.prompts)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{args.models}/policy")
    queries, mask = pad([encode_prompt(tok, p, 64)[0] for p in prompts[: args.batch]], tok.pad_token_id, side="left")
    times = {}
    t0 = time.perf_counter()  # decode loop with a KV cache
    out = policy(input_ids=queries, attention_mask=mask, use_cache=True)
    tokens = []
    for _ in range(args.response_length):
        nxt = torch.multinomial(torch.softmax(out.logits[:, -1] / 0.7, -1), 1)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = policy(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    times["generate"] = time.perf_counter() - t0
    seqs = torch.cat([queries, *tokens], 1)
    t0 = time.perf_counter()
    n_logits = args.response_length + 1  # the minimal work: the LM head only where it predicts response tokens
    ref(input_ids=seqs, attention_mask=mask, logits_to_keep=n_logits)
    for m in (value, reward):
        m.score(m.model(input_ids=seqs, attention_mask=mask).last_hidden_state)
    times["rollout_forward"] = time.perf_counter() - t0
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-5, eps=1e-5, fused=True)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for _ in range(4 * 2):
            idx = torch.randperm(args.batch)[: args.batch // 2]
            logits = policy(input_ids=seqs[idx], attention_mask=mask[idx], logits_to_keep=n_logits).logits
            hidden = value.model(input_ids=seqs[idx], attention_mask=mask[idx]).last_hidden_state
            values = value.score(hidden[:, -n_logits:])
            (logits.float().logsumexp(-1).mean() + values.mean()).backward()
            opt.step()
            opt.zero_grad()
    times["update"] = time.perf_counter() - t0
    return times


def compute_bound(args: Args) -> dict:
    """Seconds the iteration's matmul FLOPs need at this machine's measured peak (a large fp32 matmul): a hard lower
    bound that no implementation can beat. FLOPs: 2 per parameter per token forward, 6 forward+backward."""
    from transformers import AutoModelForCausalLM

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    peak = 10 * 2 * 2048 ** 3 / (time.perf_counter() - t0)  # FLOP/s
    n_policy = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(f"{args.models}/policy").parameters())
    n_value = n_policy - 1024 * 256  # no LM head (tied embeddings: the head is the embedding matrix)
    tokens = args.batch * (12 + args.response_length)  # prompts are ~12 tokens
    flops = {"generate": 2 * n_policy * args.batch * args.response_length,
             "rollout_forward": 2 * (n_policy + 2 * n_value) * tokens,  # reference, value, reward
             "update": 4 * 6 * (n_policy + n_value) * tokens}  # 4 epochs over the batch, policy and value
    return {k: v / peak for k, v in flops.items()} | {"peak_gflops": peak / 1e9}


def summarise(runs: list[dict]) -> dict:
    rows = [r for run in runs for r in run["iterations"][1:]]  # drop each run's warm-up iteration
    med = {k: statistics.median(r[k] for r in rows) for k in ("generate", "rollout_forward", "update")}
    med["total"] = statistics.median(r["generate"] + r["rollout_forward"] + r["update"] for r in rows)
    med["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    return med


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.chdir(REPO)
    args.models = os.path.abspath(args.models)
    reviews_task.ensure_data()
    build_models(args.models)
    results = {"ours": [], "trl": [], "best": []}
    for i in range(args.runs):  # interleaved: ours, TRL, ours (best), ours, TRL, ...
        results["ours"].append(run_ours(args))
        if args.trl_python:
            results["trl"].append(run_trl(args))
        if args.best_extra:
            results["best"].append(run_ours(args, args.best_extra))
        print(f"run {i + 1}/{args.runs} done", flush=True)
    table = {}
    if args.floor:
        keep_freed_memory(torch.device("cpu"))  # our scripts' allocator setting on CPU: the floor stays a floor
        plain_pytorch_floor(args)  # warm-up
        floors = [plain_pytorch_floor(args) for _ in range(args.runs)]
        floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
        floor["total"] = sum(floor.values())
        bound = compute_bound(args)
        bound["total"] = bound["generate"] + bound["rollout_forward"] + bound["update"]
        table = {"flop bound": bound, "plain loop": floor}
    else:
        floors, bound, floor = [], {"total": float("nan"), "peak_gflops": float("nan")}, {"total": float("nan")}
    table["ours"] = summarise(results["ours"])
    if results["trl"]:
        table["trl"] = summarise(results["trl"])
    if results["best"]:
        table["ours (best)"] = summarise(results["best"])
    tokens = args.batch * args.response_length
    print(f"\nPPO, {args.batch} prompts x {args.response_length} tokens, 4 epochs x 2 minibatches ({args.label}); "
          f"medians of {args.runs} runs x {args.iterations - 1} iterations")
    print(f"matmul peak {bound['peak_gflops']:.0f} GFLOP/s; 'bound/total' = share of the compute-bound limit reached")
    print(f"{'':<12}{'total s':>9}{'generate':>10}{'rollout fw':>11}{'update':>9}{'gen tok/s':>11}{'peak RSS MB':>13}"
          f"{'bound/total':>13}{'loop/total':>12}")
    for name, row in table.items():
        print(f"{name:<12}{row['total']:>9.3f}{row['generate']:>10.3f}{row['rollout_forward']:>11.3f}"
              f"{row['update']:>9.3f}{tokens / row['generate']:>11.0f}{row.get('peak_rss_mb', 0):>13.0f}"
              f"{bound['total'] / row['total']:>13.2f}{floor['total'] / row['total']:>12.2f}")
    for name, key in (("ours", "ours"), ("ours (best)", "best")):
        if "trl" in table and name in table:
            paired = [summarise([trl])["total"] / summarise([ours])["total"]  # run i of each side, run back to back
                      for ours, trl in zip(results[key], results["trl"])]
            print(f"{name} vs TRL: {table['trl']['total'] / table[name]['total']:.2f}x iteration throughput "
                  f"(run by run: {', '.join(f'{r:.2f}x' for r in paired)})")
    os.makedirs("benchmarks/results", exist_ok=True)
    json.dump({"args": vars(args), "table": table, "raw": results, "floor_runs": floors},
              open(f"benchmarks/results/ppo_{args.label}.json", "w"), indent=1)
