#!/usr/bin/env bash
# The experiments of docs/experiments.md (sections 1-4), docs/human_feedback.md (5-6), docs/verifiable.md (7),
# docs/grpo.md (8), docs/distill.md (9) and docs/tools.md (10), after the default chain has made models/sft and
# models/reward_model (python sft.py && python reward_model.py). About 50 minutes on 2 CPU cores for sections 1-4, 80
# more for 5-6. Then
#   python docs/make_figures.py        # runs/*/metrics.jsonl -> docs/figures/*.png
set -euo pipefail
# 1. kl_coef sweep, 60 iterations each (0.05 is the default)
for kl in 0 0.05 0.2 0.5; do
  python ppo_rlhf.py --kl-coef $kl --exp-name ppo_kl$kl --output-dir models/ppo_kl$kl
done
# 2. reward hacking: no KL penalty for 200 iterations, evaluated every 40
python ppo_rlhf.py --kl-coef 0 --num-iterations 200 --eval-steps 40 --exp-name ppo_hacking --output-dir models/ppo_hacking
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
# 4b. GRPO and RLOO (grpo.py) from the same SFT model and reward model at several kl_coef, the KL as k1 in the reward
#     like PPO's penalty (kl_coef 0 is grpo.py's default): the frontier with PPO and DPO
for kl in 0 0.05 0.2 0.5; do
  python grpo.py --kl-coef $kl --kl-in reward --kl-estimator k1 --exp-name grpo_kl$kl --output-dir models/grpo_kl$kl
  python grpo.py --advantage rloo --kl-coef $kl --kl-in reward --kl-estimator k1 --exp-name rloo_kl$kl \
    --output-dir models/rloo_kl$kl
done
# 5. iterative RLHF (docs/human_feedback.md): one 200-iteration PPO run against 4 rounds of 50 (label the policy's
#    samples with the simulated annotator, continue the reward model on all labels, PPO from the last policy)
for kl in 0 0.05; do
  python ppo_rlhf.py --kl-coef $kl --num-iterations 200 --eval-steps 20 --exp-name hf_single_kl$kl --output-dir models/hf_single_kl$kl
  python iterate.py --kl-coef $kl --out-dir models/iterative_kl$kl --ppo-args="--eval-steps 10"
done
mkdir -p models/iterative_kl0_vs_sft && cp -r models/iterative_kl0/round_0 models/iterative_kl0_vs_sft/   # same round 0
python iterate.py --kl-coef 0 --label-against sft --out-dir models/iterative_kl0_vs_sft --ppo-args="--eval-steps 10"
# 6. rewards that resist hacking, 200 iterations without a KL penalty: an ensemble of 3 reward models (seeds 1-3;
#    mean, and mean - std) and a hybrid (the reward model plus 3 x a repetition rule)
for seed in 2 3; do
  python reward_model.py --seed $seed --output-dir models/reward_model_s$seed --exp-name rm_seed$seed
done
for k in 0 1; do
  python ppo_rlhf.py --kl-coef 0 --num-iterations 200 --eval-steps 20 --reward-model-path models/reward_model \
    models/reward_model_s2 models/reward_model_s3 --ensemble-k $k --exp-name hf_ensemble_k${k}_kl0 --output-dir models/hf_ensemble_k${k}_kl0
done
python ppo_rlhf.py --kl-coef 0 --num-iterations 200 --eval-steps 20 --reward-model-path models/reward_model \
  --reward-fn reward_functions.py:repetition_penalty --reward-fn-weights 3 --exp-name hf_hybrid_kl0 --output-dir models/hf_hybrid_kl0
# 7. checkable answers (docs/verifiable.md): the tiny model learns the arithmetic task in SFT (20 epochs, 11 minutes),
#    then GRPO (KL in the loss, in the reward, none), RLOO and PPO against the verifier, seeds 1-3 (about an hour)
python arithmetic_task.py
python sft.py --dataset data/arithmetic/sft_train.jsonl --eval-dataset data/arithmetic/sft_eval.jsonl --num-epochs 20 \
  --output-dir models/sft_arith --exp-name sft_arith
