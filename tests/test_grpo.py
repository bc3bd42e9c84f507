"""grpo.py: the advantages by hand, the loss against a slow reference, the gradient under every aggregation the same
however the batch is split (micro-batches, torchrun processes), which KL gradient each placement follows, and learning."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, run_script, write_jsonl
from transformers import AutoModelForCausalLM

from common import Rollout, pad
from grpo import (Args, Episodes, backward_minibatch, clipped_surrogate, group_advantages, kl_penalty, loss_normaliser,
                  loss_sum)
from plumbing import Parallel


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0, 2.0,  # a group with a spread
                           0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # equal scores whose float mean is not 0.1
    g1, g2 = scores[:8], scores[8:]
    mean, std = g1.mean(), g1.std()  # std with G - 1, as the GRPO paper
    assert (g2 - g2.mean()).abs().max() > 0  # the trap is real: subtracting the mean leaves a residue
    grpo = group_advantages(scores, 8, "grpo", "group")
    assert torch.allclose(grpo[:8], (g1 - mean) / (std + 1e-4))
    none = group_advantages(scores, 8, "grpo", "none")
    assert torch.allclose(none[:8], torch.tensor([0.0, -1.0, 2.0, -1.0, 1.0, -1.0, -1.0, 1.0]))
    batch = group_advantages(scores, 8, "grpo", "batch")
    assert torch.allclose(batch[:8], (g1 - mean) / (scores.std() + 1e-4))
    rloo = group_advantages(scores, 8, "rloo", "group")  # r_i - mean of the other seven
    assert torch.allclose(rloo[:8], torch.tensor([r - (8 - r) / 7 for r in g1.tolist()]))
    rpp = group_advantages(scores, 8, "reinforce_pp", "group")
    centred = torch.cat([g1 - mean, torch.zeros(8)])
    assert torch.allclose(rpp[:8], (g1 - mean) / (centred.std() + 1e-4))
    for advantages in (grpo, none, batch, rloo, rpp):  # a group of equal scores: exactly 0, never NaN or residue
        assert (advantages[8:] == 0).all() and torch.isfinite(advantages).all()


@pytest.mark.parametrize("offset, step", [(0.7, 1e-3), (50.0, 0.05)])
def test_batch_scaling_keeps_its_digits_on_offset_rewards(offset, step):
    """A batch std taken as sqrt(E[x^2] - mean^2) from float32 sums cancels catastrophically when the scores sit far
    from 0 against their spread (a verifier's 0.7 + 1e-3 n, a judge's 50 + 0.05 n): the advantages then came out 0.8x
    to 1.1x the right ones. Held against the same formula in float64."""
    torch.manual_seed(0)
    scores = offset + step * torch.randint(0, 5, (64,)).double()  # 8 groups of 8
    for advantage in ("grpo", "reinforce_pp"):
        grouped = scores.view(-1, 8)
        centred = grouped - grouped.mean(1, keepdim=True)
        std = (scores if advantage == "grpo" else centred.flatten()).std()  # float64, with n - 1
        equal = grouped.max(1, keepdim=True).values == grouped.min(1, keepdim=True).values
        expected = torch.where(equal, 0.0, centred / (std + 1e-4)).flatten()
        ours = group_advantages(scores.float(), 8, advantage, "batch")
        assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-4), (ours - expected).abs().max()


def test_group_of_two_and_leave_one_out_never_explodes():
    """G = 2: GRPO gives +-1/sqrt(2) x (1 - tiny) whatever the gap; RLOO the plain differences. A near-tie stays small
    under RLOO, and scaling by a group std that is near 0 is bounded by the 1e-4 floor (no 1e6 advantages)."""
    scores = torch.tensor([2.0, 0.0, 5.0, 5.0 + 1e-6])
    grpo = group_advantages(scores, 2, "grpo", "group")
    assert torch.allclose(grpo[:2], torch.tensor([1.0, -1.0]) / 2 ** 0.5, atol=1e-4)
    assert grpo[2:].abs().max() < 0.02
    rloo = group_advantages(scores, 2, "rloo", "group")
    assert torch.allclose(rloo, torch.tensor([2.0, -2.0, -1e-6, 1e-6]), atol=1e-6)


def test_clipped_surrogate_and_clip_higher_by_hand():
    new = torch.log(torch.tensor([[0.5, 1.0, 1.25, 1.5]]))
    old = torch.zeros(1, 4)
    for adv, low, high in ((1.0, [0, 0, 0, 1], [0, 0, 0, 1]), (-1.0, [1, 0, 0, 0], [1, 0, 0, 0])):
        loss, ratio, clip_low, clip_high = clipped_surrogate(new, old, torch.tensor([adv]), 0.2, 0.3)
        expected = [-min(r * adv, max(0.8, min(r, 1.3)) * adv) for r in (0.5, 1.0, 1.25, 1.5)]
        assert torch.allclose(loss, torch.tensor([expected])), (loss, expected)
        assert clip_low.int().tolist() == [[int(adv < 0), 0, 0, 0]]
        assert clip_high.int().tolist() == [[0, 0, 0, int(adv > 0)]]
    assert torch.allclose(ratio, torch.tensor([[0.5, 1.0, 1.25, 1.5]]))


def slow_loss(per_token, mask, aggregation, response_length):
    """The aggregated loss term by term, over the whole batch at once."""
    B, T = per_token.shape
    if aggregation == "token":
        total = sum(per_token[b, t] for b in range(B) for t in range(T) if mask[b, t])
        return total / sum(mask[b, t] for b in range(B) for t in range(T))
    if aggregation == "sequence":
        means = [sum(per_token[b, t] for t in range(T) if mask[b, t]) / sum(mask[b]) for b in range(B) if mask[b].any()]
        return sum(means) / len(means)
    return sum(per_token[b, t] for b in range(B) for t in range(T) if mask[b, t]) / (B * response_length)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_loss_split_in_micro_batches_matches_a_slow_reference(aggregation):
    torch.manual_seed(0)
    per_token = torch.randn(8, 6)
    lengths = [6, 1, 3, 6, 2, 5, 0, 4]  # unequal, and one response wholly out of the loss (--mask-truncated)
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    normaliser = loss_normaliser(mask, aggregation, response_length=6)
    split = sum(loss_sum(per_token[k: k + 2], mask[k: k + 2], aggregation) for k in range(0, 8, 2)) / normaliser
    assert torch.allclose(split, torch.as_tensor(slow_loss(per_token, mask, aggregation, 6), dtype=torch.float))


def episodes_for(tokenizer, seed=0, B=8, T=6):
    """A batch of B responses of unequal lengths to prompts of unequal lengths, with advantages, old log-probs a
    little off the policy's (so the clip acts) and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 5, 3, 2, 4)[:B]]
    queries, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
    responses = torch.randint(5, vocab, (B, T), generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6])[:B]
    response_mask = torch.arange(T)[None] < lengths[:, None]
    responses = responses.masked_fill(~response_mask, tokenizer.pad_token_id)
    rollout = Rollout(torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask.long()], 1),
                      queries.shape[1], responses, response_mask, lengths < T)
    return Episodes(rollout, response_mask.float(), torch.randn(B, generator=g),
                    -3 - torch.rand(B, T, generator=g), -3 - torch.rand(B, T, generator=g))


