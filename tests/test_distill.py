"""distill.py: the divergences against slow references, the reverse-KL gradient by Monte Carlo, a student equal to its
teacher left alone, the gradient however the batch is split, learning toward the teacher, and a teacher of another
vocabulary refused."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import Args, Episodes, backward_minibatch, generalized_jsd, reverse_kl_loss
from plumbing import Parallel
from test_grpo import episodes_for


def slow_jsd(s_logits, t_logits, beta):
    """GKD's generalised JSD of two distributions, by the definition, element by element."""
    s = [math.exp(x) for x in s_logits]
    s = [x / sum(s) for x in s]
    t = [math.exp(x) for x in t_logits]
    t = [x / sum(t) for x in t]
    kl = lambda p, q: sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # noqa: E731
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_against_its_definition(beta):
    """Two positions of hand-built logits: the divergence of each, term by term; beta 0 and 1 are the forward and the
    reverse KL."""
    student = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, -2.0]]])
    teacher = torch.tensor([[[0.5, 1.5, 0.0, -1.0], [1.0, -1.0, 2.0, 0.5]]])
    ours = generalized_jsd(student, teacher, beta)
    expected = torch.tensor([[slow_jsd(s.tolist(), t.tolist(), beta) for s, t in zip(student[0], teacher[0])]])
    assert torch.allclose(ours, expected, atol=1e-6)
    if beta in (0.0, 1.0):
        s, t = student.log_softmax(-1), teacher.log_softmax(-1)
        p, q = (t, s) if beta == 0 else (s, t)
        assert torch.allclose(ours, (p.exp() * (p - q)).sum(-1), atol=1e-6)


def test_the_sampled_reverse_kl_follows_its_gradient():
    """By Monte Carlo over 400,000 samples from the student (one token per response): the policy gradient with the
    sampled log-ratio as the negative advantage is the gradient of KL(student || teacher), and its mean the KL."""
    torch.manual_seed(0)
    theta = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.3], requires_grad=True)
    teacher = torch.log_softmax(torch.tensor([0.0, 1.0, 0.5, 0.5, -1.0]), 0)
    logp_all = torch.log_softmax(theta, 0)
    exact = (logp_all.exp() * (logp_all - teacher)).sum()
    (exact_grad,) = torch.autograd.grad(exact, theta, retain_graph=True)
    x = torch.multinomial(logp_all.exp().detach(), 400_000, replacement=True)
    logp = logp_all[x][:, None]
    per_token, advantages = reverse_kl_loss(logp, logp.detach(), teacher[x][:, None], 0.2)
    (grad,) = torch.autograd.grad(per_token.mean(), theta)
    assert abs(-advantages.mean().item() - exact.item()) < 0.02 * exact.item()
    assert (grad - exact_grad).norm() < 0.05 * exact_grad.norm(), (grad, exact_grad)


def test_a_student_equal_to_its_teacher_is_left_alone():
    """Student = teacher: both losses are 0 and so is their gradient (the reverse KL's advantages are exactly 0; the
    JSD is at its minimum)."""
    logits = torch.randn(2, 3, 7, requires_grad=True)
    logprobs = logits.log_softmax(-1)[..., 0]
    per_token, advantages = reverse_kl_loss(logprobs, logprobs.detach(), logprobs.detach(), 0.2)
    assert (advantages == 0).all()
    (grad,) = torch.autograd.grad(per_token.sum(), logits)
    assert (grad == 0).all()
    for beta in (0.0, 0.5, 1.0):
        jsd = generalized_jsd(logits, logits.detach(), beta)
        (grad,) = torch.autograd.grad(jsd.sum(), logits)
        assert jsd.abs().max() < 1e-6 and grad.abs().max() < 1e-6, beta


def distill_episodes(tokenizer, sampled=True):
    """A batch of unequal prompts and responses (test_grpo's), its old log-probs a little off the student's."""
    grpo = episodes_for(tokenizer)
    return Episodes(grpo.rollout, grpo.loss_mask, grpo.old_logprobs, grpo.ref_logprobs, sampled)


def gradient(student, teacher, episodes, loss, micro, padding_free=True):
    args = Args(loss=loss, beta=0.5, temperature=0.7, cliprange=0.2)
    student.zero_grad()
    vocab = student.get_output_embeddings().weight.shape[0]
    backward_minibatch(Parallel(student), Parallel(teacher), episodes, torch.arange(len(episodes.loss_mask)), micro,
                       args, vocab, padding_free, lambda: torch.autocast("cpu", enabled=False))
    return {n: p.grad.clone() for n, p in student.named_parameters()}


def relative_gap(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in b)


