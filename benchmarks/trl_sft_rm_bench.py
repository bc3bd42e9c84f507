"""TRL 1.16's SFTTrainer, RewardTrainer or DPOTrainer on the benchmark's model and data, timed per optimizer step.
Run by bench_sft_rm.py (SFT, reward model) and bench_dpo.py (DPO) in TRL's own venv:

    python -m venv /tmp/trl116 && /tmp/trl116/bin/pip install torch==2.13.0 && /tmp/trl116/bin/pip install trl==1.16.0
    /tmp/trl116/bin/python benchmarks/trl_sft_rm_bench.py --stage sft --model benchmarks/.models/policy \
        --data data/reviews/sft_train.jsonl --steps 25 --out t.json

TRL 1.16's configs default to bf16=True (autocast) and gradient_checkpointing=True; both are turned off here so the
work is the same as ours (fp32, no recomputation), unless --trl-defaults. On a CPU without bf16 units (AVX2 only)
the defaults run about 27x slower.

The step time is the interval between consecutive `on_step_end` callbacks, so it covers everything the trainer does
per step (collation, forward, backward, optimizer, its own metrics), as bench_sft_rm.py measures ours.
"""

import argparse
import json
import resource
import time

from datasets import Dataset
from transformers import TrainerCallback

parser = argparse.ArgumentParser()
parser.add_argument("--stage", choices=["sft", "reward", "dpo"], required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--out", required=True)
parser.add_argument("--padding-free", action="store_true", help="SFT only: padding_free=True (the batch as one row)")
parser.add_argument("--precompute-ref", action="store_true", help="DPO only: precompute_ref_log_probs=True")
parser.add_argument("--trl-defaults", action="store_true",
                    help="keep TRL's defaults bf16=True (autocast) and gradient_checkpointing=True")
args = parser.parse_args()


class Timer(TrainerCallback):
    def __init__(self):
        self.steps, self.last = [], None

    def on_step_end(self, *a, **k):
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now


rows = [json.loads(line) for line in open(args.data)][: args.batch * args.steps]
common = dict(per_device_train_batch_size=args.batch, max_steps=args.steps, max_length=128, save_strategy="no",
              eval_strategy="no", logging_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
              disable_tqdm=True, seed=1, output_dir="/tmp/trl_sft_rm_bench_out")
if not args.trl_defaults:  # the same work as ours: fp32 without autocast, no recomputation (TRL turns both on)
    common |= dict(bf16=False, gradient_checkpointing=False)
if args.padding_free:  # TRL requires max_length=None here; no row of ours comes near 128 tokens anyway
    common["max_length"] = None
timer = Timer()
if args.stage == "sft":
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=args.model, args=SFTConfig(learning_rate=2e-3, padding_free=args.padding_free, **common),
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                          for r in rows]), callbacks=[timer])
elif args.stage == "dpo":  # the reference is the policy's own starting point, as in dpo.py
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=args.model, args=DPOConfig(learning_rate=1e-4, beta=0.1,
                                                          precompute_ref_log_probs=args.precompute_ref, **common),
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                          for r in rows]), callbacks=[timer])
else:
    from trl import RewardConfig, RewardTrainer

    trainer = RewardTrainer(model=args.model, args=RewardConfig(learning_rate=5e-4, **common),
                            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                             for r in rows]), callbacks=[timer])
trainer.train()
json.dump({"steps": timer.steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
          open(args.out, "w"))
