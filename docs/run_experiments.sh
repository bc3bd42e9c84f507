#!/usr/bin/env bash
# The experiments of docs/experiments.md, on the embedded task, after the default chain has made models/sft and
# models/reward_model (python sft.py && python reward_model.py). About 35 minutes on 2 CPU cores. Then
#   python docs/make_figures.py        # runs/*/metrics.jsonl -> docs/figures/*.png
set -euo pipefail
# 1. kl_coef sweep, 60 iterations each (0.05 is the default)
for kl in 0 0.05 0.2 0.5; do
  python ppo_rlhf.py --kl-coef $kl --exp-name ppo_kl$kl --output-dir models/ppo_kl$kl
done
# 2. reward hacking: no KL penalty for 200 iterations, evaluated every 40
python ppo_rlhf.py --kl-coef 0 --num-iterations 200 --eval-every 40 --exp-name ppo_hacking --output-dir models/ppo_hacking
# 3. the reward model against the number of labelled pairs (rankings of 4), on the same 600 held-out pairs
for n in 10000 30000 60000; do
  python reviews_task.py --out-dir data/reviews_$n --sizes.pref-train $n > /dev/null
  python reward_model.py --dataset data/reviews_$n/preference_train.jsonl --eval-dataset data/reviews/preference_eval.jsonl \
    --eval-reward-fn reviews_task.py:gold_score --normalize-on none --exp-name rm_pairs$n --output-dir models/reward_model_$n
done
# 4. DPO from the same SFT model on the same labels, at several beta (0.1 is the default): the PPO-DPO frontier
for beta in 0.03 0.1 0.3 1.0; do
  python dpo.py --beta $beta --exp-name dpo_beta$beta --output-dir models/dpo_beta$beta
done
