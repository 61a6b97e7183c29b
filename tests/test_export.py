"""Export of fused models: onnxruntime agrees with PyTorch (relative error <= 1e-4) and the
ONNX deploy graph has the expected convolutions; TorchScript and .pt2 files load and agree;
files are written atomically and never replaced unless asked; `gcnet export` end to end.

GCNet is exported at 64×128 (the smallest size with exact pyramid sizes is 64×64); timm's
RepVGG-A0 and MobileOne-S0 at 64×64."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import randomize_norms  # noqa: E402
from gcnet import FACTORIES  # noqa: E402
from gcnet.config import GCNetConfig  # noqa: E402
from reparam.export import check_onnx, onnx_io, onnx_op_counts, to_onnx, to_pt2, to_torchscript  # noqa: E402
from reparam.testing import rel_error  # noqa: E402

pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

RTOL = 1e-4
GCNET_SIZE = (64, 128)


def gcnet_deploy_convs(config: GCNetConfig) -> int:
    """Convs of the deploy form (auxiliary head dropped): stem 2, one per GCBlock, bilateral
    fusions 2 + 3, DAPPM 5 scales + 4 processes + compression + shortcut, head 3×3 + classifier."""
    blocks = sum(config.stage_blocks) + sum(config.semantic_blocks) + sum(config.detail_blocks)
    return 2 + blocks + 5 + 11 + 2


def bn_scopes(path) -> list[str]:
    """The top-level module each BatchNormalization node of an ONNX file comes from."""
    scopes = []
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "BatchNormalization":
            names = dict((p.key, p.value) for p in node.metadata_props).get("pkg.torch.onnx.name_scopes", "[]")
            scopes.append(eval(names)[1].split(".")[0] if names != "[]" else "?")
    return scopes


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def gcnet_onnx(request, tmp_path_factory):
    """(variant, training-form eval model, fused model, example input, ONNX path)."""
    torch.manual_seed(0)
    model = randomize_norms(FACTORIES[request.param](), seed=1).eval()
    x = torch.randn(1, 3, *GCNET_SIZE)
    fused = reparam.fuse(model, (x,))
    path = to_onnx(fused, (x,), tmp_path_factory.mktemp("onnx") / f"gcnet_{request.param}.onnx")
    return request.param, model, fused, x, path


def assert_onnx_matches(label: str, model, x, path):
    err = check_onnx(path, model, (x,))
    print(f"{label} {tuple(x.shape)}: onnxruntime vs PyTorch training form, max rel. error {err:.3g}")
    assert err <= RTOL


def test_gcnet_onnx_matches_pytorch(gcnet_onnx):
    variant, model, _, x, path = gcnet_onnx
    assert_onnx_matches(f"GCNet-{variant.upper()}", model, x, path)


def test_gcnet_onnx_has_one_conv_per_gcblock_and_no_bn_outside_dappm(gcnet_onnx):
    variant, model, fused, _, path = gcnet_onnx
    ops = onnx_op_counts(path)
    assert ops["Conv"] == gcnet_deploy_convs(model.config)
    # DAPPM normalizes in BN → ReLU → conv order, tensors other branches read: no conv to fold into
    fused_bns = [n for n, m in fused.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {n.split(".")[0] for n in fused_bns} == {"dappm"}
    assert ops["BatchNormalization"] == len(fused_bns) == 11
    assert set(bn_scopes(path)) == {"dappm"}


@pytest.fixture(scope="module", params=["repvgg_a0", "mobileone_s0"])
def timm_onnx(request, tmp_path_factory):
    """(name, model, timm's own deploy form, example input, ONNX path of reparam's fused form)."""
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(request.param), seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    path = to_onnx(reparam.fuse(model, (x,)), (x,), tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return request.param, model, reparameterize_model(model), x, path


def test_timm_onnx_matches_pytorch(timm_onnx):
    name, model, _, x, path = timm_onnx
    assert_onnx_matches(name, model, x, path)


def test_timm_onnx_has_the_convs_of_timms_own_deploy_form(timm_onnx):
    _, _, timm_deploy, _, path = timm_onnx
    ops = onnx_op_counts(path)
    expected = reparam.count(timm_deploy)  # counts the classifier Linear as a conv
    assert ops["Conv"] + ops["Gemm"] == expected.convs
    assert ops["BatchNormalization"] == expected.bns == 0


def test_torchscript_and_pt2_load_and_agree(gcnet_onnx, tmp_path):
    _, model, fused, x, _ = gcnet_onnx
    ts = to_torchscript(fused, (x,), tmp_path / "m.ts")
    pt2 = to_pt2(fused, (x,), tmp_path / "m.pt2")
    with torch.no_grad():
        expected = model(x)
        assert rel_error(expected, torch.jit.load(str(ts))(x)) <= 1e-5
        assert rel_error(expected, torch.export.load(str(pt2)).module()(x)) <= 1e-5


def _small():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()


def test_writers_refuse_to_overwrite_and_leave_no_temporary_file(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.onnx"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        to_onnx(_small(), (x,), path)
    assert path.read_text() == "keep me"
    to_onnx(_small(), (x,), path, overwrite=True)
    assert check_onnx(path, _small().eval(), (x,)) >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_export_leaves_nothing(tmp_path):
    def boom(tmp):
        Path(tmp).write_text("half a file")
        raise RuntimeError("exporter failed")
    from reparam.export import write_atomic
    with pytest.raises(RuntimeError, match="exporter failed"):
        write_atomic(tmp_path / "m.onnx", False, boom)
    assert list(tmp_path.iterdir()) == []


def test_training_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="eval"):
        to_pt2(_small().train(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.pt2")


def test_gcnet_export_command(tmp_path, capsys):
    from gcnet.cli import main
    out = tmp_path / "s.onnx"
    argv = ["export", "--variant", "s", "--format", "onnx", "--out", str(out), "--size", "64", "64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "on 1×3×64×64: max relative error" in printed and "on 2×3×128×128: max relative error" in printed
    assert onnx_op_counts(out)["Conv"] == gcnet_deploy_convs(FACTORIES["s"]().config)
    assert onnx_io(out) == ([("image", ["batch", 3, "height", "width"])], [("logits", ["batch", 19, "height", "width"])])
    assert main(argv) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--static"]) == 0
    assert onnx_io(out) == ([("image", [1, 3, 64, 64])], [("logits", [1, 19, 64, 64])])


def test_dynamic_onnx_runs_other_sizes(tmp_path):
    model = _small()
    path = to_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", input_names=["image"],
                   output_names=["logits"], dynamic=True)
    for shape in [(1, 3, 8, 8), (3, 3, 16, 24)]:
        assert check_onnx(path, model, (torch.randn(shape),)) <= RTOL
