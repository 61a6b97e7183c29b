"""Importing the release's checkpoints: key names written out from GCNET.md, training and deploy form."""
import importlib.util
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import reparam
from gcnet import GCNET_L, GCNET_S, GCNet, gcnet_l, gcnet_m, gcnet_s
from gcnet import checkpoint as ck
from gcnet._release import release_deploy

from test_gcnet_model import randomize_bn

SMALL = dict(channels=8, ppm_channels=16, head_channels=16)  # S's depth, narrow: fast


def release_keys(stage_blocks=(4, 4), semantic=(5, 5, 2), detail=(4, 4, 2), n_paths=2, deploy=False):
    """The release's key names per GCNET.md, written out independently of gcnet.checkpoint."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    conv_module = lambda p: [f"{p}.conv.weight"] + [f"{p}.bn.{k}" for k in bn]
    norm_act_conv = conv_module  # same names; `bn` sits before `conv` there

    def gcblock(p, residual):
        if deploy:
            return [f"{p}.reparam_3x3.weight", f"{p}.reparam_3x3.bias"]
        keys = []
        for path in [f"path_3x3_{i + 1}" for i in range(n_paths)] + ["path_1x1"]:
            keys += conv_module(f"{p}.{path}.conv1") + conv_module(f"{p}.{path}.conv2")
        return keys + ([f"{p}.path_residual.{k}" for k in bn] if residual else [])

    keys = conv_module("backbone.stem.0") + conv_module("backbone.stem.1")
    trunk = [True] * stage_blocks[0] + [False] + [True] * (stage_blocks[1] - 1)  # residual?
    for i, residual in enumerate(trunk):
        keys += gcblock(f"backbone.stem.{i + 2}", residual)
    for stage in range(3):
        for i in range(semantic[stage]):
            keys += gcblock(f"backbone.semantic_branch_layers.{stage}.{i}", i > 0)
        for i in range(detail[stage]):
            keys += gcblock(f"backbone.detail_branch_layers.{stage}.{i}", not (stage == 2 and i == 0))
    for p in ["backbone.compression_1", "backbone.down_1", "backbone.compression_2",
              "backbone.down_2.0", "backbone.down_2.1"]:
        keys += conv_module(p)
    spp = (["backbone.spp.scales.0"] + [f"backbone.spp.scales.{i}.1" for i in range(1, 5)]
           + [f"backbone.spp.processes.{i}" for i in range(4)] + ["backbone.spp.compression", "backbone.spp.shortcut"])
    for p in spp:
        keys += norm_act_conv(p)
    for head, cls in (("decode_head.head", "decode_head.conv_seg"),
                      ("decode_head.aux_head_c4", "decode_head.aux_cls_seg_c4")):
        keys += [f"{head}.0.{k}" for k in bn] + conv_module(f"{head}.2") + [f"{cls}.weight", f"{cls}.bias"]
    return keys


def random_release_state_dict(config, seed=0):
    """The release's names with our shapes (checked against explicit shapes below), random values."""
    g = torch.Generator().manual_seed(seed)
    ours = GCNet(config).state_dict()
    return {k: (torch.randint(0, 100, v.shape, generator=g) if v.dtype == torch.long
                else torch.rand(v.shape, generator=g) + 0.5)
            for k, v in ck.to_release(ours, config).items()}


@pytest.mark.parametrize("n_paths", [2, 3])
def test_mapping_covers_exactly_the_release_names(n_paths):
    config = ck.replace(GCNET_S, n_paths=n_paths)
    ours = gcnet_s(n_paths=n_paths).state_dict()
    assert sorted(ck.to_release(ours, config)) == sorted(release_keys(n_paths=n_paths))


