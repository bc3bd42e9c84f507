"""grpo.py: the advantages by hand, the loss against a slow reference, the gradient under every aggregation the same
however the batch is split (micro-batches, torchrun processes), which KL gradient each placement follows, and learning."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, run_script, write_jsonl
from transformers import AutoModelForCausalLM

from common import Rollout, pad
from grpo import (Args, Episodes, backward_minibatch, cispo_loss, clipped_surrogate, group_advantages, importance_ratio,
                  kl_penalty, loss_normaliser, loss_sum, top_entropy_mask, truncated_importance_weights)
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
        ratio = importance_ratio(new, old, torch.ones(1, 4), "token")
        loss, clip_low, clip_high = clipped_surrogate(ratio, torch.tensor([adv]), 0.2, 0.3)
        expected = [-min(r * adv, max(0.8, min(r, 1.3)) * adv) for r in (0.5, 1.0, 1.25, 1.5)]
        assert torch.allclose(loss, torch.tensor([expected])), (loss, expected)
        assert clip_low.int().tolist() == [[int(adv < 0), 0, 0, 0]]
        assert clip_high.int().tolist() == [[0, 0, 0, int(adv > 0)]]
    assert torch.allclose(ratio, torch.tensor([[0.5, 1.0, 1.25, 1.5]]))


def test_sequence_level_ratio_is_the_geometric_mean_of_the_loss_tokens():
    """GSPO: one ratio per response, exp of the mean log-ratio over its loss tokens (padding left out), at each token."""
    new = torch.log(torch.tensor([[2.0, 0.5, 4.0, 7.0], [1.5, 9.0, 9.0, 9.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # the 7 and the 9s are padding
    ratio = importance_ratio(new, torch.zeros(2, 4), mask, "sequence")
    assert torch.allclose(ratio, torch.tensor([[(2 * 0.5 * 4) ** (1 / 3)] * 4, [1.5] * 4]))
    assert torch.allclose(importance_ratio(new, torch.zeros(2, 4), mask, "token"), new.exp())


def slow_policy_loss(new, old, adv, mask, loss, level, cliprange, cliprange_high, delta):
    """The per-token policy loss and d loss / d new log-prob, token by token, from the papers' formulas."""
    B, T = new.shape
    values, grads = torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        n = max(1, sum(int(mask[b, t]) for t in range(T)))
        seq = math.exp(sum(float(new[b, t] - old[b, t]) for t in range(T) if mask[b, t]) / n)
        for t in range(T):
            r = seq if level == "sequence" else math.exp(float(new[b, t] - old[b, t]))
            dr = r / n * mask[b, t] if level == "sequence" else r  # d r / d new[b, t]
            a = float(adv[b])
            if loss == "cispo":  # -sg(min(r, 1 + eh)) * A * log pi: the weight is a constant to the gradient
                w = min(r, 1 + cliprange_high)
                values[b, t], grads[b, t] = -w * a * float(new[b, t]), -w * a
                continue
            capped = min(r, delta) if delta is not None else r
            clipped = min(max(r, 1 - cliprange), 1 + cliprange_high)
            if capped * a <= clipped * a:  # the unclipped branch is the min: its gradient, unless delta capped it
                values[b, t], grads[b, t] = -capped * a, (0.0 if delta is not None and r > delta else -a * dr)
            else:
                values[b, t], grads[b, t] = -clipped * a, 0.0
    return values, grads


@pytest.mark.parametrize("loss, level, delta", [("clip", "token", None), ("clip", "sequence", None),
                                                ("clip", "token", 1.5), ("cispo", "token", None),
                                                ("cispo", "sequence", None)])
