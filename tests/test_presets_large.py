"""The papers' large-set recipes (trainables.recipes) and how the presets apply them: every
recipe builds its method's config; `--preset paper|small` on ImageNet-LT resolves to the recipe
(run.py's plan, no training); a recipe that needs ImageNet weights refuses to start without them;
the CIFAR presets are unchanged. Resolution only: nothing here trains or starts Ray."""
from __future__ import annotations

import math

import pytest

from search import reproduce, run
from trainables import large_lt, recipes, registry
from trainables.config import TrainConfig


def build(recipe: recipes.Recipe) -> TrainConfig:
    """Returns the recipe's config for its method and set, as run.py builds it (weights named
    where the recipe needs them)."""
    cls = registry.get(recipe.method).config_cls
    weights = {"pretrained": "resnet152-imagenet.pth"} if recipe.needs_pretrained else {}
    return cls.from_dict({"dataset": recipe.dataset, **recipe.values, "recipe": recipe.describe(), **weights})


@pytest.mark.parametrize("recipe", recipes.RECIPES, ids=lambda r: r.name)
def test_every_recipe_is_fields_of_its_methods_config_with_accepted_values(recipe):
    cfg = build(recipe)   # an unknown field or a refused value raises here
    for field, value in recipe.values.items():
        assert getattr(cfg, field) == (tuple(value) if isinstance(value, list) else value), field
    # The recipe's network is the one `backbone=auto` picks on that set (the papers').
    assert recipe.values["backbone"] == large_lt.SETS[recipe.dataset].backbone
    assert recipe.source and cfg.recipe.startswith(f"{recipe.name}: {recipe.source}")
    assert recipes.get(recipe.method, recipe.dataset) is recipe   # one recipe per method and set


def test_a_recipe_field_the_config_lacks_or_a_refused_value_fails():
    wrong_name = recipes.Recipe("darl", "imagenet-lt", {"lr_warmup": 5}, "test")
    with pytest.raises(ValueError, match=r"unknown config keys \['lr_warmup'\] for DarlConfig"):
        build(wrong_name)
    wrong_value = recipes.Recipe("darl", "imagenet-lt", {"lr_schedule": "cosin"}, "test")
    with pytest.raises(ValueError, match="lr_schedule='cosin'; accepted: step, cosine"):
        build(wrong_value)
    # A field of one method's config is not another's: RNA's recipe has no τ_G.
    with pytest.raises(ValueError, match=r"unknown config keys \['tau_gla'\] for RnaConfig"):
        build(recipes.Recipe("rna", "imagenet-lt", {"tau_gla": 2.8}, "test"))


def test_paper_preset_on_imagenet_lt_trains_lglas_recipe_for_darl():
    plan = run.build_plan(run.parse_args(["darl", "--dataset", "imagenet-lt", "--preset", "paper"]))
    recipe = recipes.get("darl", "imagenet-lt")
    # The whole schedule, 32 trials; ASHA's grace 40% of 180 on a validated epoch (every 5): 70.
    assert plan["budget"] == {"trials": 32, "epochs": 180, "grace_period": 70, "reduction_factor": 2,
                              "max_concurrent": 4, "cpus_per_trial": 1.0}
    # The paper point takes the recipe's lr, and the lr range keeps its ratios to it (0.2x to 2x).
    assert plan["space"].paper_point["lr"] == 0.025
    lr = plan["space"].distributions["lr"]
    assert (lr.low, lr.high, lr.log) == (pytest.approx(0.005), pytest.approx(0.05), True)
    cfg = registry.get("darl").config_cls.from_dict({**plan["config"], **plan["space"].paper_point})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
        180, 64, 0.025, 0.9, True, 5e-4)
    assert (cfg.lr_schedule, cfg.warmup_epochs, cfg.tau_gla, cfg.backbone, cfg.eval_every) == (
        "cosine", 0, 2.8, "resnet50", 5)
    assert cfg.recipe == recipe.describe() and "darl.md" in cfg.recipe and "RandAugment" in cfg.recipe
    # Cosine from epoch 0 over 180: 0.025 at 0, half at 90, 0.025 * (1 + cos(pi * 150/180)) / 2 at 150.
    assert cfg.lr_at(0) == pytest.approx(0.025)
    assert cfg.lr_at(90) == pytest.approx(0.0125)
    assert cfg.lr_at(150) == pytest.approx(0.025 * (1 + math.cos(math.pi * 150 / 180)) / 2)
    assert run.recipe_line(plan).startswith("recipe darl/imagenet-lt: LGLA's ImageNet-LT config")


