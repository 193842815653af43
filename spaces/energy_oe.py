"""Energy-OE's search space (Liu et al. 2020): λ_E, the two energy margins and the learning
rate. The paper's point is its CIFAR-10 setting; on CIFAR-100 its m_in is -27. The paper has no
ImageNet-LT or Places-LT setting (RNA's ImageNet-LT row fine-tunes a CE model): there the search
starts at CIFAR-10's point, and m_in has no config default."""
from optuna.distributions import FloatDistribution

SPACE = {
    "lambda_energy": FloatDistribution(0.01, 1.0, log=True),  # λ_E; 0.1 = paper
    "m_in": FloatDistribution(-30.0, -15.0),                 # ID energies pushed below; -23 = paper
    "m_out": FloatDistribution(-9.0, -1.0),                  # outlier energies pushed above; -5 = paper
    "lr": FloatDistribution(0.02, 0.2, log=True),            # SGD learning rate; 0.1 = recipe
}

PAPER_POINT = {"lambda_energy": 0.1, "m_in": -23.0, "m_out": -5.0, "lr": 0.1}

DATASET_POINT = {"cifar100": {"m_in": -27.0}}
