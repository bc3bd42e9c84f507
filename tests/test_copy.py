"""Copy three files and go: a stage script, common.py and plumbing.py, alone in an empty folder, run on a model and
data of the user's (no reviews_task.py beside them, no VADER importable) and save a model that loads."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

SHARED = ("common.py", "plumbing.py")


def run_copy(script, tmp_path, *args):
    """Copy `script`, common.py and plumbing.py into tmp_path/copy and run it there, where the embedded task cannot be
    found."""
    folder = tmp_path / "copy"
    folder.mkdir(exist_ok=True)
    for name in (script, *SHARED):
        shutil.copy(os.path.join(REPO, name), folder)
    blocked = tmp_path / "blocked" / "vaderSentiment"  # the embedded task's judge must not be needed
    blocked.mkdir(parents=True, exist_ok=True)
    (blocked / "__init__.py").write_text("raise ImportError('VADER is not installed here')\n")
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONPATH": str(tmp_path / "blocked")}
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=folder, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert set(os.listdir(folder)) <= {script, *SHARED, "runs", "out", "__pycache__"}  # no data/, no models/
    return folder


def test_sft_copied_alone(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"The {w} was", "completion": " fine."}
                                                for w in ("pasta", "soup", "plot", "view", "bed", "tea")])
    folder = run_copy("sft.py", tmp_path, "--model-name-or-path", model_dir, "--dataset", data, "--output-dir", "out",
                      "--max-steps", "2", "--num-eval-generations", "2")
    AutoModelForCausalLM.from_pretrained(folder / "out")


def test_a_copied_script_with_no_flags_says_what_to_give(tmp_path):
    """The defaults name the embedded task, whose generator stays in the repository: a copied script run bare says so
    in one line and names the flags to give."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("sft.py", *SHARED):
        shutil.copy(os.path.join(REPO, name), folder)
    proc = subprocess.run([sys.executable, "sft.py"], cwd=folder, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "reviews_task.py, which is not beside this script" in proc.stderr and "--dataset" in proc.stderr


def test_reward_model_copied_alone(sft_dir, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"The {w} was", "chosen": " great.", "rejected": " bad."}
                                                  for w in ("pasta", "soup", "plot", "view", "bed", "tea")])
    folder = run_copy("reward_model.py", tmp_path, "--model-name-or-path", sft_dir, "--dataset", data, "--output-dir",
                      "out", "--max-steps", "2", "--num-normalize-samples", "4")
    assert AutoModelForSequenceClassification.from_pretrained(folder / "out").config.num_labels == 1


def test_dpo_copied_alone(sft_dir, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"The {w} was", "chosen": " great.", "rejected": " bad."}
                                                  for w in ("pasta", "soup", "plot", "view", "bed", "tea")])
    folder = run_copy("dpo.py", tmp_path, "--model-name-or-path", sft_dir, "--dataset", data, "--output-dir", "out",
                      "--max-steps", "2", "--num-eval-prompts", "2")
    AutoModelForCausalLM.from_pretrained(folder / "out")


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_ppo_copied_alone(sft_dir, tmp_path, value_model):
    AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1).save_pretrained(tmp_path / "rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} was"} for w in ("pasta", "soup", "plot", "view")])
    folder = run_copy("ppo_rlhf.py", tmp_path, "--sft-model-path", sft_dir, "--reward-model-path", tmp_path / "rm",
                      "--dataset", data, "--output-dir", "out", "--num-iterations", "2", "--response-length", "6",
                      "--value-model", value_model)  # the reward model's folder has no tokenizer: the policy's is used
    AutoModelForCausalLM.from_pretrained(folder / "out")
    if value_model == "separate":
        AutoModelForSequenceClassification.from_pretrained(folder / "out" / "value_model")
    else:
        assert (folder / "out" / "value_head.safetensors").exists()


def test_grpo_copied_alone(sft_dir, tmp_path):
    """grpo.py with a reward function of the user's that reads a field of the prompt record."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} was", "target": w}
                                                    for w in ("pasta", "soup", "plot", "view")])
    (tmp_path / "reward.py").write_text("def mentions(prompt, response, target):\n    return float(target in response)\n")
    folder = run_copy("grpo.py", tmp_path, "--sft-model-path", sft_dir, "--reward-fn", f"{tmp_path / 'reward.py'}:mentions",
                      "--dataset", data, "--output-dir", "out", "--num-iterations", "2", "--response-length", "6",
                      "--num-generations", "2", "--rollout-batch-size", "2")
    AutoModelForCausalLM.from_pretrained(folder / "out")


def test_distill_copied_alone(sft_dir, tmp_path):
    """distill.py with the user's student, teacher and prompts (here one model as both)."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} was"} for w in ("pasta", "soup", "plot", "view")])
    folder = run_copy("distill.py", tmp_path, "--model-name-or-path", sft_dir, "--teacher-model-path", sft_dir,
                      "--dataset", data, "--output-dir", "out", "--num-iterations", "2", "--response-length", "6")
    AutoModelForCausalLM.from_pretrained(folder / "out")


def test_label_copied_alone(sft_dir, tmp_path):
    """label.py with the shared files: sample pairs from the user's model and label them with the user's function."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} was"} for w in ("pasta", "soup", "plot")])
    (tmp_path / "judge.py").write_text("def pick(prompt, a, b):\n    return 'A' if len(a) >= len(b) else 'B'\n")
    folder = run_copy("label.py", tmp_path, "--policy-path", sft_dir, "--prompts", prompts, "--output",
                      "out/labels.jsonl", "--annotator", f"{tmp_path / 'judge.py'}:pick", "--response-length", "6")
    with open(folder / "out" / "labels.jsonl") as f:
        assert all(len(r["chosen"]) >= len(r["rejected"]) for r in map(json.loads, f))


def top_level_names(name: str) -> set[str]:
    """The functions, classes and variables a file defines at its top level."""
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "ppo_rlhf.py", "dpo.py", "grpo.py", "distill.py",
                                    "label.py"])
def test_no_script_defines_again_what_the_shared_files_define(script):
    """The machinery (plumbing.py) and the contract (common.py) are written once: a script that defined one of their
    names again would hold a second copy to keep in step, and would shadow the one the others use."""
    shared = top_level_names("common.py") | top_level_names("plumbing.py")
    assert not top_level_names(script) & shared


def test_the_shared_files_define_each_name_once():
    assert not top_level_names("common.py") & top_level_names("plumbing.py")


def test_readme_file_map_counts_lines_right():
    """The README's file map tells a reader how long each script is; the counts follow the files."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        counted = dict(re.findall(r"^\| `([\w.]+\.py)` \| (\d+) \|", f.read(), flags=re.M))
    assert {"common.py", "plumbing.py", "sft.py", "reward_model.py", "ppo_rlhf.py", "dpo.py", "grpo.py"} <= set(counted)
    for name, lines in counted.items():
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            assert sum(1 for _ in f) == int(lines), name