def test_small_preset_is_the_recipe_on_cifar_smalls_30_epoch_proxy_and_flags_still_win():
    plan = run.build_plan(run.parse_args(["darl", "--dataset", "imagenet-lt", "--preset", "small"]))
    assert (plan["budget"]["trials"], plan["budget"]["epochs"], plan["budget"]["grace_period"]) == (8, 30, 12)
    cfg = registry.get("darl").config_cls.from_dict({**plan["config"], **plan["space"].paper_point})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.eval_every, cfg.ood_max_images) == (30, 64, 0.025, 3, 2000)
    assert cfg.lr_at(15) == pytest.approx(0.0125)   # the cosine compressed to 30 epochs
    # --set and --epochs win over the recipe; a shorter run moves ASHA's grace with it (40% of 60 -> 25).
    plan = run.build_plan(run.parse_args(["darl", "--dataset", "imagenet-lt", "--preset", "paper",
                                          "--epochs", "60", "--set", "batch_size=32"]))
    assert (plan["budget"]["epochs"], plan["budget"]["grace_period"], plan["config"]["batch_size"]) == (60, 25, 32)


def test_rnas_imagenet_lt_recipe_resolves_to_sgd_nesterov_batch_256():
    rna = registry.get("rna")
    recipe = recipes.get("rna", "imagenet-lt")
    config = run.preset_config("paper", rna, 100, recipe)
    point = run.paper_space("rna", "imagenet-lt", recipe).paper_point
    cfg = rna.config_cls.from_dict({**config, **point, "dataset": "imagenet-lt"})
    # RNA's CIFAR defaults are Adam 1e-3 over 200 epochs; its ImageNet-LT setting is SGD.
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == ("sgd", 0.1, 0.9, True, 5e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.outlier_batch_size, cfg.lr_schedule, cfg.warmup_epochs) == (
        100, 256, 256, "cosine", 0)
    assert (cfg.crop_min_scale, cfg.backbone, cfg.eval_every) == (0.2, "resnet50", 5)
    assert cfg.recipe.startswith("rna/imagenet-lt: RNA's ImageNet-LT setting, rna.md §4.1")
    assert run.preset_budget("paper", recipe)["epochs"] == 100
    assert run.preset_budget("small", recipe)["epochs"] == 30


