"""Backbones and heads.

`resnet` builds torchvision's ResNet with a width knob and an optional CIFAR stem. Parameter
names are torchvision's own, so an exported backbone loads into `torchvision.models.resnet18`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BLOCKS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


class WidthResNet(ResNet):
    """torchvision ResNet whose stage widths are `width * (1, 2, 4, 8)` (64 is the standard).

    cifar_stem: 3x3 stride-1 first conv (instead of 7x7 stride 2), for 32x32-96x96 images.
    maxpool: keep the stem's max-pool; None: as torchvision's stem goes (kept with the 7x7 conv,
    dropped with the CIFAR one), which is what checkpoints written before the knob hold. The lab
    keeps it on TinyImageNet and STL-10 behind the 3x3 conv (conf/dataset/*: stem_maxpool).
    The classifier `fc` is an Identity: `forward` returns pooled features (B x out_dim).
    """

    def __init__(self, arch: str = "resnet18", width: int = 64, cifar_stem: bool = True, maxpool: bool | None = None):
        if arch not in BLOCKS:
            raise ValueError(f"backbone.arch={arch!r} is unknown; choose one of {sorted(BLOCKS)}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"backbone.width must be a positive integer, got {width!r}")
        block, layers = BLOCKS[arch]
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = width
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        keep_pool = not cifar_stem if maxpool is None else maxpool
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if keep_pool else nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.out_dim = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


LAST_BN = ("none", "plain", "affine")


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: str = "plain", bn: bool = True) -> nn.Sequential:
    """Linear(-BN)-ReLU blocks, then a last Linear followed by nothing (last_bn="none"), by a BN without
    affine ("plain": MoCo v3, SNCLR) or by a BN with a learnable scale and shift ("affine": NNCLR).

    bn=False: no BN in the hidden blocks, every hidden Linear with a bias (MoCo v2's head: 2 layers,
    2048 hidden, last_bn="none").
    """
    if last_bn not in LAST_BN:
        raise ValueError(f"model.proj_last_bn / model.pred_last_bn must be one of {LAST_BN}, got {last_bn!r}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        norm = [nn.BatchNorm1d(hidden_dim)] if bn else []
        layers += [nn.Linear(dim, hidden_dim, bias=not bn), *norm, nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=last_bn == "none"))
    if last_bn != "none":
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn == "affine"))
    return nn.Sequential(*layers)
