"""The CIFAR ResNet of the paper's §2 experiment (kuangliu/pytorch-cifar layout), as a flat list of residual blocks.

ResNet-34 is ``widths=(64, 128, 256, 512)``, ``blocks=(3, 4, 6, 3)``: a 3x3 stem (conv, BatchNorm, ReLU), then
sixteen :class:`BasicBlock` s whose first block of each stage after the first halves the resolution, then global
average pooling (the paper's ``AvgPool(4)`` on the 4x4 map) and a linear classifier. :func:`residual_blocks`
returns the blocks as one list so a model can be cut after any block.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from typing_extensions import override

__all__ = ["BasicBlock", "classifier", "residual_blocks", "stem"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a skip connection (a 1x1 conv + BatchNorm where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def stem(width: int) -> nn.Sequential:
    """The 3x3 input convolution (3 -> ``width`` channels, no bias), BatchNorm and ReLU."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())


def residual_blocks(widths: Sequence[int], blocks: Sequence[int]) -> list[BasicBlock]:
    """The residual blocks of all stages, in order; stage ``s`` has ``blocks[s]`` blocks of ``widths[s]`` channels.

    The first block of every stage but the first has stride 2. ResNet-34: ``(64, 128, 256, 512)``, ``(3, 4, 6, 3)``.
    """
    if len(widths) != len(blocks) or not widths:
        raise ValueError(f"residual_blocks: need one block count per width, got {list(widths)} and {list(blocks)}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (*widths, *blocks)):
        raise ValueError(f"residual_blocks: widths and blocks must be positive ints, got {widths!r}, {blocks!r}")
    layers = []
    in_channels = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for i in range(count):
            layers.append(BasicBlock(in_channels, width, stride=2 if stage > 0 and i == 0 else 1))
            in_channels = width
    return layers


def classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """Global average pooling, flatten and a linear layer to ``num_classes`` logits."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))
