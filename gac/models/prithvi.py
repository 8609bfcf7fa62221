"""Prithvi-EO-2.0 through TerraTorch's backbone registry, with LoRA (and an optional int8 base): the Stage 2 refiner.

The refiner maps opt_v1 (Stage 1's generation) to opt_v2 = opt_v1 + residual, both as S2L2A reflectance in [0, 1]
of shape ``(B, 12, 120, 120)``. The residual head's last layer starts at zero, so an untrained refiner is exactly the
identity: Stage 2 cannot start worse than Stage 1 (an earlier implementation's Stage 2 ended 6 dB *below* Stage 1).

**Bands.** Prithvi-EO-2.0 was pretrained on six HLS bands; TerraTorch's ``bands=`` argument takes band names, keeps
the pretrained patch-embedding weights of the names it knows and gives new names fresh (xavier) weights. GAC feeds
all twelve BigEarthNet L2A bands under the HLS names TerraMind also uses for S2L2A:

=====  ===================  =================================
S2     name given           patch embedding
=====  ===================  =================================
B01    COASTAL_AEROSOL      new
B02    BLUE                 pretrained (HLS BLUE)
B03    GREEN                pretrained (HLS GREEN)
B04    RED                  pretrained (HLS RED)
B05    RED_EDGE_1           new
B06    RED_EDGE_2           new
B07    RED_EDGE_3           new
B08    NIR_BROAD            new
B8A    NIR_NARROW           pretrained (HLS NIR_NARROW)
B09    WATER_VAPOR          new
B11    SWIR_1               pretrained (HLS SWIR_1)
B12    SWIR_2               pretrained (HLS SWIR_2)
=====  ===================  =================================

The pretrained backbone is frozen, but the six new bands' embedding columns are **trainable**: a frozen random
projection would feed six bands to the transformer as fixed noise-mixed features that nothing could adapt. They get
a zero-initialised trainable weight added to their fresh columns (:class:`NewBandEmbedding`), so training starts from
TerraTorch's own init, the six pretrained columns stay exactly the released ones, and weight decay (if any) pulls the
new columns back towards their init rather than towards zero. What trains is thus provable: the ``lora_A`` /
``lora_B`` adapters, ``new_band_weight`` and the ``head``.

**Standardisation.** Inputs are standardised per band before the backbone: the six pretrained bands with Prithvi's own
pretraining mean/std (``prithvi_cfgs[variant]['mean'/'std']`` in TerraTorch, HLS DN), the six new bands with
TerraMind v1's S2L2A pretraining mean/std (``v1_pretraining_mean/std['untok_sen2l2a@224']``), the only per-band L2A
statistics TerraTorch ships for them. Both are in DN (reflectance × 10000) and are divided by 10000 here.

**Geometry.** The 120 px tile is reflect-padded symmetrically to ``img_size`` (a multiple of the patch size) with
:func:`gac.models.geometry.pad_to` and the residual is centre-cropped back with :func:`gac.models.geometry.crop_from`.

**Head.** The backbone returns one token sequence per block; the last (layer-normed) one, without its cls token, goes
to :class:`gac.models.heads.TokenPixelDecoder` with the standardised input as its guide: token features are upsampled
bilinearly (continuous across token borders, so no 16 px blocks), fused with the input by 3×3 convs and projected to
12 bands by a zero-initialised conv. The residual is predicted in standardised units and scaled back by the band std.
The output is not clamped (training losses see the raw values); :func:`gac.training.export.apply`, which every
inference path uses, clips it to valid reflectance. With ``nll_weight > 0`` a :class:`gac.models.heads.SigmaHead`
(built last, on the head's detached features) also predicts a per-band log-variance (:meth:`Refiner.distribution`).

**Weights.** ``pretrained: true`` lets TerraTorch download the Prithvi hub weights (or read a pre-filled hub cache
with ``HF_HUB_OFFLINE=1``; TerraTorch maps the six pretrained bands into the 12-band patch embedding). ``ckpt_path``
builds with ``pretrained=False`` and loads a local file: the released Prithvi-EO-2.0 MAE checkpoint
(``Prithvi_EO_V2_<size>.pt``, ``encoder.*``/``decoder.*`` keys, 6 HLS bands) through TerraTorch's
``checkpoint_filter_fn_vit`` — the decoder is dropped, the six bands are mapped, the six new bands keep their fresh
init — or a state dict of GAC's 12-band backbone (e.g. ``build_backbone(p).state_dict()``), loaded strictly. Either
way every backbone weight must come from the file (:mod:`gac.models.checkpoints`). Neither gives random init.
Weights load before quantisation and LoRA.

**int8.** ``load_in_8bit: true`` replaces every ``nn.Linear`` of the backbone by a bitsandbytes ``Linear8bitLt``
(``has_fp16_weights=False``, outlier threshold 6.0) whose weight is quantised by ``Int8Params.to(device)`` (row-wise
int8 + fp32 scales ``SCB``; this works on CPU in bitsandbytes 0.50) *on the device the model will run on*:
bitsandbytes quantises only when a weight leaves the CPU, and a module ``.to()`` of already quantised weights moves
the int8 data but not the ``SCB`` scales. So callers pass ``device`` (the training task passes the trainer's root
device from Lightning's ``configure_model``), and nothing moves the quantised weights afterwards. peft then wraps
the attention layers with its bnb-aware LoRA layer (it needs ``is_loaded_in_8bit`` on the module it injects into).
The adapters stay fp32.

**Saving.** :func:`refiner_state` is the model's state dict as plain tensors (int8 weights and their ``SCB`` scales
as they are, so a reload is bit-exact); :func:`load_refiner` rebuilds from ``params`` without downloading and loads it
strictly.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gac.config import Stage2Params
from gac.errors import GacError
from gac.models.backend import uses_terratorch
from gac.models.checkpoints import load_published, load_state_dict, read_state_dict
from gac.models.geometry import crop_from, pad_to
from gac.models.heads import SigmaHead, TokenPixelDecoder
from gac.sensors import DN_SCALE

#: BigEarthNet v2 S2 band order (Stage 1's output and the catalog's ``s2``) and the band name Prithvi is given.
BAND_NAMES = (
    "COASTAL_AEROSOL",
    "BLUE",
    "GREEN",
    "RED",
    "RED_EDGE_1",
    "RED_EDGE_2",
    "RED_EDGE_3",
    "NIR_BROAD",
    "NIR_NARROW",
    "WATER_VAPOR",
    "SWIR_1",
    "SWIR_2",
)
DN_PER_REFLECTANCE = DN_SCALE
#: Where LoRA adapters may live (attention of a transformer block); :func:`trainable_report` users assert on it.
LORA_SITE = re.compile(r"(?:.*\.)?blocks\.\d+\.attn\.(qkv|proj)$")


@uses_terratorch
def _variant(p: Stage2Params) -> str:
    """``p.backbone`` without the optional ``terratorch_`` prefix, checked against TerraTorch's Prithvi configs."""
    from terratorch.models.backbones.prithvi_vit import prithvi_cfgs

    name = p.backbone.removeprefix("terratorch_")
    if name not in prithvi_cfgs:
        raise GacError(f"stage2.backbone: {p.backbone!r} (expected one of {sorted(prithvi_cfgs)})")
    return name


