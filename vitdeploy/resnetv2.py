"""ResNet-v2 backbone of the hybrid ViT (paper §3.1): BiT-style, GroupNorm + weight standardisation.

Parameter names follow timm's ``ResNetV2(preact=False, stem_type='same')`` so that timm and
JAX hybrid checkpoints map one to one. TF "SAME" padding is static here because inputs are
multiples of the total stride, which makes every stride-2 input even.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.config import HybridConfig


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation and TF "SAME" padding for even-sized inputs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 eps: float = 1e-8) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps
        self.same_pad = same_padding(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.same_pad):
            x = F.pad(x, self.same_pad)
        weight = self.weight
        flat = weight.reshape(weight.shape[0], -1).float()
        mean = flat.mean(dim=1, keepdim=True)
        var = flat.var(dim=1, unbiased=False, keepdim=True)
        weight = ((flat - mean) / torch.sqrt(var + self.eps)).reshape_as(weight).to(weight.dtype)
        return F.conv2d(x, weight, self.bias, self.stride, 0)


def same_padding(kernel_size: int, stride: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) TF "SAME" padding for an input whose size is a multiple of ``stride``."""
    total = max(kernel_size - stride, 0)
    before = total // 2
    return before, total - before, before, total - before


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by an optional ReLU."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, act: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Stem(nn.Module):
    """7x7/2 weight-standardised conv, GroupNorm+ReLU, 3x3/2 max-pool with "SAME" padding."""

    def __init__(self, in_channels: int, width: int, groups: int, eps: float) -> None:
        super().__init__()
        self.conv = StdConv2d(in_channels, width, 7, stride=2, eps=eps)
        self.norm = GroupNormAct(width, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        # "SAME" max-pool pads with -inf; F.max_pool2d's own padding is symmetric, so pad first.
        x = F.pad(x, same_padding(3, 2), value=float("-inf"))
        return F.max_pool2d(x, kernel_size=3, stride=2)


class Downsample(nn.Module):
    """1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, eps: float) -> None:
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 1, stride=stride, eps=eps)
        self.norm = GroupNormAct(out_channels, groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck: 1x1 → 3x3 (strided) → 1x1, residual, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, eps: float) -> None:
        super().__init__()
        mid = out_channels // 4
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = (
            Downsample(in_channels, out_channels, stride, groups, eps) if needs_projection else None
        )
        self.conv1 = StdConv2d(in_channels, mid, 1, eps=eps)
        self.norm1 = GroupNormAct(mid, groups)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride, eps=eps)
        self.norm2 = GroupNormAct(mid, groups)
        self.conv3 = StdConv2d(mid, out_channels, 1, eps=eps)
        self.norm3 = GroupNormAct(out_channels, groups, act=False)
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int, groups: int,
                 eps: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1,
                       groups, eps)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """Stem plus bottleneck stages; outputs the feature map the hybrid ViT tokenises."""

    def __init__(self, config: HybridConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        width = config.stem_width * config.width_factor
        self.stem = Stem(in_channels, width, config.groups, config.std_conv_eps)
        stages = []
        prev = width
        for index, depth in enumerate(config.layers):
            out = 256 * config.width_factor * 2**index
            stages.append(Stage(prev, out, depth, 1 if index == 0 else 2, config.groups, config.std_conv_eps))
            prev = out
        self.stages = nn.Sequential(*stages)
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
