"""TRL 1.16's GRPOTrainer or RLOOTrainer on the benchmark's models, timed per iteration (one generation and the
optimizer steps on it). Run by bench_grpo.py in TRL's own venv:

    python -m venv /tmp/trl116 && /tmp/trl116/bin/pip install torch==2.13.0 && /tmp/trl116/bin/pip install trl==1.16.0
    /tmp/trl116/bin/python benchmarks/trl_grpo_bench.py --trainer grpo --policy benchmarks/.models/policy \
        --reward benchmarks/.models/reward --out t.json

`--reward` is a reward model's folder, or `arithmetic_task.py:verify` (the verifier, given each record's answer).
Prompts go through the chat template when the tokenizer has one (as conversations, as ours renders them). Writes the
seconds of each iteration (the sum over its optimizer steps; the first step of each includes generation and scoring),
the mean completion length TRL logged and the process's peak RSS as JSON.
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--trainer", choices=["grpo", "rloo"], default="grpo")
parser.add_argument("--policy", required=True)
parser.add_argument("--reward", required=True)
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--prompts", default="data/reviews/prompts_train.jsonl")
parser.add_argument("--iterations", type=int, default=4)
parser.add_argument("--batch", type=int, default=8, help="prompts per iteration")
parser.add_argument("--num-generations", type=int, default=8)
parser.add_argument("--num-mini-batches", type=int, default=2, help="optimizer steps per iteration")
parser.add_argument("--response-length", type=int, default=48)
parser.add_argument("--out", required=True)
args = parser.parse_args()


class Timer(TrainerCallback):
    def __init__(self):
        self.steps, self.last = [], time.perf_counter()

    def on_step_end(self, *a, **k):  # once per optimizer step
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now


tokenizer = AutoTokenizer.from_pretrained(args.policy)
records = [json.loads(line) for line in open(args.prompts)]
prompts = [[{"role": "user", "content": r["prompt"]}] if tokenizer.chat_template else r["prompt"] for r in records]
dataset = Dataset.from_dict({"prompt": prompts, "answer": [r.get("answer", "") for r in records]})
responses = args.batch * args.num_generations
common = dict(output_dir="/tmp/trl_grpo_bench_out", per_device_train_batch_size=responses // args.num_mini_batches,
              steps_per_generation=args.num_mini_batches, gradient_accumulation_steps=1,
              num_generations=args.num_generations, max_completion_length=args.response_length, temperature=0.7,
              top_k=0, top_p=1.0, max_steps=args.iterations * args.num_mini_batches, learning_rate=args.learning_rate,
              report_to="none", save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(), seed=1,
              num_iterations=1, epsilon=0.2, disable_dropout=True,
              gradient_checkpointing=False, bf16=False)  # TRL's defaults turn both on: fp32, no recompute, as ours
if args.trainer == "grpo":  # beta 0 (no reference), token-level loss over the batch, the group's std
    config = GRPOConfig(**common, beta=0.0, loss_type="dapo", scale_rewards="group")
    Trainer = GRPOTrainer
else:  # k1 in the reward with beta 0.05, leave-one-out baseline
    config = RLOOConfig(**common, beta=0.05)
    Trainer = RLOOTrainer
if args.reward.endswith(":verify"):  # the arithmetic task's verifier, as grpo.py's --reward-fn calls it (None: 0)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from arithmetic_task import verify

    def correct(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [verify(None, t, a) or 0.0 for t, a in zip(texts, answer)]
    reward_funcs, reward_tokenizers = [correct], None
else:
    reward_funcs = [AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)]
    reward_tokenizers = [tokenizer]
trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(args.policy), reward_funcs=reward_funcs,
                  args=config, train_dataset=dataset, processing_class=tokenizer, reward_processing_classes=reward_tokenizers)
timer = Timer()
trainer.add_callback(timer)
timer.last = time.perf_counter()
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = args.num_mini_batches
iterations = [{"total": sum(timer.steps[i: i + n])} for i in range(0, len(timer.steps), n)]
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]  # per iteration
json.dump({"iterations": iterations, "peak_rss_mb": peak, "response_length": sum(lengths[1:]) / max(len(lengths[1:]), 1)},
          open(args.out, "w"), indent=1)
print(json.dumps({"iterations": len(iterations), "peak_rss_mb": peak}))
