"""Logit adjustment's search space (Menon et al. 2021): τ and the learning rate. τ's range is
the one the RNA spec recommends around the paper's τ = 1 (rna.md §9)."""
from optuna.distributions import FloatDistribution

SPACE = {
    "tau": FloatDistribution(0.5, 2.0),                       # τ of z + τ log π; 1 = paper
    "lr": FloatDistribution(0.02, 0.2, log=True),            # SGD learning rate; 0.1 = recipe
}

PAPER_POINT = {"tau": 1.0, "lr": 0.1}