ARITH="--sft-model-path models/sft_arith --dataset data/arithmetic/prompts_train.jsonl --eval-dataset data/arithmetic/prompts_eval.jsonl
  --reward-fn arithmetic_task.py:verify --eval-reward-fn arithmetic_task.py:verify --response-length 48 --num-eval-prompts 200
  --eval-steps 10 --num-iterations 40 --eval-pass-k 4"
for seed in 1 2 3; do
  python grpo.py $ARITH --kl-coef 0.05 --kl-in loss --seed $seed --exp-name grpo_arith_kl_loss \
    --output-dir models/grpo_arith_kl_loss_s$seed
  python grpo.py $ARITH --kl-coef 0.05 --seed $seed --exp-name grpo_arith_kl --output-dir models/grpo_arith_kl_s$seed
  python grpo.py $ARITH --seed $seed --exp-name grpo_arith --output-dir models/grpo_arith_s$seed
  python grpo.py $ARITH --advantage rloo --seed $seed --exp-name rloo_arith --output-dir models/rloo_arith_s$seed
  python ppo_rlhf.py $ARITH --rollout-batch-size 128 --num-ppo-epochs 1 --num-mini-batches 4 --kl-coef 0 --seed $seed \
    --exp-name ppo_arith --output-dir models/ppo_arith_s$seed
done
# 8. GRPO's 2025-26 variants on the same task (docs/grpo.md): GSPO with its paper's clip range, CISPO with
#    ScaleRL's ratio cap (TRL's epsilon_high 5.0), and GRPO on the top 20% of tokens by entropy; seeds 1-3 (about 45
#    minutes on 2 cores). Then the sampler/trainer gap of SmolLM2-135M-Instruct in bf16 against fp32 (section 7's
#    GGUF conversion, /tmp/smollm2; 4 iterations each, no evaluation)
for seed in 1 2 3; do
  python grpo.py $ARITH --importance-sampling-level sequence --cliprange 3e-4 --cliprange-high 4e-4 --seed $seed \
    --exp-name gspo_arith --output-dir models/gspo_arith_s$seed
  python grpo.py $ARITH --policy-loss cispo --cliprange-high 4 --seed $seed --exp-name cispo_arith \
    --output-dir models/cispo_arith_s$seed
  python grpo.py $ARITH --top-entropy-quantile 0.2 --seed $seed --exp-name entropy_arith \
    --output-dir models/entropy_arith_s$seed
done
python arithmetic_task.py --out-dir data/arithmetic_1op --min-steps 1 --max-steps 1 --max-operand 20 \
    --sizes.sft-train 300 --sizes.sft-eval 50 --sizes.prompts-train 400 --sizes.prompts-eval 100
for precision in --bf16 --no-bf16; do
  python grpo.py --sft-model-path /tmp/smollm2 --dataset data/arithmetic_1op/prompts_train.jsonl \
    --reward-fn arithmetic_task.py:verify --response-length 48 --rollout-batch-size 8 --num-generations 4 \
    --num-mini-batches 2 --learning-rate 1e-5 --num-iterations 4 --num-eval-prompts 0 --no-eval-kl $precision \
    --exp-name gap_smollm2$precision --output-dir /tmp/gap_smollm2$precision
done
# 9. on-policy distillation (docs/distill.md): section 7's SFT model learns from seed 1's GRPO policy (the teacher),
#    reverse KL and JSD, seeds 1-3 (about 40 minutes); then SmolLM2-135M-Instruct on one-operation sums: GRPO against
#    the verifier for 20 iterations (the teacher, and RL's own curve), and the same start distilled from it
DIST="--model-name-or-path models/sft_arith --teacher-model-path models/grpo_arith_s1
  --dataset data/arithmetic/prompts_train.jsonl --eval-dataset data/arithmetic/prompts_eval.jsonl
  --eval-reward-fn arithmetic_task.py:verify --response-length 48 --num-eval-prompts 200 --eval-steps 10
  --num-iterations 40 --eval-pass-k 4"
