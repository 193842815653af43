"""CE's search space: the learning rate only. Standard training has no τ, α, λ, η or K to search,
so none is listed. The common recipe's value (baselines.BaselineConfig) is enqueued first."""
from optuna.distributions import FloatDistribution

SPACE = {
    "lr": FloatDistribution(0.02, 0.2, log=True),            # SGD learning rate; 0.1 = recipe
}

PAPER_POINT = {"lr": 0.1}
