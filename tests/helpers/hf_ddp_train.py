"""Trains a tiny BERT with the Hugging Face Trainer under torchrun, recording with
RecordTrainerCallback; each rank also saves its weights at every epoch end (argv[1]: folder).
Run by tests/test_integration_hf_ddp.py."""

import sys

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from basis_stability.integrations.hf import RecordTrainerCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 50, (n, 8), generator=g)
        self.y = (self.x[:, 0] < 25).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


class Capture(TrainerCallback):
    def on_epoch_end(self, args, state, control, model=None, **kw):
        torch.save(
            {
                "w": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "step": state.global_step,
            },
            f"{sys.argv[1]}/rank{args.process_index}-epoch{round(state.epoch)}.pt",
        )


torch.manual_seed(0)
cfg = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=2,
)
args = TrainingArguments(
    f"{sys.argv[1]}/out",
    num_train_epochs=2,
    per_device_train_batch_size=8,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    learning_rate=1e-3,
    ddp_backend="gloo",
)
tr = Trainer(
    BertForSequenceClassification(cfg),
    args,
    train_dataset=Tokens(64, 0),
    callbacks=[Capture(), RecordTrainerCallback(f"{sys.argv[1]}/run.h5")],
)
tr.train()
print("world", args.world_size, "rank", args.process_index)