@uses_terratorch
def band_statistics(p: Stage2Params) -> tuple[Tensor, Tensor]:
    """Per-band mean and std (reflectance, S2 band order) used to standardise the refiner's input; see module doc."""
    from terratorch.models.backbones.prithvi_vit import prithvi_cfgs
    from terratorch.models.backbones.terramind.model.terramind_register import (
        PRETRAINED_BANDS as TERRAMIND_BANDS,
    )
    from terratorch.models.backbones.terramind.model.terramind_register import (
        v1_pretraining_mean,
        v1_pretraining_std,
    )

    cfg = prithvi_cfgs[_variant(p)]
    prithvi = [getattr(b, "value", b) for b in cfg["bands"]]
    terramind = TERRAMIND_BANDS["untok_sen2l2a@224"]
    mean, std = [], []
    for name in BAND_NAMES:
        if name in prithvi:
            mean.append(cfg["mean"][prithvi.index(name)])
            std.append(cfg["std"][prithvi.index(name)])
        else:
            mean.append(v1_pretraining_mean["untok_sen2l2a@224"][terramind.index(name)])
            std.append(v1_pretraining_std["untok_sen2l2a@224"][terramind.index(name)])
    return torch.tensor(mean) / DN_PER_REFLECTANCE, torch.tensor(std) / DN_PER_REFLECTANCE


