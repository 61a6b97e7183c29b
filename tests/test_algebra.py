"""Each algebra identity against the layers it replaces (pure tensors, no fx)."""
import math

import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from reparam import algebra
from reparam.algebra import Affine, ConvSpec, Pool

F64 = torch.float64


def run(spec: ConvSpec, x):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spec.nd]
    return conv(x, spec.weight, spec.bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def rand_conv(draw, cin, cout, nd=2, groups=1, kernel=None, stride=None, padding=None, dilation=None, bias=None):
    k = kernel or tuple(draw(st.sampled_from([1, 3])) for _ in range(nd))
    s = stride or (draw(st.sampled_from([1, 2])),) * nd
    d = dilation or (1,) * nd
    p = padding if padding is not None else tuple(draw(st.integers(0, (kk - 1) // 2 * dd + 1)) for kk, dd in zip(k, d))
    b = draw(st.booleans()) if bias is None else bias
    w = torch.randn(cout, cin // groups, *k, dtype=F64)
    return algebra.conv_spec(w, torch.randn(cout, dtype=F64) if b else None, s, p, d, groups)


def close(a, b):
    return (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


@given(st.data())
def test_compose_then_1x1_equals_two_convs(data):
    g = data.draw(st.sampled_from([1, 2]))
    a = rand_conv(data.draw, 4, 6, groups=g)
    b = rand_conv(data.draw, 6, 5, kernel=(1, 1), padding=(0, 0))
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    assert close(run(algebra.compose(a, b), x), run(b, run(a, x)))


@given(st.data())
def test_compose_1x1_then_kxk(data):
    a = rand_conv(data.draw, 4, 6, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
    b = rand_conv(data.draw, 6, 5, stride=(1, 1))
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    fused = algebra.compose(a, b)
    if a.has_bias() and any(b.padding):
        assert isinstance(fused, str) and "bias" in fused  # the border trap: refused
    else:
        assert close(run(fused, x), run(b, run(a, x)))


def test_padded_1x1_then_unpadded_kxk_is_exact():
    """DBB's transform III: the 1×1's border is its bias, which the fused padded conv reproduces."""
    a = algebra.conv_spec(torch.randn(6, 4, 1, 1, dtype=F64), torch.randn(6, dtype=F64), 1, 1)
    b = algebra.conv_spec(torch.randn(5, 6, 3, 3, dtype=F64), None, 1, 0)
    x = torch.randn(1, 4, 6, 6, dtype=F64)
    assert close(run(algebra.compose(a, b), x), run(b, run(a, x)))


@given(st.data())
def test_add_aligns_kernels_by_centre(data):
    kernels = data.draw(st.lists(st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (1, 5)]), min_size=2, max_size=4))
    groups = data.draw(st.lists(st.sampled_from([1, 2, 4]), min_size=len(kernels), max_size=len(kernels)))
    stride = (data.draw(st.sampled_from([1, 2])),) * 2
    specs = [rand_conv(data.draw, 4, 8, kernel=k, groups=g, stride=stride,
                       padding=tuple((kk - 1) // 2 for kk in k)) for k, g in zip(kernels, groups)]
    x = torch.randn(2, 4, 9, 10, dtype=F64)
    assert close(run(algebra.add(specs), x), sum(run(s, x) for s in specs))


def test_add_merges_dilations_and_identity():
    x = torch.randn(1, 4, 11, 11, dtype=F64)
    specs = [algebra.conv_spec(torch.randn(4, 4, 3, 3, dtype=F64), None, 1, 2, 2),
             algebra.conv_spec(torch.randn(4, 4, 5, 5, dtype=F64), torch.randn(4, dtype=F64), 1, 2, 1),
             algebra.identity(4, 2)]
    assert close(run(algebra.add(specs), x), sum(run(s, x) for s in specs))


def test_add_refuses_misaligned_centres():
    a = algebra.conv_spec(torch.randn(4, 4, 3, 3, dtype=F64), None, 1, 1)
    b = algebra.conv_spec(torch.randn(4, 4, 3, 3, dtype=F64), None, 1, 0)
    assert "not aligned" in algebra.add([a, b])


def test_concat_stacks_channels():
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    a = algebra.conv_spec(torch.randn(3, 4, 3, 3, dtype=F64), torch.randn(3, dtype=F64), 1, 1)
    b = algebra.conv_spec(torch.randn(2, 4, 1, 1, dtype=F64), None, 1, 0)
    assert close(run(algebra.concat([a, b]), x), torch.cat([run(a, x), run(b, x)], 1))


def test_bn_affine_matches_batch_norm():
    mean, var, w, b = torch.randn(5, dtype=F64), torch.rand(5, dtype=F64) + 0.1, torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    scale, shift = algebra.bn_affine(mean, var, w, b, 1e-3)
    x = torch.randn(3, 5, 4, 4, dtype=F64)
    ref = F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-3)
    assert close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), ref)
    assert close(run(algebra.as_conv(Affine(scale, shift), 5, 2), x), ref)


def test_pool_as_depthwise_conv():
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    pool = Pool((3, 3), (2, 2), (1, 1), 9.0)
    ref = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True)
    assert close(run(algebra.as_conv(pool, 3, 2), x), ref)


def test_regroup_undoes_dense():
    spec = algebra.conv_spec(torch.randn(8, 2, 3, 3, dtype=F64), None, 1, 1, 1, groups=4)
    assert torch.equal(algebra.regroup(algebra.dense(spec), 4), spec.weight)


@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]), st.booleans())
def test_groups_of_a_composition_are_the_gcd_and_exact(ga, gb, pointwise_second):
    """Merged groups come from the structure (gcd), not from the values: the same for a model
    and its meta-device copy; exact (a wrong gcd would drop blocks that hold weights)."""
    a = algebra.conv_spec(torch.randn(8, 8 // ga, 3 if pointwise_second else 1, 3 if pointwise_second else 1,
                                      dtype=F64), None, 1, 1 if pointwise_second else 0, 1, ga)
    b = algebra.conv_spec(torch.randn(8, 8 // gb, 1 if pointwise_second else 3, 1 if pointwise_second else 3,
                                      dtype=F64), None, 1, 0, 1, gb)
    merged = algebra.compose(a, b)
    assert merged.groups == math.gcd(ga, gb)
    x = torch.randn(2, 8, 7, 9, dtype=F64)
    assert close(run(merged, x), run(b, run(a, x)))


def test_compose_refuses_two_kxk():
    a = algebra.conv_spec(torch.randn(4, 4, 3, 3, dtype=F64), None, 1, 1)
    assert "compose exactly" in algebra.compose(a, a)