def gradient(model, episodes, aggregation, micro, padding_free=True):
    args = Args(loss_aggregation=aggregation, kl_coef=0.1, kl_in="loss", kl_estimator="k3", response_length=6,
                cliprange=0.2, cliprange_high=0.28)
    model.zero_grad()
    backward_minibatch(Parallel(model), episodes, torch.arange(len(episodes.advantages)), micro, args, padding_free,
                       lambda: torch.autocast("cpu", enabled=False))
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def relative_gap(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in b)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(aggregation, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    episodes = episodes_for(tokenizer)
    whole = gradient(model, episodes, aggregation, micro=8)
    assert relative_gap(gradient(model, episodes, aggregation, micro=2), whole) < 1e-5
    assert relative_gap(gradient(model, episodes, aggregation, micro=8, padding_free=False), whole) < 1e-5


GRADIENT_WORKER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from transformers import AutoModelForCausalLM, AutoTokenizer
import grpo
import plumbing
from test_grpo import episodes_for
rank, world_size, device = plumbing.init_distributed("cpu")
tokenizer = AutoTokenizer.from_pretrained({model!r})
episodes = episodes_for(tokenizer)
for strategy in ("ddp", "fsdp"):
    for aggregation in ("token", "sequence", "constant"):
        model = AutoModelForCausalLM.from_pretrained({model!r})
        wrapped = plumbing.distribute([model], strategy, False)
        args = grpo.Args(loss_aggregation=aggregation, kl_coef=0.1, kl_in="loss", kl_estimator="k3",
                         response_length=6, cliprange=0.2, cliprange_high=0.28)
        half = torch.arange(rank * 4, rank * 4 + 4)  # this process's half of the batch, in 2 micro-batches of 2
        grpo.backward_minibatch(wrapped, episodes, half, 2, args, True, lambda: torch.autocast("cpu", enabled=False))
        grads = {{n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                  for n, p in wrapped.named_parameters()}}
        if rank == 0:
            torch.save(grads, os.path.join({out!r}, f"{{strategy}}_{{aggregation}}.pt"))
"""


def test_two_processes_give_the_gradient_of_the_whole_batch(model_dir, tmp_path):
    """torchrun, 2 processes x 2 micro-batches of unequal lengths, DDP and FSDP2: the gradient of one optimizer step
    is the one-process gradient of the whole batch, for every aggregation."""
    from transformers import AutoTokenizer

    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENT_WORKER.format(repo=REPO, tests=os.path.join(REPO, "tests"), model=str(model_dir),
                                             out=str(tmp_path)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)],
                   check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    episodes = episodes_for(tokenizer)
    for aggregation in ("token", "sequence", "constant"):
        whole = {f"models.0.{k}": v for k, v in gradient(model, episodes, aggregation, micro=8).items()}
        for strategy in ("ddp", "fsdp"):
            two = torch.load(tmp_path / f"{strategy}_{aggregation}.pt", weights_only=True)
            two = {k.replace("module.", ""): v for k, v in two.items()}
            assert relative_gap(two, whole) < 1e-5, (strategy, aggregation)


def test_kl_placements_follow_the_gradients_docs_grpo_states():
    """On a categorical distribution, by Monte Carlo over samples from pi: k1 in the reward (REINFORCE with a
    leave-one-out baseline) follows the gradient of KL(pi || ref) (with the group mean as the baseline, (G - 1) / G
    of it); k3 in the loss follows the gradient of KL(ref || pi),
    the other direction; k1 in the loss follows nothing (its expected gradient is 0)."""
    torch.manual_seed(0)
    ref_logits = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.5])
    theta = torch.tensor([2.0, 0.0, -1.0, 0.5, 1.0], requires_grad=True)
    ref_logp = torch.log_softmax(ref_logits, 0)

    def exact(direction):
        logp = torch.log_softmax(theta, 0)
        kl = (logp.exp() * (logp - ref_logp)).sum() if direction == "pi||ref" else (ref_logp.exp() * (ref_logp - logp)).sum()
        return torch.autograd.grad(kl, theta)[0]

    N, G, beta = 400_000, 4, 1.0
    logp_all = torch.log_softmax(theta, 0)
    x = torch.multinomial(logp_all.exp().detach(), N, replacement=True)
    logp = logp_all[x][:, None]  # (N, 1): one token per response
    ref = ref_logp[x][:, None]
    mask = torch.ones(N, 1)

    # k1 in the reward: score -beta * k1, a leave-one-out baseline, the clipped surrogate at ratio 1
    scores = -beta * kl_penalty(logp.detach(), ref, "k1")[:, 0]
    advantages = group_advantages(scores, G, "rloo", "none")
    per_token, *_ = clipped_surrogate(logp, logp.detach(), advantages, 0.2, 0.2)
    in_reward = torch.autograd.grad(loss_sum(per_token, mask, "token") / loss_normaliser(mask, "token", 1), theta,
                                    retain_graph=True)[0]
    # the group mean as the baseline (GRPO without std scaling) includes the response itself: the same direction,
    # shrunk by (G - 1) / G
    per_token, *_ = clipped_surrogate(logp, logp.detach(), group_advantages(scores, G, "grpo", "none"), 0.2, 0.2)
    group_mean = torch.autograd.grad(loss_sum(per_token, mask, "token") / N, theta, retain_graph=True)[0]
    # k3 and k1 as loss terms
    in_loss = {est: torch.autograd.grad(beta * loss_sum(kl_penalty(logp, ref, est), mask, "token") / N, theta,
                                        retain_graph=True)[0] for est in ("k1", "k3")}
    forward_kl, reverse_kl = exact("pi||ref"), exact("ref||pi")
    assert (forward_kl - reverse_kl).norm() > 0.4 * forward_kl.norm()  # the two targets are far apart here
    assert (in_reward - beta * forward_kl).norm() < 0.05 * forward_kl.norm(), (in_reward, forward_kl)
    assert (group_mean - (G - 1) / G * beta * forward_kl).norm() < 0.05 * forward_kl.norm()
    assert (in_loss["k3"] - beta * reverse_kl).norm() < 0.05 * reverse_kl.norm(), (in_loss["k3"], reverse_kl)
    assert (in_loss["k3"] - beta * forward_kl).norm() > 0.3 * forward_kl.norm()
    assert in_loss["k1"].norm() < 0.05 * forward_kl.norm()


def grpo_args(task_dir, sft_dir, out, *extra):
    return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--eval-dataset",
            task_dir / "prompts_eval.jsonl", "--output-dir", out, "--rollout-batch-size", "4", "--num-generations", "4",
            "--response-length", "8", "--num-eval-prompts", "8", "--eval-steps", "1000", "--learning-rate", "1e-3",
            "--eval-reward-fn", "", *extra]


def test_constant_reward_gives_zero_advantages_and_record_fields_reach_the_reward(task_dir, sft_dir, tmp_path):
    """A reward function reading the record's `bonus` field: every response to a prompt scores the same, so every group
    has zero variance, every advantage is 0 and so is the policy loss; the mean score is the mean bonus. For bonus 0
    the function says it cannot score (None): scored 0 and counted, in training and in evaluation."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} was", "bonus": i}
                                                       for i, w in enumerate(("pasta", "soup", "plot", "view"))])
    (tmp_path / "reward.py").write_text("def bonus(prompt, response, bonus):\n    return float(bonus) if bonus else None\n")
    run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--dataset", prompts, "--num-iterations", "2",
                                     "--reward-fn", f"{tmp_path / 'reward.py'}:bonus", "--missing-eos-penalty", "0",
                                     "--eval-dataset", "none", "--num-eval-prompts", "4",
                                     "--eval-reward-fn", f"{tmp_path / 'reward.py'}:bonus"), cwd=tmp_path)
    assert [v for _, v in read_metrics(tmp_path, "objective/scores")] == [1.5, 1.5]
    assert [v for _, v in read_metrics(tmp_path, "objective/parse_failures")] == [0.25, 0.25]
    assert [v for _, v in read_metrics(tmp_path, "eval/gold_parse_failures")] == [0.25, 0.25]
    assert [v for _, v in read_metrics(tmp_path, "objective/zero_std_groups")] == [1.0, 1.0]
    assert [v for _, v in read_metrics(tmp_path, "loss/policy")] == [0.0, 0.0]


