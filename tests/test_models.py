"""Model registry, shapes, parameter counts and LGLA's expert leak (DARL spec §9, test 15)."""
import pytest
import torch

from trainables import models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer2_convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in model.layer2.modules() if isinstance(m, torch.nn.Conv2d)]


def cross_expert_grads(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Returns |d logits_j / d layer2 weights of expert k| summed, as a [K, K] matrix [j, k].

    In a grouped conv, expert k owns output-channel block k of the weight.
    """
    k_experts = model.num_experts
    convs = layer2_convs(model)
    logits, _ = model(x)
    probe = torch.randn_like(logits)  # random projection, so no sum can cancel to zero
    grads = torch.zeros(k_experts, k_experts)
    for j in range(k_experts):
        g = torch.autograd.grad((logits[j] * probe[j]).sum(), [c.weight for c in convs],
                                retain_graph=True)
        for gw in g:
            for k, block in enumerate(gw.chunk(k_experts, dim=0)):
                grads[j, k] += block.abs().sum()
    return grads


def test_registry_names_and_unknown():
    assert models.names() == ["lgla_resnet32", "lgla_resnet50", "resnet152", "resnet18", "resnet18_rna",
                              "resnet32", "resnet32_multihead", "resnet50", "resnet50_multihead",
                              "rna_resnet50"]
    with pytest.raises(ValueError, match=r"'resnet33'.*lgla_resnet32.*resnet32"):
        models.create("resnet33", num_classes=10)


def test_bad_kwargs_raise():
    with pytest.raises(ValueError, match="expert_shortcut"):
        models.create("lgla_resnet32", 10, expert_shortcut="pad")
    with pytest.raises(ValueError, match="classifier"):
        models.create("resnet32", 10, classifier="arcface")


@pytest.mark.parametrize("num_classes, expected", [(10, 1_344_784), (100, 1_362_064)])
def test_lgla_parameter_count(num_classes, expected):
    model = models.create("lgla_resnet32", num_classes, num_experts=3)
    assert n_params(model) == expected


def test_lgla_shapes():
    model = models.create("lgla_resnet32", 10)
    logits, feats = model(torch.randn(2, 3, 32, 32))
    assert model.num_experts == 3
    assert logits.shape == (3, 2, 10) and feats.shape == (3, 2, 64)
    assert logits.abs().max() <= 30.0 + 1e-4  # s * cos with s = 30


@pytest.mark.parametrize("num_experts", [1, 2, 4])
@pytest.mark.parametrize("shortcut", ["lgla_concat", "per_expert"])
def test_lgla_any_number_of_experts(num_experts, shortcut):
    model = models.create("lgla_resnet32", 5, num_experts=num_experts, expert_shortcut=shortcut)
    logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (num_experts, 2, 5) and feats.shape == (num_experts, 2, 64)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_resnet32_shapes(classifier):
    model = models.create("resnet32", 10, classifier=classifier)
    logits, feats = model(torch.randn(2, 3, 32, 32))
    assert model.num_experts == 1
    assert logits.shape == (1, 2, 10) and feats.shape == (1, 2, 64)
    assert n_params(model) == (464_154 if classifier == "linear" else 464_144)


def test_normed_linear_init_unit_columns():
    head = models.create("lgla_resnet32", 10).classifiers[0]
    assert head.weight.shape == (64, 10)
    assert torch.allclose(head.weight.norm(dim=0), torch.ones(10), atol=1e-5)


def test_lgla_concat_leaks_into_middle_expert_only():
    torch.manual_seed(0)
    model = models.create("lgla_resnet32", 10, expert_shortcut="lgla_concat")
    grads = cross_expert_grads(model, torch.randn(2, 3, 32, 32))
    assert grads[1, 0] > 0 and grads[1, 2] > 0           # expert 1 sees experts 0 and 2
    assert grads[0, 1] == 0 and grads[0, 2] == 0          # experts 0 and 2 see only themselves
    assert grads[2, 0] == 0 and grads[2, 1] == 0
    assert torch.all(grads.diagonal() > 0)


def test_per_expert_shortcut_has_no_leak():
    torch.manual_seed(0)
    model = models.create("lgla_resnet32", 10, expert_shortcut="per_expert")
    grads = cross_expert_grads(model, torch.randn(2, 3, 32, 32))
    off_diagonal = grads - torch.diag(grads.diagonal())
    assert torch.all(off_diagonal == 0)
    assert torch.all(grads.diagonal() > 0)


def test_ensemble_is_mean_of_experts():
    model = models.create("lgla_resnet32", 10).eval()
    logits, _ = model(torch.randn(2, 3, 32, 32))
    assert logits.mean(0).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet32", "lgla_resnet32"])
def test_channels_last_and_autocast(name):
    torch.manual_seed(0)
    model = models.create(name, 10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, _ = model(x)
        cl, _ = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, cl, atol=1e-4)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = model(x.to(memory_format=torch.channels_last))
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(p.grad is not None for p in model.parameters())
