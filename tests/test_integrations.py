"""Lightning and Hugging Face Trainer integrations on CPU with a simulated capacity."""

from __future__ import annotations

import pytest
import torch
from conftest import card
from torch import nn


def test_lightning_callback_sets_batch_size_and_lr(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from batchfit.integrations.lightning import BatchfitCallback

    seen: list[int] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4))
            self.batch_size = 8
            self.lr = 0.01

        def training_step(self, batch, index):
            x, y = batch
            seen.append(x.shape[0])
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(4096, 32), torch.randint(0, 4, (4096,)))
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

    torch.manual_seed(0)
    module = Module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = BatchfitCallback(memory=card(8))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    # The probe must not move the weights: compare right after setup, before training changes them.
    original_setup = callback.setup

    def checked_setup(trainer, pl_module, stage):
        original_setup(trainer, pl_module, stage)
        assert all(torch.equal(v, before[k]) for k, v in pl_module.state_dict().items())

    callback.setup = checked_setup
    trainer.fit(module)
    result = callback.result
    assert result is not None and result.recommended_batch_size > 8
    assert module.batch_size == result.recommended_batch_size
    assert seen and seen[-1] == module.batch_size  # fit trained with the new batch size
    assert module.lr == pytest.approx(0.01 * module.batch_size / 8)  # linear rule for SGD


def test_hf_trainer_args_are_set_and_train(tmp_path):
    transformers = pytest.importorskip("transformers")
    from batchfit.integrations.hf import fit_training_args

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (64,))
    dataset = [{"input_ids": ids, "labels": ids} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    result = fit_training_args(args, model, train_dataset=dataset, memory=card(12), target_global_batch=64)
    assert args.per_device_train_batch_size == result.recommended_batch_size
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 64
    assert args.gradient_accumulation_steps > 1  # 64 per step does not fit in 12 MiB
    assert args.learning_rate == pytest.approx(1e-4 * (64 / 2) ** 0.5)  # AdamW: square-root rule
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[0] == args.per_device_train_batch_size
    trainer.train()
    assert trainer.state.global_step == 2
