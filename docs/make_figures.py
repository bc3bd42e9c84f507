"""Turn runs/*/metrics.jsonl into the figures and the sample table the docs show.

    pip install matplotlib                       # optional: only this script needs it
    python docs/make_figures.py                  # reads ./runs, writes docs/figures/*.png and docs/samples.md

Runs are found by their experiment name (runs/{exp_name}__{seed}__{time}; the latest of each name is used): `sft`,
`reward_model` and `ppo_kl0.05` from the default chain, and those of docs/run_experiments.sh (`ppo_kl0`, `ppo_kl0.2`,
`ppo_hacking`, `rm_pairs10000`, `grpo_kl0.05`, ...). A figure whose runs are missing is skipped with a line saying so.
"""

import glob
import json
import os
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    runs: str = "runs"
    """the folder holding the runs"""
    out: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
    """where the PNGs go"""
    samples: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples.md")
    """where the table of SFT and PPO samples goes"""


def load(runs: str, name: str) -> list[dict] | None:
    """The rows of the latest run named `name`, or None."""
    found = sorted(glob.glob(os.path.join(runs, f"{name}__*", "metrics.jsonl")), key=os.path.getmtime)
    return [json.loads(line) for line in open(found[-1])] if found else None


def load_seeds(runs: str, name: str) -> dict[str, list[dict]]:
    """{seed: rows} of the latest run of each seed named `name` (runs/{name}__{seed}__{time})."""
    found = sorted(glob.glob(os.path.join(runs, f"{name}__*", "metrics.jsonl")), key=os.path.getmtime)
    return {path.split("__")[-2]: [json.loads(line) for line in open(path)] for path in found}


