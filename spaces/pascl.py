"""PASCL's search space: λ1, λ2, T, η, k around the paper's point on the data set (enqueued first).

λ2 and T are the CIFAR-10 values, which the code's ImageNet command keeps (and Places-LT, which
PASCL never ran, takes); for CIFAR-100 the paper uses λ2 = 0.02, T = 0.2, both inside these ranges.
"""
from optuna.distributions import FloatDistribution

SPACE = {
    "lambda_oe": FloatDistribution(0.05, 2.0, log=True),      # λ1, OE weight; 0.5 = paper
    "lambda_pascl": FloatDistribution(0.005, 1.0, log=True),  # λ2, L_PASCL weight; 0.1 = paper
    "temperature": FloatDistribution(0.03, 0.5, log=True),    # T of L_PASCL; 0.07 = paper
    "lr": FloatDistribution(2e-4, 5e-3, log=True),            # η (Adam); 1e-3 = paper
    "tail_fraction": FloatDistribution(0.2, 0.6),             # k, share of classes that anchor; 0.4
}

PAPER_POINT = {"lambda_oe": 0.5, "lambda_pascl": 0.1, "temperature": 0.07, "lr": 1e-3,
               "tail_fraction": 0.4}

DATASET_POINT = {"cifar100": {"lambda_pascl": 0.02, "temperature": 0.2}}
