"""Classifier heads on top of spot embeddings, behind one :class:`Head` interface.

Registered by name in :data:`HEADS` (see :func:`make_head`):

* ``"mlp"`` — the ActiveVisium architecture: ``Linear(d→128) → LeakyReLU(0.02) →
  Linear(128→C)``, cross-entropy with inverse-class-frequency weights that sum to 1,
  best-validation checkpoint (lowest validation loss), early stopping after ``patience``
  epochs without improvement. Trained by default with Adam at lr 1e-3 for up to 200
  epochs (patience 20) and a weight decay that shrinks with the number of labels
  (``weight_decay_per_label / n``), chosen on DLPFC 151510 so that the head is at least
  as good as logistic regression from 30 labels to the whole pool (benchmarks/README.md);
  the paper's settings (Adam 1e-4, ≤ 50 epochs, patience 10, no decay) are the
  ``activevisium`` preset (:mod:`histoloop.presets`).
* ``"multimodal"`` — image and gene-expression branches fused by LayerNorm + MLP.
* ``"logreg"`` — standardised scikit-learn logistic regression, a fast baseline.
* ``"ensemble"`` — ``members`` MLPs with different seeds; ``member_proba`` for BALD.

Inputs. Single-input heads (``mlp``, ``logreg``, ``ensemble`` of ``mlp``) take a
float array ``(n, d)``, or ``(n_views, n, d)`` where ``views[0]`` is the clean
embedding and the others are augmented views: each epoch draws one view per spot at
random; validation and prediction use the clean view. The multimodal head takes a
mapping ``{"image": (n, d) or (n_views, n, d), "genes": (n, g)}``.

Labels are integer class indices in ``[0, n_classes)``.

Artifacts. :meth:`Head.to_bytes` writes a ``torch.save`` archive holding only tensors,
strings and numbers; :meth:`Head.from_bytes` reads it with ``weights_only=True`` so a
model file can never run code when loaded.
"""

from histoloop.training.heads.base import (
    HEADS,
    FitReport,
    Head,
    HeadInput,
    UnknownHead,
    inverse_frequency_weights,
    make_head,
    register_head,
    stratified_split,
)
from histoloop.training.heads.ensemble import EnsembleConfig, EnsembleHead
from histoloop.training.heads.logreg import LogRegConfig, LogRegHead
from histoloop.training.heads.torch_nets import (
    MLPConfig,
    MLPHead,
    MLPNet,
    MultimodalConfig,
    MultimodalHead,
    MultimodalNet,
)
from histoloop.training.heads.torch_nets import _torch_threads as _torch_threads

__all__ = [
    "HEADS",
    "EnsembleConfig",
    "EnsembleHead",
    "FitReport",
    "Head",
    "HeadInput",
    "LogRegConfig",
    "LogRegHead",
    "MLPConfig",
    "MLPHead",
    "MLPNet",
    "MultimodalConfig",
    "MultimodalHead",
    "MultimodalNet",
    "UnknownHead",
    "inverse_frequency_weights",
    "make_head",
    "register_head",
    "stratified_split",
]
