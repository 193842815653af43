"""RICASSO's search space (spec §4, §4.1): τ, α, ρ, λ0, λ1, γ0, γ1, ε0, ε1, K.

The paper reports none of these values, so PAPER_POINT is the spec's reading of it (the one τ
shared by Eqs. 1 and 6, LGLA's K = 3) with its fills where the paper is silent. τ of Eq. 1 is
not searched: it is LGLA's per-dataset constant (3.0 CIFAR-10, 2.5 CIFAR-100, 2.8 ImageNet-LT,
2.4 Places-LT; --set tau_gla=), and the energy temperature's paper point on each set is that τ.
"""
from optuna.distributions import CategoricalDistribution, FloatDistribution

SPACE = {
    "tau_energy": FloatDistribution(0.1, 100.0, log=True),        # τ, Eq. 6 energy temperature
    "mixup_alpha": FloatDistribution(0.1, 4.0, log=True),         # α, Beta(α, α) mixing
    "hat_sampler_rho": CategoricalDistribution([1.0, 2.0]),       # ρ: balanced 1 | reversed 2
    "lambda_cbcl": FloatDistribution(0.01, 10.0, log=True),       # λ0, Eq. 13
    "lambda_rcl": FloatDistribution(0.01, 10.0, log=True),        # λ1, Eq. 13
    "cbcl_gamma_pos": FloatDistribution(0.05, 5.0, log=True),     # γ0, Eq. 11
    "cbcl_gamma_neg": FloatDistribution(0.05, 5.0, log=True),     # γ1, Eq. 11
    "cbcl_eps_num": CategoricalDistribution([0.0, 1e-3, 1.0]),    # ε0, Eq. 11
    "cbcl_eps_den": CategoricalDistribution([1e-8, 1e-3, 1.0]),   # ε1, Eq. 11
    "num_experts": CategoricalDistribution([3]),                  # K; 4 empties a CIFAR-10 band
}

PAPER_POINT = {
    "tau_energy": 3.0,   # = τ of Eq. 1 on CIFAR-10 (LGLA), since the paper writes one τ
    "mixup_alpha": 1.0,
    "hat_sampler_rho": 1.0,
    "lambda_cbcl": 1.0,
    "lambda_rcl": 1.0,
    "cbcl_gamma_pos": 1.0,
    "cbcl_gamma_neg": 1.0,
    "cbcl_eps_num": 0.0,
    "cbcl_eps_den": 1e-8,
    "num_experts": 3,
}

# τ of Eq. 6 = LGLA's τ_G of the set (lgla.default_tau_gla), as tau_energy=None resolves it.
DATASET_POINT = {"cifar100": {"tau_energy": 2.5}, "imagenet-lt": {"tau_energy": 2.8},
                 "places-lt": {"tau_energy": 2.4}}
