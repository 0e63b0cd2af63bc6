"""Classification heads. Each takes the backbone's last feature map (N x C x h x w) and returns logits (N x classes)."""

from __future__ import annotations

import torch
from torch import nn

from pneumolab.errors import did_you_mean

__all__ = ["HEADS", "AttentionHead", "LinearHead", "PlanHead", "build_head"]


def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class LinearHead(nn.Module):
    """Global average pooling, dropout and one linear layer: the standard transfer-learning head."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(_global_avg_pool(x)))


class PlanHead(nn.Module):
    """The research plan's head: Dropout 0.4, Linear C->512, ReLU, Dropout 0.3, Linear 512->classes.

    The dropout rates are the plan's; `drop_rate` is accepted for a uniform signature and ignored.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0, hidden: int = 512) -> None:
        super().__init__()
        del drop_rate
        self.drop1 = nn.Dropout(0.4)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.drop2 = nn.Dropout(0.3)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.drop1(_global_avg_pool(x))))
        return self.fc(self.drop2(x))


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP over the average- and max-pooled channel descriptors."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        peak = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7 x 7 convolution over the channel-wise average and max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps))


class AttentionHead(nn.Module):
    """A CBAM block (channel then spatial attention, Woo et al. 2018) on the feature map, then a linear head.

    The research plan's "explore attention mechanisms": the head learns which channels and which image regions
    of the pretrained features matter for pneumonia, at the cost of a few hundred thousand parameters.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0, reduction: int = 16) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(in_features, reduction)
        self.spatial_attention = SpatialAttention()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial_attention(self.channel_attention(x))
        return self.fc(self.drop(_global_avg_pool(x)))


HEADS: dict[str, type[nn.Module]] = {"linear": LinearHead, "plan": PlanHead, "attention": AttentionHead}
"""Head names accepted by `create_model(head=...)`."""


def build_head(name: str, in_features: int, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
    """Build the head called `name` for `in_features` channels and `num_classes` outputs.

    Raises:
        UnknownNameError: `name` is not in `HEADS`.
    """
    try:
        cls = HEADS[name]
    except KeyError:
        raise did_you_mean("head", name, HEADS) from None
    return cls(in_features, num_classes, drop_rate)