def test_a_recipe_needing_imagenet_weights_refuses_to_start_without_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = ("the cala/places-lt recipe fine-tunes an ImageNet-pretrained resnet152, but no weights were "
                "given; expected --set pretrained=FILE (a torchvision resnet152 state dict) or "
                "--set pretrained=imagenet (torchvision's, downloaded)")
    assert run.main(["cala", "--dataset", "places-lt", "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --dataset places-lt --preset paper: {expected}\n"
    assert reproduce.main(["open_sampling", "--dataset", "places-lt"]) == 2
    assert "the open_sampling/places-lt recipe fine-tunes an ImageNet-pretrained resnet152" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []   # refused before any folder or tracking store
    plan = run.build_plan(run.parse_args(["cala", "--dataset", "places-lt", "--preset", "paper",
                                          "--set", "pretrained=resnet152.pth"]))
    assert plan["config"]["pretrained"] == "resnet152.pth" and plan["config"]["lr"] == 0.01
    # The smoke preset is a check of every stage on a CPU: no recipe, so no weights needed.
    plan = run.build_plan(run.parse_args(["cala", "--dataset", "places-lt"]))
    assert "recipe" not in plan["config"] and run.recipe_line(plan) is None


def test_a_method_without_a_recipe_says_so_and_keeps_its_defaults():
    plan = run.build_plan(run.parse_args(["ce", "--dataset", "places-lt", "--preset", "paper",
                                          "--protocol", "offline"]))
    assert "recipe" not in plan["config"] and plan["budget"]["epochs"] == 200
    assert run.recipe_line(plan) == ("recipe: none for ce on places-lt in the specs; the method's defaults "
                                     "apply (set the schedule with --set)")


def test_reproduce_trains_the_paper_point_with_the_recipe():
    plan = reproduce.build_plan(reproduce.parse_args(["cala", "--dataset", "places-lt",
                                                      "--set", "pretrained=resnet152.pth"]))
    cfg = plan["config"]
    assert plan["budget"]["epochs"] == 30 and plan["entry"].values == {"test_acc": 43.42}
    assert (cfg["lr"], cfg["batch_size"], cfg["lr_schedule"], cfg["knn_k"]) == (0.01, 256, "cosine", 40)
    assert "val_source" not in cfg and cfg["recipe"].startswith("cala/places-lt: cala.md §5.1")
    with pytest.raises(run.UsageError, match="no paper numbers for darl on imagenet-lt; accepted: --dataset "
                                             "cifar10 or cifar100"):
        reproduce.build_plan(reproduce.parse_args(["darl", "--dataset", "imagenet-lt"]))


def test_cifar_presets_are_unchanged():
    ce = registry.get("ce")
    assert run.preset_config("smoke", ce, 100) == {
        "n_max": 100, "val_per_class": 10, "test_per_class": 30, "ood_max_images": 100, "val_ood_size": 100,
        "batch_size": 16, "warmup_epochs": 1, "eval_batch_size": 100, "outlier_max_images": 1000}
    assert run.preset_config("small", ce, 100) == {"ood_max_images": 2000, "eval_every": 3}
    assert run.preset_config("paper", ce, 100) == {"eval_every": 5}
    assert [(run.preset_budget(p)["epochs"], run.preset_budget(p)["grace_period"])
            for p in ("smoke", "small", "paper")] == [(3, 1), (30, 12), (200, 80)]
    for preset in ("small", "paper"):
        plan = run.build_plan(run.parse_args(["darl", "--preset", preset]))
        assert "recipe" not in plan["config"] and "batch_size" not in plan["config"]
        assert plan["space"].paper_point["lr"] == 0.1 and plan["space"].distributions["lr"].low == 0.02


def test_list_shows_the_recipes_in_100_columns(capsys):
    run.list_methods()
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("Large-set recipes")))
    rows = lines[start + 1:]
    assert len(rows) == len(recipes.RECIPES) and all(len(line) <= 100 for line in lines[start:])
    assert rows[0].split() == ["darl/imagenet-lt", "resnet50,", "180", "epochs,", "batch", "64,", "sgd",
                               "0.025,", "wd", "5e-4,", "cosine"]
    assert any(r.split()[0] == "cala/places-lt" and "resnet152 pretrained," in r for r in rows)


def test_ricassos_one_tau_follows_lglas_per_set_value():
    # RICASSO writes one τ for Eqs. 1 and 6: its searched energy temperature starts at τ_G.
    for dataset, tau in (("imagenet-lt", 2.8), ("places-lt", 2.4)):
        space = run.paper_space("ricasso", dataset, recipes.get("ricasso", dataset))
        assert space.paper_point["tau_energy"] == tau
        assert run.paper_space("darl", dataset, recipes.get("darl", dataset)).paper_point["tau_energy"] == 8.0
    assert run.paper_space("ricasso", "cifar10").paper_point["tau_energy"] == 3.0


