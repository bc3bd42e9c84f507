"""Memory per GPU for SFT and PPO under DDP and FSDP2, and on one GPU with and without LoRA, computed (not measured)
from the model shapes.

    python benchmarks/memory_table.py            # prints the Markdown tables of docs/scaling.md

Bytes per parameter with --bf16 (mixed precision): a trained model keeps fp32 weights (4), fp32 gradients (4) and
AdamW's two fp32 moments (8) = 16; a frozen one (PPO's reference and reward model) is held in bf16 (2). DDP holds all
of it on every GPU; FSDP2 divides it by the number of GPUs, plus the bf16 copy of the layers being gathered (two
layers: the one computing and the one prefetched). PPO trains the policy and a value model of the reward model's size
and holds the reference and reward model: here all four the same size, so 16 + 16 + 2 + 2 = 36 bytes per parameter.

Activations, per token of a micro-batch, stored for backward in bf16: about 16h + 8i bytes per decoder layer (the
inputs of the norms, attention projections and SwiGLU MLP; memory-efficient attention keeps no (T, T) matrix), plus the
fp32 logits and their log-softmax, 8V bytes per token, where the loss is taken. With gradient checkpointing each layer
keeps only its input (2h bytes per token) and one layer is recomputed at a time. PPO trains two models on the same
micro-batch. Its rollouts (no activations kept) hold a KV cache of 2 x layers x kv_heads x head_dim x 2 bytes per
token and, under FSDP2, the whole policy gathered in bf16 (2 bytes per parameter) for the decode loop. The peak is the
larger of the update phase (states + activations) and the rollout phase (states + KV cache + gathered policy).

One GPU, full fine-tuning against LoRA (--lora-r 16 on every linear layer of the decoder, --bf16, gradient
checkpointing). Full: a trained model 16 bytes per parameter, a frozen one 2; SFT 16, DPO 16 + 2 (the reference),
PPO 36 as above. LoRA: each model's frozen base in bf16 (2), the adapters trained at 16 bytes per adapter parameter,
r (9h + 2 kv + 3i) of them per decoder layer (q and o: h -> h, k and v: h -> kv, gate and up: h -> i, down: i -> h,
each r (in + out)); the reference is the policy with its adapters off, so SFT and DPO hold one base and PPO three (the
policy's, the value model's and the reward model's). Activations as above (LoRA's own, r values per token and layer,
left out); PPO's rollout holds its KV cache.
"""

GIB = 2**30
MODELS = {  # name: (parameters, hidden h, intermediate i, layers, vocab V, kv heads x head dim)
    "SmolLM2-135M": (135e6, 576, 1536, 30, 49152, 3 * 64),
    "Llama-3.2-1B": (1.24e9, 2048, 8192, 16, 128256, 8 * 64),
    "Llama-2-7B": (6.74e9, 4096, 11008, 32, 32000, 32 * 128),
    "Llama-2-70B": (69.0e9, 8192, 28672, 80, 32000, 8 * 128),
}
ONE_GPU = {  # the models of the LoRA table
    "Llama-3.2-1B": (1.24e9, 2048, 8192, 16, 128256, 8 * 64),
    "Llama-3.1-8B": (8.03e9, 4096, 14336, 32, 128256, 8 * 128),
    "Llama-3.1-70B": (70.6e9, 8192, 28672, 80, 128256, 8 * 128),
}
LORA_R = 16
GPUS = 8
TOKENS = 8 * 512  # a micro-batch per GPU: 8 sequences of 512 tokens
ROLLOUT_TOKENS = 64 * 512  # PPO's rollout per GPU: 64 prompts, prompt + response up to 512 tokens


def activations(h, i, layers, vocab, checkpointing: bool) -> float:
    per_layer = 16 * h + 8 * i
    stored = 2 * h * layers + per_layer if checkpointing else per_layer * layers
    return TOKENS * (stored + 8 * vocab)


def row(name, stage: str, strategy: str, checkpointing: bool) -> list[str]:
    params, h, i, layers, vocab, kv = MODELS[name]
    shards = GPUS if strategy == "fsdp" else 1
    gathered = 2 * 2 * params / layers if strategy == "fsdp" else 0  # two bf16 layers being gathered
    if stage == "sft":
        states = 16 * params / shards
        act = activations(h, i, layers, vocab, checkpointing)
        rollout = 0
    else:
        states = (16 + 16 + 2 + 2) * params / shards
        act = 2 * activations(h, i, layers, vocab, checkpointing)  # policy and value model
        rollout = 2 * layers * kv * 2 * ROLLOUT_TOKENS + (2 * params if strategy == "fsdp" else 0)
    peak = states + max(gathered + act, rollout)
    return [f"{states / GIB:.1f}", f"{act / GIB:.1f}", f"{rollout / GIB:.1f}", f"{peak / GIB:.0f}"]


def one_gpu(name, stage: str, lora: bool) -> tuple[float, float]:
    """-> (weights and optimizer state, peak) in GiB on one GPU, gradient checkpointing on."""
    params, h, i, layers, vocab, kv = ONE_GPU[name]
    adapters = LORA_R * (9 * h + 2 * kv + 3 * i) * layers
    trained, bases = {"sft": (1, 1), "dpo": (1, 1), "ppo": (2, 3)}[stage]
    if lora:
        states = 2 * params * bases + 16 * adapters * trained
    else:
        states = {"sft": 16, "dpo": 16 + 2, "ppo": 36}[stage] * params
    act = trained * activations(h, i, layers, vocab, True)
    rollout = 2 * layers * kv * 2 * ROLLOUT_TOKENS if stage == "ppo" else 0
    return states / GIB, (states + max(act, rollout)) / GIB


if __name__ == "__main__":
    print(f"\nOne 80 GB GPU, --bf16, gradient checkpointing, micro-batch {TOKENS} tokens; LoRA rank {LORA_R} on every "
          "linear layer. GiB: weights and optimizer state / peak\n")
    print("| model | SFT full | SFT LoRA | DPO full | DPO LoRA | PPO full | PPO LoRA |")
    print("|---|---|---|---|---|---|---|")
    for name in ONE_GPU:
        cells = []
        for stage in ("sft", "dpo", "ppo"):
            for lora in (False, True):
                states, peak = one_gpu(name, stage, lora)
                cells.append(f"{states:.0f} / {peak:.0f}" + (" fits" if peak <= 80 * 1e9 / GIB else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    for stage in ("sft", "ppo"):
        print(f"\n{stage.upper()}, GiB per GPU on {GPUS} GPUs, micro-batch {TOKENS} tokens"
              + (f", rollout {ROLLOUT_TOKENS} tokens" if stage == "ppo" else "") + "\n")
        rollout = " rollout: KV cache + gathered policy |" if stage == "ppo" else ""
        print(f"| model | strategy | weights, grads, Adam | activations (checkpointed) |{rollout} peak (checkpointed) |")
        print("|---|---|---|---|" + "---|" * (stage == "ppo") + "---|")
        for name in MODELS:
            for strategy in ("ddp", "fsdp"):
                plain, ckpt = row(name, stage, strategy, False), row(name, stage, strategy, True)
                rollout = f" {plain[2]} |" if stage == "ppo" else ""
                print(f"| {name} | {strategy} | {plain[0]} | {plain[1]} ({ckpt[1]}) |{rollout} {plain[3]} ({ckpt[3]}) |")
