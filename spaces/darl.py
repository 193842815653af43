"""DARL's search space (spec §4.2): τ, α, λ, η, K. The paper's point is enqueued first."""
from optuna.distributions import CategoricalDistribution, FloatDistribution

SPACE = {
    "tau_energy": FloatDistribution(0.1, 100.0, log=True),   # τ, ALA energy temperature (Fig. 8)
    "mixup_alpha": FloatDistribution(0.1, 10.0, log=True),   # α, Beta(α, α) mixing (Fig. 7)
    "lambda_mix": FloatDistribution(0.25, 4.0, log=True),    # λ, mixed-row weight; 1 = paper
    "lr": FloatDistribution(0.02, 0.2, log=True),            # η, learning rate; 0.1 = paper
    "num_experts": CategoricalDistribution([3]),             # K; wider K needs LGLA band guards
}

PAPER_POINT = {"tau_energy": 8.0, "mixup_alpha": 1.0, "lambda_mix": 1.0, "lr": 0.1, "num_experts": 3}
