"""Linear probes: multinomial logistic regression on embeddings (the spurious-cue study, the toy model's diagnosis)."""

from __future__ import annotations

import numpy as np
import torch


def fit_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, steps: int = 300,
              weight_decay: float = 1e-4, seed: int = 0):
    """Multinomial logistic regression (L-BFGS, standardised features); returns a predict function."""
    x = torch.as_tensor(features, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    y = torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], n_classes, generator=gen, dtype=torch.float64) * 0.01).requires_grad_()
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, y) + weight_decay * (weight ** 2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    w, b = weight.detach(), bias.detach()

    def predict(features: np.ndarray) -> np.ndarray:
        z = (torch.as_tensor(features, dtype=torch.float64) - mean) / std
        return (z @ w + b).argmax(dim=1).numpy()

    return predict