def test_policy_losses_match_a_slow_reference(loss, level, delta):
    """Ratios laid out by hand to fall inside the clip, below it, above it and above delta, for advantages of both
    signs: the loss and its gradient per token, against the formulas computed token by token."""
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.4, 2.0], [0.5, 0.9, 1.0, 1.1, 1.4, 2.0], [1.25, 0.7, 3.0, 1.0, 1.0, 1.0]])
    old = -1 - torch.rand(3, 6, generator=torch.Generator().manual_seed(0))
    new = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -0.5])
    mask = torch.tensor([[1.0] * 6, [1.0] * 6, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    ratio = importance_ratio(new, old, mask, level)
    if loss == "cispo":
        per_token, _ = cispo_loss(ratio, new, adv, 0.3)
    else:
        per_token, _, _ = clipped_surrogate(ratio, adv, 0.2, 0.3, delta)
    (grads,) = torch.autograd.grad((per_token * mask).sum(), new)
    values, expected = slow_policy_loss(new.detach(), old, adv, mask, loss, level, 0.2, 0.3, delta)
    if level == "sequence" and loss == "clip":  # every token's loss holds the response's ratio, which each token moves:
        expected = (expected * mask).sum(1, keepdim=True) * mask  # d(sum of the row) / d token = the row's sum
    assert torch.allclose(per_token * mask, values * mask, atol=1e-5)
    assert torch.allclose(grads * mask, expected * mask, atol=1e-5), (grads, expected)


def test_top_entropy_mask_keeps_the_top_quantile_of_the_loss_tokens():
    """q = 0.25 of 8 loss tokens: the 2 most uncertain ones, wherever they sit; padding, however uncertain, never."""
    entropy = torch.tensor([[0.1, 2.0, 0.3, 9.0], [1.5, 0.2, 0.4, 0.6], [3.0, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # 8 loss tokens
    kept = top_entropy_mask(entropy, mask, 0.25)
    assert kept.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert top_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()


def test_truncated_importance_weights_by_hand():
    """Yao et al. 2025: the weight is pi_old / pi_sampler (trainer over sampler), capped at C."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    assert torch.allclose(truncated_importance_weights(old, sampler, 3.0), torch.tensor([[2.0, 0.5, 3.0]]))


def test_bias_corrected_kl_estimates_the_current_policy_from_old_samples():
    """Off-policy tokens drawn from pi_old: k3 weighted by pi / pi_old estimates KL(pi || ref), value and gradient,
    by Monte Carlo on a categorical distribution; the plain k3 of those tokens estimates neither."""
    torch.manual_seed(0)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0, -1.0, 0.5]), 0)
    theta = torch.tensor([2.0, 0.0, -1.0, 0.5, 1.0], requires_grad=True)
    old_logp = torch.log_softmax(torch.tensor([0.5, 0.5, 0.0, 0.0, 1.5]), 0)  # the rollout's policy, not the current
    logp_all = torch.log_softmax(theta, 0)
    kl = (logp_all.exp() * (logp_all - ref_logp)).sum()  # KL(pi || ref), exactly
    exact_grad = torch.autograd.grad(kl, theta, retain_graph=True)[0]
    x = torch.multinomial(old_logp.exp(), 400_000, replacement=True)
    logp, ref, old = logp_all[x][:, None], ref_logp[x][:, None], old_logp[x][:, None]
    ratio = importance_ratio(logp, old, torch.ones_like(logp), "token")
    corrected = (kl_penalty(logp, ref, "k3") * ratio).mean()
    plain = kl_penalty(logp, ref, "k3").mean()
    assert abs(corrected.item() - kl.item()) < 0.02 * kl.item() and abs(plain.item() - kl.item()) > 0.2 * kl.item()
    grad = torch.autograd.grad(corrected, theta)[0]
    assert (grad - exact_grad).norm() < 0.05 * exact_grad.norm(), (grad, exact_grad)


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


# the policy losses and weights of the update, each a set of flags; "pg_weights": the entropy mask and the truncated
# importance weights against the sampler, both per-token weights the episodes carry
VARIANTS = {"clip": {}, "gspo": {"importance_sampling_level": "sequence"}, "cispo": {"policy_loss": "cispo"},
            "delta": {"delta": 1.3}, "kl_bias_correction": {"kl_bias_correction": True}, "pg_weights": {}}


def episodes_for(tokenizer, seed=0, B=8, T=6, pg_weights=False, G=1, tools=False):
    """A batch of B responses of unequal lengths to prompts of unequal lengths, with advantages, old log-probs off
    the policy's (~ -6 for the tiny model) both ways (so both clips act) and reference log-probs; with `pg_weights`,
    weights on each token's policy loss, some 0 (as an entropy mask makes them), the others spread (as truncated
    importance weights). `G` > 1: groups, B / G prompts each repeated G times in a row. `tools`: in responses of 5
    tokens or more, tokens 1 and 2 a tool's turn (context, not in the loss), as `rollout_with_tools` marks them."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 5, 3, 2, 4)[:B // G]]
    queries, query_mask = pad([p for p in prompts for _ in range(G)], tokenizer.pad_token_id, side="left")
    responses = torch.randint(5, vocab, (B, T), generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6, 2, 6, 5, 1, 4, 3, 6, 2])[:B]
    response_mask = torch.arange(T)[None] < lengths[:, None]
    responses = responses.masked_fill(~response_mask, tokenizer.pad_token_id)
    policy_mask = response_mask & ~((lengths[:, None] >= 5) & (torch.arange(T)[None] >= 1) & (torch.arange(T)[None] <= 2))
    rollout = Rollout(torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask.long()], 1),
                      queries.shape[1], responses, response_mask, lengths < T, None, policy_mask if tools else None)
    weights = (torch.rand(B, T, generator=g) < 0.6) * 2 * torch.rand(B, T, generator=g)
    return Episodes(rollout, rollout.actions().float(), torch.randn(B, generator=g),
                    -9 + 6 * torch.rand(B, T, generator=g), -3 - torch.rand(B, T, generator=g),  # ratios ~e^-3 to e^3
                    weights if pg_weights else None)


def gradient(model, episodes, aggregation, micro, padding_free=True, variant="clip", share_prompt=False):
    args = Args(loss_aggregation=aggregation, kl_coef=0.1, kl_in="loss", kl_estimator="k3", response_length=6,
                cliprange=0.2, cliprange_high=0.28, **VARIANTS.get(variant, {}))
    model.zero_grad()
    backward_minibatch(Parallel(model), episodes, torch.arange(len(episodes.advantages)), micro, args, padding_free,
                       lambda: torch.autocast("cpu", enabled=False), share_prompt)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def relative_gap(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in b)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(aggregation, variant, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    episodes = episodes_for(tokenizer, pg_weights=variant == "pg_weights")
    whole = gradient(model, episodes, aggregation, micro=8, variant=variant)
    assert relative_gap(gradient(model, episodes, aggregation, micro=2, variant=variant), whole) < 1e-5
    assert relative_gap(gradient(model, episodes, aggregation, micro=8, padding_free=False, variant=variant), whole) < 1e-5
    if variant != "clip":  # the flags change the gradient: the test can tell them apart
        assert relative_gap(gradient(model, episodes_for(tokenizer), aggregation, micro=8), whole) > 1e-3
    tools = episodes_for(tokenizer, pg_weights=variant == "pg_weights", tools=True)  # tool turns inside responses
    with_tools = gradient(model, tools, aggregation, micro=8, variant=variant)
    assert relative_gap(gradient(model, tools, aggregation, micro=3, variant=variant), with_tools) < 1e-5
    assert relative_gap(with_tools, whole) > 1e-3


GRADIENT_WORKER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from transformers import AutoModelForCausalLM, AutoTokenizer
import grpo
import plumbing
from test_grpo import CASES, VARIANTS, episodes_for
rank, world_size, device = plumbing.init_distributed("cpu")
tokenizer = AutoTokenizer.from_pretrained({model!r})
for strategy in ("ddp", "fsdp"):
    for aggregation, variant in CASES:
        episodes = episodes_for(tokenizer, pg_weights=variant == "pg_weights", G=2 if variant == "shared" else 1,
                                tools=variant == "tools")
        model = AutoModelForCausalLM.from_pretrained({model!r})
        wrapped = plumbing.distribute([model], strategy, False)
        args = grpo.Args(loss_aggregation=aggregation, kl_coef=0.1, kl_in="loss", kl_estimator="k3",
                         response_length=6, cliprange=0.2, cliprange_high=0.28, **VARIANTS.get(variant, {{}}))
        half = torch.arange(rank * 4, rank * 4 + 4)  # this process's half of the batch, in 2 micro-batches of 2
        grpo.backward_minibatch(wrapped, episodes, half, 2, args, True, lambda: torch.autocast("cpu", enabled=False),
                                variant == "shared")
        grads = {{n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                  for n, p in wrapped.named_parameters()}}
        if rank == 0:
            torch.save(grads, os.path.join({out!r}, f"{{strategy}}_{{aggregation}}_{{variant}}.pt"))
torch.distributed.barrier()
os._exit(0)  # no interpreter finalization: it can free gloo's group under its threads (plumbing.user_errors_in_one_line)
"""
# every aggregation with the clipped surrogate; the other losses and weights with the token aggregation; "shared":
# groups of 2 whose prompt each micro-batch computes once (`shared_prompt_layout`), against the unshared whole batch;
# "tools": responses with a tool's turn inside, out of the loss
CASES = ([(a, "clip") for a in ("token", "sequence", "constant")] + [("token", v) for v in VARIANTS if v != "clip"]
         + [("token", "shared"), ("sequence", "shared"), ("token", "tools"), ("sequence", "tools")])


def test_two_processes_give_the_gradient_of_the_whole_batch(model_dir, tmp_path):
    """torchrun, 2 processes x 2 micro-batches of unequal lengths, DDP and FSDP2: the gradient of one optimizer step
    is the one-process gradient of the whole batch, for every aggregation and every policy loss and weight, and with
    each group's prompt computed once, and with tool turns inside responses."""
    from transformers import AutoTokenizer

    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENT_WORKER.format(repo=REPO, tests=os.path.join(REPO, "tests"), model=str(model_dir),
                                             out=str(tmp_path)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)],
                   check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for aggregation, variant in CASES:
        episodes = episodes_for(tokenizer, pg_weights=variant == "pg_weights", G=2 if variant == "shared" else 1,
                                tools=variant == "tools")
        whole = {f"models.0.{k}": v for k, v in gradient(model, episodes, aggregation, micro=8, variant=variant).items()}
        for strategy in ("ddp", "fsdp"):
            two = torch.load(tmp_path / f"{strategy}_{aggregation}_{variant}.pt", weights_only=True)
            two = {k.replace("module.", ""): v for k, v in two.items()}
            assert relative_gap(two, whole) < 1e-5, (strategy, aggregation, variant)


@pytest.mark.parametrize("G, B, micro", [(2, 8, 8), (2, 8, 3), (8, 16, 16), (8, 16, 4)])
def test_a_shared_prompt_gives_the_same_logprobs_gradient_and_reward(G, B, micro, model_dir):
    """Groups of G responses to prompts of unequal lengths (left-padded), responses of unequal lengths: each prompt fed
    once per micro-batch gives the log-probs, one optimizer step's gradient and a reward model's scores of one
    sequence per response (the whole batch, unshared), to fp32 rounding; micro-batches of 3 and 4 cut groups apart."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common import reward_scores
    from grpo import forward
    from plumbing import layout

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    episodes = episodes_for(tokenizer, B=B, G=G)
    batch, mask = episodes.rollout, episodes.rollout.response_mask
    plain = layout(batch.query_responses, batch.attention_mask, batch.context_length, True)
    shared = layout(batch.query_responses, batch.attention_mask, batch.context_length, True, share_prompt=True)
    fed = lambda lay: (lay[0]["input_ids"] != 0).sum().item()  # noqa: E731  (ids drawn from 5 up; packing pads with 0)
    prompt_tokens, response_tokens = batch.attention_mask[:, :batch.context_length].sum().item(), mask.sum().item()
    assert fed(plain) == prompt_tokens + response_tokens
    assert fed(shared) == prompt_tokens // G + response_tokens  # each prompt fed once
    with torch.no_grad():
        expected = forward(model, plain, batch.responses, 0.7)[0]
        assert (forward(model, shared, batch.responses, 0.7)[0] - expected)[mask].abs().max() < 1e-5
    whole = gradient(model, episodes, "token", micro=B)
    assert relative_gap(gradient(model, episodes, "token", micro=micro, share_prompt=True), whole) < 1e-5
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    with torch.no_grad():
        scores = reward_scores(reward_model, **plain[0], last=plain[2])
        assert (reward_scores(reward_model, **shared[0], last=shared[2]) - scores).abs().max() < 1e-5


def test_a_shared_prefill_samples_the_same_tokens_from_fewer(model_dir):
    """Sampling with each group's prompt prefilled once: the same tokens under a fixed seed (the random draws are taken
    in the same order from the same distribution) and the same sampler log-probs, from fewer tokens fed."""
    from transformers import AutoTokenizer

    from common import rollout

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [p for p in episodes_for(tokenizer).rollout.query_responses[:4, :5].tolist() for _ in range(4)]
    prompts = [[t for t in p if t != tokenizer.pad_token_id] for p in prompts]  # 4 prompts of 3 to 5 ids, 4 times each
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda m, inputs, out: fed.append(inputs[0].numel()))
    runs = []
    for share in (False, True):
        torch.manual_seed(3)
        runs.append(rollout(model, prompts, 12, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, True, share))
        runs[-1] = runs[-1], sum(fed)
        fed.clear()
    (plain, plain_fed), (shared, shared_fed) = runs
    assert torch.equal(shared.query_responses, plain.query_responses)
    assert (shared.sampler_logprobs - plain.sampler_logprobs).abs().max() < 1e-5
    assert shared_fed < plain_fed - 10


def test_sharing_works_only_where_the_model_honours_the_mask(model_dir):
    from plumbing import sharing_works

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sharing_works(model, 256)
    model.config.sliding_window = 128  # a custom mask would not apply the window: sequences longer than it refused
    assert sharing_works(model, 128) and not sharing_works(model, 256)
    model.config.sliding_window = None
    model.config._attn_implementation = "eager"  # adds the mask to the scores: a boolean one would leak siblings in
    assert not sharing_works(model, 256)


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
    per_token, *_ = clipped_surrogate(torch.exp(logp - logp.detach()), advantages, 0.2, 0.2)
    in_reward = torch.autograd.grad(loss_sum(per_token, mask, "token") / loss_normaliser(mask, "token", 1), theta,
                                    retain_graph=True)[0]
    # the group mean as the baseline (GRPO without std scaling) includes the response itself: the same direction,
    # shrunk by (G - 1) / G
    per_token, *_ = clipped_surrogate(torch.exp(logp - logp.detach()), group_advantages(scores, G, "grpo", "none"), 0.2,
                                      0.2)
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


@pytest.mark.parametrize("flags", [
    ["--policy-loss", "cispo", "--cliprange-high", "4", "--importance-sampling-level", "sequence",
     "--top-entropy-quantile", "0.2", "--tis-cap", "2", "--kl-coef", "0.1", "--kl-in", "loss", "--kl-bias-correction"],
    ["--delta", "1.5", "--num-updates-per-batch", "2", "--num-mini-batches", "1"]], ids=["cispo-gspo-entropy-tis", "delta"])
def test_the_2025_flags_run_and_start_on_policy(flags, task_dir, sft_dir, tmp_path):
    """grpo.py with GSPO, CISPO, entropy masking, truncated importance sampling and the bias-corrected KL together (and
    with two-sided clipping): the first minibatch repeats the rollout exactly; in fp32 on the CPU the sampler's log-probs
    are the trainer's within rounding, so no importance weight reaches the cap."""
    run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "2",
                                     "--reward-fn", "reward_functions.py:positivity", *flags), cwd=tmp_path)
    assert [v for _, v in read_metrics(tmp_path, "val/first_ratio_max_dev")] == [0.0, 0.0]
    assert all(v < 1e-4 for _, v in read_metrics(tmp_path, "val/sampler_logprob_gap_max"))
    assert read_metrics(tmp_path, "policy/tis_capped") == ([(1, 0.0), (2, 0.0)] if "--tis-cap" in flags else [])
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("flags, message", [(["--delta", "1.1"], "--delta must exceed 1 + cliprange_high"),
                                            (["--top-entropy-quantile", "0"], "--top-entropy-quantile must be in (0, 1]"),
                                            (["--kl-bias-correction"], "--kl-bias-correction weights the KL term")])
