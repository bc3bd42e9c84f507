"""A large dataset in: time and peak memory to read 200,000 SFT rows from JSONL, Parquet and a `save_to_disk` folder,
and of `sft.py` from start to the end of its first optimizer step on each. By hand:

    python benchmarks/bench_data_sources.py --rows 200000 --runs 3

The rows are the embedded task's SFT demonstrations, each prompt lengthened with a numbered filler sentence so that
no two rows are equal and a row is about 600 characters (the mean of common chat SFT sets is several times that; the
stages cut tokens at --max-prompt-length / --max-completion-length anyway). Every measurement is a fresh process;
peak memory is its maximum resident set (`/usr/bin/time -f %M`). Parquet runs once on an empty `datasets` cache
(it writes an Arrow copy of the file there first) and then on the filled cache. A 1,000-row JSONL run gives the
fixed cost (Python, torch, the model) that the rows add to. Medians over --runs.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import reviews_task  # noqa: E402


@dataclass
class Args:
    rows: int = 200_000
    """rows in the large dataset"""
    runs: int = 3
    """measurements per source (medians reported)"""
    out: str = "benchmarks/results/data_sources.json"
    """where the figures are written"""


def measure(command: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one fresh process."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    seconds, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024


if __name__ == "__main__":
    args = tyro.cli(Args)
    import datasets

    work = tempfile.mkdtemp(prefix="bench_data_")
    reviews_task.generate(os.path.join(work, "task"), seed=0)
    with open(os.path.join(work, "task", "sft_train.jsonl")) as f:
        demos = [json.loads(line) for line in f]
    filler = "Please keep the answer short, friendly and about the product described above, row number {}. "
    rows = [{"prompt": d["prompt"] + " " + filler.format(i) * 4, "completion": d["completion"]}
            for i, d in zip(range(args.rows), (demos[i % len(demos)] for i in range(args.rows)))]
    paths = {"jsonl": os.path.join(work, "big.jsonl"), "parquet": os.path.join(work, "big.parquet"),
             "saved": os.path.join(work, "big_saved")}
    with open(paths["jsonl"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    small = os.path.join(work, "small.jsonl")
    with open(small, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:1000])
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(paths["parquet"])
    ds.save_to_disk(paths["saved"])
    del ds, rows
    sizes = {k: sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(p) for f in fs) if os.path.isdir(p)
             else os.path.getsize(p) for k, p in paths.items()}
    print("files (MiB):", {k: round(v / 2**20, 1) for k, v in sizes.items()})

    env = os.environ | {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    sft = [sys.executable, os.path.join(REPO, "sft.py"), "--max-steps", "1", "--per-device-train-batch-size", "32",
           "--eval-steps", "1000", "--num-eval-generations", "2", "--num-samples", "2", "--eval-reward-fn", ""]
    read = [sys.executable, "-c", "import sys; from common import read_data; print(len(read_data(sys.argv[1], 'sft')))"]
    measure([*sft, "--dataset", small, "--output-dir", os.path.join(work, "out")], env, work)  # makes the tiny model
    results, fresh = {}, iter(range(10**6))
    for label, source, cold in [("jsonl 1k rows", small, False), ("jsonl", paths["jsonl"], False),
                                ("parquet, empty cache", paths["parquet"], True), ("parquet", paths["parquet"], False),
                                ("saved folder", paths["saved"], False)]:
        reads, runs = [], []
        for run in range(args.runs):  # a cold run gets a new, empty cache folder for each process
            cache = lambda: {"HF_DATASETS_CACHE": os.path.join(work, f"cache{next(fresh)}" if cold else "cache")}  # noqa: E731
            reads.append(measure([*read, source], env | cache(), work))
            out = os.path.join(work, "out")
            runs.append(measure([*sft, "--dataset", source, "--output-dir", out], env | cache(), work))
        results[label] = {"read_s": statistics.median(r[0] for r in reads),
                          "read_peak_mib": statistics.median(r[1] for r in reads),
                          "sft_first_step_s": statistics.median(r[0] for r in runs),
                          "sft_peak_mib": statistics.median(r[1] for r in runs)}
        print(label, {k: round(v, 1) for k, v in results[label].items()}, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": args.rows, "file_mib": sizes, "runs": args.runs, "results": results}, f, indent=1)
    print("| source | read: s | read: peak MiB | sft.py to first step: s | sft.py peak MiB |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['read_s']:.1f} | {r['read_peak_mib']:.0f} | {r['sft_first_step_s']:.1f} | "
              f"{r['sft_peak_mib']:.0f} |")
