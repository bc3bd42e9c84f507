"""Stage 1: the label mask, learning, saving, determinism, resuming, and clear errors."""

import os
import platform
import re
import subprocess
import sys

import pytest
import torch
from conftest import CHATML, REPO, read_metrics, run_script, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import read_jsonl
from sft import Args, collate, encode, token_nll_sum


def test_labels_on_a_hand_laid_example():
    pad_id = 0
    batch = collate([([1, 11, 12], [21, 22, 2]), ([1, 13], [23, 2])], pad_id, False, padding_free=False)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 21, 22, 2], [1, 13, 23, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    # prompt positions and padding ignored; completion tokens and the EOS (2) kept
    assert batch["labels"].tolist() == [[-100, -100, -100, 21, 22, 2], [-100, -100, 23, 2, -100, -100]]
    whole = collate([([1, 11, 12], [21, 22, 2])], pad_id, True, padding_free=False)["labels"]
    assert whole.tolist() == [[-100, 11, 12, 21, 22, 2]]  # the first token is never predicted


def test_packed_labels_on_a_hand_laid_example():
    """Three examples of 6, 4 and 2 tokens: rows of 6, the first holds the 6, the second the 4 then the 2."""
    examples = [([1, 11, 12], [21, 22, 2]), ([1, 13], [23, 2]), ([1], [2])]
    batch = collate(examples, 0, False, padding_free=True)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 21, 22, 2], [1, 13, 23, 2, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 21, 22, 2], [-100, -100, 23, 2, -100, 2]]
    # with the prompt in the loss, an example's first token is still not a target: it would be predicted from the
    # last token of the example before it in the row
    whole = collate(examples, 0, True, padding_free=True)["labels"]
    assert whole.tolist() == [[-100, 11, 12, 21, 22, 2], [-100, 13, 23, 2, -100, 2]]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_padding_free_loss_and_gradient_match_padding(model_dir, train_on_prompt):
    """The packed batch is the same computation as the padded one: summed NLL and its gradient agree."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(3, 300, (int(p),), generator=g).tolist(),
                 torch.randint(3, 300, (int(c),), generator=g).tolist()) for p, c in torch.randint(1, 12, (9, 2), generator=g)]
    results = []
    for padding_free in (False, True):
        batch = collate(examples, 0, train_on_prompt, padding_free)
        loss = token_nll_sum(model, batch)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, torch.cat([x.flatten() for x in grads]), (batch["labels"] != -100).sum()))
    (padded, g_padded, n_padded), (packed, g_packed, n_packed) = results
    assert n_padded == n_packed
    assert batch["input_ids"].numel() < collate(examples, 0, train_on_prompt, False)["input_ids"].numel()
    assert torch.allclose(padded, packed, rtol=1e-5)
    assert torch.allclose(g_padded, g_packed, rtol=1e-4, atol=1e-6)


def sft_args(task_dir, model_dir, out, *extra):
    return ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl",
            "--eval-dataset", task_dir / "sft_eval.jsonl", "--output-dir", out, "--learning-rate", "3e-3",
            "--per-device-train-batch-size", "16", "--num-samples", "2", "--num-eval-generations", "16",
            "--max-completion-length", "24", *extra]


def test_short_run_learns_saves_and_generates(task_dir, model_dir, tmp_path):
    out = tmp_path / "sft"
    proc = run_script("sft.py", *sft_args(task_dir, model_dir, out, "--max-steps", "40", "--eval-steps", "20"),
                      cwd=tmp_path)
    # a log file has no progress bar: each line says how long the run has taken and has left, each evaluation its time
    assert re.search(r"step 20/40: train loss [\d.]+  \[0:\d\d:\d\d elapsed, 0:\d\d:\d\d left\]", proc.stdout)
    assert re.search(r"step 20: eval loss [\d.]+ \(\d+ s\)", proc.stdout)
    losses = read_metrics(tmp_path, "eval/sft/loss")
    assert [s for s, _ in losses] == [0, 20, 40]
    assert losses[-1][1] < 0.8 * losses[0][1]  # held-out loss falls well below the random-init loss

    # the saved folder is the trained model: recomputed from it, the held-out loss is the last one logged
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    args = Args(max_completion_length=24)
    evals = encode(read_jsonl(str(task_dir / "sft_eval.jsonl"), "sft"), tok, args)[0]
    with torch.no_grad():
        batches = [collate(evals[k: k + 16], tok.pad_token_id, False, False) for k in range(0, len(evals), 16)]
        nll = sum(token_nll_sum(model, b).item() for b in batches)
    tokens = sum((b["labels"][:, 1:] != -100).sum().item() for b in batches)
    assert abs(nll / tokens - losses[-1][1]) < 1e-4 * losses[-1][1], (nll / tokens, losses[-1][1])
    assert os.path.exists(out / "args.json") and os.path.exists(out / "model.safetensors")
    assert not os.path.exists(out / "checkpoint")


def test_same_seed_same_losses(task_dir, model_dir, tmp_path):
    runs = []
    for name in ["a", "b"]:
        (tmp_path / name).mkdir()
        run_script("sft.py", *sft_args(task_dir, model_dir, tmp_path / name / "out", "--max-steps", "8",
                                       "--eval-steps", "100", "--seed", "7"), cwd=tmp_path / name)
        runs.append(read_metrics(tmp_path / name, "train/sft/loss"))
    assert len(runs[0]) == 8 and runs[0] == runs[1]


def test_gradient_accumulation_matches_one_big_batch(task_dir, model_dir, tmp_path):
    """Loss normalised over the tokens of the whole accumulated batch: 2 x 8 equals 1 x 16, step for step."""
    runs = []
    for name, bs, ga in [("big", "16", "1"), ("acc", "8", "2")]:
        (tmp_path / name).mkdir()
        run_script("sft.py", *sft_args(task_dir, model_dir, tmp_path / name / "out", "--max-steps", "3",
                                       "--eval-steps", "100", "--num-eval-generations", "2"),
                   "--per-device-train-batch-size", bs, "--gradient-accumulation-steps", ga, cwd=tmp_path / name)
        runs.append([v for _, v in read_metrics(tmp_path / name, "train/sft/loss")])
    assert torch.allclose(torch.tensor(runs[0]), torch.tensor(runs[1]), atol=1e-4)


def test_chat_template_and_long_prompts(tmp_path, tokenizer, model_dir):
    """Conversational data through a chat template; prompts over the limit are cut from the left, or skipped."""
    chat_dir = tmp_path / "chat_model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(chat_dir)
    tok.save_pretrained(chat_dir)
    rows = [{"messages": [{"role": "user", "content": f"Review {i}: the pasta was"},
                          {"role": "assistant", "content": " very good."}]} for i in range(40)]
    rows += [{"prompt": "word " * 200, "completion": " fine."}] * 8
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    common = ["--model-name-or-path", chat_dir, "--dataset", data, "--eval-dataset", data, "--max-steps", "2",
              "--per-device-train-batch-size", "8", "--eval-steps", "100", "--num-eval-generations", "4",
              "--max-prompt-length", "32", "--eval-reward-fn", ""]
    proc = run_script("sft.py", *common, "--output-dir", tmp_path / "o1", cwd=tmp_path)
    assert "48 training examples (8 prompts cut from the left, 0 skipped, 0 completions cut)" in proc.stdout
    assert "<|im_start|>assistant" in proc.stdout  # samples are printed with the rendered chat prompt
    proc = run_script("sft.py", *common, "--skip-long-prompts", "--output-dir", tmp_path / "o2", cwd=tmp_path)
    assert "40 training examples (0 prompts cut from the left, 8 skipped, 0 completions cut)" in proc.stdout


def test_bad_dataset_gives_a_clear_error(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": " c"}, {"prompt": "p"}])
    proc = run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", data, "--eval-dataset", data,
                      cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"{data}, line 2: missing field 'completion'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or
                    tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="a glibc setting, read back with mallinfo2 (glibc 2.33)")
def test_keep_freed_memory_only_when_run_as_a_script():
    """glibc's setting is the whole process's: a script's own `cli` makes it, a program that imports the machinery and
    starts a run itself (`setup`) keeps glibc's defaults."""
    code = """
import ctypes, dataclasses, sys, torch
sys.path.insert(0, sys.argv[1])
import plumbing
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mmapped_by_a_64mb_tensor():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(16 * 2**20)
    return libc.mallinfo2().hblkhd - before
@dataclasses.dataclass
class Args:
    device: str = "cpu"
    track: bool = False
    exp_name: str = "x"
    seed: int = 1
    strategy: str = "ddp"
    bf16: bool = False
    lora_r: int = 0
    trust_remote_code: bool = False
plumbing.setup(Args())  # a run started from someone's own program
print(mmapped_by_a_64mb_tensor())
sys.argv = ["script.py"]
plumbing.cli(Args)  # a script's entry
print(mmapped_by_a_64mb_tensor())
"""
    proc = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, check=True)
    imported, as_script = map(int, proc.stdout.split()[-2:])
    assert imported >= 64 * 2**20 and as_script == 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or
                    tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="a glibc setting, read back with mallinfo2 (glibc 2.33)")
