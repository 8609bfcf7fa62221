"""Stage 3's grounder: TerraMind's encoder-decoder, LoRA on the decoder's cross-attention, two pixel heads.

Stage 3 must *train* through TerraMind, so it cannot use TerraMind's generation sampler (``generate()`` is
``@torch.no_grad()`` and ends in a VQ tokenizer's diffusion decoder). It runs the encoder-decoder itself, in one
differentiable pass, with no tokenizer anywhere:

* **Encoder (what is attended to).** Raw-pixel patch tokens of two image modalities: S1GRD (σ0 in dB, ``[VV, VH]``)
  and S2L2A (opt_v2 as DN). Each is standardised with TerraMind's pretraining mean/std, reflect-padded 120 px →
  ``img_size`` (:mod:`gac.models.geometry`) and embedded by TerraMind's own ``untok_sen1grd@224`` /
  ``untok_sen2l2a@224``
  patch embeddings (linear projection of a 16×16 patch + 2-D sin-cos position + modality embedding). The encoder
  self-attends over all ``2·(img_size/16)²`` tokens; its output, projected by ``decoder_proj_context`` plus the same
  position/modality embeddings, is the context of every decoder block.
* **Decoder queries (what attends).** One query per 16×16 output patch: TerraMind's mask token + the decoder embedding
  of the *tokenised* S2L2A modality ``tok_sen2l2a@224`` (position + S2L2A modality embedding), exactly what TerraMind's
  MaskGIT sampler feeds when every target token is still masked. In each decoder block the queries self-attend, then
  cross-attend (``decoder.<i>.cross_attn.{q,kv,proj}``, the layers LoRA adapts) to the S1 *and* S2 encoder tokens.
* **Pixels (where they come from).** The pretrained model only predicts token ids of the tokenizer's codebook; it has
  no differentiable pixel output. ``pixel_head`` (:class:`gac.models.heads.TokenPixelDecoder`) upsamples the decoder
  output tokens bilinearly — continuous across token borders, so it draws no 16 px blocks — and fuses them by 3×3
  convs with the standardised opt_v2 and S1 at full resolution into the *standardised* residual, cropped back to
  120 px, converted to reflectance and **added to opt_v2**. Its last conv starts at zero: an untrained grounder
  returns opt_v2 unchanged.
* **Cycle path** (:meth:`Grounder.sar_from_optical`). The same encoder sees *only* the S2L2A tokens of an optical
  image; the queries carry the ``tok_sen1grd@224`` decoder embedding instead, cross-attend to those optical tokens
  through the same LoRA-adapted layers, and ``sar_head`` (the same decoder, guided by the optical image alone;
  zero-initialised, so it starts at the pretraining mean) turns them into standardised S1 dB.
  ``L1(sar_from_optical(opt_v3), s1)`` thus asks the grounded optical image to carry the SAR's structure.

With ``stage3.nll_weight > 0`` a :class:`gac.models.heads.SigmaHead` (built last, on the pixel head's detached
features) also predicts opt_v3's per-band log-variance (:meth:`Grounder.distribution`).

Trainable: the LoRA A/B matrices on ``cross_attn.{q,kv,proj}`` and the two heads (the only non-LoRA trainable part,
since no pretrained pixel output exists). Everything else of TerraMind (embeddings, encoder, decoder self-attention
and MLPs, norms) is frozen.

The architecture comes from TerraTorch's ``FULL_MODEL_REGISTRY`` entry ``<variant>_encdec``: ``stage3.variant`` is the
only switch. In TerraTorch 1.2.11 the tiny and small entries pass ``pretrained_bands`` on to ``TerraMind``, which does
not accept it, so they cannot be built as they are; GAC therefore reads the entry's hyper-parameters (by running it
against a stand-in builder) and hands the ones ``TerraMind`` accepts to TerraTorch's own ``build_terrammind_encdec``,
which also fetches the hub weights for ``pretrained: true``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from gac.config import Stage3Params
from gac.errors import GacError
from gac.models import geometry
from gac.models.backend import uses_terratorch
from gac.models.checkpoints import load_published
from gac.models.heads import SigmaHead, TokenPixelDecoder
from gac.sensors import DN_SCALE

#: BigEarthNet tiles are 120×120 px.
TILE = 120
#: S2L2A DN per unit of reflectance (``gac.evaluation.metrics.to_reflectance`` divides by this).
DN_PER_REFLECTANCE = DN_SCALE
#: Modality names as TerraMind's embedding builders know them.
SAR, OPTICAL = "S1GRD", "S2L2A"
#: Raw-pixel modalities the encoder embeds, and tokenised modalities whose decoder embeddings make the queries.
ENCODER_MODALITIES, QUERY_MODALITIES = (SAR, OPTICAL), (OPTICAL, SAR)


class _Captured(Exception):
    """Stops a registry entry once the stand-in builder has seen its hyper-parameters."""


@uses_terratorch
def registry_hyperparameters(variant: str) -> dict[str, Any]:
    """The hyper-parameters TerraTorch's ``<variant>_encdec`` registry entry builds ``TerraMind`` with.

    Only those ``TerraMind`` accepts are returned, plus ``variant`` (which names the hub weights).
    """
    from unittest import mock

    from terratorch.models.backbones.terramind.model import terramind_register
    from terratorch.models.backbones.terramind.model.terramind import TerraMind
    from terratorch.registry import FULL_MODEL_REGISTRY

    name = variant.removeprefix("terratorch_")
    entry = f"terratorch_{name}_encdec"
    if f"{name}_encdec" not in FULL_MODEL_REGISTRY:
        raise GacError(
            f"stage3.variant: {variant!r} has no '{name}_encdec' in TerraTorch's FULL_MODEL_REGISTRY "
            "(expected terramind_v1_{tiny,small,base,large})"
        )
    captured: dict[str, Any] = {}

    def stand_in(**kwargs: Any) -> None:
        captured.update(kwargs)
        raise _Captured

    with mock.patch.object(terramind_register, "build_terrammind_encdec", stand_in), contextlib.suppress(_Captured):
        FULL_MODEL_REGISTRY.build(entry, encoder_embeddings={}, decoder_embeddings={}, modality_info={})
    accepted = set(inspect.signature(TerraMind).parameters) - {
        "encoder_embeddings",
        "decoder_embeddings",
        "modality_info",
    }
    return {"variant": captured["variant"], **{k: v for k, v in captured.items() if k in accepted}}


@uses_terratorch
def build_encdec(p: Stage3Params) -> nn.Module:
    """Build the bare TerraMind encoder-decoder (no LoRA, no heads) for ``p.variant`` with its weights.

    Encoder embeddings: raw-pixel S1GRD and S2L2A; decoder embeddings: tokenised S2L2A and S1GRD (their position and
    modality embeddings make the queries). ``pretrained: true`` loads the hub weights through TerraTorch (shape
    mismatches such as 224 px position tables are skipped: GAC's sin-cos tables are rebuilt for ``img_size``);
    ``ckpt_path`` loads the released ``TerraMind_v1_<size>.pt`` (or a state dict of this module) through TerraTorch's
    ``checkpoint_filter_fn``, demanding every weight but the position tables from the file; neither gives random
    init.
    """
    from terratorch.models.backbones.terramind.model import terramind_register
    from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO
    from terratorch.models.backbones.terramind.model.terramind import (
        build_modality_embeddings,
        build_output_modality_embeddings,
    )

    if p.img_size < TILE:
        raise GacError(f"stage3.img_size: {p.img_size} is smaller than the {TILE} px tile (expected ≥ {TILE})")
    hp = registry_hyperparameters(p.variant)
    sizes = {"img_size": p.img_size, "dim": hp["dim"]}  # patch sizes come from MODALITY_INFO (16 px)
    encoder_embeddings, _ = build_modality_embeddings(MODALITY_INFO, list(ENCODER_MODALITIES), **sizes)
    decoder_embeddings, _ = build_output_modality_embeddings(MODALITY_INFO, list(QUERY_MODALITIES), **sizes)
    model = terramind_register.build_terrammind_encdec(
        pretrained=p.pretrained and not p.ckpt_path,
        encoder_embeddings=encoder_embeddings,
        decoder_embeddings=decoder_embeddings,
        modality_info=MODALITY_INFO,
        **hp,
    )
    if p.ckpt_path:  # the released TerraMind_v1_<size>.pt (more modalities, 224 px tables) or this module's own state
        load_published(model, p.ckpt_path, "stage3.ckpt_path", terramind_register.checkpoint_filter_fn)
    return model


class Grounder(nn.Module):
    """opt_v2 + S1 → opt_v3 through TerraMind's encoder-decoder (see the module docstring for the data flow).

    Args:
        encdec: the TerraMind encoder-decoder of :func:`build_encdec`, LoRA already injected.
        img_size: the square model input the 120 px tile is padded to.
    """

    @uses_terratorch
    def __init__(self, encdec: nn.Module, img_size: int, sigma: bool = False) -> None:
        super().__init__()
        from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO
        from terratorch.models.backbones.terramind.model.terramind_register import (
            v1_pretraining_mean,
            v1_pretraining_std,
        )

        self.encdec = encdec
        self.img_size = img_size
        # TerraMind's keys for the modalities, in the order the embedding builders inserted them.
        self.enc_key = dict(zip(ENCODER_MODALITIES, encdec.encoder_embeddings.keys(), strict=True))
        self.dec_key = dict(zip(QUERY_MODALITIES, encdec.decoder_embeddings.keys(), strict=True))
        self.modality_id = {m: MODALITY_INFO[k]["id"] for m, k in self.enc_key.items()}
        channels = {m: MODALITY_INFO[k]["num_channels"] for m, k in self.enc_key.items()}
        for mod, key in self.enc_key.items():
            self.register_buffer(f"mean_{mod}", _column(v1_pretraining_mean[key], channels[mod]), persistent=False)
            self.register_buffer(f"std_{mod}", _column(v1_pretraining_std[key], channels[mod]), persistent=False)
        self.patch = encdec.decoder_embeddings[self.dec_key[OPTICAL]].patch_size
        self.pixel_head = TokenPixelDecoder(encdec.dim, channels[OPTICAL] + channels[SAR], channels[OPTICAL])
        self.sar_head = TokenPixelDecoder(encdec.dim, channels[OPTICAL], channels[SAR])
        # created last and on a forked RNG: everything else, and every later draw (the data order), is the same
        # with and without it
        guide = channels[OPTICAL] + channels[SAR]
        self.sigma_head = None
        if sigma:
            with torch.random.fork_rng(devices=[]):
                self.sigma_head = SigmaHead(guide, channels[OPTICAL])

    # --- units and geometry -------------------------------------------------------------------------------------
    def _standardise(self, mod: str, x: torch.Tensor) -> torch.Tensor:
        return (x - getattr(self, f"mean_{mod}")) / getattr(self, f"std_{mod}")

    def _model_input(self, s1_db: torch.Tensor | None, opt_refl: torch.Tensor) -> dict[str, torch.Tensor]:
        """Standardised, padded encoder inputs keyed by TerraMind modality key."""
        images = {OPTICAL: opt_refl * DN_PER_REFLECTANCE} | ({SAR: s1_db} if s1_db is not None else {})
        return {self.enc_key[m]: geometry.pad_to(self._standardise(m, x), self.img_size) for m, x in images.items()}

    def _to_image(self, tokens: torch.Tensor, head: nn.Module, guide: list[torch.Tensor]) -> torch.Tensor:
        """Decoder tokens (B, N, D) + padded full-resolution guides → standardised image (B, C, 120, 120)."""
        return geometry.crop_from(head(tokens, torch.cat(guide, dim=1)), TILE)

    # --- the encoder-decoder ------------------------------------------------------------------------------------
    def _decode(self, inputs: dict[str, torch.Tensor], query: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``inputs``, decode one query per patch for modality ``query``; returns (tokens, encoder mod mask)."""
        m = self.encdec
        first = next(iter(inputs.values()))
        batch, grid = first.shape[0], first.shape[-1] // self.patch[0]
        mods = {}
        for key, x in inputs.items():
            mask = torch.zeros(batch, grid * grid, dtype=torch.bool, device=x.device)
            mods[key] = m.encoder_embeddings[key]({"tensor": x, "input_mask": mask})
        tokens, emb, enc_mask, mod_mask = m.forward_mask_encoder(mods, sum(d["x"].shape[1] for d in mods.values()))
        context = m.decoder_proj_context(m.forward_encoder(tokens + emb, encoder_mask=enc_mask)) + emb
        ids = torch.zeros(batch, grid, grid, dtype=torch.long, device=first.device)
        query_emb = m.decoder_embeddings[self.dec_key[query]].forward_embed({"tensor": ids})["emb"]
        y = m.forward_decoder(m.mask_token + query_emb, context, encoder_mask=enc_mask, decoder_attention_mask=None)
        return y, mod_mask

    def forward(self, s1_db: torch.Tensor, opt_refl: torch.Tensor) -> torch.Tensor:
        """Ground optical reflectance (B, 12, 120, 120) in S1 dB (B, 2, 120, 120); returns opt_v3 reflectance.

        The output is opt_v2 plus a learnt residual; it is not clipped (callers clip when they quantise to DN).
        """
        return self.distribution(s1_db, opt_refl)[0]

    def distribution(self, s1_db: torch.Tensor, opt_refl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """opt_v3 reflectance and, with a σ head, its uncalibrated log-variance in reflectance² (else ``None``)."""
        inputs = self._model_input(s1_db, opt_refl)
        y, _ = self._decode(inputs, OPTICAL)
        guide = torch.cat([inputs[self.enc_key[OPTICAL]], inputs[self.enc_key[SAR]]], dim=1)
        features, guide = self.pixel_head.features(y, guide)
        standardised = geometry.crop_from(self.pixel_head.out(torch.cat([features, guide], dim=1)), TILE)
        std_dn = getattr(self, f"std_{OPTICAL}")
        mean = opt_refl + standardised * std_dn / DN_PER_REFLECTANCE
        if self.sigma_head is None:
            return mean, None
        log_var = geometry.crop_from(self.sigma_head(features, guide), TILE)
        return mean, log_var + 2 * torch.log(std_dn / DN_PER_REFLECTANCE)

    def sar_from_optical(self, opt_refl: torch.Tensor) -> torch.Tensor:
        """Predict S1 σ0 in dB (B, 2, 120, 120) from optical reflectance alone (the cycle-consistency path)."""
        inputs = self._model_input(None, opt_refl)
        y, _ = self._decode(inputs, SAR)
        standardised = self._to_image(y, self.sar_head, [inputs[self.enc_key[OPTICAL]]])
        return standardised * getattr(self, f"std_{SAR}") + getattr(self, f"mean_{SAR}")

    @torch.no_grad()
    def cross_attention_maps(self, s1_db: torch.Tensor, opt_refl: torch.Tensor) -> torch.Tensor:
        """Attention mass on the S1 tokens per output patch, last decoder layer, mean over heads: (B, Hp, Wp).

        1 means a patch's query looked only at the SAR, 0 only at the optical input (the rest of the mass). The
        patch grid covers the padded ``img_size`` square. TerraMind computes cross-attention with fused SDPA, so the
        weights are recomputed here from the (LoRA-adapted) ``q``/``kv`` of the layer's actual inputs.
        """
        attn = self.encdec.decoder[-1].cross_attn
        seen: dict[str, Any] = {}
        handle = attn.register_forward_pre_hook(lambda _mod, args: seen.update(args=args))
        try:
            _, mod_mask = self._decode(self._model_input(s1_db, opt_refl), OPTICAL)
        finally:
            handle.remove()
        x, context, mask = seen["args"]
        weights = _attention_weights(attn, x, context, mask)  # (B, heads, N, M)
        on_sar = (mod_mask == self.modality_id[SAR]).to(weights.dtype)[:, None, None, :]
        mass = (weights * on_sar).sum(-1).mean(1)  # (B, N)
        grid = self.img_size // self.patch[0]
        return mass.reshape(-1, grid, grid)


def _column(values: list[float], channels: int) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    if t.numel() != channels:
        raise GacError(f"TerraMind pretraining statistics have {t.numel()} channels, expected {channels}")
    return t[None, :, None, None]


def _attention_weights(attn: nn.Module, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None):
    """Softmax attention weights (B, heads, N, M) of a TerraMind (Norm)CrossAttention for inputs ``x``, ``context``."""
    (b, n, c), m, h = x.shape, context.shape[1], attn.num_heads
    q = attn.q(x).reshape(b, n, h, c // h).transpose(1, 2)
    k = attn.kv(context).reshape(b, m, 2, h, c // h)[:, :, 0].transpose(1, 2)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if mask is not None:  # TerraMind: True = do not attend; (B, M) or (B, 1|N, M)
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        logits = logits.masked_fill(mask, float("-inf"))
    return logits.softmax(-1)


def build_grounder(p: Stage3Params) -> Grounder:
    """Build the Stage 3 grounder: TerraMind ``p.variant`` encoder-decoder, LoRA on ``p.lora.target_modules``, heads.

    Everything of TerraMind except the LoRA adapters is frozen; the heads are trainable.
    """
    from peft import LoraConfig, inject_adapter_in_model

    encdec = build_encdec(p)
    config = LoraConfig(
        r=p.lora.rank, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout, target_modules=p.lora.target_modules
    )
    try:
        encdec = inject_adapter_in_model(config, encdec)
    except ValueError as e:  # peft: no module matched
        raise GacError(
            f"stage3.lora.target_modules: {p.lora.target_modules!r} matches no TerraMind module ({e})"
        ) from None
    for name, param in encdec.named_parameters():
        param.requires_grad = "lora_" in name
    return Grounder(encdec, p.img_size, sigma=p.nll_weight > 0)


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """How much of ``model`` trains: ``trainable`` and ``total`` parameter counts, their ``share``, the ``names``."""
    params = dict(model.named_parameters())
    names = [n for n, t in params.items() if t.requires_grad]
    trainable = sum(params[n].numel() for n in names)
    total = sum(t.numel() for t in params.values())
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0, "names": names}


def grounder_state(model: Grounder) -> dict[str, torch.Tensor]:
    """The grounder's full state (frozen base included: here it is random init) as plain CPU tensors.

    Safe to ``torch.save`` and to read back with ``torch.load(..., weights_only=True)``.
    """
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_grounder(p: Stage3Params, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> Grounder:
    """Rebuild the grounder ``p`` describes and load ``state`` (from :func:`grounder_state`) strictly.

    The base weights come from ``state``, so nothing is downloaded or read from ``p.ckpt_path``.
    """
    model = build_grounder(p.model_copy(update={"pretrained": False, "ckpt_path": None}))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise GacError(
            f"stage3 state does not match the grounder ({len(result.missing_keys)} missing keys, e.g. "
            f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]})"
        )
    return model.to(device)
