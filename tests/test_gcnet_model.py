"""GCNet: shapes, traceability, the compiler's deploy form against the release's formulas,
and the deploy-form counts against Table 3."""
import copy

import pytest
import torch
from torch import nn

import reparam
from gcnet import GCBlock, gcnet_l, gcnet_m, gcnet_s
from gcnet._release import gcblock_kernel_bias, release_timed_form
from gcnet.info import EXPECTED_DEPLOY, PAPER, count_on_meta

FACTORIES = {"s": gcnet_s, "m": gcnet_m, "l": gcnet_l}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines, so that folding them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) * 0.5 + 0.75
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) * 0.5 + 0.75
    return model


def test_training_mode_returns_main_and_aux_logits_at_one_eighth():
    model = gcnet_s(num_classes=7, channels=8).train()
    main, aux = model(torch.randn(2, 3, 64, 128))
    assert main.shape == aux.shape == (2, 7, 8, 16)


def test_eval_mode_upsamples_to_the_input_or_keeps_one_eighth():
    x = torch.randn(1, 3, 64, 128)
    assert gcnet_s(channels=8).eval()(x).shape == (1, 19, 64, 128)
    assert gcnet_s(channels=8, upsample_logits=False).eval()(x).shape == (1, 19, 8, 16)


def test_factories_work_without_arguments_and_reject_unknown_options():
    model = gcnet_s()
    assert model.config.channels == 32 and model.config.n_paths == 2 and model.config.num_classes == 19
    with pytest.raises(TypeError, match="unknown GCNet option"):
        gcnet_s(chanels=8)


def test_whole_model_traces_as_one_fx_graph():
    model = gcnet_s(channels=8).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 64, 128)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("cin, cout, stride", [(8, 8, 1), (8, 16, 2), (8, 16, 1), (16, 16, 2)])
def test_gcblock_structure(cin, cout, stride):
    block = GCBlock(cin, cout, stride, n_paths=3, act=False)
    assert len(block.paths_3x3) == 3
    assert (block.residual is not None) == (cin == cout and stride == 1)
    assert block.path_1x1.conv1.conv.stride == (stride, stride)  # the stride sits on the FIRST 1x1
    assert block.path_1x1.conv2.conv.stride == (1, 1)
    assert isinstance(block.act, nn.Identity)
    assert block(torch.randn(1, cin, 16, 16)).shape == (1, cout, 16 // stride, 16 // stride)


@pytest.mark.parametrize("n_paths", [1, 2, 3, 4])
@pytest.mark.parametrize("cin, cout, stride, act", [(8, 8, 1, True), (8, 16, 2, True), (16, 16, 1, False),
                                                    (8, 12, 1, True)])
def test_compiler_matches_the_release_formulas_on_one_gcblock(cin, cout, stride, act, n_paths):
    block = randomize_bn(GCBlock(cin, cout, stride, n_paths, act), seed=n_paths).eval()
    x = torch.randn(2, cin, 15, 17)
    fused, report = reparam.fuse_with_report(block, (x,))
    assert (report.after.convs, report.after.bns) == (1, 0), str(report)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].stride == (stride, stride)
    kernel, bias = gcblock_kernel_bias(block)  # the oracle: the paper's formulas, written out
    assert reparam.testing.rel_error((kernel, bias), (convs[0].weight, convs[0].bias)) <= 1e-5
    assert reparam.testing.model_rel_error(block, fused, x) <= 1e-5


@pytest.fixture(scope="module", params=["s", "m", "l"])
def variant(request):
    """(name, eval model with random BN statistics, reparam.fuse of it), built once per variant."""
    model = randomize_bn(FACTORIES[request.param](), seed=1).eval()
    return request.param, model, reparam.fuse(model)


def test_fused_model_gives_the_same_logits(variant):
    _, model, fused = variant
    reparam.testing.assert_equivalent(model, fused, torch.randn(1, 3, 64, 128), rtol=1e-5)


def test_fused_model_has_one_conv_per_gcblock_and_only_unfoldable_bns(variant):
    _, model, fused = variant
    blocks = sum(isinstance(m, GCBlock) for m in model.modules())
    after = reparam.count(fused, (torch.randn(1, 3, 64, 128),))
    # + 2 stem + 5 fusion convs + 11 DAPPM convs + 1 head 3×3 + 1 classifier
    assert after.convs == blocks + 20
    # left: DAPPM's 11 BN-ReLU-conv BNs on shared tensors (the head's BN folds into 3 convs)
    assert after.bns == 11


def test_deploy_counts_match_table_3(variant):
    name, model, fused = variant
    deploy = count_on_meta(fused, (1024, 2048))
    training = count_on_meta(model, (1024, 2048))
    (params, gmacs), (paper_params, paper_gmacs) = EXPECTED_DEPLOY[name], PAPER[name]
    assert deploy.params == pytest.approx(params, rel=1e-3)
    assert deploy.macs / 1e9 == pytest.approx(gmacs, rel=1e-3)
    assert deploy.params == pytest.approx(paper_params, rel=0.03)
    assert deploy.macs / 1e9 == pytest.approx(paper_gmacs, rel=0.03)
    assert training.params > 2 * deploy.params and training.macs > 2 * deploy.macs
    # the release's timed form (its own conversion + order-based conv-BN fuser) counts the same, but
    # for the head's BN, which reparam folds into three convs (fold_into_sum), and the 4 BNs before
    # DAPPM's P → P process convs, which the release folds into P-wide biases (2P parameters → P each)
    release = count_on_meta(release_timed_form(model), (1024, 2048))
    head_bn, ppm = 2 * model.head.bn.num_features, model.config.ppm_channels
    assert (release.params - head_bn + 4 * ppm, release.macs) == (deploy.params, deploy.macs)


@pytest.mark.parametrize("factory", [gcnet_s, gcnet_m, gcnet_l])
@pytest.mark.parametrize("n_paths", [1, 3, 4])
def test_fused_equals_training_form_for_any_n_paths(factory, n_paths):
    # n_paths=2 is covered at full width above; the narrow width keeps the depth and structure
    model = randomize_bn(factory(n_paths=n_paths, channels=8, ppm_channels=16, head_channels=16),
                         seed=n_paths).eval()
    x = torch.randn(1, 3, 64, 128)
    fused = reparam.fuse(model)
    reparam.testing.assert_equivalent(model, fused, x, rtol=1e-5)
    assert reparam.count(fused, (x,)).convs == sum(isinstance(m, GCBlock) for m in model.modules()) + 20


def test_fuse_leaves_the_model_unchanged():
    model = gcnet_s(channels=8).train()
    before = copy.deepcopy(model.state_dict())
    reparam.fuse(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
