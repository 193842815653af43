"""COCL's search space: λ1, λ2, λ3, T, m, τ and the learning rate around the official CIFAR
point (enqueued first). τ only changes the test-time calibration (OLC), so a trial searches it
on the validation split like any other field.

On ImageNet-LT the README's command sets λ1 = 0.02, λ2 = λ3 = 0.01 (Places-LT, which COCL never
ran, takes them too); their ranges there span the same ×0.1 to ×10 around them as on CIFAR."""
from optuna.distributions import FloatDistribution

SPACE = {
    "lambda_ocl": FloatDistribution(0.005, 0.5, log=True),    # λ1, outlier class loss; 0.05
    "lambda_tail": FloatDistribution(0.005, 0.5, log=True),   # λ2, tail prototype loss; 0.05
    "lambda_head": FloatDistribution(0.01, 1.0, log=True),    # λ3, head triplet loss; 0.1
    "temperature": FloatDistribution(0.03, 0.5, log=True),    # T of the tail prototype loss; 0.07
    "margin": FloatDistribution(0.25, 4.0, log=True),         # m of the head triplet loss; 1
    "tau_olc": FloatDistribution(0.0, 2.0),                   # τ of OLC at test time; 1
    "lr": FloatDistribution(2e-4, 5e-3, log=True),            # Adam learning rate; 1e-3
}

PAPER_POINT = {"lambda_ocl": 0.05, "lambda_tail": 0.05, "lambda_head": 0.1, "temperature": 0.07,
               "margin": 1.0, "tau_olc": 1.0, "lr": 1e-3}

_LARGE_SPACE = {
    "lambda_ocl": FloatDistribution(0.002, 0.2, log=True),    # λ1; 0.02
    "lambda_tail": FloatDistribution(0.001, 0.1, log=True),   # λ2; 0.01
    "lambda_head": FloatDistribution(0.001, 0.1, log=True),   # λ3; 0.01
}
_LARGE_POINT = {"lambda_ocl": 0.02, "lambda_tail": 0.01, "lambda_head": 0.01}
DATASET_SPACE = {"imagenet-lt": _LARGE_SPACE, "places-lt": _LARGE_SPACE}
DATASET_POINT = {"imagenet-lt": _LARGE_POINT, "places-lt": _LARGE_POINT}