@pytest.mark.parametrize("loss, sampled", [("reverse_kl", True), ("jsd", True), ("reverse_kl", False)])
def test_micro_batches_give_the_gradient_of_the_whole_batch(loss, sampled, model_dir):
    """Two micro-batches of unequal lengths, padded or packed: the gradient of one step is the whole batch's."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(student.config).eval()  # another model of the same vocabulary
    episodes = distill_episodes(tokenizer, sampled)
    whole = gradient(student, teacher, episodes, loss, micro=8)
    assert relative_gap(gradient(student, teacher, episodes, loss, micro=2), whole) < 1e-5
    assert relative_gap(gradient(student, teacher, episodes, loss, micro=8, padding_free=False), whole) < 1e-5


GRADIENT_WORKER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from transformers import AutoModelForCausalLM, AutoTokenizer
import distill
import plumbing
from test_distill import distill_episodes
rank, world_size, device = plumbing.init_distributed("cpu")
tokenizer = AutoTokenizer.from_pretrained({model!r})
for strategy in ("ddp", "fsdp"):
    for loss in ("reverse_kl", "jsd"):
        student = AutoModelForCausalLM.from_pretrained({model!r})
        torch.manual_seed(1)
        teacher = AutoModelForCausalLM.from_config(student.config).eval()
        student_w = plumbing.distribute([student], strategy, False)
        teacher_w = plumbing.distribute([teacher], strategy, False, trainable=False)
        args = distill.Args(loss=loss, beta=0.5, temperature=0.7, cliprange=0.2)
        half = torch.arange(rank * 4, rank * 4 + 4)  # this process's half of the batch, in 2 micro-batches of 2
        distill.backward_minibatch(student_w, teacher_w, distill_episodes(tokenizer), half, 2, args,
                                   student.get_output_embeddings().weight.shape[0], True,
                                   lambda: torch.autocast("cpu", enabled=False))
        grads = {{n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                  for n, p in student_w.named_parameters()}}
        if rank == 0:
            torch.save(grads, os.path.join({out!r}, f"{{strategy}}_{{loss}}.pt"))
torch.distributed.barrier()
os._exit(0)  # no interpreter finalization: it can free gloo's group under its threads (plumbing.user_errors_in_one_line)
"""


def test_two_processes_give_the_gradient_of_the_whole_batch(model_dir, tmp_path):
    """torchrun, 2 processes x 2 micro-batches, DDP and FSDP2: one process's gradient of the whole batch, both losses."""
    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENT_WORKER.format(repo=REPO, tests=os.path.join(REPO, "tests"), model=str(model_dir),
                                             out=str(tmp_path)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)],
                   check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(student.config).eval()
    for loss in ("reverse_kl", "jsd"):
        whole = {f"models.0.{k}": v for k, v in gradient(student, teacher, distill_episodes(tokenizer), loss, 8).items()}
        for strategy in ("ddp", "fsdp"):
            two = torch.load(tmp_path / f"{strategy}_{loss}.pt", weights_only=True)
            two = {k.replace("module.", ""): v for k, v in two.items()}
            assert relative_gap(two, whole) < 1e-5, (strategy, loss)


def distill_args(task_dir, student, teacher, out, *extra):
    return ["--model-name-or-path", student, "--teacher-model-path", teacher, "--dataset",
            task_dir / "prompts_train.jsonl", "--eval-dataset", task_dir / "prompts_eval.jsonl", "--output-dir", out,
            "--rollout-batch-size", "16", "--response-length", "8", "--num-eval-prompts", "16", "--eval-reward-fn", "",
            *extra]


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_the_student_moves_toward_the_teacher(loss, task_dir, model_dir, sft_dir, tmp_path):
    """A random student of the teacher's vocabulary (the tiny model before SFT; the teacher, after): a few steps bring
    its held-out reverse KL to the teacher down (eval/scores is minus that KL), and the saved student loads."""
    run_script("distill.py", *distill_args(task_dir, model_dir, sft_dir, tmp_path / "out", "--loss", loss,
                                           "--num-iterations", "16", "--eval-steps", "8", "--learning-rate", "1e-2"),
               cwd=tmp_path)
    scores = [v for _, v in read_metrics(tmp_path, "eval/scores")]  # minus the held-out KL, summed per response
    assert len(scores) == 3 and scores[-1] > 0.75 * scores[0], scores  # the KL down by a quarter at least
    kl = [v for _, v in read_metrics(tmp_path, "objective/reverse_kl")]  # per token, on the training samples
    assert sum(kl[-4:]) < sum(kl[:4]), kl
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_demonstrations_share_the_batches_and_a_foreign_teacher_is_refused(task_dir, model_dir, sft_dir, tmp_path):
    """--lmbda 0.5: about half the iterations train on the demonstrations, the others on the student's samples; a
    teacher whose tokenizer numbers the tokens otherwise stops the run at start, in one line."""
    run_script("distill.py", *distill_args(task_dir, sft_dir, sft_dir, tmp_path / "out", "--lmbda", "0.5",
                                           "--demonstrations", task_dir / "sft_train.jsonl", "--num-iterations", "6",
                                           "--eval-steps", "100"), cwd=tmp_path)
    sampled = [v for _, v in read_metrics(tmp_path, "objective/sampled")]
    assert 0 < sum(sampled) < len(sampled) == 6, sampled
    kls = [v for _, v in read_metrics(tmp_path, "objective/reverse_kl")]
    assert abs(kls[0]) < 1e-5  # the student starts as its teacher
    foreign = tmp_path / "foreign"
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    tokenizer.add_tokens(["zzz"])  # one more token, not a special one: another numbering of the vocabulary
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(foreign)
    tokenizer.save_pretrained(foreign)
    proc = run_script("distill.py", *distill_args(task_dir, sft_dir, foreign, tmp_path / "out2"), cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "another vocabulary" in proc.stderr
