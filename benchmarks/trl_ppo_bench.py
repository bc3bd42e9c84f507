"""TRL 1.12's PPOTrainer on the benchmark's models, timed per iteration. Run by bench_ppo.py in TRL's own venv:

    python -m venv /tmp/trl112 && /tmp/trl112/bin/pip install torch==2.13.0 && /tmp/trl112/bin/pip install trl==1.12.0
    /tmp/trl112/bin/python benchmarks/trl_ppo_bench.py --models benchmarks/.models --iterations 4 --out t.json

Splits each iteration into generation (TRL's batch_generation), other rollout forwards (its forward/get_reward
helpers, under no_grad) and the rest (the PPO update), and writes them as JSON.
"""

import argparse
import json
import resource
import time

import torch
import trl.experimental.ppo.ppo_trainer as ppo_module
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--models", required=True)
parser.add_argument("--prompts", default="data/reviews/prompts_train.jsonl")
parser.add_argument("--iterations", type=int, default=4)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--response-length", type=int, default=48)
parser.add_argument("--dtype", default="float32")
parser.add_argument("--out", required=True)
args = parser.parse_args()

clock = {"generate": 0.0, "rollout_forward": 0.0}


def timed(name, fn):
    def wrapper(*a, **k):
        if torch.is_grad_enabled():  # the update phase calls `forward` too: count only the no-grad rollout calls
            return fn(*a, **k)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        clock[name] += time.perf_counter() - t0
        return out
    return wrapper


ppo_module.batch_generation = timed("generate", ppo_module.batch_generation)
ppo_module.forward = timed("rollout_forward", ppo_module.forward)
ppo_module.get_reward = timed("rollout_forward", ppo_module.get_reward)


class Timer(TrainerCallback):
    def __init__(self):
        self.rows, self.last = [], time.perf_counter()

    def on_step_end(self, *a, **k):  # once per PPO iteration (rollout + all epochs)
        now = time.perf_counter()
        total = now - self.last
        self.rows.append({"total": total, "generate": clock["generate"], "rollout_forward": clock["rollout_forward"],
                          "update": total - clock["generate"] - clock["rollout_forward"]})
        clock["generate"] = clock["rollout_forward"] = 0.0
        self.last = now


dtype = getattr(torch, args.dtype)
tokenizer = AutoTokenizer.from_pretrained(f"{args.models}/policy")
prompts = [json.loads(line)["prompt"] for line in open(args.prompts)]


def encode(prompt):
    """As ppo_rlhf.py does: through the chat template when the model has one, else plain text with a BOS."""
    if tokenizer.chat_template is None:
        return tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


dataset = Dataset.from_dict({"input_ids": [encode(p) for p in prompts]})
# TRL's rollout batch is per_device_train_batch_size * gradient_accumulation_steps, split into num_mini_batches;
# so 32 prompts in 2 minibatches of 16 is 16 x 2 here (with 1 accumulation step, TRL would roll out only 16)
config = PPOConfig(output_dir="/tmp/trl_ppo_bench_out", per_device_train_batch_size=args.batch // 2,
                   gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=4,
                   response_length=args.response_length, temperature=0.7, total_episodes=args.batch * args.iterations,
                   learning_rate=1e-4, kl_coef=0.05, report_to="none", num_sample_generations=0, save_strategy="no",
                   logging_steps=1, use_cpu=not torch.cuda.is_available(), bf16=args.dtype == "bfloat16", seed=1,
                   missing_eos_penalty=None, stop_token=None)
trainer = PPOTrainer(
    args=config, processing_class=tokenizer, train_dataset=dataset,
    model=AutoModelForCausalLM.from_pretrained(f"{args.models}/policy", dtype=dtype),
    ref_model=AutoModelForCausalLM.from_pretrained(f"{args.models}/policy", dtype=dtype),
    reward_model=AutoModelForSequenceClassification.from_pretrained(f"{args.models}/reward", num_labels=1, dtype=dtype),
    value_model=AutoModelForSequenceClassification.from_pretrained(f"{args.models}/reward", num_labels=1, dtype=dtype),
)
timer = Timer()
trainer.add_callback(timer)
timer.last = time.perf_counter()
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
json.dump({"iterations": timer.rows, "peak_rss_mb": peak}, open(args.out, "w"), indent=1)
print(json.dumps({"iterations": len(timer.rows), "peak_rss_mb": peak}))