def test_pascl_eat_cocl_imagenet_lt_recipes_resolve_to_their_papers_schedules():
    def resolved(method: str, preset: str = "paper"):
        plan = run.build_plan(run.parse_args([method, "--dataset", "imagenet-lt", "--preset", preset]))
        return plan, registry.get(method).config_cls.from_dict({**plan["config"], **plan["space"].paper_point})

    # PASCL: SGD Nesterov 0.1 at batch 256 (+256 outliers), wd 5e-5, x0.1 at epochs 60 and 80 of 100.
    plan, cfg = resolved("pascl")
    assert (cfg.optimizer, cfg.lr, cfg.nesterov, cfg.weight_decay, cfg.batch_size, cfg.outlier_batch_size) == (
        "sgd", 0.1, True, 5e-5, 256, 256)
    assert [cfg.lr_at(e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert (plan["budget"]["epochs"], plan["budget"]["grace_period"], cfg.crop_min_scale) == (100, 40, 0.2)
    # Its Adam range 2e-4-5e-3 around 1e-3 moves with the recipe's 0.1: 0.02-0.5.
    lr = plan["space"].distributions["lr"]
    assert (lr.low, lr.high) == (pytest.approx(0.02), pytest.approx(0.5))
    assert "PASCL-FT" in cfg.recipe and plan["config"]["protocol"] == "pascl"
    # EAT: 0.05 = 0.1 * 128 / 256 over 60 epochs; its milestones 60 and 80 never fire: constant.
    plan, cfg = resolved("eat")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.outlier_batch_size, cfg.epochs) == (
        "sgd", 0.05, 5e-5, 128, 128, 60)
    assert {cfg.lr_at(e) for e in range(60)} == {0.05}
    assert plan["space"].paper_point["abstention_ratio"] == 0.03   # 30 abstention classes
    _, small = resolved("eat", "small")
    assert (small.epochs, small.lr_at(29)) == (30, 0.05)
    # COCL: only lr 0.1 and its λs are published; PASCL's ImageNet schedule, its own 128 + 256 batch.
    plan, cfg = resolved("cocl")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.outlier_batch_size) == (
        "sgd", 0.1, 5e-5, 128, 256)
    assert (cfg.lambda_ocl, cfg.lambda_tail, cfg.lambda_head, cfg.lr_at(60)) == (0.02, 0.01, 0.01, pytest.approx(0.01))
    assert "not published" in cfg.recipe
    for method in ("pascl", "eat", "cocl"):   # no Places-LT recipe: none of the three papers ran it
        assert recipes.get(method, "places-lt") is None


def test_a_large_sets_default_protocol_has_sets_for_it_and_an_explicit_one_without_is_refused(capsys):
    from trainables import protocols
    for dataset in ("imagenet-lt", "places-lt"):
        for method in registry.names():
            name = protocols.for_method(method, dataset)
            assert protocols.get(name).sets_for(dataset), (method, dataset)
            paper = protocols.for_method(method)
            if dataset in dict(protocols.get(paper).large_sets):   # the paper's protocol is kept where it can be
                assert name == paper
    # The papers' own where they have sets; the set's benchmark elsewhere (and CIFAR unchanged).
    assert [protocols.for_method(m, "places-lt") for m in ("la", "darl", "rna", "cala", "open_sampling")] == [
        "oltr", "oltr", "oltr", "cala", "open_sampling"]
    assert [protocols.for_method(m, "imagenet-lt") for m in ("la", "ricasso", "cala", "open_sampling")] == [
        "openood-v1.5", "ricasso", "rna", "rna"]
    assert [protocols.for_method(m) for m in ("la", "open_sampling")] == ["openood-v1.5", "open_sampling"]
    plan = run.build_plan(run.parse_args(["la", "--dataset", "places-lt", "--preset", "paper"]))
    assert (plan["config"]["protocol"], plan["config"]["test_ood"]) == ("oltr", ("places_lt_open",))
    plan = run.build_plan(run.parse_args(["open_sampling", "--dataset", "imagenet-lt", "--preset", "small"]))
    assert (plan["config"]["protocol"], plan["config"]["test_ood"]) == ("rna", ("imagenet_1k_ood",))
    expected = ("--protocol openood-v1.5: protocol 'openood-v1.5' has no OOD sets for dataset places-lt; "
                "accepted for places-lt: open_sampling, cala, oltr, offline")
    with pytest.raises(run.UsageError) as e:
        run.build_plan(run.parse_args(["la", "--dataset", "places-lt", "--protocol", "openood-v1.5"]))
    assert str(e.value) == expected
    # reproduce.py: its default is the paper numbers' protocol; an explicit one without sets is one line.
    assert reproduce.main(["cala", "--dataset", "places-lt", "--protocol", "rna",
                           "--set", "pretrained=resnet152.pth"]) == 2
    assert capsys.readouterr().err == ("error: --protocol rna: protocol 'rna' has no OOD sets for dataset "
                                       "places-lt; accepted for places-lt: open_sampling, cala, oltr, offline\n")
    with pytest.raises(run.UsageError, match="--protocol oltr: protocol 'oltr' has OOD sets only for imagenet-lt, "
                                             "places-lt, not for dataset cifar10; accepted for cifar10: offline, darl"):
        run.build_plan(run.parse_args(["la", "--protocol", "oltr"]))
