"""An unmodified Hugging Face training script: TrainingArguments from the command line, a tiny random LLaMA.

It never imports hf_galore: `hf-galore run` / `python -m hf_galore` must make `--optim galore_*` work on it.
"""

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, length: int = 16, vocab: int = 128):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=RandomTokens())
    trainer.train()
    print(f"optimizer: {type(trainer.optimizer.optimizer).__module__}.{type(trainer.optimizer.optimizer).__name__}")


if __name__ == "__main__":
    main()
