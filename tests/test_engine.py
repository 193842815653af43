"""The shared engine's own pieces: schedules, the outlier stream, speed options, method state."""
from __future__ import annotations

import math

import pytest
import torch

from trainables import engine
from trainables.baselines import OeConfig, OutlierExposure
from trainables.config import TrainConfig


def test_cosine_schedule_after_warmup():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2, lr_schedule="cosine")
    assert cfg.lr_at(0) == pytest.approx(0.01)                     # constant warm-up at ×0.1
    assert cfg.lr_at(2) == pytest.approx(0.1)                      # cos(0)
    assert cfg.lr_at(6) == pytest.approx(0.05)                     # halfway through 8 epochs
    assert cfg.lr_at(9) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    no_warmup = TrainConfig(epochs=4, lr=1e-3, warmup_epochs=0, lr_schedule="cosine")
    assert [no_warmup.lr_at(e) for e in range(4)] == pytest.approx(
        [1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 4)), 5e-4, 1e-3 * 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_ldam_warmup_ramp():
    cfg = TrainConfig(epochs=200, lr=0.1, warmup_epochs=5, warmup_method="ldam")
    assert [cfg.lr_at(e) for e in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])


@pytest.mark.parametrize("field, value", [("optimizer", "adamw"), ("lr_schedule", "poly"),
                                          ("warmup_method", "exp"), ("precision", "fp16")])
def test_bad_choices_are_one_line_errors(field, value):
    with pytest.raises(ValueError, match=f"{field}='{value}'; accepted: "):
        TrainConfig(**{field: value})


@pytest.fixture(scope="module")
def tiny_oe(data_dir, cache_dir):
    """An OE config on the smallest real build, and its prepared data (outliers included)."""
    cfg = OeConfig(data_dir=data_dir, cache_dir=cache_dir, download=False, n_max=100,
                         val_per_class=2, test_per_class=2, ood_max_images=20, val_ood_size=20,
                         test_ood=("mnist",), batch_size=64, outlier_batch_size=96,
                         outlier_max_images=150, epochs=2, device="cpu")
    return cfg, engine.prepare(cfg, uses_outliers=True)


def test_outlier_stream_cycles_a_small_set_without_repeats_within_a_lap(tiny_oe):
    cfg, prepared = tiny_oe
    assert prepared.record["outlier_set"] == "tin_aux" and prepared.record["outlier_size"] == "150"
    trial = engine.Trial(OutlierExposure, cfg, prepared)
    seen = []
    original = trial.method.loss

    def spy(model, batch, rng):
        seen.append(batch.out_index.clone())
        assert batch.x_out.shape == (len(batch.out_index), 3, 32, 32)
        return original(model, batch, rng)
    trial.method.loss = spy
    trial.train_epoch()
    drawn = torch.cat(seen)
    steps = math.ceil(len(prepared.id.train) / cfg.batch_size)
    assert len(seen) == steps and len(drawn) == steps * 96
    assert sorted(drawn[:150].tolist()) == list(range(150))        # one lap: each outlier once


def test_bf16_channels_last_epoch_trains(tiny_oe):
    cfg, prepared = tiny_oe
    fast = OeConfig(**{**cfg.to_dict(), "precision": "bf16", "channels_last": True})
    trial = engine.Trial(OutlierExposure, fast, prepared)
    conv = next(m for m in trial.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = trial.train_epoch()
    assert math.isfinite(out["train_loss"])
    assert all(p.dtype == torch.float32 for p in trial.model.parameters())   # weights stay fp32
