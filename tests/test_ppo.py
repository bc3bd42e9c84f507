"""Stage 3: each piece of PPO's math against a slow reference, the rollout contracts, and learning."""

import shutil

import pytest
import torch
from conftest import read_metrics, run_script, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from common import pad, reward_scores, truncate_after_eos
from ppo_rlhf import (ValueHead, compute_gae, forward, kl_shaped_rewards, masked_mean, masked_whiten, policy_loss,
                      value_loss)
from plumbing import layout


def test_gae_matches_a_direct_double_sum():
    torch.manual_seed(0)
    B, T, gamma, lam = 3, 7, 0.9, 0.8
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], dtype=torch.float)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(mask[b].sum())  # valid length: the episode ends at its last valid token
        r, v = rewards[b, :n], values[b, :n]
        v_next = torch.cat([v[1:], torch.zeros(1)])
        delta = r + gamma * v_next - v
        for t in range(T):
            expected = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) if t < n else torch.tensor(0.0)
            assert torch.allclose(advantages[b, t], torch.as_tensor(expected), atol=1e-5), (b, t)
            assert torch.allclose(returns[b, t], torch.as_tensor(expected) + (v[t] if t < n else 0), atol=1e-5)


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, -1e6, 1e6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)
    w = masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - valid.mean()) / valid.var(unbiased=False).sqrt()
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5)
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(masked_mean(kept, mask), valid.mean(), atol=1e-5)


