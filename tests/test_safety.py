"""The engine trusts no rule: a wrong rewrite is refused by the self-check, and with example
inputs never reaches the returned model; a rule that raises is one refusal; every result passes
the post-condition (issue 14); `fuse` never writes the caller's tensors."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import check, engine, ops, rules
from reparam.rules.sequential import merge_sequential
from reparam.testing import assert_equivalent

from strategies import randomize


def conv_bn_relu(c=4):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))


def altered_merge(name: str, weight, bias=lambda b: b):
    """merge_sequential with its new conv's weight and bias passed through `weight` and `bias`:
    what a buggy rule returns."""
    def rule(node, g):
        rw = merge_sequential(node, g)
        if isinstance(rw, ops.Rewrite):
            new = rw.terms[0][0]
            bad = replace(new.spec, weight=weight(new.spec.weight),
                          bias=None if new.spec.bias is None else bias(new.spec.bias))
            return replace(rw, rule=name, terms=[(replace(new, spec=bad), 1.0)])
        return rw
    rule.__name__ = name
    return rule


broken_rule = altered_merge("broken_rule", lambda w: w * 1.01, lambda b: b * 1.01)  # 1% too large
# one input channel too many: the model it makes raises
raising_result_rule = altered_merge("raising_result_rule", lambda w: torch.cat([w, w[:, :1]], 1))


def raising_rule(node, g):
    if node.op == "call_module" and isinstance(g.module(node), nn.BatchNorm2d):
        raise KeyError("a rule's bug")
    return None


@pytest.fixture
def with_rule(monkeypatch):
    def use(rule):
        monkeypatch.setattr(rules, "RULES", [rule, *rules.RULES])
    return use


@pytest.mark.parametrize("with_inputs", [False, True])
def test_a_wrong_rule_is_caught_by_the_self_check(with_rule, with_inputs):
    with_rule(broken_rule)
    model, x = randomize(conv_bn_relu(), 0).eval(), torch.randn(2, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    assert_equivalent(model, fused, x)
    refused = [s for s in report.faults if s.rule == "broken_rule"]
    assert refused and all("not exact here (rel err " in s.reason for s in refused), str(report)
    assert reparam.count(fused, (x,)).bns == 0  # the real rule still merges


def test_a_wrong_rule_past_the_self_check_never_reaches_the_result_given_inputs(with_rule, monkeypatch):
    """The self-check switched off: the whole-model check finds the rewrites by bisection."""
    with_rule(broken_rule)
    monkeypatch.setattr(check, "verify", lambda g, rw, tolerance=0: check.Verdict(0.0))
    model, x = randomize(conv_bn_relu(), 0).eval(), torch.randn(2, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert report.max_rel_error <= 1e-5
    assert not [r for r in report.rewrites if r.rule == "broken_rule"]
    assert [n for n in report.notes if n.startswith("undone: broken_rule")], report.notes
    without, _ = reparam.fuse_with_report(model)  # no inputs, no whole-model check: wrong
    assert reparam.testing.model_rel_error(model, without, x) > 1e-3


def test_a_fused_model_that_raises_on_the_inputs_is_never_returned(with_rule, monkeypatch):
    """The self-check switched off: a rewrite after which the fused model raises is found by
    bisection and undone; the error never reaches the caller."""
    with_rule(raising_result_rule)
    monkeypatch.setattr(check, "verify", lambda g, rw, tolerance=0: check.Verdict(0.0))
    model, x = randomize(conv_bn_relu(), 0).eval(), torch.randn(2, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert not [r for r in report.rewrites if r.rule == "raising_result_rule"]
    undone = [n for n in report.notes if n.startswith("undone: raising_result_rule")]
    assert undone and "fails on the example inputs (RuntimeError" in undone[0], report.notes


def drop_hardtanh(node, g):
    """A test-only rule: every Hardtanh is its input (true only where its range is wide)."""
    if isinstance(g.module(node), nn.Hardtanh):
        return ops.Rewrite("drop_hardtanh", node, [(node.args[0], 1.0)], [node])
    return None


def test_layers_without_tensors_share_a_verdict_only_with_the_same_settings(with_rule):
    """Verdicts on dropping a weightless layer are reused per class and settings: a clamp to
    ±1e9 passes as the identity, the same class clamping to ±0.1 does not."""
    with_rule(drop_hardtanh)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardtanh(-1e9, 1e9), nn.Conv2d(4, 4, 1),
                                    nn.Hardtanh(-0.1, 0.1), nn.Conv2d(4, 4, 1), nn.Hardtanh(-1e9, 1e9)), 0).eval()
    x = torch.randn(2, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model)
    assert_equivalent(model, fused, x)
    assert len([r for r in report.rewrites if r.rule == "drop_hardtanh"]) == 2, str(report)
    assert [s.path for s in report.faults if s.rule == "drop_hardtanh"] == ["3"], str(report)


def test_a_rule_that_raises_is_one_refusal_and_the_rest_fuses(with_rule):
    with_rule(raising_rule)
    model, x = randomize(conv_bn_relu(), 0).eval(), torch.randn(2, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert [s for s in report.faults if s.reason == "internal error in raising_rule: KeyError: \"a rule's bug\""]
    assert reparam.count(fused, (x,)).bns == 0


class Issue14(nn.Module):
    """The fuzzer's model of issue 14: a cat of a conv-free run beside a fold into a sum."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.conv3 = nn.Conv1d(6, 6, 3, padding=1, bias=False)
        self.conv1 = nn.Conv1d(6, 6, 1)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        v = self.act(x)
        s = self.bn(self.conv3(x) + F.interpolate(self.conv1(v), size=x.shape[2:], mode="nearest"))
        return torch.cat([v, v / 3, x], 1), s