def test_release_shapes_of_gcnet_s():
    sd = ck.to_release(gcnet_s().state_dict(), GCNET_S)
    expected = {"backbone.stem.0.conv.weight": (32, 3, 3, 3),
                "backbone.stem.2.path_3x3_1.conv1.conv.weight": (32, 32, 3, 3),
                "backbone.stem.6.path_1x1.conv1.conv.weight": (64, 32, 1, 1),  # stage 3's first block
                "backbone.semantic_branch_layers.0.0.path_3x3_2.conv2.conv.weight": (128, 128, 1, 1),
                "backbone.semantic_branch_layers.2.1.path_residual.running_var": (512,),
                "backbone.detail_branch_layers.2.0.path_3x3_1.conv1.conv.weight": (128, 64, 3, 3),
                "backbone.down_2.1.conv.weight": (256, 128, 3, 3),
                "backbone.compression_2.conv.weight": (64, 256, 1, 1),
                "backbone.spp.scales.4.1.bn.weight": (512,),  # BN before the conv: input channels
                "backbone.spp.compression.conv.weight": (128, 640, 1, 1),
                "decode_head.head.0.weight": (128,), "decode_head.head.2.conv.weight": (64, 128, 3, 3),
                "decode_head.conv_seg.weight": (19, 64, 1, 1), "decode_head.aux_head_c4.0.weight": (64,),
                "decode_head.aux_cls_seg_c4.bias": (19,)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected


def test_training_form_checkpoint_imports_key_for_key(tmp_path):
    config = ck.replace(GCNET_S, **SMALL)
    release = random_release_state_dict(config)
    path = tmp_path / "gcnet_s_release.pth"
    torch.save({"state_dict": release, "meta": {"epoch": 3}}, path)
    out = ck.convert(path, tmp_path / "gcnet_s.safetensors")  # the model is read from the file
    model = ck.load(out)  # and its config from the converted file's metadata
    assert model.config == config
    pairs = [(o, r) for r, o in ck.prefix_pairs(config)]
    for key, value in model.state_dict().items():
        assert torch.equal(value, release[ck.rename(key, pairs)]), key


@pytest.mark.parametrize("config", [ck.replace(GCNET_S, n_paths=3, num_classes=11, **SMALL),   # CamVid
                                    ck.replace(GCNET_L, num_classes=21, **SMALL)])            # VOC
def test_n_paths_and_num_classes_are_read_from_the_checkpoint(config, tmp_path):
    path = tmp_path / "release.pth"
    torch.save({"state_dict": random_release_state_dict(config)}, path)
    assert ck.load(path).config == config  # CamVid's 11 classes, N=3, width 8: all from the file


def test_deploy_form_checkpoint_fuses_to_the_release_deploy_model(tmp_path):
    config = ck.replace(GCNET_S, **SMALL)
    trained = randomize_bn(gcnet_s(**SMALL)).eval()
    deploy_sd = ck.to_release(release_deploy(trained).state_dict(), config)
    assert sorted(deploy_sd) == sorted(release_keys(deploy=True))
    path = tmp_path / "deploy.pth"
    torch.save(deploy_sd, path)  # a bare state dict
    model = ck.load(ck.convert(path, tmp_path / "deploy.pt")).eval()
    assert model.config == config  # N is not recorded in the deploy layout: the release's 2
    x = torch.randn(1, 3, 64, 128)
    reparam.testing.assert_equivalent(trained, model, x, rtol=1e-5)
    fused = reparam.fuse(model)
    reparam.testing.assert_equivalent(trained, fused, x, rtol=1e-5)
    assert reparam.count(fused, (x,)).bns == 11


def test_errors_list_missing_unexpected_and_mismatched_keys():
    release = random_release_state_dict(GCNET_S)
    del release["backbone.stem.3.path_1x1.conv2.bn.weight"]
    release["backbone.stem.99.foo"] = torch.zeros(1)
    release["decode_head.conv_seg.bias"] = torch.zeros(5)
    with pytest.raises(ck.CheckpointError) as e:
        ck.from_release(release, GCNET_S)
    msg = str(e.value)
    assert "1 missing key(s)" in msg and "backbone.stem.3.path_1x1.conv2.bn.weight (our stage2.1.path_1x1" in msg
    assert "1 unexpected key(s)" in msg and "backbone.stem.99.foo" in msg
    assert "decode_head.conv_seg.bias: (5,) vs (19,) expected" in msg


def test_an_explicit_variant_is_checked_against_the_file(tmp_path):
    path = tmp_path / "s.pth"
    torch.save({"state_dict": random_release_state_dict(GCNET_S)}, path)
    assert ck.load(path, "s").config == GCNET_S
    with pytest.raises(ck.CheckpointError, match=r"s.pth: holds another model than GCNet-M: channels 32 in "
                       r"the file, 64 asked; head_channels 64 in the file, 128 asked \(.*it is s\)"):
        ck.load(path, "m")
    with pytest.raises(ck.CheckpointError, match="num_classes 19 in the file, 11 asked"):
        ck.load(path, num_classes=11)
    with pytest.raises(ck.CheckpointError, match="unknown variant 'xl'"):
        ck.load(path, "xl")


def test_writes_are_atomic_and_replace_the_old_file(tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")
    ck.save_state_dict({"a": torch.ones(2)}, out, {"variant": "s"})
    sd, meta = ck.read_state_dict(out)
    assert torch.equal(sd["a"], torch.ones(2)) and meta["variant"] == "s"
    with pytest.raises(Exception):
        ck.save_state_dict({"a": "not a tensor"}, out)
    assert ck.read_state_dict(out)[0].keys() == {"a"}  # the failed write left the old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # and no temp file behind


@pytest.mark.parametrize("factory", [gcnet_s, gcnet_m, gcnet_l])
@pytest.mark.parametrize("options", [{}, dict(n_paths=3, num_classes=11)])
def test_full_size_release_layouts_describe_their_model(factory, options):
    """S/M/L from `to_release` of a model (on the meta device: shapes only), both layouts."""
    with torch.device("meta"):
        model = factory(**options)
        deploy = ck.to_release(release_deploy(model).state_dict(), model.config)
    training = ck.to_release(model.state_dict(), model.config)
    name = factory.__name__[-1]
    assert ck.infer_config(training) == model.config and ck.variant_of(model.config) == name
    assert ck.infer_config(deploy) == ck.replace(model.config, n_paths=2)  # N is not in the deploy layout
    assert ck.check_config(ck.infer_config(deploy), name, n_paths_known=False, n_paths=3).n_paths == 3
    assert ck.describe(model.config) == f"GCNet-{name.upper()}, n_paths={model.config.n_paths}, " \
                                        f"{model.config.num_classes} classes"


def test_a_state_dict_of_another_model_is_named_as_such():
    with pytest.raises(ck.CheckpointError, match="not a GCNet checkpoint: no backbone.stem.0.conv.weight"):
        ck.infer_config({"backbone.conv1.weight": torch.zeros(1), "decode_head.conv_seg.weight": torch.zeros(1)})


def save_mmengine_checkpoint(path, state_dict, marker):
    """A checkpoint shaped as mmengine's Runner saves one: `meta`, `state_dict`, `optimizer` and a
    `message_hub` of pickled mmengine objects, whose module exists only while saving. Unpickling
    them for real would call `mmengine.logging.record`, which writes `marker`."""
    mmengine, logging = types.ModuleType("mmengine"), types.ModuleType("mmengine.logging")

    def record(*args):
        marker.write_text("foreign code ran")

    class HistoryBuffer:
        def __init__(self):
            self._log_history, self._count_history = np.arange(3.0), np.ones(3)

    class MessageHub:
        def __init__(self):
            self.log_scalars = OrderedDict(loss=HistoryBuffer())
            self.runtime_info = {"iter": 160000}

        def __reduce__(self):
            return record, (dict(self.__dict__),)

    for obj in (record, HistoryBuffer, MessageHub):
        obj.__module__, obj.__qualname__ = "mmengine.logging", obj.__name__
        setattr(logging, obj.__name__, obj)
    mmengine.logging = logging
    sys.modules.update({"mmengine": mmengine, "mmengine.logging": logging})
    try:
        torch.save({"meta": {"mmengine_version": "0.10.4", "iter": 160000,
                             "dataset_meta": {"classes": ("road", "sidewalk")}, "hub": HistoryBuffer()},
                    "state_dict": state_dict, "message_hub": MessageHub(),
                    "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": []}}, path)
    finally:
        del sys.modules["mmengine"], sys.modules["mmengine.logging"]


def test_mmengine_runner_checkpoint_loads_without_mmengine_or_its_code(tmp_path):
    config = ck.replace(GCNET_S, **SMALL)
    release = random_release_state_dict(config)
    path, marker = tmp_path / "iter_160000.pth", tmp_path / "ran"
    save_mmengine_checkpoint(path, release, marker)
    assert importlib.util.find_spec("mmengine") is None
    with pytest.raises(ModuleNotFoundError, match="mmengine"):  # what plain pickle does with it
        torch.load(path, weights_only=False)
    model = ck.load(path)
    assert model.config == config and not marker.exists()
    assert torch.equal(model.state_dict()["stem.0.conv.weight"], release["backbone.stem.0.conv.weight"])
    _, meta = ck.read_state_dict(path)
    assert meta["iter"] == 160000 and isinstance(meta["hub"], ck.Foreign)


def test_files_that_are_no_checkpoints_name_the_file_and_the_problem(tmp_path):
    fixture = (Path(__file__).parent / "data" / "gcnet-release" / "release_s_c8_deploy.pth").read_bytes()
    files = {"empty.pth": b"", "truncated.pth": fixture[: len(fixture) // 2], "garbage.pth": b"hello " * 50,
             "garbage.safetensors": b"\xff" * 100, "truncated.safetensors": b"\x10" + b"\0" * 7 + b'{"a":'}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.pth").mkdir()
    torch.save([1, 2], tmp_path / "list.pth")
    expected = {"empty.pth": "the file is empty", "truncated.pth": "truncated", "garbage.pth": "truncated",
                "garbage.safetensors": "header too large", "truncated.safetensors": "not a readable safetensors",
                "missing.pth": "no such file", "folder.pth": "not a file", "list.pth": "holds no state dict"}
    for name, problem in expected.items():
        with pytest.raises(ck.CheckpointError) as e:
            ck.load(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and problem in str(e.value), str(e.value)
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
