"""Open-sampling's search space (spec §4 and A1): η, α and the learning rate.

α is searched as alpha_scale = α / max_j β_j, which is valid (≥ 1) on every dataset. The
paper's default α = max β + min β is alpha_scale = 1 + 1/IR, i.e. 1.01 at IR 100; the top of
the range reaches Table 5's α = 5 on CIFAR-10-LT (about 12.4)."""
from optuna.distributions import FloatDistribution

SPACE = {
    "eta": FloatDistribution(0.05, 5.0, log=True),           # η, weight of L_reg; 1 = official script
    "alpha_scale": FloatDistribution(1.0, 16.0, log=True),   # α / max β; 1 = MCD, large -> uniform
    "lr": FloatDistribution(0.02, 0.2, log=True),            # SGD learning rate; 0.1 = paper
}

PAPER_POINT = {"eta": 1.0, "alpha_scale": 1.01, "lr": 0.1}

# The default α on the large sets, 1 + n_min / n_max of their lists: 5 / 1280 images per class on
# ImageNet-LT, 5 / 4980 on Places-LT. (On CIFAR the point is IR 100's; IR 10 and 50 give 1.1, 1.02.)
DATASET_POINT = {"imagenet-lt": {"alpha_scale": 1 + 5 / 1280}, "places-lt": {"alpha_scale": 1 + 5 / 4980}}
