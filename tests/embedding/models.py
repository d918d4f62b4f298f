"""Small torch models for the export and embedding tests (seeded, CPU, fast)."""

from __future__ import annotations

import torch


def small_cnn(dim: int = 16) -> torch.nn.Module:
    """A little CNN: normalised NCHW float in, (B, dim) out; weights fixed by a seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, dim),
    )
    torch.random.set_rng_state(generator_state)
    return model.eval()
