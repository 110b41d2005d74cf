"""DINO projection head.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (arXiv 2104.14294),
Sec. 3.1: a 3-layer MLP (hidden 2048, GELU, no batch norm) down to a 256-d bottleneck, an L2
normalisation, then a weight-normalised linear layer to ``K`` (65536) prototype logits. As in the
reference code, the weight-norm magnitude ``g`` can be fixed to 1 ("norm last layer"), which
stabilises training.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer to ``out_dim`` logits.

    Args:
        in_dim: Backbone feature size ``D``.
        out_dim: Number of prototypes ``K`` (65536 in the paper).
        hidden_dim: Width of the hidden MLP layers.
        bottleneck_dim: Size of the normalised bottleneck.
        nlayers: Number of Linear layers in the MLP (>= 1).
        norm_last_layer: If True, the weight-norm magnitude ``g`` stays fixed at 1 (not trained).

    Attributes:
        mlp: The MLP ``D -> hidden -> ... -> bottleneck``.
        last_layer: ``Linear(bottleneck, K, bias=False)`` with a ``weight_norm`` parametrization;
            its parameters are ``last_layer.parametrizations.weight.original0`` (``g``,
            ``[K, 1]``) and ``.original1`` (``v``, ``[K, bottleneck]``). The name ``last_layer``
            is matched by the freeze logic in :mod:`dino.optim`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)

        # The last layer keeps PyTorch's default Linear init for v (as in the reference code); only
        # the magnitude g is reset to 1 so every prototype starts as a unit vector.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # (K, 1)
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map backbone features to prototype logits.

        Args:
            x: ``[B, D]`` backbone features.

        Returns:
            ``[B, K]`` logits (cosine similarities times ``g``, so in ``[-1, 1]`` when ``g = 1``).
        """
        z = self.mlp(x)  # (B, bottleneck)
        z = F.normalize(z, dim=-1)  # (B, bottleneck), unit L2 norm
        return self.last_layer(z)  # (B, K)
