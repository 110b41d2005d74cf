"""Multi-crop forward pass.

Caron et al. 2021 (arXiv 2104.14294), Sec. 3.1: the student sees every crop (2 global + N local),
the teacher only the global ones. Crops of one resolution are batched into a single backbone call
(one call per resolution), and all ``[CLS]`` features go through the head in a single call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MultiCropWrapper(nn.Module):
    """Backbone + head applied to a list of multi-resolution crop batches.

    Args:
        backbone: Maps ``[n, 3, H, W]`` to ``[n, D]`` for any supported ``H, W``.
        head: Maps ``[n, D]`` to ``[n, K]``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        """Run all crops through backbone and head.

        Args:
            crops: Tensors of shape ``[k_i * B, 3, H_i, W_i]``, each holding one or more crops of
                one resolution in crop-major order (crop 0 of the whole batch, then crop 1, ...).

        Returns:
            ``[sum_i k_i * B, K]`` logits in the input order (crop-major).
        """
        if isinstance(crops, Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("MultiCropWrapper needs at least one crop tensor")

        # Group runs of consecutive tensors that share a spatial size: one backbone call per run.
        features: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            run = crops[start:end]
            x = run[0] if len(run) == 1 else torch.cat(list(run), dim=0)  # (n, 3, H, W)
            features.append(self.backbone(x))  # (n, D)
            start = end

        feats = features[0] if len(features) == 1 else torch.cat(features, dim=0)  # (N_total, D)
        return self.head(feats)  # (N_total, K)