def test_issue_14_no_meta_weight_and_the_same_result_every_time():
    model = randomize(Issue14(), 0).eval().double()
    x = torch.randn(1, 6, 9, dtype=torch.float64)
    errors = set()
    for _ in range(5):
        fused, report = reparam.fuse_with_report(model, (x,), max_macs_ratio=math.inf)
        assert not [n for n, t in [*fused.named_parameters(), *fused.named_buffers()] if t.is_meta]
        with torch.no_grad():
            errors.add(tuple(reparam.testing.rel_error(a, b) for a, b in zip(model(x), fused(x))))
        assert report.max_rel_error <= 1e-12
    assert len(errors) == 1 and max(errors.pop()) <= 1e-12
    assert any(r.rule == "fold_into_sum" for r in report.rewrites)


def test_a_merged_op_made_on_the_model_device_even_where_no_op_holds_a_tensor():
    """The mechanism of issue 14: an op made while fusing got the device of a tensor that was
    itself still a placeholder. Now nothing in the graph module is a placeholder while fusing."""
    model = randomize(Issue14(), 0).eval()
    x = torch.randn(2, 6, 9)
    g = ops.Graph(reparam.trace.symbolic(model))
    assert g.device == torch.device("cpu")
    engine.run(g.gm, max_macs_ratio=math.inf)
    assert not any(t.is_meta for t in g.gm.parameters())
    assert_equivalent(model, g.gm, x)


def test_the_post_condition_refuses_to_return_a_model_with_a_meta_weight(monkeypatch):
    def on_meta(self):
        return ops.make_module(self.spec, self.dtype_device[0], torch.device("meta"), conv=self.conv)
    monkeypatch.setattr(ops.Pending, "module", on_meta)
    with pytest.raises(reparam.InternalError, match="meta device"):
        reparam.fuse(randomize(conv_bn_relu(), 0).eval())


def test_the_post_condition_refuses_a_dtype_the_model_never_had(monkeypatch):
    def as_double(self):
        return ops.make_module(self.spec, torch.float64, self.dtype_device[1], conv=self.conv)
    monkeypatch.setattr(ops.Pending, "module", as_double)
    with pytest.raises(reparam.InternalError, match="float64"):
        reparam.fuse(randomize(conv_bn_relu(), 0).eval())


