"""reparam.fuse on the libraries where re-parameterizable blocks run, as their users call it.

Ultralytics YOLO (built from its YAML configs) and segmentation_models_pytorch with a timm
encoder: random weights and BN statistics, nothing downloaded. Fused with and without example
inputs, each result runs at most as many convs and BNs as the library's own converter leaves
(Ultralytics' `model.fuse()`, timm's `reparameterize_model`) and computes the original function.
Without example inputs the root's Python stays (Ultralytics iterates its layers and reads
`m.f`, `m.i`): each layer is fused in place and keeps its class and attributes."""
from __future__ import annotations

import copy
import io
import os
import sys
from pathlib import Path

import pytest
import torch

import reparam
from reparam.testing import assert_equivalent

os.environ.setdefault("YOLO_OFFLINE", "1")
tasks = pytest.importorskip("ultralytics.nn.tasks")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `examples`, `benchmarks`
from examples.blocks import randomize_norms  # noqa: E402


def _random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_norms(model, seed).eval()


def _at_most_as_many(model, ours, theirs, x, who: str):
    """`ours` runs at most the convs and BNs of `theirs` (the library's converter), and computes
    `model`'s function."""
    t, o = reparam.count(theirs, (x,)), reparam.count(ours, (x,))
    assert o.convs <= t.convs and o.bns <= t.bns, \
        f"convs/BNs {o.convs}/{o.bns} after reparam.fuse vs {t.convs}/{t.bns} after {who}"
    assert_equivalent(model, ours, x, rtol=1e-5)


def _yolo(config: str):
    torch.manual_seed(0)
    return _random_bn(tasks.DetectionModel(config, verbose=False)), torch.randn(1, 3, 64, 96)


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml", "yolov9t.yaml"])
@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "inputs"])
def test_yolo_fuses_like_ultralytics(config, with_inputs):
    model, x = _yolo(config)
    theirs = copy.deepcopy(model).fuse(verbose=False)
    _at_most_as_many(model, reparam.fuse(model, (x,) if with_inputs else None), theirs, x, f"Ultralytics ({config})")


def test_yolo_layers_keep_what_the_parent_reads():
    """Fused in place: the layers Ultralytics iterates keep their class and `f`, `i`, `type`, and
    the fused model still runs Ultralytics' own methods (`.to()` runs BaseModel._apply, which
    moves the head's `stride`), deep copies, saves and loads (`torch.save` pickles the model)."""
    from ultralytics.nn.modules import Conv, Detect

    model, x = _yolo("yolov8n.yaml")
    fused, report = reparam.fuse_with_report(model)
    layers = list(fused.model)
    assert [type(m).__name__ for m in layers] == [type(m).__name__ for m in model.model]
    assert isinstance(layers[0], Conv) and isinstance(layers[-1], Detect)
    assert [(m.f, m.i, m.type) for m in layers] == [(m.f, m.i, m.type) for m in model.model]
    assert not hasattr(layers[0], "bn") and report.rewrites and not report.norms_left
    root = report.untraced[0]
    assert root.path == "<root>" and root.fused_below == len(report.rewrites) > 0, root
    fused = copy.deepcopy(fused).to(torch.float64).to(torch.float32)
    assert isinstance(fused.model[0], Conv) and fused.model[0].i == 0
    assert_equivalent(model, fused, x, rtol=1e-5)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded.model[0], Conv) and isinstance(loaded.model[-1], Detect) and loaded.model[-1].i == 22
    assert_equivalent(model, loaded, x, rtol=1e-5)
    assert model.model[0].bn is not None  # the user's model is untouched


def test_the_parent_reaching_into_a_layer_keeps_it_python():
    """A layer whose method the parent calls (or whose submodule it reads) is no whole: it keeps
    its children, and only they are fused."""
    from ultralytics.nn.modules import Conv

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv(3, 8, 3), Conv(8, 8, 3)

        def forward(self, x):
            if x.shape[1] != 3:  # untraceable: the Python stays
                raise ValueError("3 channels expected")
            x = self.a(x)
            return self.b.forward_fuse(x) + self.b.bn(x)  # reaches into b

    model = _random_bn(Net())
    x = torch.randn(1, 3, 17, 19)
    fused = reparam.fuse(model)
    assert not hasattr(fused.a, "bn") and isinstance(fused.a, Conv) and hasattr(fused.b, "bn")
    assert_equivalent(model, fused, x, rtol=1e-5)


smp = None


def _smp():
    global smp
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "inputs"])
def test_smp_with_a_timm_encoder_fuses_like_timm(with_inputs):
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = _random_bn(_smp().FPN("tu-repvgg_a0", encoder_weights=None, classes=3))
    x = torch.randn(1, 3, 64, 64)
    theirs = reparameterize_model(copy.deepcopy(model))
    _at_most_as_many(model, reparam.fuse(model, (x,) if with_inputs else None), theirs, x, "timm")


def test_the_report_says_why_each_batch_norm_is_left():
    """A conv and its BN called apart by a parent's Python that does not trace: without example
    inputs no graph holds both, and the report names the parent; with them torch.export folds it."""

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.shape[1] != 3:
                raise ValueError("3 channels expected")
            return self.bn(self.conv(x))

    model, x = _random_bn(Untraceable()), torch.randn(1, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model)
    assert [s.path for s in report.norms_left] == ["bn"]
    assert "called by the Python of '<root>'" in report.norms_left[0].reason
    assert "batch norms left" in str(report) and report.untraced[0].fused_below == 0
    fused, report = reparam.fuse_with_report(model, (x,))
    assert not report.norms_left and reparam.count(fused, (x,)).bns == 0
    assert_equivalent(model, fused, x, rtol=1e-5)


def test_rtdetr_fuses_fully_though_its_top_k_flips_in_float32():
    """RT-DETR-L selects its queries by top-k: at 96×96 rounding in float32 flips a near tie, and
    the output moves by about 0.4 relative for any exact fuse (Ultralytics' too). The whole-model
    check compares in float64, where the fused model agrees: nothing is undone."""
    from benchmarks.reach import build, ultralytics_fuse

    model, x, _ = build("rtdetr-l", 96)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert not [n for n in report.notes if n.startswith("undone")], report.notes
    ours, theirs = reparam.count(fused, (x,)), reparam.count(ultralytics_fuse(model), (x,))
    assert ours.convs <= theirs.convs and ours.bns <= theirs.bns == 3 and ours.bns == 0
    wide = [copy.deepcopy(m).double() for m in (model, fused)]
    with torch.no_grad():
        exact = reparam.testing.rel_error(*(m(x.double()) for m in wide))
    assert exact < 1e-7, exact


def test_a_batch_norm_left_gets_the_refusal_that_names_it():
    """A BN whose conv (in another submodule) has a second reader: the refusal is at the conv,
    and names the BN among the readers; the BN's line says that, not that nothing was near it."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
            self.b, self.c = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + self.c(torch.relu(y))

    model, x = _random_bn(Shared()), torch.randn(1, 3, 9, 11)
    fused, report = reparam.fuse_with_report(model)
    assert [s.path for s in report.norms_left] == ["b"], report
    assert "also used elsewhere" in report.norms_left[0].reason and "(at a.0)" in report.norms_left[0].reason
    assert_equivalent(model, fused, x, rtol=1e-5)
