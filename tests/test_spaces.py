"""Search spaces per data set (spaces.get, search/run.py's paper_space): on every data set the
first trial a search enqueues is the method's default config there (or its large-set recipe),
and every range holds its paper point. Resolution only: nothing here trains or starts Ray."""
from __future__ import annotations

import importlib

import pytest

import spaces
from search import run
from trainables import baselines, eat, lgla, pascl, recipes, registry

DATASETS = ("cifar10", "cifar100", "imagenet-lt", "places-lt")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet-lt": 1000, "places-lt": 365}
# The lists' n_max / n_min; CIFAR's is the search's default imbalance ratio.
IMBALANCE = {"cifar10": 100, "cifar100": 100, "imagenet-lt": 1280 / 5, "places-lt": 4980 / 5}
# Searched fields with no paper value on a data set (the config leaves them None and the method
# has no default there): the search starts at the space's CIFAR-10 point.
NO_PAPER_VALUE = {("energy_oe", "imagenet-lt", "m_in"), ("energy_oe", "places-lt", "m_in"),
                  ("cala", "imagenet-lt", "knn_k"), ("cala", "places-lt", "knn_k"),
                  ("cala_meta", "imagenet-lt", "knn_k"), ("cala_meta", "places-lt", "knn_k")}


def resolved_default(method: str, dataset: str, field: str):
    """Returns the value a searched field takes on `dataset` when left at its default: the
    config's (filled per data set when built), else what the method resolves None to, through
    the same function it calls (None where it has none)."""
    needs = {"meta_group_weights": "pixels"} if method == "cala_meta" and not dataset.startswith("cifar") else {}
    value = getattr(registry.get(method).config_cls.from_dict({"dataset": dataset, **needs}), field)
    if value is not None:
        return value
    c = NUM_CLASSES[dataset]
    return {("pascl", "lambda_pascl"): lambda: pascl.default_lambda_pascl(c, dataset),
            ("pascl", "temperature"): lambda: pascl.default_temperature(c, dataset),
            ("ricasso", "tau_energy"): lambda: lgla.default_tau_gla(c),   # τ of Eq. 6 = τ_G
            ("energy_oe", "m_in"): lambda: baselines.ENERGY_M_IN.get(dataset),
            ("open_sampling", "alpha_scale"): lambda: 1 + 1 / IMBALANCE[dataset],   # α = max β + min β
            ("cala", "knn_k"): lambda: None, ("cala_meta", "knn_k"): lambda: None}[(method, field)]()


def cases():
    for method in registry.names():
        for dataset in DATASETS:
            if dataset.startswith("cifar") or registry.get(method).large_scale:
                yield method, dataset


def required_args(method: str, dataset: str) -> list[str]:
    """Returns what a run needs to start there: Places-LT's recipes fine-tune ImageNet weights,
    and Meta-CALA groups the large sets' classes on some features (raw pixels here)."""
    args = ["--set", "pretrained=resnet152.pth"] if dataset == "places-lt" else []
    if method == "cala_meta" and not dataset.startswith("cifar"):
        args += ["--set", "meta_group_weights=pixels"]
    return args


@pytest.mark.parametrize("method,dataset", list(cases()))
def test_first_trial_is_the_methods_defaults_on_the_set_or_its_recipe(method, dataset):
    weights = required_args(method, dataset)
    cifar_point = spaces.get(method).paper_point
    for preset in ("smoke", "paper"):
        plan = run.build_plan(run.parse_args([method, "--dataset", dataset, "--preset", preset, *weights]))
        space = plan["space"]
        recipe = recipes.get(method, dataset) if preset == "paper" else None
        for field, value in space.paper_point.items():
            if recipe is not None and field in recipe.values:
                expected = recipe.values[field]
            elif (method, dataset, field) in NO_PAPER_VALUE:
                assert resolved_default(method, dataset, field) is None
                expected = cifar_point[field]
            else:
                expected = resolved_default(method, dataset, field)
            assert value == expected, (preset, field)
            dist = space.distributions[field]
            assert value in dist.choices if hasattr(dist, "choices") else dist.low <= value <= dist.high
        # The point builds the trial's config (a one-line error in build_plan otherwise).
        registry.get(method).config_cls.from_dict({**plan["config"], **space.paper_point})