class MakesAFloat64Constant(nn.Module):
    """A float32 model whose forward computes in float64 with a tensor it makes (fuzz seed 26)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        z = x.double()
        z.index_put_((torch.tensor([0]),), torch.tensor(0.5, dtype=torch.float64))
        return self.bn(self.conv(x)) + z.float().sum(1, keepdim=True)


def test_a_float64_value_the_forward_makes_is_the_models_own_dtype():
    model, x = randomize(MakesAFloat64Constant(), 0).eval(), torch.randn(2, 3, 7, 6)
    fused, report = reparam.fuse_with_report(model, (x,))  # was: InternalError "never had"
    assert reparam.count(fused, (x,)).bns == 0
    assert {p.dtype for p in fused.parameters()} == {torch.float32}
    assert_equivalent(model, fused, x)


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        x.sub_(0.5).mul_(32)
        return self.bn(self.conv(x))


def test_fuse_never_writes_the_callers_inputs_and_reports_the_true_error():
    model, x = randomize(WritesItsInput(), 0).eval(), torch.randn(2, 3, 7, 9)
    before = x.clone()
    fused, report = reparam.fuse_with_report(model, (x,))
    assert torch.equal(x, before)
    assert report.max_rel_error <= 1e-5 and reparam.count(fused, (x,)).bns == 0
    a, b = x.clone(), x.clone()
    with torch.no_grad():
        assert reparam.testing.rel_error(model(a), fused(b)) <= 1e-5
    assert torch.equal(a, b)  # the fused model writes its input as the model does


def test_the_self_check_measures_a_rewrite_on_probes():
    """A right rewrite measures float64 rounding; a kernel off by 1% measures 1%."""
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    g = ops.Graph(reparam.trace.symbolic(randomize(block, 0).eval()))
    bn = next(n for n in g.gm.graph.nodes if n.target == "1")
    assert check.verify(g, merge_sequential(bn, g)).error <= 1e-14
    assert check.verify(g, broken_rule(bn, g)).error == pytest.approx(1e-2, rel=0.1)


class ChannelsLastLinear(nn.Module):
    """permute → Linear → permute back → BatchNorm2d (a ConvNeXt-style block)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_the_self_check_probes_a_linear_at_the_rank_its_region_needs():
    """Without shapes, a Linear's probe is not only 2-D: the permutes need 4-D input."""
    from reparam.rules.views import fold_through_permute
    g = ops.Graph(reparam.trace.symbolic(randomize(ChannelsLastLinear(), 0).eval()))
    bn = next(n for n in g.gm.graph.nodes if n.target == "bn")
    rw = fold_through_permute(bn, g)
    assert check.verify(g, rw).error <= 1e-14
    new = rw.substitute[0]
    bad = replace(rw, substitute=[replace(new, spec=replace(new.spec, weight=new.spec.weight * 1.01))])
    assert check.verify(g, bad).error == pytest.approx(1e-2, rel=0.2)


def test_a_nan_the_model_does_not_compute_is_a_difference():
    """The whole-model check's measure: NaN where the model is finite (or the other way) is
    infinitely wrong, never 0 (NaN compares false); matching NaN and infinities agree."""
    x, nan, inf = torch.tensor([1.0, 2.0, 3.0]), float("nan"), float("inf")
    assert reparam.testing.rel_error(x, torch.tensor([1.0, nan, 3.0])) == math.inf
    assert reparam.testing.rel_error(torch.tensor([1.0, nan, 3.0]), x) == math.inf
    assert reparam.testing.rel_error(torch.tensor([1.0, inf]), torch.tensor([1.0, -inf])) == math.inf
    assert reparam.testing.rel_error(torch.tensor([nan, inf, 2.0]), torch.tensor([nan, inf, 2.0])) == 0.0


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.rand_like(x[:, :1])


def test_a_model_whose_outputs_change_from_call_to_call_is_fused_and_says_so():
    model, x = randomize(Noisy(), 0).eval(), torch.randn(2, 3, 7, 9)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert reparam.count(fused, (x,)).bns == 0
    assert any("change from call to call" in n for n in report.notes), str(report)