@uses_terratorch
def build_backbone(p: Stage2Params) -> nn.Module:
    """The plain 12-band Prithvi ViT encoder of ``p.backbone`` with its weights (hub, ``ckpt_path`` or random)."""
    from terratorch.registry import BACKBONE_REGISTRY

    name = _variant(p)
    backbone = BACKBONE_REGISTRY.build(
        name,
        pretrained=p.pretrained and not p.ckpt_path,
        bands=list(BAND_NAMES),
        num_frames=1,
        img_size=p.img_size,
    )
    patch = backbone.patch_embed.patch_size[-1]
    if p.img_size % patch:
        raise GacError(f"stage2.img_size: {p.img_size} is not a multiple of {name}'s patch size {patch}")
    if p.ckpt_path:
        _load_checkpoint(backbone, p, name)
    return backbone


@uses_terratorch
def _load_checkpoint(backbone: nn.Module, p: Stage2Params, variant: str) -> None:
    """``stage2.ckpt_path``: the released MAE checkpoint (``encoder.*`` keys) or GAC's 12-band backbone state dict."""
    from terratorch.models.backbones.prithvi_vit import checkpoint_filter_fn_vit, prithvi_cfgs

    keys = read_state_dict(p.ckpt_path, "stage2.ckpt_path").keys()
    if not any(k.startswith(("encoder.", "decoder.")) for k in keys):
        load_state_dict(backbone, p.ckpt_path, key="stage2.ckpt_path")
        return
    pretrained_bands = prithvi_cfgs[variant]["bands"]
    load_published(
        backbone,
        p.ckpt_path,
        "stage2.ckpt_path",
        lambda state, model: checkpoint_filter_fn_vit(state, model, pretrained_bands, model.model_bands),
        source_key=lambda k: f"encoder.{k}",
        remapped=("patch_embed.proj.weight",),
    )


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs, on *every* int8 matmul, that fp32 activations are cast to fp16: by design, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quantize_linears(module: nn.Module, device: str | torch.device = "cpu") -> int:
    """Replace every ``nn.Linear`` under ``module`` by a frozen int8 ``Linear8bitLt`` quantised on ``device``.

    Returns the count. The new layers (weights, scales and bias) live on ``device``; see the module docstring for why
    quantisation must happen where the model runs.
    """
    import bitsandbytes as bnb

    matmul_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in matmul_log.filters):
        matmul_log.addFilter(_DropCastNotice())

    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights=False, threshold=6.0
        )
        weight = linear.weight.data.detach().cpu().clone()  # Int8Params quantises only on a move away from the CPU
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone().to(device), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, layer)
    module.is_loaded_in_8bit = True  # peft reads this to pick its bnb 8-bit LoRA layer
    return len(targets)


