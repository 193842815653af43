"""The shared engine's own pieces: schedules, the outlier stream, speed options, method state."""
from __future__ import annotations

import dataclasses
import math
import traceback

import pytest
import torch

from trainables import engine, registry
from trainables.baselines import OeConfig, OutlierExposure
from trainables.config import REPRODUCTION_PRECISION, TrainConfig


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
                                          ("warmup_method", "exp"), ("precision", "fp16"),
                                          ("compile", "fast"), ("channels_last", "yes"),
                                          ("fused_optimizer", "on")])
def test_bad_choices_are_one_line_errors(field, value):
    with pytest.raises(ValueError, match=f"{field}='{value}'; accepted: "):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", ["eval_every", "checkpoint_every", "batch_size"])
def test_counts_below_one_are_refused(field):
    with pytest.raises(ValueError, match=f"{field}=0; accepted: an integer >= 1"):
        TrainConfig(**{field: 0})


def test_speed_settings_resolve_per_device():
    auto = TrainConfig()
    assert auto.speed("cuda") == {"precision": "bf16", "channels_last": True, "fused_optimizer": True,
                                  "compile": "none"}
    assert auto.speed("cpu") == {"precision": "fp32", "channels_last": False, "fused_optimizer": False,
                                 "compile": "none"}
    forced = TrainConfig(precision="fp32", channels_last=False, fused_optimizer=False, compile="default")
    assert forced.speed("cuda") == {"precision": "fp32", "channels_last": False, "fused_optimizer": False,
                                    "compile": "default"}
    # A reproduction forces fp32 on a GPU; bf16 is there only when asked for.
    assert TrainConfig(precision=REPRODUCTION_PRECISION).speed("cuda")["precision"] == "fp32"
    assert TrainConfig(precision="bf16").speed("cpu")["precision"] == "bf16"


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


def test_fused_optimizer_takes_the_same_steps(tiny_oe):
    """The fused kernel is an implementation of the same update: same losses, same weights."""
    cfg, prepared = tiny_oe
    runs = []
    for fused in (False, True):
        trial = engine.Trial(OutlierExposure, OeConfig(**{**cfg.to_dict(), "fused_optimizer": fused}), prepared)
        assert trial.optimizer.defaults["fused"] is (True if fused else None)
        losses = [trial.train_epoch()["train_loss"]]
        runs.append((losses, [p.detach().clone() for p in trial.model.parameters()]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for plain, fused in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)


def test_compiled_training_forward_is_captured_and_matches_eager(tiny_oe, monkeypatch):
    """compile= wraps the training forward in torch.compile. A counting backend (no code
    generation, so the test stays fast) shows that Dynamo captured the model; losses match eager
    and the checkpoint's parameter names stay those of the plain module."""
    cfg, prepared = tiny_oe
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend=counting_backend))
    eager = engine.Trial(OutlierExposure, cfg, prepared)
    compiled = engine.Trial(OutlierExposure, OeConfig(**{**cfg.to_dict(), "compile": "default"}), prepared)
    assert compiled.train_model is not compiled.model
    assert compiled.train_epoch()["train_loss"] == pytest.approx(eager.train_epoch()["train_loss"], rel=1e-5)
    assert graphs, "torch.compile never captured the training forward"
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())


def test_compile_is_refused_for_a_method_that_cannot_take_it(data_dir, cache_dir):
    from trainables.cala import MetaConfig, MetaMethod
    cfg = MetaConfig(data_dir=data_dir, cache_dir=cache_dir, download=False, n_max=100, imbalance_ratio=10,
                     val_per_class=2, test_per_class=2, ood_max_images=20, val_ood_size=20, test_ood=("mnist",),
                     meta_per_class=2, device="cpu", compile="default")
    with pytest.raises(ValueError, match="compile='default': method cala_meta does not support"):
        engine.Trial(MetaMethod, cfg, engine.prepare(cfg, MetaMethod.uses_outliers))


class Recorder:
    def __init__(self):
        self.reports = []

    def restore(self, load):
        pass

    def report(self, metrics, checkpoint_dir):
        self.reports.append((dict(metrics), checkpoint_dir is not None))


def test_eval_every_reports_only_validated_epochs_and_always_the_last(tiny_oe):
    cfg, prepared = tiny_oe
    recorder = Recorder()
    engine.fit(OutlierExposure, OeConfig(**{**cfg.to_dict(), "epochs": 5, "eval_every": 2,
                                            "checkpoint_every": 2}), recorder, prepared)
    assert [m["epoch"] for m, _ in recorder.reports] == [2, 4, 5]
    assert [ckpt for _, ckpt in recorder.reports] == [False, True, True]   # every 2nd report + last
    assert all("val_score" in m and m["epoch_seconds"] > 0 for m, _ in recorder.reports)
    assert ["test_acc" in m for m, _ in recorder.reports] == [False, False, True]


def test_prepare_shared_loads_once_per_data_build(tiny_oe):
    cfg, _ = tiny_oe
    first = engine.prepare_shared(cfg, uses_outliers=True)
    other_lr = OeConfig(**{**cfg.to_dict(), "lr": 0.01, "epochs": 9})   # not a data field
    assert engine.prepare_shared(other_lr, uses_outliers=True) is first
    rebuilt = engine.prepare_shared(OeConfig(**{**cfg.to_dict(), "val_per_class": 3}), uses_outliers=True)
    assert rebuilt is not first and len(rebuilt.id.val) == 30


@pytest.fixture(scope="module")
def tiny_all(data_dir, cache_dir):
    """The smallest real build with outliers and a meta set, usable by every method."""
    # IR 5: the tail keeps 2 images, the fewest CALA accepts.
    values = dict(data_dir=data_dir, cache_dir=cache_dir, download=False, n_max=10, imbalance_ratio=5,
                  val_per_class=2, test_per_class=2, ood_max_images=20, val_ood_size=20,
                  test_ood=("mnist",), batch_size=16, outlier_max_images=64, meta_per_class=2,
                  epochs=2, warmup_epochs=0, device="cpu")
    return values, engine.prepare(TrainConfig(**values), uses_outliers=True)


@pytest.mark.parametrize("name", registry.names())
def test_a_training_step_builds_no_tensor_from_host_data(name, tiny_all, monkeypatch):
    """On a GPU, a tensor built from Python or NumPy data inside the step is a host-to-device
    copy that stalls the launch queue. After a warm-up epoch (constants are cached then), an
    epoch of every method must build none: its draws come from device generators."""
    values, prepared = tiny_all
    method_cls = registry.get(name)
    fields = {f.name for f in dataclasses.fields(method_cls.config_cls)}
    cfg = method_cls.config_cls.from_dict({k: v for k, v in values.items() if k in fields})
    trial = engine.Trial(method_cls, cfg, prepared)
    trial.train_epoch()
    calls = []
    for factory in ("tensor", "as_tensor", "from_numpy"):
        real = getattr(torch, factory)

        def spy(*args, _real=real, _name=factory, **kwargs):
            calls.append((_name, "".join(traceback.format_stack(limit=3)[:-1])))
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch, factory, spy)
    out = trial.train_epoch()
    monkeypatch.undo()
    assert math.isfinite(out["train_loss"])
    assert not calls, f"{name}: {len(calls)} host tensors per epoch, first from:\n{calls[0][1]}"
