#!/usr/bin/env bash
# SFT steps of the embedded tiny model on 1 process against 2 (torchrun, gloo), the same global batch of 32, on the CPU.
# Interleaved, 3 rounds; prints the median seconds per step of each (the first 5 steps left out: warm-up).
#   bash benchmarks/bench_processes.sh            # from the repository root, after `python sft.py` made the tiny model
set -euo pipefail
repo=$(pwd)
out=$(mktemp -d)
common=(--max-steps 40 --eval-dataset none --num-samples 0 --num-eval-generations 0 --save-steps 1000 --eval-steps 1000)
for round in 1 2 3; do
  (cd "$out" && mkdir -p "one$round" && cd "one$round" && TQDM_DISABLE=1 python "$repo/sft.py" "${common[@]}" \
     --model-name-or-path "$repo/models/tiny-llama" --dataset "$repo/data/reviews/sft_train.jsonl" \
     --output-dir out --per-device-train-batch-size 32 > log 2>&1)
  for strategy in ddp fsdp; do
    (cd "$out" && mkdir -p "two$strategy$round" && cd "two$strategy$round" && TQDM_DISABLE=1 OMP_NUM_THREADS=1 \
       python -m torch.distributed.run --standalone --nproc-per-node 2 "$repo/sft.py" "${common[@]}" \
       --model-name-or-path "$repo/models/tiny-llama" --dataset "$repo/data/reviews/sft_train.jsonl" \
       --output-dir out --per-device-train-batch-size 16 --strategy $strategy > log 2>&1)
  done
done
python - "$out" <<'PY'
import glob, json, statistics, sys
for name in ("one", "twoddp", "twofsdp"):
    runs = []
    for folder in sorted(glob.glob(f"{sys.argv[1]}/{name}[0-9]")):
        (metrics,) = glob.glob(f"{folder}/runs/*/metrics.jsonl")
        steps = [r["time/step"] for r in map(json.loads, open(metrics)) if "time/step" in r][5:]
        runs.append(statistics.median(steps))
    print(f"{name:8s} median s/step per round: {' '.join(f'{t:.4f}' for t in runs)}   median {statistics.median(runs):.4f}")
PY