for seed in 1 2 3; do
  python distill.py $DIST --seed $seed --exp-name distill_rkl_arith --output-dir models/distill_rkl_arith_s$seed
  python distill.py $DIST --loss jsd --seed $seed --exp-name distill_jsd_arith --output-dir models/distill_jsd_arith_s$seed
done
SMOL1="--dataset data/arithmetic_1op/prompts_train.jsonl --eval-dataset data/arithmetic_1op/prompts_eval.jsonl
  --eval-reward-fn arithmetic_task.py:verify --response-length 48 --eval-pass-k 1 --num-eval-prompts 100
  --eval-steps 10 --learning-rate 1e-5 --num-iterations 20"
python grpo.py --sft-model-path /tmp/smollm2 $SMOL1 --reward-fn arithmetic_task.py:verify --rollout-batch-size 8 \
  --num-generations 4 --num-mini-batches 2 --no-eval-kl --exp-name grpo_smollm2_arith --output-dir /tmp/grpo_smol
python distill.py --model-name-or-path /tmp/smollm2 --teacher-model-path /tmp/grpo_smol $SMOL1 --rollout-batch-size 32 \
  --exp-name distill_smollm2_arith --output-dir /tmp/distill_smol
# 10. tool calls inside rollouts (docs/tools.md): the calculator task's tiny chat model learns in SFT to call the
#     calculator on about half the problems (15 epochs, 6 minutes), then GRPO with the tool and without it, seeds 1-3
#     (about 1 minute a run); then SmolLM2-135M-Instruct: a short SFT on the same kind of demonstrations (3 epochs of
#     631 rows), GRPO with the tool and without it (seed 1)
python calculator_task.py
python sft.py --model-name-or-path models/tiny-chat --dataset data/calculator/sft_train.jsonl --eval-dataset none \
  --num-epochs 15 --num-eval-generations 0 --output-dir models/sft_calc --exp-name sft_calc
CALC="--sft-model-path models/sft_calc --dataset data/calculator/prompts_train.jsonl
  --eval-dataset data/calculator/prompts_eval.jsonl --reward-fn calculator_task.py:verify
  --eval-reward-fn calculator_task.py:verify --response-length 64 --num-eval-prompts 200 --eval-steps 10
  --num-iterations 40 --eval-pass-k 1"
for seed in 1 2 3; do
  python grpo.py $CALC --tools calculator_task.py:multiply --seed $seed --exp-name grpo_calc_tools \
    --output-dir models/grpo_calc_tools_s$seed
  python grpo.py $CALC --seed $seed --exp-name grpo_calc --output-dir models/grpo_calc_s$seed
done
python calculator_task.py --out-dir data/calculator_smol --model-dir "" --sizes.sft-train 400 \
  --sizes.prompts-train 400 --sizes.prompts-eval 100
python sft.py --model-name-or-path /tmp/smollm2 --dataset data/calculator_smol/sft_train.jsonl --eval-dataset none \
  --num-epochs 3 --learning-rate 5e-5 --max-prompt-length 128 --num-eval-generations 0 --output-dir /tmp/sft_smol_calc \
  --exp-name sft_smollm2_calc
SMOLC="--sft-model-path /tmp/sft_smol_calc --dataset data/calculator_smol/prompts_train.jsonl
  --eval-dataset data/calculator_smol/prompts_eval.jsonl --reward-fn calculator_task.py:verify
  --eval-reward-fn calculator_task.py:verify --response-length 64 --num-eval-prompts 100 --eval-steps 10
  --num-iterations 20 --eval-pass-k 1 --rollout-batch-size 8 --num-generations 4 --num-mini-batches 2
  --learning-rate 1e-5 --no-eval-kl"
python grpo.py $SMOLC --tools calculator_task.py:multiply --exp-name grpo_smollm2_calc_tools --output-dir /tmp/grpo_smol_calc_tools
python grpo.py $SMOLC --exp-name grpo_smollm2_calc --output-dir /tmp/grpo_smol_calc
