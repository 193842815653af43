"""Meta-CALA's search space (CALA spec §10). The paper's CIFAR-10-LT point is enqueued first."""
from optuna.distributions import CategoricalDistribution, FloatDistribution

SPACE = {
    "tau1": FloatDistribution(0.5, 2.0),                                     # τ1, class-prior weight
    "tau2": FloatDistribution(0.25, 2.0),                                    # τ2, adjustment weight
    "knn_k": CategoricalDistribution([10, 20, 40, 60, 80, 100]),             # K, within the batch
    "meta_lr": FloatDistribution(1e-4, 1e-2, log=True),                      # η2 (Adam); paper 1e-3
    "meta_interval": CategoricalDistribution([1, 5, 20]),                    # paper 1, code 20
    "meta_hidden": CategoricalDistribution([100, 200]),                      # MLP width; code 200
}

# meta_hidden is not in the paper; 200 is the released code's value.
PAPER_POINT = {"tau1": 1.5, "tau2": 1.0, "knn_k": 40, "meta_lr": 1e-3, "meta_interval": 1,
               "meta_hidden": 200}