def test_truncation_after_the_first_eos():
    eos, pad_id = 2, 0
    responses = torch.tensor([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 5, 5, 5, 5]])
    out, mask, has_eos = truncate_after_eos(responses, eos, pad_id)
    assert out.tolist() == [[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 5, 5, 5, 5]]
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_score_lands_on_eos_and_the_kl_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)  # row 0 ends with EOS at index 2
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0, 0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, 9, 9], [-1.0, -2.0, -1.0, -1.0, -1.0]])
    scores = torch.tensor([0.7, -0.3])
    rewards, non_score, kl_k1, kl_k3 = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    k1 = torch.tensor([[0.5, -1.0, 0.0, 0, 0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(kl_k1, k1)
    expected = -0.1 * k1
    expected[0, 2] += 0.7  # at the EOS, not one past it
    expected[1, 4] += -0.3  # no EOS: the last token
    assert torch.allclose(rewards, expected)
    assert torch.allclose(non_score, -0.1 * k1)
    # k3 = (r - 1) - log r with log r = ref - logprob: e^-0.5 - 1 + 0.5, e^1 - 1 - 1, and e^-1 - 1 + 1, by hand
    k3 = torch.tensor([[0.1065307, 0.7182818, 0.0, 0, 0], [0.0, 0.3678794, 0.0, 0.0, 0.0]])
    assert torch.allclose(kl_k3, k3, atol=1e-6)
    r3, _, _, _ = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, 0.1, "k3")
    assert torch.allclose(r3 - rewards, -0.1 * (k3 - k1), atol=1e-6)


def test_clipped_value_loss_on_hand_values():
    values = torch.tensor([[1.0, 1.0, 0.0]])
    new_values = torch.tensor([[1.5, 0.9, 0.0]])
    returns = torch.tensor([[3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(new_values, values, returns, mask, cliprange_value=0.2)
    # token 0: unclipped (1.5-3)^2 = 2.25, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: 0.81 vs (0.9-0)^2 = 0.81 -> 0.81
    assert torch.allclose(loss, torch.tensor(0.5 * (3.24 + 0.81) / 2))
    assert torch.allclose(clipfrac, torch.tensor(0.5))


def test_policy_loss_clipping_and_dual_clip():
    logprobs = torch.zeros(1, 3)
    new_logprobs = torch.log(torch.tensor([[1.5, 0.5, 5.0]]))
    advantages = torch.tensor([[1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, ratio, clipfrac = policy_loss(new_logprobs, logprobs, advantages, mask, cliprange=0.2)
    # max(-A r, -A clip(r)): 1 -> max(-1.5, -1.2) = -1.2; 2 -> max(0.5, 0.8) = 0.8; 3 -> max(5, 1.2) = 5
    assert torch.allclose(loss, torch.tensor((-1.2 + 0.8 + 5.0) / 3))
    assert torch.allclose(clipfrac, torch.tensor(2 / 3))
    dual, _, _ = policy_loss(new_logprobs, logprobs, advantages, mask, cliprange=0.2, dual_clip=3.0)
    assert torch.allclose(dual, torch.tensor((-1.2 + 0.8 + 3.0) / 3))  # the third is capped at -c * A = 3


def test_empty_response_keeps_losses_finite():
    """A response that is only EOS has one valid token; a batch of them must give finite everything."""
    mask = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    rewards = torch.tensor([[0.3, 0, 0], [-0.2, 0, 0]])
    values = torch.tensor([[0.1, 0, 0], [0.1, 0, 0]])
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 0.95)
    advantages = masked_whiten(advantages, mask)
    lp = torch.tensor([[-0.1, 0, 0], [-0.2, 0, 0]])
    pg, _, _ = policy_loss(lp, lp, advantages, mask, 0.2)
    vf, _ = value_loss(values, values, returns, mask, 0.2)
    assert all(torch.isfinite(t).all() for t in (advantages, returns, pg, vf))
    same = masked_whiten(torch.tensor([[0.5, 0, 0]]), torch.tensor([[1.0, 0, 0]]))  # zero variance
    assert torch.isfinite(same).all()


def test_left_padding_does_not_change_logprobs(model_dir):
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt, response = [1, 40, 41, 42], [50, 51, 2]
    results = []
    for n_pad in (0, 3):
        queries, qmask = pad([prompt, [1] * (len(prompt) + n_pad)], 0, side="left")
        responses, rmask = pad([response, response], 0)
        qr, mask = torch.cat([queries, responses], 1), torch.cat([qmask, rmask], 1)
        with torch.no_grad():
            lay = layout(qr, mask, queries.shape[1], padding_free=False)
            results.append(forward(policy, None, lay, qr[:, queries.shape[1]:], 0.7, with_values=False)[0][0])
    assert torch.allclose(results[0], results[1], atol=1e-5)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_padding_free_forward_matches_padded(model_dir, value_model):
    """Left-padded queries, responses cut at different EOS: the packed forward gives the padded forward's log-probs,
    entropies, values and reward scores on every valid token, and the same gradient of a masked loss."""
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    if value_model == "shared":
        value_net = ValueHead(policy.config.hidden_size)
        torch.nn.init.normal_(value_net.linear.weight)  # not zeros: values of 0 everywhere would hide a wrong gather
    else:
        value_net = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    scorer = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    prompts = [[1, 40, 41, 42], [1, 43], [1, 44, 45], [1, 46, 47, 48, 49, 50]]
    responses = [[60, 61, 2, 0, 0], [62, 63, 64, 65, 66], [2, 0, 0, 0, 0], [67, 68, 69, 2, 0]]
    queries, qmask = pad(prompts, 0, side="left")
    rmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    qr, mask = torch.cat([queries, torch.tensor(responses)], 1), torch.cat([qmask, rmask], 1)
    results = []
    for padding_free in (False, True):
        lay = layout(qr, mask, queries.shape[1], padding_free)
        lp, ent, v = forward(policy, value_net, lay, qr[:, queries.shape[1]:], 0.7)
        params = [p for m in (policy, value_net) if m is not None for p in m.parameters()]
        grads = torch.autograd.grad(masked_mean(lp + ent + v, rmask.float()), params)
        score = reward_scores(scorer, **lay[0], last=lay[2])
        if padding_free:
            assert lay[0]["input_ids"].numel() < qr.numel()  # the padding is gone
        else:  # the padded layout reads the score where reward_scores finds the last real token itself
            assert torch.allclose(score, reward_scores(scorer, qr, mask), atol=1e-6)
        results.append((lp, ent, v, score, torch.cat([g.flatten() for g in grads])))
    valid = rmask.bool()
    for padded, packed in zip(*results):
        if padded.shape == valid.shape:
            padded, packed = padded[valid], packed[valid]
        assert torch.allclose(padded, packed, atol=1e-5), (padded, packed)


def ppo_args(task_dir, sft_dir, out, *extra):
    return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl",
            "--eval-dataset", task_dir / "prompts_eval.jsonl", "--output-dir", out,
            "--rollout-batch-size", "16", "--response-length", "12", "--num-eval-prompts", "8",
            "--eval-steps", "1000", "--learning-rate", "1e-3", *extra]


def test_first_minibatch_ratio_is_one_and_generation_config_is_ignored(task_dir, sft_dir, tmp_path):
    """Rollout and update forwards agree (ratio exactly 1 on the first minibatch) and policy == reference at first
    (KL 0). The SFT model's generation_config.json here forbids EOS (suppress_tokens) and penalises repetition: PPO
    must sample without it, so some responses end. AdamW's weight decay is 0 by default: embedding rows of the value
    model that no token reached stay as they were."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    model = tmp_path / "sft_with_generation_config"
    shutil.copytree(sft_dir, model)
    eos = AutoModelForCausalLM.from_pretrained(sft_dir).config.eos_token_id
    GenerationConfig(do_sample=True, suppress_tokens=[eos], repetition_penalty=1.3, top_k=5).save_pretrained(model)
    for value_model in ("separate", "shared"):
        (tmp_path / value_model).mkdir()
        run_script("ppo_rlhf.py", *ppo_args(task_dir, model, tmp_path / value_model / "out", "--num-iterations", "2",
                                            "--reward-fn", "reward_functions.py:positivity", "--temperature", "0.7",
                                            "--value-model", value_model, "--eval-reward-fn", ""),
                   cwd=tmp_path / value_model)
        assert [v for _, v in read_metrics(tmp_path / value_model, "val/first_ratio_max_dev")] == [0.0, 0.0]
        kl = read_metrics(tmp_path / value_model, "objective/kl")
        assert kl[0][1] == 0.0 and kl[1][1] != 0.0
        assert sum(v for _, v in read_metrics(tmp_path / value_model, "val/num_eos_tokens")) > 0
    start = load_file(model / "model.safetensors")["model.embed_tokens.weight"]
    trained = load_file(tmp_path / "separate" / "out" / "value_model" / "model.safetensors")["model.embed_tokens.weight"]
    assert (trained == start).all(dim=1).sum() >= 20  # weight decay would have shrunk every row


def test_micro_batches_change_no_gradient(task_dir, sft_dir, tmp_path):
    """The losses are token means over the whole minibatch: split into 4 micro-batches of unequal token counts, one
    optimizer step has the gradient (norm) of the unsplit minibatch. Averaging each micro-batch's own token mean, as
    before, weights the tokens of a micro-batch of short responses more, and fails this."""
    norms, lengths = {}, {}
    for accumulation in (1, 4):
        cwd = tmp_path / str(accumulation)
        cwd.mkdir()
        run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, cwd / "out", "--num-iterations", "1", "--num-ppo-epochs",
                                            "1", "--num-mini-batches", "1", "--gradient-accumulation-steps",
                                            str(accumulation), "--reward-fn", "reward_functions.py:positivity",
                                            "--eval-reward-fn", "", "--temperature", "1.5"), cwd=cwd)
        norms[accumulation] = read_metrics(cwd, "loss/grad_norm_avg")[0][1]
        lengths[accumulation] = [read_metrics(cwd, k)[0][1] for k in ("val/response_length", "val/num_eos_tokens")]
    assert lengths[1] == lengths[4] and 0 < lengths[1][1] < 16  # the same rollout; some ended early, some did not
    assert norms[4] == pytest.approx(norms[1], rel=1e-4)


def test_missing_eos_penalty_through_the_script(task_dir, sft_dir, tmp_path):
    """A constant reward 0.7 and kl_coef 0: what PPO maximises is 0.7 less the penalty 1.0 for each response that
    never ended, as the script computes it from its own rollouts."""
    (tmp_path / "constant.py").write_text("def score(prompt, response):\n    return 0.7\n")
    run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "3", "--kl-coef", "0",
                                        "--reward-fn", f"{tmp_path / 'constant.py'}:score", "--response-length", "6",
                                        "--value-model", "shared", "--num-ppo-epochs", "1", "--eval-reward-fn", ""),
               cwd=tmp_path)
    ended = [v for _, v in read_metrics(tmp_path, "val/num_eos_tokens")]
    assert min(ended) < 16  # some responses ran out of tokens
    for n, (_, score), (_, rlhf_reward) in zip(ended, read_metrics(tmp_path, "objective/scores"),
                                                read_metrics(tmp_path, "objective/rlhf_reward")):
        assert score == pytest.approx(0.7) and rlhf_reward == pytest.approx(0.7 - 1.0 * (16 - n) / 16)


def test_one_valid_token_keeps_metrics_finite(task_dir, sft_dir, tmp_path):
    """One episode of one token: the ratio's variance is undefined and must not stop the run. No evaluation. The
    gradient norm is logged as it was before clipping (here far above --max-grad-norm)."""
    run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "1",
                                        "--rollout-batch-size", "1", "--num-mini-batches", "1", "--num-ppo-epochs", "1",
                                        "--response-length", "1", "--reward-fn", "reward_functions.py:positivity",
                                        "--value-model", "shared", "--num-eval-prompts", "0",
                                        "--max-grad-norm", "1e-6"), cwd=tmp_path)
    assert read_metrics(tmp_path, "val/ratio_var") == [(1, 0.0)]
    (_, grad_norm), = read_metrics(tmp_path, "loss/grad_norm_avg")
    assert 1e-3 < grad_norm < float("inf")
    assert read_metrics(tmp_path, "eval/scores") == []


def test_dual_clip_must_exceed_one(task_dir, sft_dir, tmp_path):
    proc = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "1",
                                               "--dual-clip", "0.5", "--reward-fn", "reward_functions.py:positivity",
                                               "--eval-reward-fn", ""), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--dual-clip 0.5: c must be > 1" in proc.stderr and "Traceback" not in proc.stderr


def test_ppo_raises_a_toy_reward_and_kl_coef_limits_kl(task_dir, sft_dir, tmp_path):
    """Reward = count of 'the'. It must rise within a few iterations, and the final evaluation's win rate against
    the SFT policy on that reward must be a share above one half; a large kl_coef must end with a smaller KL."""
    finals = {}
    for kl_coef in ("0.0", "1.0"):
        cwd = tmp_path / kl_coef
        cwd.mkdir()
        judge = "reward_functions.py:count_token_the" if kl_coef == "0.0" else ""
        run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, cwd / "out", "--num-iterations", "12",
                                            "--reward-fn", "reward_functions.py:count_token_the", "--kl-coef", kl_coef,
                                            "--value-model", "shared", "--eval-reward-fn", judge,
                                            "--num-eval-prompts", "32"), cwd=cwd)
        scores = [v for _, v in read_metrics(cwd, "objective/scores")]
        finals[kl_coef] = sum(v for _, v in read_metrics(cwd, "objective/kl")[-3:]) / 3
        if kl_coef == "0.0":
            assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.5, scores
            ((_, win_rate),) = read_metrics(cwd, "eval/gold_win_rate_vs_sft")
            ((_, policy), (_, sft)) = read_metrics(cwd, "eval/gold_score")[-1:] + read_metrics(cwd, "eval/sft_gold_score")
            assert 0.6 < win_rate <= 1.0 and policy > sft, (win_rate, policy, sft)
            distinct = [v for _, v in read_metrics(cwd, "eval/distinct_responses")]
            assert distinct[0] > 0.8 and all(0 < v <= 1 for v in distinct), distinct  # sampled responses differ
    assert finals["1.0"] < finals["0.0"], finals


def test_pipeline_chains_and_saves(task_dir, sft_dir, tmp_path):
    """reward_model.py from the SFT folder, then ppo_rlhf.py with both; outputs load with plain transformers, and the
    first rollout scores about 0, as the reward model's normalisation promises."""
    (tmp_path / "rm_logs").mkdir()
    rm = run_script("reward_model.py", "--model-name-or-path", sft_dir, "--dataset", task_dir / "preference_train.jsonl",
                    "--eval-dataset", task_dir / "preference_eval.jsonl", "--output-dir", tmp_path / "rm",
                    "--max-steps", "4", "--num-normalize-samples", "16", "--normalize-response-length", "12",
                    "--eval-reward-fn", "", cwd=tmp_path / "rm_logs")
    proc = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "ppo", "--reward-model-path",
                                               tmp_path / "rm", "--num-iterations", "2", "--eval-steps", "1"),
                      cwd=tmp_path)
    assert "warning: the reward model was normalised" not in proc.stdout  # it sampled as this run samples
    (tmp_path / "other").mkdir()
    other = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "other" / "ppo", "--reward-model-path",
                                                tmp_path / "rm", "--num-iterations", "1", "--response-length", "8"),
                       cwd=tmp_path / "other")
    assert "warning: the reward model was normalised on samples at temperature, response length, prompt length " \
           "[0.7, 12, 64]; this run samples at [0.7, 8, 64]" in other.stdout
    spread = float(rm.stdout.split("(score std ")[1].split(")")[0])  # of the normalisation samples' scores
    first = float(proc.stdout.split("first rollout: mean score ")[1].split(",")[0])
    assert abs(first) < spread, (first, spread)
    assert first == pytest.approx(read_metrics(tmp_path, "objective/scores")[0][1], abs=1e-3)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ppo" / "value_model")
    assert policy.config.vocab_size == value.config.vocab_size
    assert not (tmp_path / "ppo" / "checkpoint").exists()


def test_entropy_has_no_backward_unless_the_bonus_is_on(model_dir):
    """With entropy_grad off (ent_coef 0) the entropy is a plain number: the same values, no autograd graph, and the
    policy-loss gradient is what it was with the graph kept (where the loss multiplied it by 0)."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    queries, qmask = pad([[1, 40, 41], [1, 43]], 0, side="left")
    responses, rmask = torch.tensor([[60, 61, 2], [62, 2, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    lay = layout(torch.cat([queries, responses], 1), torch.cat([qmask, rmask], 1), queries.shape[1], True)
    out = {}
    for entropy_grad in (True, False):
        lp, ent, _ = forward(policy, None, lay, responses, 0.7, with_values=False, entropy_grad=entropy_grad)
        loss = -masked_mean(lp, rmask.float()) - 0.0 * masked_mean(ent, rmask.float())
        grads = torch.autograd.grad(loss, list(policy.parameters()))
        out[entropy_grad] = (ent, torch.cat([g.flatten() for g in grads]))
    assert out[True][0].requires_grad and not out[False][0].requires_grad
    assert torch.equal(out[True][0].detach(), out[False][0]) and torch.equal(out[True][1], out[False][1])



@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_head_at_response_positions_matches_full_logits(model_dir, arch):
    """`forward` applies the LM head only where response tokens are predicted. Against the slow reference (the full
    (R, L, V) logits, then gathered) on packed and padded layouts: the same log-probs, entropies, values and gradient
    to 1e-5. Gemma 2 soft-caps its logits after the head: the cap must still apply (a call of the head alone skips it)."""
    from transformers import Gemma2Config

    torch.manual_seed(0)
    if arch == "llama":
        policy = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        policy = AutoModelForCausalLM.from_config(Gemma2Config(
            vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0, attn_implementation="eager"))
    value_net = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(value_net.linear.weight)
    queries, qmask = pad([[1, 40, 41, 42], [1, 43], [1, 44, 45]], 0, side="left")
    responses = torch.tensor([[60, 61, 2, 0], [62, 63, 64, 65], [2, 0, 0, 0]])
    rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    qr, mask = torch.cat([queries, responses], 1), torch.cat([qmask, rmask], 1)
    params = list(policy.parameters()) + list(value_net.parameters())
    for padding_free in (False, True):
        lay = layout(qr, mask, queries.shape[1], padding_free)
        inputs, (rows, cols), _ = lay
        out = policy(**inputs, use_cache=False, output_hidden_states=True)  # the reference: every position's logits
        logits = out.logits[rows, cols].float() / 0.7
        ref_lp = torch.log_softmax(logits, -1).gather(2, responses.unsqueeze(-1)).squeeze(-1)
        ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        ref_v = value_net(out.hidden_states[-1][rows, cols])
        if arch == "gemma2":
            assert out.logits.abs().max() < 2.0  # the cap is in force in the reference
        lp, ent, v = forward(policy, value_net, lay, responses, 0.7, entropy_grad=True)
        for a, b in ((lp, ref_lp), (ent, ref_ent), (v, ref_v)):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        grad = torch.autograd.grad(masked_mean(lp + ent + v, rmask.float()), params)
        ref_grad = torch.autograd.grad(masked_mean(ref_lp + ref_ent + ref_v, rmask.float()), params)
        for g, rg in zip(grad, ref_grad):
            assert torch.allclose(g, rg, atol=1e-5), (g - rg).abs().max()
        assert len(policy.get_output_embeddings()._forward_pre_hooks) == 0  # the hook is gone after the pass


def test_reward_functions_receive_the_record_fields(task_dir, sft_dir, tmp_path):
    """A reward function naming a field of the prompt record gets it: here the score is the record's `bonus`, so the
    batch's mean score is the mean bonus of its prompts (all four prompts in every batch)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} was", "bonus": i, "note": "unused"}
                                                       for i, w in enumerate(("pasta", "soup", "plot", "view"))])
    (tmp_path / "reward.py").write_text("def bonus(prompt, response, bonus):\n    return float(bonus)\n")
    run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "out", "--dataset", prompts, "--num-iterations",
                                        "2", "--rollout-batch-size", "4", "--reward-fn",
                                        f"{tmp_path / 'reward.py'}:bonus", "--value-model", "shared",
                                        "--num-eval-prompts", "0", "--eval-reward-fn", ""), cwd=tmp_path)
    assert [v for _, v in read_metrics(tmp_path, "objective/scores")] == [1.5, 1.5]