def add_lora(module: nn.Module, p: Stage2Params) -> None:
    """Inject LoRA adapters (peft) into ``module`` in place, then freeze everything in it but the adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = p.lora
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    try:
        inject_adapter_in_model(config, module)
    except ValueError as e:
        raise GacError(
            f"stage2.lora.target_modules: {lora.target_modules!r} cannot be adapted in {p.backbone} "
            f"({str(e).splitlines()[0]}); attention only is r'.*blocks\\.\\d+\\.attn\\.(qkv|proj)'"
        ) from None
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


class NewBandEmbedding(nn.Module):
    """The patch embedding's frozen ``Conv3d`` plus a trainable, zero-initialised weight on the new bands' columns.

    ``conv(x, W + scatter(new_band_weight))`` equals the original embedding at init and lets only the columns of
    ``new_bands`` (input channel indices) move; see the module docstring for why.
    """

    def __init__(self, conv: nn.Conv3d, new_bands: list[int]) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("new_bands", torch.tensor(new_bands, dtype=torch.long), persistent=False)
        out, _, *kernel = conv.weight.shape
        self.new_band_weight = nn.Parameter(torch.zeros(out, len(new_bands), *kernel))

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        weight = c.weight.index_add(1, self.new_bands, self.new_band_weight.to(c.weight.dtype))
        return F.conv3d(x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


@uses_terratorch
def new_band_indices(p: Stage2Params) -> list[int]:
    """Indices (in :data:`BAND_NAMES`) of the bands ``p.backbone`` was not pretrained on."""
    from terratorch.models.backbones.prithvi_vit import prithvi_cfgs

    pretrained = {getattr(b, "value", b) for b in prithvi_cfgs[_variant(p)]["bands"]}
    return [i for i, name in enumerate(BAND_NAMES) if name not in pretrained]


class Refiner(nn.Module):
    """opt_v1 reflectance (B, 12, H, H) → opt_v2 reflectance = opt_v1 + residual (see the module docstring)."""

    def __init__(self, backbone: nn.Module, img_size: int, mean: Tensor, std: Tensor, sigma: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.img_size = img_size
        self.head = TokenPixelDecoder(backbone.embed_dim, len(BAND_NAMES), len(BAND_NAMES))
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        # created last and on a forked RNG: everything else, and every later draw (the data order), is the same
        # with and without it
        self.sigma_head = None
        if sigma:
            with torch.random.fork_rng(devices=[]):
                self.sigma_head = SigmaHead(len(BAND_NAMES), len(BAND_NAMES))

    def forward(self, x: Tensor) -> Tensor:
        return self.distribution(x)[0]

    def distribution(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """opt_v2 reflectance and, with a σ head, its uncalibrated log-variance in reflectance² (else ``None``)."""
        if x.ndim != 4 or x.shape[1] != len(BAND_NAMES) or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"expected (B, {len(BAND_NAMES)}, H, H) reflectance, got {tuple(x.shape)}")
        size = x.shape[-1]
        z = (pad_to(x, self.img_size) - self.mean) / self.std
        tokens = self.backbone(z)[-1][:, 1:, :]  # last block (layer-normed), cls token dropped
        features, guide = self.head.features(tokens, z)
        residual = crop_from(self.head.out(torch.cat([features, guide], dim=1)), size)
        mean = x + residual * self.std
        if self.sigma_head is None:
            return mean, None
        return mean, crop_from(self.sigma_head(features, guide), size) + 2 * torch.log(self.std)


def build_refiner(p: Stage2Params, device: str | torch.device = "cpu") -> Refiner:
    """Backbone with weights → (int8 base, quantised on ``device``) → LoRA → frozen base + zero-init head.

    The new bands' embedding columns train (:class:`NewBandEmbedding`). Only the int8 layers are placed on ``device``
    here; the rest moves with the module as usual.
    """
    backbone = build_backbone(p)
    if p.load_in_8bit:
        quantize_linears(backbone, device)
    add_lora(backbone, p)
    embedding = NewBandEmbedding(backbone.patch_embed.proj, new_band_indices(p))
    backbone.patch_embed.proj = embedding
    mean, std = band_statistics(p)
    return Refiner(backbone, p.img_size, mean, std, sigma=p.nll_weight > 0)


def trainable_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts (int8 weights count one per element), their share and the names."""
    names = [n for n, prm in model.named_parameters() if prm.requires_grad]
    trainable = sum(prm.numel() for prm in model.parameters() if prm.requires_grad)
    total = sum(prm.numel() for prm in model.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / total, "names": names}


def refiner_state(model: Refiner) -> dict[str, Tensor]:
    """Everything needed to rebuild ``model`` as plain tensors (int8 base weights + ``SCB`` scales kept exact)."""
    return {k: v.detach().as_subclass(Tensor).clone() for k, v in model.state_dict().items()}


def load_refiner(p: Stage2Params, state: dict[str, Tensor], device: str | torch.device = "cpu") -> Refiner:
    """Rebuild the refiner ``p`` describes (no download, no ``ckpt_path``) and load ``state`` strictly; eval mode.

    A *fresh* model is built for every load: bitsandbytes refuses to load int8 weights into a ``Linear8bitLt`` that
    has already run (its scales live on in the layer's matmul state).
    """
    model = build_refiner(p.model_copy(update={"pretrained": False, "ckpt_path": None}), device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shapes: another variant, rank, band set or 8-bit setting
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise GacError(f"stage2 checkpoint does not match the stage2 params ({detail[:300]})") from None
    return model.to(device).eval()