def distinct(rows: list[dict], key: str = "samples") -> tuple[list, list]:
    """(steps, share of distinct responses) from the evaluation tables logged as text ("... 'prompt' -> 'response'")."""
    points = {}
    for r in rows:
        if key in r:
            responses = [line.split(" -> ", 1)[1] for line in r[key].split("\n") if " -> " in line]
            points[r["step"]] = len(set(responses)) / len(responses)
    return sorted(points), [points[s] for s in sorted(points)]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one metric; a step logged twice (a resumed run) keeps its last value."""
    points = {r["step"]: r[key] for r in rows if key in r}
    return sorted(points), [points[s] for s in sorted(points)]


if __name__ == "__main__":
    args = tyro.cli(Args)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    plt.rcParams.update({"figure.dpi": 120, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name))
        plt.close(fig)
        print(f"wrote {os.path.join(args.out, name)}")

    # 1. PPO with the default settings: proxy reward, gold score and KL against iteration
    ppo = load(args.runs, "ppo_kl0.05") or load(args.runs, "ppo")
    if ppo:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3))
        axes[0].plot(*series(ppo, "objective/scores"), label="rollouts (training prompts)")
        axes[0].plot(*series(ppo, "eval/scores"), "o-", label="held-out prompts")
        axes[0].set(title="reward-model score", xlabel="iteration")
        axes[0].legend()
        axes[1].plot(*series(ppo, "eval/gold_score"), "o-", color="C2", label="PPO policy")
        steps, sft_gold = series(ppo, "eval/sft_gold_score")
        if sft_gold:
            axes[1].axhline(sft_gold[-1], color="gray", ls="--", label="SFT policy")
        axes[1].set(title="gold judge, held-out prompts", xlabel="iteration")
        axes[1].legend()
        axes[2].plot(*series(ppo, "objective/kl"), color="C3")
        axes[2].set(title="KL to the SFT policy (nats per response)", xlabel="iteration")
        save(fig, "ppo_learning_curve.png")
    else:
        print("no ppo_kl0.05 or ppo run: skipping ppo_learning_curve.png")

    # 1b. GRPO with the default settings (no KL term) and with PPO's penalty: score, gold score, held-out KL
    grpo = {"kl_coef 0 (default)": load(args.runs, "grpo_kl0") or load(args.runs, "grpo"),
            "kl_coef 0.05, k1 in the reward": load(args.runs, "grpo_kl0.05")}
    grpo = {label: rows for label, rows in grpo.items() if rows}
    if grpo:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3))
        for (label, rows), color in zip(grpo.items(), ("C2", "C4")):
            axes[0].plot(*series(rows, "objective/scores"), color=color, alpha=0.7, label=f"rollouts, {label}")
            axes[1].plot(*series(rows, "eval/gold_score"), "o-", color=color, label=label)
            axes[2].plot(*series(rows, "eval/kl"), "o-", color=color, label=label)
        sft_gold = series(next(iter(grpo.values())), "eval/sft_gold_score")[1]
        if sft_gold:
            axes[1].axhline(sft_gold[-1], color="gray", ls="--", label="SFT policy")
        axes[0].set(title="reward-model score (training prompts)", xlabel="iteration")
        axes[1].set(title="gold judge, held-out prompts", xlabel="iteration")
        axes[2].set(title="KL to the SFT policy, held out (nats)", xlabel="iteration")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        save(fig, "grpo_learning_curve.png")
    else:
        print("no grpo_kl0, grpo or grpo_kl0.05 run: skipping grpo_learning_curve.png")

    # 2. the kl_coef sweep
    sweep = {kl: load(args.runs, f"ppo_kl{kl}") for kl in ("0", "0.05", "0.2")}
    if all(sweep.values()):
        fig, axes = plt.subplots(1, 4, figsize=(13, 3))
        for i, (kl, rows) in enumerate(sweep.items()):
            axes[0].plot(*series(rows, "objective/scores"), color=f"C{i}", label=f"kl_coef {kl}")
            axes[1].plot(*series(rows, "eval/gold_score"), "o-", color=f"C{i}", label=f"kl_coef {kl}")
            axes[2].plot(*series(rows, "objective/kl"), color=f"C{i}", label=f"kl_coef {kl}")
            axes[3].plot(*distinct(rows), "o-", color=f"C{i}", label=f"kl_coef {kl}")
        for ax, title in zip(axes, ["reward-model score (rollouts)", "gold judge (held-out)", "KL to SFT (nats)",
                                    "distinct responses (held-out)"]):
            ax.set(title=title, xlabel="iteration")
            ax.legend()
        save(fig, "ppo_kl_sweep.png")
    else:
        print("kl sweep runs missing: skipping ppo_kl_sweep.png")

    # 3. a long run without a KL penalty: proxy and gold score, KL, and how many different answers are left
    hacking = load(args.runs, "ppo_hacking")
    if hacking:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        axes[0].plot(*series(hacking, "eval/scores"), "o-", label="reward-model score")
        axes[0].plot(*series(hacking, "eval/gold_score"), "o-", label="gold score")
        axes[0].set(title="kl_coef 0, held-out prompts", xlabel="iteration")
        axes[0].legend()
        axes[1].plot(*series(hacking, "objective/kl"), color="C3")
        axes[1].set(title="KL to the SFT policy (nats)", xlabel="iteration")
        axes[2].plot(*distinct(hacking), "o-", color="C4")
        axes[2].set(title="distinct responses, share of 128 held-out", xlabel="iteration", ylim=(0, 1.05))
        save(fig, "ppo_reward_hacking.png")
    else:
        print("no ppo_hacking run: skipping ppo_reward_hacking.png")

    # 4. the reward model: held-out accuracy during training, and against the number of labelled pairs
    curve = {n: load(args.runs, f"rm_pairs{n}") for n in (10000, 30000, 60000)}
    default = load(args.runs, "reward_model")
    if default:
        curve[21000] = default
    curve = {n: rows for n, rows in sorted(curve.items()) if rows}
    if curve:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        ceiling = None
        for i, (n, rows) in enumerate(curve.items()):
            axes[0].plot(*series(rows, "eval/rm/accuracy"), color=f"C{i}", label=f"{n:,} pairs")
            ceiling = (series(rows, "eval/rm/noise_ceiling")[1] or [ceiling])[-1]
        final = [series(rows, "eval/rm/accuracy")[1][-1] for rows in curve.values()]
        error = [(a * (1 - a) / 600) ** 0.5 for a in final]  # sampling error of 600 held-out pairs
        axes[1].errorbar(list(curve), final, yerr=error, fmt="o-", capsize=3, label="reward model (+-1 s.e.)")
        axes[1].set_xticks(list(curve), [f"{n // 1000}k" for n in curve])
        for ax in axes:
            if ceiling:
                ax.axhline(ceiling, color="gray", ls="--", label="noise ceiling")
        axes[0].set(title="held-out accuracy while training", xlabel="optimizer step")
        axes[1].set(title="final held-out accuracy (600 pairs)", xlabel="training pairs (rankings of 4)")
        for ax in axes:
            ax.legend()
        save(fig, "rm_accuracy.png")
    else:
        print("no reward-model runs: skipping rm_accuracy.png")

    # 4b. PPO, DPO, GRPO and RLOO from the same SFT model and labels: final gold score against final KL to the SFT
    #     policy, and against the run's wall time
    families = [("PPO", "ppo_kl", ("0", "0.05", "0.2", "0.5"), "kl_coef", "C0"),
                ("DPO", "dpo_beta", ("0.03", "0.1", "0.3", "1.0"), "beta", "C1"),
                ("GRPO", "grpo_kl", ("0", "0.05", "0.2", "0.5"), "kl_coef", "C2"),
                ("RLOO", "rloo_kl", ("0", "0.05", "0.2", "0.5"), "kl_coef", "C3")]
    found = {method: {name: load(args.runs, f"{prefix}{name}") for name in names}
             for method, prefix, names, _, _ in families}
    if sum(any(runs.values()) for runs in found.values()) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
        for method, _, _, label, color in families:
            points = [(series(rows, "eval/kl")[1][-1], series(rows, "eval/gold_score")[1][-1], rows[-1]["time"], name)
                      for name, rows in found[method].items() if rows]
            if not points:
                print(f"ppo_dpo_frontier.png: no {method} runs, left out")
                continue
            points.sort()  # along the KL axis
            axes[0].plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=f"{method} ({label})")
            axes[1].plot([p[2] for p in points], [p[1] for p in points], "o", color=color, label=method)
            for kl, gold, seconds, name in points:  # the setting beside each point
                for ax, x in ((axes[0], kl), (axes[1], seconds)):
                    ax.annotate(name, (x, gold), textcoords="offset points", fontsize=6, color=color,
                                xytext=(4, -9 if method in ("DPO", "RLOO") else 4))
        sft_gold = [series(rows, "eval/sft_gold_score")[1] for runs in found.values() for rows in runs.values() if rows]
        if any(sft_gold):
            for ax in axes:
                ax.axhline(next(g for g in sft_gold if g)[-1], color="gray", ls="--", label="SFT policy")
        axes[0].set(title="held-out prompts, end of training", xlabel="KL to the SFT policy (nats per response)",
                    ylabel="gold score")
        axes[1].set(title="the same runs against their wall time", xlabel="seconds on 2 CPU cores (+ the reward "
                    "model's for PPO, GRPO, RLOO)", ylabel="gold score")
        axes[0].legend(fontsize=7)
        save(fig, "ppo_dpo_frontier.png")
    else:
        print("fewer than two of ppo_kl*, dpo_beta*, grpo_kl*, rloo_kl* runs: skipping ppo_dpo_frontier.png")

    # 4c. iterative RLHF (iterate.py): rounds of PPO chained end to end against one PPO run of the same length
    def chained(prefix: str, first: str | None = None, rounds: int = 4, per_round: int = 50):
        """The evaluation rows of rounds 0..3 (those run) of an iterate.py run, steps shifted to total PPO iterations
        (`first`: the run of a round 0 copied from another loop)."""
        out = []
        for r in range(rounds):
            rows = load(args.runs, f"{prefix}_ppo{r}") or (load(args.runs, first) if r == 0 and first else None)
            if rows is None:  # the rounds run so far
                return out or None
            out += [row | {"step": row["step"] + r * per_round} for row in rows if r == 0 or row["step"] > 0]
        return out
    curves = [("one run, kl 0", load(args.runs, "hf_single_kl0"), "--", "C3"),
              ("rounds of 50, kl 0, pairs of policy samples", chained("iterative_kl0"), "o-", "C3"),
              ("rounds of 50, kl 0, policy vs SFT pairs", chained("iterative_kl0_vs_sft", "iterative_kl0_ppo0"), "s-",
               "C4"),
              ("one run, kl 0.05", load(args.runs, "hf_single_kl0.05"), "--", "C0"),
              ("rounds of 50, kl 0.05, pairs of policy samples", chained("iterative_kl0.05"), "o-", "C0")]
    for label, rows, _, _ in curves:
        if not rows:
            print(f"iterative_rlhf.png: no runs for '{label}', left out")
    curves = [c for c in curves if c[1]]
    if len(curves) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for label, rows, style, color in curves:
            for ax, key in zip(axes, ["eval/gold_score", "eval/kl", "eval/distinct_responses"]):
                ax.plot(*series(rows, key), style, color=color, ms=3, label=label)
        for ax in axes:
            for x in (50, 100, 150):
                ax.axvline(x, color="gray", lw=0.5, ls=":")
        axes[0].set(title="gold score (held out)", xlabel="PPO iterations (new round at the dotted lines)")
        axes[1].set(title="KL to the SFT policy (nats)", xlabel="PPO iterations")
        axes[2].set(title="share of distinct responses", xlabel="PPO iterations")
        axes[0].legend(fontsize=6)
        save(fig, "iterative_rlhf.png")
    else:
        print("hf_single_kl* or iterative_kl*_ppo* runs missing: skipping iterative_rlhf.png")

    # 4d. rewards that resist hacking, without a KL penalty: one reward model, an ensemble, a hybrid with a rule
    robust = {"one reward model": load(args.runs, "hf_single_kl0"),
              "ensemble of 3, mean": load(args.runs, "hf_ensemble_k0_kl0"),
              "ensemble of 3, mean - std": load(args.runs, "hf_ensemble_k1_kl0"),
              "reward model + 3 x repetition rule": load(args.runs, "hf_hybrid_kl0")}
    colors = dict(zip(robust, ["C3", "C1", "C2", "C0"]))
    robust = {label: rows for label, rows in robust.items() if rows}
    if "one reward model" in robust and len(robust) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for label, rows in robust.items():
            color = colors[label]
            axes[0].plot(*series(rows, "eval/gold_score"), "o-", ms=3, color=color, label=label)
            axes[1].plot(*series(rows, "eval/kl"), "o-", ms=3, color=color, label=label)
            axes[2].plot(*series(rows, "eval/stutter_rate"), "o-", ms=3, color=color, label=label)
        axes[0].set(title="gold score (held out), kl_coef 0", xlabel="PPO iteration")
        axes[1].set(title="KL to the SFT policy (nats)", xlabel="PPO iteration")
        axes[2].set(title="share of responses with a repeated word pair", xlabel="PPO iteration")
        axes[0].legend(fontsize=7)
        save(fig, "robust_rewards.png")
    else:
        print("hf_single_kl0, hf_ensemble_* or hf_hybrid_kl0 runs missing: skipping robust_rewards.png")

    # 4e. a real model on checkable answers: SmolLM2-135M-Instruct, GRPO against arithmetic_task.py:verify
    #     (docs/verifiable.md; the run's --exp-name is grpo_smollm2_arith)
    smol_seeds = load_seeds(args.runs, "grpo_smollm2_arith")
    if smol_seeds:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for i, (seed, smol) in enumerate(sorted(smol_seeds.items())):
            axes[0].plot(*series(smol, "eval/pass@1_greedy"), "o-", color=f"C{i}", label=f"greedy, seed {seed}")
            axes[0].plot(*series(smol, "eval/gold_score"), "x--", color=f"C{i}", alpha=0.6, label=f"sampled, seed {seed}")
            axes[1].plot(*series(smol, "eval/response_length"), "o-", color=f"C{i}", label=f"seed {seed}")
            axes[2].plot(*series(smol, "objective/scores"), color=f"C{i}", label=f"reward, seed {seed}")
            axes[2].plot(*series(smol, "val/truncated"), ":", color=f"C{i}", label=f"cut at 48 tokens, seed {seed}")
        axes[0].set(title="held-out accuracy (100 problems)", xlabel="iteration", ylim=(0, 1))
        axes[0].legend(fontsize=6)
        axes[1].set(title="held-out response length (tokens)", xlabel="iteration")
        axes[1].legend(fontsize=6)
        axes[2].set(title="training rollouts", xlabel="iteration", ylim=(0, 1))
        axes[2].legend(fontsize=6)
        save(fig, "smollm2_grpo_arithmetic.png")
    else:
        print("no grpo_smollm2_arith run: skipping smollm2_grpo_arithmetic.png")

    # 4f. the tiny model on arithmetic: GRPO (without and with a KL penalty in the loss), RLOO and PPO against the
    #     verifier, 3 seeds each (docs/verifiable.md; --exp-name grpo_arith_kl_loss, grpo_arith, rloo_arith, ppo_arith
    #     with --seed 1 to 3)
    names = {"grpo_arith_kl_loss": ("GRPO, KL 0.05 in the loss", "C1"), "grpo_arith": ("GRPO", "C0"),
             "rloo_arith": ("RLOO", "C2"), "ppo_arith": ("PPO", "C3")}
    arith = {(name, seed): rows for name in names for seed, rows in load_seeds(args.runs, name).items()}
    if arith:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        colors = {name: color for name, (_, color) in names.items()}
        for (name, seed), rows in sorted(arith.items()):
            label = names[name][0] if seed == "1" else None
            axes[0].plot(*series(rows, "eval/pass@1_greedy"), "o-", ms=3, color=colors[name], alpha=0.7, label=label)
            axes[1].plot(*series(rows, "eval/kl"), "o-", ms=3, color=colors[name], alpha=0.7, label=label)
            minutes = max(r["time"] for r in rows) / 60
            axes[2].plot(minutes, series(rows, "eval/pass@1_greedy")[1][-1], "o", color=colors[name], label=label)
        axes[0].set(title="held-out greedy accuracy (200 problems)", xlabel="iteration", ylim=(0, 1))
        axes[1].set(title="KL to the SFT model (nats)", xlabel="iteration")
        axes[2].set(title="final accuracy against wall time", xlabel="minutes (2 CPU cores)", ylim=(0, 1), xlim=(0, None))
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "tiny_arithmetic.png")
    else:
        print("no grpo_arith(_kl_loss), rloo_arith or ppo_arith run: skipping tiny_arithmetic.png")

    # 4g. GRPO's 2025-26 variants on the same arithmetic task, 3 seeds each (docs/grpo.md; --exp-name grpo_arith,
    #     gspo_arith, cispo_arith, entropy_arith with --seed 1 to 3)
    names = {"grpo_arith": ("GRPO", "C0"), "gspo_arith": ("GSPO (sequence ratio)", "C1"),
             "cispo_arith": ("CISPO", "C2"), "entropy_arith": ("GRPO, top-20% entropy tokens", "C3")}
    frontier = {(name, seed): rows for name in names for seed, rows in load_seeds(args.runs, name).items()}
    if len({name for name, _ in frontier}) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for (name, seed), rows in sorted(frontier.items()):
            label, color = names[name][0] if seed == "1" else None, names[name][1]
            axes[0].plot(*series(rows, "eval/pass@1_greedy"), "o-", ms=3, color=color, alpha=0.7, label=label)
            axes[1].plot(*series(rows, "eval/kl"), "o-", ms=3, color=color, alpha=0.7, label=label)
            axes[2].plot(*series(rows, "policy/entropy"), "-", color=color, alpha=0.7, label=label)
        axes[0].set(title="held-out greedy accuracy (200 problems)", xlabel="iteration", ylim=(0, 1))
        axes[1].set(title="KL to the SFT model (nats)", xlabel="iteration")
        axes[2].set(title="policy entropy per token (nats)", xlabel="iteration")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "grpo_frontier_arith.png")
    else:
        print("no gspo_arith, cispo_arith or entropy_arith run: skipping grpo_frontier_arith.png")

    # 4h. on-policy distillation (docs/distill.md): the tiny model's arithmetic student and its GRPO-trained teacher,
    #     reverse KL and JSD against GRPO from the same start, per response sampled; and SmolLM2-135M-Instruct against
    #     the GRPO run that made its teacher, per response sampled and per minute of training (--exp-name distill_rkl_arith,
    #     distill_jsd_arith, grpo_arith, distill_smollm2_arith, grpo_smollm2_arith)
    def spent(rows, key):  # (responses sampled, minutes of sampling and update) at each evaluation
        done, minutes, out = 0, 0.0, {}
        for r in rows:
            if "charts/episodes" in r:
                done = r["charts/episodes"]
                minutes += sum(r.get(k, 0) for k in ("time/generate", "time/grade", "time/score", "time/logprobs",
                                                     "time/update")) / 60
            if key in r:
                out[r["step"]] = (done, minutes, r[key])
        return [out[k] for k in sorted(out)]
    names = {"distill_rkl_arith": ("distillation, reverse KL", "C0"), "distill_jsd_arith": ("distillation, JSD", "C1"),
             "grpo_arith": ("GRPO (the teacher's recipe)", "C2")}
    tiny = {(name, seed): rows for name in names for seed, rows in load_seeds(args.runs, name).items()}
    smol = {name: load(args.runs, name) for name in ("distill_smollm2_arith", "grpo_smollm2_arith")}
    if {"distill_rkl_arith", "grpo_arith"} <= {name for name, _ in tiny}:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
        for (name, seed), rows in sorted(tiny.items()):
            label, color = names[name][0] if seed == "1" else None, names[name][1]
            points = spent(rows, "eval/pass@1_greedy")
            axes[0].plot([p[0] for p in points], [p[2] for p in points], "o-", ms=3, color=color, alpha=0.7, label=label)
        axes[0].axhline(0.49, color="gray", ls=":", label="the teacher (GRPO, seed 1)")
        axes[0].set(title="tiny model, seeds 1-3", xlabel="responses sampled", ylabel="held-out greedy accuracy",
                    ylim=(0, 1))
        for name, color, label in (("grpo_smollm2_arith", "C2", "GRPO (its last point: the teacher)"),
                                   ("distill_smollm2_arith", "C0", "distillation, reverse KL")):
            if smol[name]:
                points = spent(smol[name], "eval/pass@1_greedy")
                axes[1].plot([p[0] for p in points], [p[2] for p in points], "o-", color=color, label=label)
                axes[2].plot([p[1] for p in points], [p[2] for p in points], "o-", color=color, label=label)
        axes[1].set(title="SmolLM2-135M-Instruct, one-operation sums", xlabel="responses sampled", ylim=(0, 1))
        axes[2].set(title="SmolLM2-135M-Instruct, against time", xlabel="minutes of sampling and update (2 cores)",
                    ylim=(0, 1))
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "distill_arith.png")
    else:
        print("no distill_rkl_arith or grpo_arith run: skipping distill_arith.png")

    # 4i. tool calls inside rollouts (docs/tools.md): the calculator task, GRPO with and without the tool from the same
    #     SFT model, seeds 1-3, held-out greedy accuracy and the share of greedy responses that call; then
    #     SmolLM2-135M-Instruct after its short SFT (--exp-name grpo_calc_tools, grpo_calc, grpo_smollm2_calc_tools,
    #     grpo_smollm2_calc)
    calc = {(name, seed): rows for name in ("grpo_calc_tools", "grpo_calc") for seed, rows in
            load_seeds(args.runs, name).items()}
    if {"grpo_calc_tools", "grpo_calc"} <= {name for name, _ in calc}:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
        styles = {"grpo_calc_tools": ("GRPO with the calculator", "C0"), "grpo_calc": ("GRPO without it", "C1")}
        for (name, seed), rows in sorted(calc.items()):
            label, color = styles[name][0] if seed == "1" else None, styles[name][1]
            axes[0].plot(*series(rows, "eval/pass@1_greedy"), "o-", ms=3, color=color, alpha=0.7, label=label)
            if name == "grpo_calc_tools":
                axes[1].plot(*series(rows, "eval/tools_used_greedy"), "o-", ms=3, color=color, alpha=0.7,
                             label="held out, greedy" if seed == "1" else None)
                axes[1].plot(*series(rows, "tools/used"), color="C2", lw=0.8, alpha=0.6,
                             label="training samples (T 0.7)" if seed == "1" else None)
        axes[0].set(title="tiny model: held-out greedy accuracy", xlabel="iteration", ylim=(0, 1))
        axes[1].set(title="tiny model: responses that call, seeds 1-3", xlabel="iteration", ylim=(0, 1.05))
        for name, color, label in (("grpo_smollm2_calc_tools", "C0", "with the calculator: accuracy"),
                                   ("grpo_smollm2_calc", "C1", "without it: accuracy")):
            rows = load(args.runs, name)  # sampled: greedy, SmolLM2 calls on every problem from the start
            if rows:
                axes[2].plot(*series(rows, "eval/scores"), "o-", color=color, label=label)
                if name == "grpo_smollm2_calc_tools":
                    axes[2].plot(*series(rows, "eval/tools_used"), "s--", color=color, alpha=0.6,
                                 label="with the calculator: share that calls")
        axes[2].set(title="SmolLM2-135M-Instruct, sampled at T 0.7", xlabel="iteration", ylim=(0, 1.05))
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "tools_calculator.png")
    else:
        print("no grpo_calc_tools or grpo_calc run: skipping tools_calculator.png")

    # 5. SFT: training and held-out loss
    sft = load(args.runs, "sft")
    if sft:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(*series(sft, "train/sft/loss"), alpha=0.6, label="training batches")
        ax.plot(*series(sft, "eval/sft/loss"), "o-", label="held out")
        ax.set(title="SFT loss (nats per completion token)", xlabel="optimizer step")
        ax.legend()
        save(fig, "sft_loss.png")
    else:
        print("no sft run: skipping sft_loss.png")

    # 6. the same held-out prompts answered by the SFT policy and by the PPO policy, side by side
    if ppo:
        last = {}
        for r in ppo:
            last |= {k: r[k] for k in ("samples", "sft_samples") if k in r}
        if "sft_samples" in last:
            def responses(table, with_score):
                # lines "  +1.23 | 'prompt' -> 'response'" (PPO) or "  'prompt' -> 'response'" (SFT)
                return [line.split(" | ", 1)[1] if with_score else line.strip() for line in table.split("\n")]
            ppo_rows, sft_rows = responses(last["samples"], True), responses(last["sft_samples"], False)
            lines = ["| prompt | SFT policy | PPO policy |", "| --- | --- | --- |"]
            for p, s in list(zip(ppo_rows, sft_rows))[:12]:
                prompt, ppo_text = p.split(" -> ", 1)
                lines.append(f"| {prompt} | {s.split(' -> ', 1)[1]} | {ppo_text} |")
            with open(args.samples, "w") as f:
                f.write("<!-- written by docs/make_figures.py from the default PPO run's final evaluation -->\n"
                        + "\n".join(lines) + "\n")
            print(f"wrote {args.samples}")
