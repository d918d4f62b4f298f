"""TorchScript export matches predict() for every head, scaling included."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from histoloop.training import FeatureScaling, train_model
from histoloop.training.export import export_torchscript, input_layout
from histoloop.training.predict import predict


def _data(n: int = 90, seed: int = 0):
    r = np.random.default_rng(seed)
    y = np.repeat(["a", "b", "c"], n // 3)
    image = (r.standard_normal((n, 10)) + np.repeat(np.eye(3, 10) * 4, n // 3, axis=0)).astype(
        np.float32
    )
    genes = r.poisson(3, (n, 6)).astype(np.float32)
    return image, genes, y


@pytest.mark.parametrize("head", ["mlp", "logreg", "ensemble", "multimodal"])
def test_exported_module_matches_predict(head: str) -> None:
    image, genes, y = _data()
    if head == "multimodal":
        features = {"image": image, "genes": genes}
        scaling = {
            "image": FeatureScaling.fit(image),
            "genes": FeatureScaling.fit(genes, log1p_target_sum=1e4),
        }
        x = np.hstack([image, genes])
    else:
        features, scaling, x = image, {"features": FeatureScaling.fit(image)}, image
    params = (
        {"max_epochs": 2, "members": 2}
        if head == "ensemble"
        else ({} if head == "logreg" else {"max_epochs": 2})
    )
    model = train_model(features, y, head=head, scaling=scaling, hyperparameters=params)
    assert sum(d for _, d in input_layout(model)) == x.shape[1]
    module = export_torchscript(model)
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
    with torch.inference_mode():
        probs, hidden, members = (t.numpy() for t in loaded(torch.from_numpy(x)))
    ref = predict(model, features)
    np.testing.assert_allclose(probs, ref.probabilities, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hidden, ref.hidden, rtol=1e-4, atol=1e-4)
    assert members.shape == ((2,) if head == "ensemble" else (1,)) + probs.shape
    np.testing.assert_allclose(members.mean(0), probs, rtol=1e-5, atol=1e-6)
