"""GaLore in one page: train a tiny random-init LLaMA on embedded text with AdamW and with GaLoreAdamW.

    python examples/quickstart.py            # about a minute on 2 CPU cores, no downloads

Byte-level tokens (vocabulary 256) on the opening of Pride and Prejudice (public domain), so nothing is fetched.
Prints the loss of both runs every few steps and the optimizer-state bytes each holds.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_galore import GaLoreAdamW, optimizer_state_bytes
from hf_galore.targets import select_targets

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one "
    "day, have you heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, "
    "returned she; for Mrs. Long has just been here, and she told me all about it."
)
STEPS, BLOCK, BATCH, RANK = 120, 64, 8, 16


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=BLOCK,
    )
    return LlamaForCausalLM(config)


def batches() -> list[torch.Tensor]:
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - BLOCK, (STEPS, BATCH), generator=gen)
    return [torch.stack([data[s : s + BLOCK] for s in row.tolist()]) for row in starts]


def train(name: str, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer) -> list[float]:
    losses = []
    for step, tokens in enumerate(batches(), start=1):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0:
            print(f"{name:12} step {step:4d}  loss {loss.item():.3f}")
    return losses


def main() -> None:
    baseline = build_model()
    adamw = torch.optim.AdamW(baseline.parameters(), lr=3e-3, weight_decay=0.0)
    adamw_losses = train("AdamW", baseline, adamw)

    model = build_model()
    targets = {id(t.param) for t in select_targets(model, "attn,mlp")}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in targets], "rank": RANK, "update_proj_gap": 50},
        {"params": [p for p in model.parameters() if id(p) not in targets]},
    ]
    galore = GaLoreAdamW(groups, lr=3e-3, weight_decay=0.0)
    galore_losses = train("GaLoreAdamW", model, galore)

    print(f"\nfinal loss      AdamW {adamw_losses[-1]:.3f}   GaLoreAdamW(rank={RANK}) {galore_losses[-1]:.3f}")
    print(
        f"optimizer state AdamW {optimizer_state_bytes(adamw) / 2**20:.2f} MiB   "
        f"GaLoreAdamW {optimizer_state_bytes(galore) / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
