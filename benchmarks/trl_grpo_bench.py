"""TRL 1.16's GRPOTrainer or RLOOTrainer on the benchmark's models, timed per iteration (one generation and the
optimizer steps on it). Run by bench_grpo.py in TRL's own venv:

    python -m venv /tmp/trl116 && /tmp/trl116/bin/pip install torch==2.13.0 && /tmp/trl116/bin/pip install trl==1.16.0
    /tmp/trl116/bin/python benchmarks/trl_grpo_bench.py --trainer grpo --models benchmarks/.models --out t.json

Writes the seconds of each iteration (the sum over its optimizer steps; the first step of each includes generation
and scoring) and the process's peak RSS as JSON.
"""

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--trainer", choices=["grpo", "rloo"], default="grpo")
parser.add_argument("--models", required=True)
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


tokenizer = AutoTokenizer.from_pretrained(f"{args.models}/policy")
prompts = [json.loads(line)["prompt"] for line in open(args.prompts)]
dataset = Dataset.from_dict({"prompt": prompts})
responses = args.batch * args.num_generations
common = dict(output_dir="/tmp/trl_grpo_bench_out", per_device_train_batch_size=responses // args.num_mini_batches,
              steps_per_generation=args.num_mini_batches, gradient_accumulation_steps=1,
              num_generations=args.num_generations, max_completion_length=args.response_length, temperature=0.7,
              top_k=0, top_p=1.0, max_steps=args.iterations * args.num_mini_batches, learning_rate=1e-4,
              report_to="none", save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(), seed=1,
              num_iterations=1, epsilon=0.2, disable_dropout=True,
              gradient_checkpointing=False, bf16=False)  # TRL's defaults turn both on: fp32, no recompute, as ours
if args.trainer == "grpo":  # beta 0 (no reference), token-level loss over the batch, the group's std
    config = GRPOConfig(**common, beta=0.0, loss_type="dapo", scale_rewards="group")
    Trainer = GRPOTrainer
else:  # k1 in the reward with beta 0.05, leave-one-out baseline
    config = RLOOConfig(**common, beta=0.05)
    Trainer = RLOOTrainer
reward_model = AutoModelForSequenceClassification.from_pretrained(f"{args.models}/reward", num_labels=1)
trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(f"{args.models}/policy"), reward_funcs=[reward_model],
                  args=config, train_dataset=dataset, processing_class=tokenizer, reward_processing_classes=[tokenizer])
timer = Timer()
trainer.add_callback(timer)
timer.last = time.perf_counter()
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = args.num_mini_batches
iterations = [{"total": sum(timer.steps[i: i + n])} for i in range(0, len(timer.steps), n)]
json.dump({"iterations": iterations, "peak_rss_mb": peak}, open(args.out, "w"), indent=1)
print(json.dumps({"iterations": len(iterations), "peak_rss_mb": peak}))