def test_the_2025_flags_refuse_what_cannot_work(flags, message, task_dir, sft_dir, tmp_path):
    proc = run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--reward-fn",
                                            "reward_functions.py:positivity", *flags), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("hook, message", [
    ("def r(prompt, response):\n    return 'good'\n", "returned 'good' (str) for "),
    ("def r(prompt, response):\n    return float('nan')\n", "returned nan (float) for "),
    ("def r(prompt, response, answer):\n    return 1.0\n", "no field 'answer', which the reward function"),
    ("", "has no function r"), (None, "no file")])
def test_a_reward_function_that_cannot_work_is_one_line(hook, message, task_dir, sft_dir, tmp_path):
    """A reward function returning a string or NaN (named with the record it scored), one taking a field a record holds
    as null (the same rule as a missing one, in every source), and a file or function that is not there: one line."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ['{"prompt": "The pasta was", "answer": null}'] * 4)
    if hook is not None:
        (tmp_path / "reward.py").write_text(hook)
    proc = run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--dataset", prompts, "--eval-dataset",
                                            "none", "--reward-fn", f"{tmp_path / 'reward.py'}:r"), cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-1500:]


def test_a_hanging_reward_function_cannot_stall_the_run(task_dir, sft_dir, tmp_path):
    """A reward function that hangs on some responses is cut off after --reward-fn-timeout: those score None, counted
    with the parse failures, a warning says so, and the run goes on to its save."""
    (tmp_path / "reward.py").write_text("import time\n\ndef r(prompt, response):\n    if 'the' in response:\n"
                                        "        time.sleep(600)\n    return 1.0\n")
    proc = run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "1",
                                            "--reward-fn", f"{tmp_path / 'reward.py'}:r", "--reward-fn-timeout", "0.2"),
                      cwd=tmp_path)
    assert "took more than 0.2 s on one response: scored None" in proc.stdout
    assert read_metrics(tmp_path, "objective/parse_failures")[0][1] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


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