def test_cifar10s_space_is_the_modules_own():
    for method in registry.names():
        space = spaces.get(method, "cifar10")
        module = importlib.import_module(f"spaces.{method}")
        assert (space.distributions, space.paper_point) == (module.SPACE, module.PAPER_POINT)


def test_eat_searches_10_to_100_abstention_classes_around_the_papers_30_on_the_large_sets():
    for dataset in ("imagenet-lt", "places-lt"):
        space = spaces.get("eat", dataset)
        c, dist = NUM_CLASSES[dataset], space.distributions["abstention_ratio"]
        assert eat.num_abstention_classes(c, space.paper_point["abstention_ratio"]) == 30
        assert (eat.num_abstention_classes(c, dist.low), eat.num_abstention_classes(c, dist.high)) == (10, 100)
    # CIFAR keeps 0.1-1 around 0.3 (3 and 30 classes on CIFAR-10 and CIFAR-100).
    assert spaces.get("eat", "cifar100").paper_point["abstention_ratio"] == 0.3


def test_cocls_imagenet_lambdas_start_the_search_with_ranges_of_x01_to_x10():
    space = spaces.get("cocl", "imagenet-lt")
    assert {k: space.paper_point[k] for k in ("lambda_ocl", "lambda_tail", "lambda_head")} == {
        "lambda_ocl": 0.02, "lambda_tail": 0.01, "lambda_head": 0.01}
    for field in ("lambda_ocl", "lambda_tail", "lambda_head"):
        dist = space.distributions[field]
        assert dist.log and (dist.low, dist.high) == pytest.approx(
            (space.paper_point[field] / 10, space.paper_point[field] * 10))


def test_space_accepts_the_papers_values_on_the_large_sets_and_refuses_cifars_where_out_of_range():
    plan = run.build_plan(run.parse_args(["eat", "--dataset", "imagenet-lt", "--space", "abstention_ratio=0.03"]))
    assert plan["space"].distributions["abstention_ratio"].choices == (0.03,)
    plan = run.build_plan(run.parse_args(["cocl", "--dataset", "imagenet-lt", "--space", "lambda_head=0.01",
                                          "--space", "lambda_tail=0.005:0.02"]))
    assert plan["space"].paper_point["lambda_head"] == 0.01 and plan["space"].paper_point["lambda_tail"] == 0.01
    with pytest.raises(run.UsageError, match=r"^--space abstention_ratio=0.3: out of range; allowed "
                                             r"uniform \[0.01, 0.1\]$"):
        run.build_plan(run.parse_args(["eat", "--dataset", "imagenet-lt", "--space", "abstention_ratio=0.3"]))
    # CIFAR keeps its range, which the large-set value lies outside of.
    with pytest.raises(run.UsageError, match=r"allowed uniform \[0.1, 1\]$"):
        run.build_plan(run.parse_args(["eat", "--space", "abstention_ratio=0.03"]))


def test_a_space_module_whose_point_leaves_its_range_is_refused(monkeypatch):
    module = importlib.import_module("spaces.eat")
    monkeypatch.setitem(module.DATASET_POINT, "imagenet-lt", {"abstention_ratio": 0.3})
    with pytest.raises(ValueError, match=r"spaces.eat on imagenet-lt: paper point abstention_ratio=0.3 lies "
                                         r"outside its searched uniform \[0.01, 0.1\]"):
        spaces.get("eat", "imagenet-lt")


def test_list_shows_each_sets_own_ranges_and_points(capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  on imagenet-lt: abstention_ratio uniform [0.01, 0.1] paper 0.03" in out
    assert "  on cifar100: lambda_pascl paper 0.02; temperature paper 0.2" in out
    assert "  on cifar100: knn_k paper 80" in out   # CALA's K, from its config's per-set default


def test_the_searcher_suggests_the_sets_paper_point_first():
    from search import orchestrate   # Ray and Optuna, imported once for every case
    for method, dataset in cases():
        weights = required_args(method, dataset)
        plan = run.build_plan(run.parse_args([method, "--dataset", dataset, "--preset", "paper", *weights]))
        first = orchestrate.searcher(plan["space"], "tpe", 0).suggest("trial-0")
        assert first == plan["space"].paper_point, (method, dataset)
