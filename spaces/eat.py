"""EAT's search space: Λ0, Λ1, the number of abstention classes and the learning rate around the
official CIFAR point (enqueued first).

The number of abstention classes is searched as abstention_ratio = odc / C: the README's odc = 3
(CIFAR-10) and 30 (CIFAR-100) are both 0.3. On ImageNet-LT its odc is 30 of 1000 classes (0.03),
and Places-LT, which EAT never ran, keeps the 30 classes (30 / 365, trainables.eat); there the
ratio is searched over 10 to 100 abstention classes."""
from optuna.distributions import FloatDistribution

SPACE = {
    "lambda_cutmix": FloatDistribution(0.005, 1.0, log=True),   # Λ0, tail-paste CE; 0.05 (README)
    "lambda_ood": FloatDistribution(0.005, 1.0, log=True),      # Λ1, abstention CE; 0.05 (README)
    "abstention_ratio": FloatDistribution(0.1, 1.0),            # odc / C; 0.3
    "lr": FloatDistribution(2e-4, 5e-3, log=True),              # Adam learning rate; 1e-3
}

PAPER_POINT = {"lambda_cutmix": 0.05, "lambda_ood": 0.05, "abstention_ratio": 0.3, "lr": 1e-3}

DATASET_SPACE = {
    "imagenet-lt": {"abstention_ratio": FloatDistribution(10 / 1000, 100 / 1000)},   # 10 to 100 classes
    "places-lt": {"abstention_ratio": FloatDistribution(10 / 365, 100 / 365)},
}
DATASET_POINT = {
    "imagenet-lt": {"abstention_ratio": 30 / 1000},   # odc 30
    "places-lt": {"abstention_ratio": 30 / 365},
}
