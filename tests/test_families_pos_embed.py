"""Each family source's own position-embedding resampling, reproduced by one RESAMPLE_METHODS convention.

The references are the sources' real functions, not re-typed formulas: transformers' own
``interpolate_pos_encoding`` of ``Dinov2Embeddings``, ``Dinov2WithRegistersEmbeddings``,
``CLIPVisionEmbeddings`` and ``SiglipVisionEmbeddings`` (transformers 5.x), and timm's
``resample_abs_pos_embed`` (its ``dynamic_img_size`` path for every family). The original
DINOv2 code (facebookresearch/dinov2, not installable here) is ``test_pos_embed.dinov2_original``.
Each source matches exactly one convention within 1e-5, and every other convention misses it.
"""

from __future__ import annotations

import pytest
import torch
from test_pos_embed import dinov2_original, smooth_grid
from timm_without_torchvision import TIMM_MISSING, import_timm

from vitdeploy.pos_embed import RESAMPLE_METHODS, resample_pos_embed

transformers = pytest.importorskip("transformers")
timm = import_timm()

OLD = 6  # the stored grid (6x6)
DIM = 16
NEW_GRIDS = [(6, 6), (4, 4), (9, 9), (5, 8), (10, 3)]  # native, down, up, two non-square
PATCH = 14


def stored(prefix: int) -> torch.Tensor:
    """``[1, prefix + 36, 16]``: fixed prefix embeddings, then a smooth grid with some noise."""
    grid = smooth_grid(OLD, OLD, DIM) + 0.1 * torch.randn(OLD, OLD, DIM, generator=torch.Generator().manual_seed(0))
    cls = torch.randn(1, prefix, DIM, generator=torch.Generator().manual_seed(1))
    return torch.cat([cls, grid.reshape(1, -1, DIM)], dim=1)


def hf_dinov2(with_registers: bool):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
        Dinov2WithRegistersEmbeddings,
    )

    kind, config_cls = ((Dinov2WithRegistersEmbeddings, Dinov2WithRegistersConfig) if with_registers
                        else (Dinov2Embeddings, Dinov2Config))
    module = kind(config_cls(hidden_size=DIM, patch_size=PATCH, image_size=OLD * PATCH)).eval()
    pos = stored(1)
    module.position_embeddings.data.copy_(pos)

    def resample(new: tuple[int, int]) -> torch.Tensor:
        embeddings = torch.zeros(1, 1 + new[0] * new[1], DIM)
        return module.interpolate_pos_encoding(embeddings, new[0] * PATCH, new[1] * PATCH)

    return pos, 1, resample


def hf_clip_or_siglip(siglip: bool):
    if siglip:
        from transformers import SiglipVisionConfig as Config
        from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as Embeddings
    else:
        from transformers import CLIPVisionConfig as Config
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as Embeddings
    module = Embeddings(Config(hidden_size=DIM, num_attention_heads=2, patch_size=PATCH, image_size=OLD * PATCH)).eval()
    prefix = 0 if siglip else 1
    pos = stored(prefix)
    module.position_embedding.weight.data.copy_(pos[0])

    def resample(new: tuple[int, int]) -> torch.Tensor:
        embeddings = torch.zeros(1, prefix + new[0] * new[1], DIM)
        return module.interpolate_pos_encoding(embeddings, new[0] * PATCH, new[1] * PATCH)

    return pos, prefix, resample


def timm_dynamic(no_embed_class: bool):
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if no_embed_class else 1
    pos = stored(prefix)

    def resample(new: tuple[int, int]) -> torch.Tensor:
        return resample_abs_pos_embed(pos, new_size=list(new), old_size=[OLD, OLD], num_prefix_tokens=prefix)

    return pos, prefix, resample


def dinov2_original_code():
    pos = stored(1)

    def resample(new: tuple[int, int]) -> torch.Tensor:
        grid = dinov2_original(pos[0, 1:].reshape(OLD, OLD, DIM), new)
        return torch.cat([pos[:, :1], grid.reshape(1, -1, DIM)], dim=1)

    return pos, 1, resample


SOURCES = {
    "transformers Dinov2": (lambda: hf_dinov2(False), "huggingface"),
    "transformers Dinov2WithRegisters": (lambda: hf_dinov2(True), "timm"),
    "transformers CLIP": (lambda: hf_clip_or_siglip(False), "huggingface"),
    "transformers SigLIP": (lambda: hf_clip_or_siglip(True), "huggingface"),
    "timm (class token embedded)": (lambda: timm_dynamic(False), "timm"),
    "timm no_embed_class (DeiT III, DINOv2 reg4)": (lambda: timm_dynamic(True), "timm"),
    "DINOv2 original": (dinov2_original_code, "dinov2"),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_each_source_is_one_convention_and_no_other(source):
    if "timm" in source and timm is None:
        pytest.skip(TIMM_MISSING)
    make, method = SOURCES[source]
    pos, prefix, reference = make()
    with torch.no_grad():
        for new in NEW_GRIDS:
            expected = reference(new)
            errors = {m: float((resample_pos_embed(pos, new, (OLD, OLD), prefix, method=m) - expected).abs().max())
                      for m in RESAMPLE_METHODS}
            assert errors[method] <= 1e-5, (source, new, errors)
            if new != (OLD, OLD):  # every convention is the identity at the stored grid
                assert min(e for m, e in errors.items() if m != method) > 1e-3, (source, new, errors)
