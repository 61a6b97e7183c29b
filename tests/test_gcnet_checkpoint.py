"""Importing the release's checkpoints: key names written out from GCNET.md, training and deploy form."""
import pickle

import pytest
import torch
from torch import nn

import reparam
from gcnet import GCNET_S, gcnet_s
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
    ours = gcnet_s(**{f: getattr(config, f) for f in ("channels", "ppm_channels", "head_channels", "n_paths",
                                                      "num_classes")}).state_dict()
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
    out = ck.convert(path, "s", tmp_path / "gcnet_s.safetensors", **SMALL)
    model = ck.load(out)  # variant and config come from the file's metadata
    pairs = [(o, r) for r, o in ck.prefix_pairs(config)]
    for key, value in model.state_dict().items():
        assert torch.equal(value, release[ck.rename(key, pairs)]), key


def test_n_paths_and_num_classes_are_read_from_the_checkpoint(tmp_path):
    config = ck.replace(GCNET_S, n_paths=3, num_classes=11, **SMALL)
    path = tmp_path / "camvid_n3.pth"
    torch.save({"state_dict": random_release_state_dict(config)}, path)
    model = ck.load(path, "s", **SMALL)
    assert (model.config.n_paths, model.config.num_classes) == (3, 11)


def test_deploy_form_checkpoint_fuses_to_the_release_deploy_model(tmp_path):
    config = ck.replace(GCNET_S, **SMALL)
    trained = randomize_bn(gcnet_s(**SMALL)).eval()
    deploy_sd = ck.to_release(release_deploy(trained).state_dict(), config)
    assert sorted(deploy_sd) == sorted(release_keys(deploy=True))
    path = tmp_path / "deploy.pth"
    torch.save(deploy_sd, path)  # a bare state dict
    model = ck.load(ck.convert(path, "s", tmp_path / "deploy.pt", **SMALL)).eval()
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


def test_wrong_variant_is_a_clear_error(tmp_path):
    path = tmp_path / "s.pth"
    torch.save({"state_dict": random_release_state_dict(GCNET_S)}, path)
    with pytest.raises(ck.CheckpointError, match="shape mismatch"):
        ck.load(path, "m")
    with pytest.raises(ck.CheckpointError, match="unknown variant"):
        ck.load(path, "xl")


class _Opaque:  # stands for mmengine objects in a checkpoint's `meta`
    pass


def test_pickled_objects_need_an_explicit_opt_in(tmp_path):
    path = tmp_path / "with_meta.pth"
    torch.save({"state_dict": random_release_state_dict(ck.replace(GCNET_S, **SMALL)), "meta": _Opaque()}, path)
    with pytest.raises(ck.CheckpointError, match="--trust-pickle"):
        ck.read_state_dict(path)
    assert ck.read_state_dict(path, trust_pickle=True)[0]


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
