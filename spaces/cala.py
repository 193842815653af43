"""Heuristic-CALA's search space (CALA spec §10). The paper's CIFAR-10-LT point is enqueued first."""
from optuna.distributions import CategoricalDistribution, FloatDistribution

SPACE = {
    "tau1": FloatDistribution(0.5, 2.0),                                     # τ1, class-prior weight
    "tau2": FloatDistribution(0.25, 2.0),                                    # τ2, density-ratio weight
    "knn_k": CategoricalDistribution([10, 20, 40, 60, 80, 100]),             # K (App. D.V grid)
    "smooth_alpha": CategoricalDistribution([0.0, 0.05, 0.1, 0.25, 1.0]),    # α, Eq. A.11
    "mixup_alpha": CategoricalDistribution([0.2, 1.0]),                      # paper 0.2, code 1.0
    "v_mode": CategoricalDistribution(["log", "l2_ratio"]),                  # Eq. 8 vs the code's form
    "bank_samples_per_class": CategoricalDistribution([5, 10, 20]),          # bank size; code 10
}

# bank_samples_per_class is not in the paper; 10 is the released code's value.
PAPER_POINT = {"tau1": 1.5, "tau2": 1.0, "knn_k": 40, "smooth_alpha": 0.05, "mixup_alpha": 0.2,
               "v_mode": "log", "bank_samples_per_class": 10}
