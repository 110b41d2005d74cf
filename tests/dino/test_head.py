import torch
from torch.nn import functional as F

from dino.head import DINOHead


def test_output_shape_and_frozen_unit_magnitude():
    head = DINOHead(48, out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=True)
    out = head(torch.randn(5, 48))
    assert out.shape == (5, 64)
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (64, 1)
    assert not g.requires_grad
    assert torch.equal(g, torch.ones_like(g))
    # With g = 1 every logit is a cosine similarity. float32: two 16-term norms (<= 16 * 2**-24 / 2 each, after
    # the sqrt), a 16-term dot product (<= 16 * 2**-24) and the divisions: a cosine near 1 can exceed it by
    # <= ~35 * 2**-24 = 2.1e-6; 1e-5. (Without the normalisation the logits would not be bounded by 1 at all.)
    assert out.abs().max() <= 1 + 1e-5


def test_magnitude_trainable_without_norm_last_layer():
    head = DINOHead(48, out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    assert head.last_layer.parametrizations.weight.original0.requires_grad


def test_forward_equals_manual_mlp_normalise_weightnorm():
    head = DINOHead(48, out_dim=64, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 32), (32, 32), (32, 16)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)

    x = torch.randn(4, 48)
    h = F.gelu(x @ linears[0].weight.T + linears[0].bias)
    h = F.gelu(h @ linears[1].weight.T + linears[1].bias)
    z = h @ linears[2].weight.T + linears[2].bias
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.parametrizations.weight.original1  # (K, bottleneck)
    w = v / v.norm(dim=1, keepdim=True)
    # float32, the same maths through other kernels (addmm vs mm + add, F.normalize, the weight-norm
    # parametrisation): three matmuls summing 48, 32 and 32 terms, then a 16-term cosine, each <= n * 2**-24
    # relative to its inputs' scale: <= (48 + 32 + 32 + 16 + 24) * 2**-24 ~ 9e-6 on logits <= 1; atol 1e-5.
    torch.testing.assert_close(head(x), z @ w.T, rtol=1e-5, atol=1e-5)


def test_single_layer_head_and_state_dict_names():
    head = DINOHead(48, out_dim=10, bottleneck_dim=8, nlayers=1)
    assert len(head.mlp) == 1 and head.mlp[0].out_features == 8
    assert set(head.state_dict()) == {
        "mlp.0.weight",
        "mlp.0.bias",
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    }