def test_keep_freed_memory_keeps_large_blocks_off_mmap():
    """keep_freed_memory (every stage calls it; it acts on CPU only): a 64 MB tensor comes from the heap, where its
    pages stay mapped after it is freed, not from an mmap of its own; a MALLOC_MMAP_MAX_ in the environment is left in
    charge. In a fresh process: the setting is per process and stays for its life."""
    code = """
import ctypes, os, sys, torch
sys.path.insert(0, sys.argv[1])
from plumbing import keep_freed_memory
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mmapped_by_a_64mb_tensor():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(16 * 2**20)
    return libc.mallinfo2().hblkhd - before
os.environ["MALLOC_MMAP_MAX_"] = "65536"  # the user's own setting: nothing changes
keep_freed_memory(torch.device("cpu"))
print(mmapped_by_a_64mb_tensor())
del os.environ["MALLOC_MMAP_MAX_"]
keep_freed_memory(torch.device("cuda"))  # a GPU run: host memory is left to glibc's defaults
print(mmapped_by_a_64mb_tensor())
keep_freed_memory(torch.device("cpu"))
print(mmapped_by_a_64mb_tensor())
"""
    proc = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, check=True)
    user_setting, gpu_run, kept = map(int, proc.stdout.split())
    assert user_setting >= 64 * 2**20 and gpu_run >= 64 * 2**20  # glibc's default: a block this large gets an mmap
    assert kept == 0