def test_a_field_the_reward_needs_is_missing(task_dir, sft_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The soup was", "answer": "1"}, {"prompt": "The tea was"}])
    (tmp_path / "reward.py").write_text("def check(prompt, response, answer):\n    return float(answer in response)\n")
    for script in ("grpo.py", "ppo_rlhf.py"):
        proc = run_script(script, "--sft-model-path", sft_dir, "--dataset", prompts, "--output-dir", tmp_path / script,
                          "--reward-fn", f"{tmp_path / 'reward.py'}:check", "--eval-reward-fn", "", cwd=tmp_path,
                          check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{prompts}, line 2: no field 'answer'" in proc.stderr, proc.stderr


def test_updates_off_policy_start_at_ratio_one_and_kl_is_measured(task_dir, sft_dir, tmp_path):
    """Two passes over two minibatches with the KL in the reward: the old log-probs come from a separate pass, which
    the first minibatch's forward repeats exactly; the KL starts at 0 (policy = SFT model) and moves."""
    run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "3",
                                     "--reward-fn", "reward_functions.py:positivity", "--num-updates-per-batch", "2",
                                     "--num-mini-batches", "2", "--kl-coef", "0.1", "--kl-in", "reward",
                                     "--kl-estimator", "k1", "--advantage", "rloo"), cwd=tmp_path)
    assert [v for _, v in read_metrics(tmp_path, "val/first_ratio_max_dev")] == [0.0, 0.0, 0.0]
    kl = [v for _, v in read_metrics(tmp_path, "objective/kl")]
    assert kl[0] == 0.0 and kl[-1] != 0.0


def test_grpo_raises_the_reward_and_the_gold_score(task_dir, sft_dir, tmp_path):
    """Reward = count of 'the' (also the judge): the training score rises, and at the end the policy beats the SFT model
    on held-out prompts by that judge."""
    run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "15",
                                     "--rollout-batch-size", "8", "--reward-fn", "reward_functions.py:count_token_the",
                                     "--eval-reward-fn", "reward_functions.py:count_token_the",
                                     "--num-eval-prompts", "32"), cwd=tmp_path)
    scores = [v for _, v in read_metrics(tmp_path, "objective/scores")]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.5, scores
    ((_, win_rate),) = read_metrics(tmp_path, "eval/gold_win_rate_vs_sft")
    assert win_rate > 0.6, win_rate
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
