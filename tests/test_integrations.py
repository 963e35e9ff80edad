"""Lightning and Hugging Face Trainer integrations on CPU with a simulated capacity."""

from __future__ import annotations

import pytest
import torch
from conftest import card
from torch import nn

from batchfit import find_batch_size


def quiet_trainer(pl, tmp_path, callback, max_steps: int):
    """A CPU Trainer with nothing but the callback: no logger, checkpoints, bars or summary."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )


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
    trainer = quiet_trainer(pl, tmp_path, callback, max_steps=2)
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
    result = fit_training_args(
        args, model, train_dataset=dataset, memory=card(12), target_global_batch=64, scale_lr=True
    )
    assert args.per_device_train_batch_size == result.recommended_batch_size
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 64
    assert args.gradient_accumulation_steps > 1  # 64 per step does not fit in 12 MiB
    assert args.learning_rate == pytest.approx(1e-4 * (64 / 2) ** 0.5)  # AdamW: square-root rule
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[0] == args.per_device_train_batch_size
    trainer.train()
    assert trainer.state.global_step == 2


def test_hf_keeps_the_global_batch_and_the_rate_and_says_what_changed(tmp_path):
    transformers = pytest.importorskip("transformers")
    from batchfit.integrations.hf import fit_training_args

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (64,))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=5e-5,
        report_to=[], use_cpu=True,
    )  # fmt: skip
    result = fit_training_args(args, model, {"input_ids": ids, "labels": ids}, memory="1GiB", eval_batch=True)
    assert args.per_device_eval_batch_size == result.eval_batch_size > args.per_device_train_batch_size
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32  # the user's global batch
    assert args.gradient_accumulation_steps == 1 and args.learning_rate == 5e-5  # fits at once; rate untouched
    assert any("gradient_accumulation_steps 4 -> 1" in n and "learning rate left alone" in n for n in result.notes)
    args.max_steps, args.save_strategy, args.logging_strategy = 1, "no", "no"
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 64)
    trainer.train()  # the Trainer takes the arguments as set
    assert trainer.state.global_step == 1


# Lightning's own BatchSizeFinder scenarios (tests/tests_pytorch/tuner/test_scale_batch_size.py),
# each through a real Trainer.fit on CPU.
def _lightning_case(tmp_path, *, holder: str, dataset: int = 4096, **callback_options):
    """A module whose batch size lives in `holder` ('module', 'module+hparams', 'datamodule+module',
    'datamodule-hparams'); returns (module, datamodule or None, callback, trainer, sizes seen)."""
    pl = pytest.importorskip("lightning.pytorch")
    from batchfit.integrations.lightning import BatchfitCallback

    seen: list[tuple[int, int | None]] = []
    data = torch.utils.data.TensorDataset(torch.randn(dataset, 32), torch.randint(0, 4, (dataset,)))

    class Module(pl.LightningModule):
        def __init__(self, **hparams) -> None:
            super().__init__()
            if hparams:
                self.save_hyperparameters(hparams)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch, index):
            x, y = batch
            seen.append((x.shape[0], getattr(self, "batch_size", None)))
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

    class Data(pl.LightningDataModule):
        def __init__(self, **hparams) -> None:
            super().__init__()
            self.save_hyperparameters(hparams)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=self.hparams.batch_size)

    datamodule = None
    module = Module(batch_size=2) if holder == "module+hparams" else Module()
    if holder in ("module", "module+hparams", "datamodule+module"):
        module.batch_size = 2
    if holder.startswith("datamodule"):
        datamodule = Data(batch_size=2)
    callback = BatchfitCallback(memory=card(8), **callback_options)
    trainer = quiet_trainer(pl, tmp_path, callback, max_steps=1)
    return module, datamodule, callback, trainer, seen


def test_lightning_datamodule_hparams_and_module_are_all_set(tmp_path):
    module, dm, callback, trainer, seen = _lightning_case(tmp_path, holder="datamodule+module")
    trainer.fit(module, datamodule=dm)
    answer = callback.result.recommended_batch_size
    assert answer > 2 and module.batch_size == answer and dm.hparams.batch_size == answer
    assert seen[-1][0] == answer  # fit trained at the answer, through the datamodule's loader


def test_lightning_batch_size_only_in_datamodule_hparams(tmp_path):
    module, dm, callback, trainer, seen = _lightning_case(tmp_path, holder="datamodule-hparams")
    trainer.fit(module, datamodule=dm)
    assert dm.hparams.batch_size == callback.result.recommended_batch_size > 2
    assert seen[-1][0] == dm.hparams.batch_size


def test_lightning_module_attribute_and_hparams_both_change_with_a_warning(tmp_path):
    module, _, callback, trainer, _ = _lightning_case(tmp_path, holder="module+hparams")
    with pytest.warns(UserWarning, match="mutually exclusive"):
        trainer.fit(module)
    assert module.batch_size == module.hparams.batch_size == callback.result.recommended_batch_size


def test_lightning_loader_passed_to_fit_is_refused_before_probing(tmp_path):
    module, _, callback, trainer, seen = _lightning_case(tmp_path, holder="module")
    loader = module.train_dataloader()
    with pytest.raises(ValueError, match=r"passed directly to trainer\.fit"):
        trainer.fit(module, train_dataloaders=loader)
    assert callback.result is None and not seen


def test_lightning_never_larger_than_the_dataset(tmp_path):
    module, _, callback, trainer, _ = _lightning_case(tmp_path, holder="module", dataset=64)
    trainer.fit(module)
    assert module.batch_size == callback.result.recommended_batch_size <= 64


def test_lightning_batch_attribute_holds_each_trials_size(tmp_path):
    module, _, callback, trainer, seen = _lightning_case(tmp_path, holder="module")
    trainer.fit(module)
    trials = {t.batch_size for t in callback.result.trials}
    during = [attr for size, attr in seen if size in trials]
    assert during and all(size == attr for size, attr in seen)  # the model saw its batch size right


@pytest.mark.parametrize("max_trials", [0, 1])
def test_lightning_max_trials_never_lowers_the_size_without_evidence(tmp_path, max_trials):
    module, _, callback, trainer, _ = _lightning_case(tmp_path, holder="module", max_trials=max_trials)
    trainer.fit(module)
    # Never lowered without evidence; raised only to a size a trial verified (the search starts at 4).
    assert module.batch_size >= 2
    assert (callback.result is None) == (max_trials == 0)
    if max_trials:  # issue 18 case 19: one answer, the module's and the result's
        assert callback.result.recommended_batch_size == module.batch_size
        assert module.batch_size in {t.batch_size for t in callback.result.trials if t.ok} | {2}
        if module.batch_size == 2:
            assert "kept batch_size=2" in callback.result.notes[-1]
    else:
        assert module.batch_size == 2


@pytest.mark.parametrize("mode", ["eval", "both"])
def test_lightning_callback_refuses_mode_and_names_eval_batch_arg_name(mode):
    """Issue 18 case 19: mode='eval' failed with 'optimizer= does not apply', mode='both' sized
    training_step under inference mode."""
    pytest.importorskip("lightning.pytorch")
    from batchfit.integrations.lightning import BatchfitCallback

    with pytest.raises(ValueError, match="mode= does not apply; eval_batch_arg_name="):
        BatchfitCallback(mode=mode)


def test_lightning_lowers_the_size_on_evidence_judged_by_the_results_budget(tmp_path):
    """A search cut short keeps the size unless a trial at or below it broke the budget the
    result carries (the search's own, not one recomputed beside it)."""
    pytest.importorskip("lightning")
    from dataclasses import replace

    from batchfit.integrations.lightning import BatchfitCallback

    result = find_batch_size(nn.Linear(8, 8), torch.randn(8), memory=card(64), max_trials=2)
    cut = {"max_trials": len(result.trials)}
    small = max(t.batch_size for t in result.trials)
    kept = BatchfitCallback._answer(replace(result, recommended_batch_size=1), small, cut)
    lowered = BatchfitCallback._answer(replace(result, recommended_batch_size=1, budget_bytes=0), small, cut)
    assert (kept, lowered) == (small, 1)


def test_lightning_setup_leaves_the_rng_as_it_was(tmp_path):
    module, _, callback, trainer, _ = _lightning_case(tmp_path, holder="module")
    states = []
    original = callback.setup

    def watched(trainer, pl_module, stage):
        states.append(torch.get_rng_state())
        original(trainer, pl_module, stage)
        states.append(torch.get_rng_state())

    callback.setup = watched
    trainer.fit(module)
    assert len(states) == 2 and torch.equal(states[0], states[1])


def test_lightning_rate_belongs_to_the_global_batch(tmp_path):
    module, _, callback, trainer, _ = _lightning_case(tmp_path, holder="module")
    module.lr = 0.1
    trainer.accumulate_grad_batches = 2  # what fit will use: the global batch is twice the batch size
    trainer.fit(module)
    answer, scaling = module.batch_size, callback.lr_scaling
    assert scaling is not None and (scaling.base_batch_size, scaling.batch_size) == (2 * 2, answer * 2)
    assert module.lr == pytest.approx(0.1 * answer / 2)  # SGD, linear rule


def test_lightning_sizes_the_validation_batch_when_asked(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from batchfit.integrations.lightning import BatchfitCallback

    data = torch.utils.data.TensorDataset(torch.randn(2**15, 32), torch.randint(0, 4, (2**15,)))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(32, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 4)
            )
            self.batch_size, self.val_batch_size = 2, 2

        def training_step(self, batch, index):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, index):
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=self.val_batch_size)

    module = Module()
    callback = BatchfitCallback(memory=card(256), eval_batch_arg_name="val_batch_size", scale_lr=False)
    quiet_trainer(pl, tmp_path, callback, max_steps=1).fit(module)
    assert module.val_batch_size == callback.result.eval_batch_size > module.batch_size
    assert callback.result.eval_per_sample_bytes < callback.result.per_sample_allocated_bytes


def test_hf_a_global_batch_beyond_the_dataset_is_not_kept(tmp_path):
    """Issue 18 case 18: HF's 'large per_device_train_batch_size, let the finder shrink it' idiom
    (4096 on 512 examples) ended at 64 x 64 accumulation."""
    transformers = pytest.importorskip("transformers")
    from batchfit.integrations.hf import fit_training_args

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (64,))
    dataset = [{"input_ids": ids, "labels": ids} for _ in range(512)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4096, report_to=[], use_cpu=True
    )
    result = fit_training_args(args, model, train_dataset=dataset, memory=card(12))
    assert args.gradient_accumulation_steps == 1 and args.per_device_train_batch_size <= 512
    assert any("more than the 512 examples" in note for note in result.notes)
