"""Outlier Exposure's search space: λ over RNA's trade-off grid (Fig. 6: 0.01 to 1) and the
learning rate. The paper's point is OE's λ = 0.5."""
from optuna.distributions import FloatDistribution

SPACE = {
    "lambda_oe": FloatDistribution(0.01, 1.0, log=True),     # λ, outlier-term weight; 0.5 = OE
    "lr": FloatDistribution(0.02, 0.2, log=True),            # SGD learning rate; 0.1 = recipe
}

PAPER_POINT = {"lambda_oe": 0.5, "lr": 0.1}
