"""EAT's search space: Λ0, Λ1, the number of abstention classes and the learning rate around the
official CIFAR point (enqueued first).

The number of abstention classes is searched as abstention_ratio = odc / C, valid on every
dataset: the README's odc = 3 (CIFAR-10) and 30 (CIFAR-100) are both 0.3."""
from optuna.distributions import FloatDistribution

SPACE = {
    "lambda_cutmix": FloatDistribution(0.005, 1.0, log=True),   # Λ0, tail-paste CE; 0.05 (README)
    "lambda_ood": FloatDistribution(0.005, 1.0, log=True),      # Λ1, abstention CE; 0.05 (README)
    "abstention_ratio": FloatDistribution(0.1, 1.0),            # odc / C; 0.3
    "lr": FloatDistribution(2e-4, 5e-3, log=True),              # Adam learning rate; 1e-3
}

PAPER_POINT = {"lambda_cutmix": 0.05, "lambda_ood": 0.05, "abstention_ratio": 0.3, "lr": 1e-3}
