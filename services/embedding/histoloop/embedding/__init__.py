"""histoloop embedding: patch → vector (Triton, in-process ONNX, handcrafted), expression features.

Public API (domain logic only; the gRPC servicer and event worker wrap it):

- :func:`make_embedder` — ``"triton"``, ``"onnx"``, ``"efficientnet"`` or ``"handcrafted"``.
- :func:`embed_dataset` — a stored patch set → one embeddings ``.h5ad`` artifact.
- :func:`embed_views` — clean + augmented views (ActiveVisium repetitions).
- :func:`fit_expression` / :func:`transform_expression` — gene-expression features.
- :func:`build_embedding_anndata`, :func:`write_embeddings`, :func:`read_embeddings`.
"""

from histoloop.embedding._anndata import (
    H5AD_CONTENT_TYPE,
    build_embedding_anndata,
    read_embeddings,
    write_embeddings,
)
from histoloop.embedding._augment import augment_patches, embed_views
from histoloop.embedding._base import Embedder, EmbeddingShapeError, check_patches
from histoloop.embedding._efficientnet import (
    EFFICIENTNET_DIM,
    EFFICIENTNET_NAME,
    EfficientNetEmbedder,
    efficientnet_features,
)
from histoloop.embedding._expression import (
    ExpressionMatrix,
    ExpressionParams,
    fit_expression,
    highly_variable_genes,
    log_normalize,
    read_10x_h5,
    read_expression,
    read_h5ad_counts,
    transform_expression,
)
from histoloop.embedding._factory import EMBEDDER_KINDS, EmbedderKind, make_embedder
from histoloop.embedding._handcrafted import FEATURE_NAMES, HandcraftedEmbedder
from histoloop.embedding._modelio import IMAGENET_MEAN, IMAGENET_STD, ModelIO
from histoloop.embedding._onnx import OnnxEmbedder, onnx_model_path
from histoloop.embedding._pipeline import EmbeddingResult, embed_dataset
from histoloop.embedding._triton import TritonEmbedder

__all__ = [
    "EFFICIENTNET_DIM",
    "EFFICIENTNET_NAME",
    "EMBEDDER_KINDS",
    "FEATURE_NAMES",
    "H5AD_CONTENT_TYPE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetEmbedder",
    "Embedder",
    "EmbedderKind",
    "EmbeddingResult",
    "EmbeddingShapeError",
    "ExpressionMatrix",
    "ExpressionParams",
    "HandcraftedEmbedder",
    "ModelIO",
    "OnnxEmbedder",
    "TritonEmbedder",
    "augment_patches",
    "build_embedding_anndata",
    "check_patches",
    "efficientnet_features",
    "embed_dataset",
    "embed_views",
    "fit_expression",
    "highly_variable_genes",
    "log_normalize",
    "make_embedder",
    "onnx_model_path",
    "read_10x_h5",
    "read_embeddings",
    "read_expression",
    "read_h5ad_counts",
    "transform_expression",
    "write_embeddings",
]
