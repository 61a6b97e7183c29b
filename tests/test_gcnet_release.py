"""Our GCNet against the release's own numbers: checkpoints and logits written by the authors'
code at width 8 (tests/data/gcnet-release/README.md), both checkpoint layouts, both forms."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reparam
from gcnet import checkpoint as ck
from reparam.testing import rel_error

DATA = Path(__file__).parent / "data" / "gcnet-release"
REFERENCE = torch.load(DATA / "release_s_c8_reference.pt", weights_only=True)
WIDTH_8 = dict(channels=8, ppm_channels=16, head_channels=16)


def fixture_model(layout: str):
    """The fixture's weights in our training form, logits at H/8 as the release's reference."""
    sd, _ = ck.read_state_dict(DATA / f"release_s_c8_{layout}.pth")
    config = ck.replace(ck.CONFIGS["s"], **WIDTH_8)
    model = ck.GCNet(config, upsample_logits=False)
    model.load_state_dict(ck.from_release(sd, config))
    return model.eval()


@pytest.fixture(scope="module", params=["train", "deploy"])
def layout(request):
    """(layout, training form, reparam.fuse of it) for one of the release's two layouts."""
    model = fixture_model(request.param)
    return request.param, model, reparam.fuse(model)


@torch.no_grad()
def test_training_form_computes_the_release_logits(layout):
    name, model, _ = layout
    out = model(REFERENCE["input"])
    assert rel_error(REFERENCE["logits"], out) <= 1e-5
    if name == "deploy":
        assert rel_error(REFERENCE["logits_deploy"], out) <= 1e-5


@torch.no_grad()
def test_fused_deploy_form_computes_the_release_logits(layout):
    _, model, fused = layout
    assert rel_error(REFERENCE["logits"], fused(REFERENCE["input"])) <= 1e-5
    counts = reparam.count(fused, (REFERENCE["input"],))
    assert (counts.convs, counts.bns) == (50, 11)  # as GCNet-S at full width


@torch.no_grad()
def test_eval_output_is_the_release_logits_resized():
    model = fixture_model("train")
    model.upsample_logits = True
    x = REFERENCE["input"]
    expected = F.interpolate(REFERENCE["logits"], size=x.shape[2:], mode="bilinear", align_corners=False)
    assert rel_error(expected, model(x)) <= 1e-5


@torch.no_grad()
def test_bench_release_form_is_what_the_release_times_and_not_exact():
    """The release's speed script: switch_to_deploy() plus its order-based conv-BN fuser, which
    also folds the BNs before DAPPM's 4 process convs: 50 convs and 8 BNs (the exact form: 11)."""
    from gcnet._release import release_timed_form
    x = REFERENCE["input"]
    timed = release_timed_form(fixture_model("train"))
    counts = reparam.count(timed, (x,))
    assert (counts.convs, counts.bns) == (50, 8)
    assert rel_error(REFERENCE["logits"], timed(x)) > 0.1  # another function than the release's model
