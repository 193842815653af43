"""RNA's search space (spec §3, §9): λ, τ, η. The paper's point is enqueued first."""
from optuna.distributions import CategoricalDistribution, FloatDistribution

SPACE = {
    "lambda_rna": FloatDistribution(0.1, 1.0),               # λ, weight of L_RNA (Fig. 5 grid)
    "tau_la": CategoricalDistribution([0.5, 1.0, 1.5, 2.0]),  # τ, logit adjustment; 1 = paper
    "lr": FloatDistribution(3e-4, 3e-3, log=True),           # η, Adam learning rate; 1e-3 = paper
}

PAPER_POINT = {"lambda_rna": 0.5, "tau_la": 1.0, "lr": 1e-3}
