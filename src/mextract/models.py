"""Victim and substitute architectures (torchvision models adapted to 32x32 inputs).

Models take float images in [0, 1] (N, 3, 32, 32) and normalise inside, so the
victim API, the attacks and the evaluation all exchange plain [0, 1] images.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import vgg
from torchvision.models.resnet import BasicBlock, ResNet

# CIFAR-10 channel statistics; used for every data set (BatchNorm absorbs the rest).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class Classifier(nn.Module):
    """Normalisation followed by a backbone that returns logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class CifarResNet18(ResNet):
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool.

    ``width`` is the channel count of the first stage (64 in the standard model);
    later stages double it as usual.
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, width * 2, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, width * 4, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, width * 8, 2, stride=2)
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def vgg11_bn_cifar(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """torchvision VGG-11-BN for 32x32 inputs: the five pools leave 1x1, so the
    7x7 adaptive pool and the 4096-wide head are replaced by one linear layer.
    ``width`` scales every conv layer's channel count (0.25 = "width/4")."""
    cfg = [v if v == "M" else max(8, int(round(v * width))) for v in vgg.cfgs["A"]]
    return CifarVGG(vgg.make_layers(cfg, batch_norm=True), cfg[-2], num_classes)


class CifarVGG(nn.Module):
    """torchvision's VGG with the 32x32 head: ``features`` from ``vgg.make_layers``,
    then flatten and one linear layer. Built directly rather than by replacing the
    head of ``vgg.VGG``, whose constructor first allocates and initialises the
    ~120M-parameter ImageNet head (2.7 s per model here). Convolutions and batch norms
    are initialised as torchvision's VGG does; the linear layer keeps PyTorch's
    default."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


ARCHITECTURES = ("resnet18", "vgg11")


def build_model(arch: str, num_classes: int, width: float | None = None) -> Classifier:
    """Build a model by config name: ``resnet18`` (width = first-stage channels, default
    64) or ``vgg11`` (VGG-11-BN, width = channel multiplier, default 1.0)."""
    if arch == "resnet18":
        return Classifier(CifarResNet18(num_classes, width=int(width or 64)))
    if arch == "vgg11":
        return Classifier(vgg11_bn_cifar(num_classes, width=float(width or 1.0)))
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def feature_extractor(model: Classifier) -> tuple[nn.Module, nn.Linear]:
    """Split a model into (penultimate features, last linear layer).

    Used by the active-learning strategies, whose gradient embeddings only need the
    last layer (closed form: (p - onehot(y_hat)) outer features).
    """
    net = model.net
    if isinstance(net, CifarResNet18):
        head = net.fc
        body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4,
            net.avgpool, nn.Flatten(),
        )
    elif isinstance(net, CifarVGG):
        head = net.classifier
        body = nn.Sequential(net.features, net.avgpool)
    else:
        raise TypeError(f"no feature split for {type(net).__name__}")

    class _Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body((x - self.model.mean) / self.model.std)

    return _Features(), head
