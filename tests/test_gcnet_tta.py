"""Test-time augmentation as the release evaluates with `--tta` (mmseg's TestTimeAug and
SegTTAModel): image ratios 0.5-1.75, each as is and flipped, softmax of the logits resized to the
label size, averaged. The expectation is computed here step by step, with the sizes written out."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gcnet import cli
from gcnet import evaluate as ev
from gcnet.presets import TrainConfig
from gcnet.transforms import normalize, to_tensors

from test_gcnet_datasets import make_layout

# an 8×12 image at the release's ratios: (⌊8r + ½⌋, ⌊12r + ½⌋), all exact here
SIZES = {0.5: (4, 6), 0.75: (6, 9), 1.0: (8, 12), 1.25: (10, 15), 1.5: (12, 18), 1.75: (14, 21)}


def tiny_model(classes=4):
    torch.manual_seed(0)
    return nn.Conv2d(3, classes, 3, padding=1).eval()  # a 3×3 conv: neither scale- nor flip-invariant


def by_hand(model, image, label_size):
    """Mean over the 12 predictions of softmax(resize(logits)), flipped predictions flipped back."""
    total, count = 0, 0
    for size in SIZES.values():
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        plain = F.interpolate(model(scaled), size=label_size, mode="bilinear", align_corners=False)
        mirrored = model(scaled.flip(3)).flip(3)
        mirrored = F.interpolate(mirrored, size=label_size, mode="bilinear", align_corners=False)
        total = total + plain.softmax(1) + mirrored.softmax(1)
        count += 2
    return (total / count)[0]


@torch.no_grad()
def test_tta_is_the_mean_softmax_of_the_scaled_and_flipped_predictions():
    assert ev.TTA_SCALES == tuple(SIZES)
    model, image = tiny_model(), torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(1))
    expected = by_hand(model, image, (7, 10))
    assert torch.allclose(ev.tta_probabilities(model, image, (7, 10)), expected, atol=1e-6)
    single = F.interpolate(model(image[None]), size=(7, 10), mode="bilinear", align_corners=False)[0].softmax(0)
    assert (expected - single).abs().max() > 0.01  # the augmentation changes the result
    assert torch.equal(ev.segment(model, image, (7, 10), tta=True), expected.argmax(0))


@torch.no_grad()
def test_evaluate_and_the_cli_score_with_tta(tmp_path, monkeypatch, capsys):
    root = make_layout("folder", tmp_path / "data", n=1, size=(8, 12))
    dataset = ev.dataset_for(TrainConfig(dataset="folder", data_root=str(root)), "val")
    raw_image, label = dataset[0]
    model = tiny_model(classes=3)
    pred = by_hand(model, normalize(to_tensors(raw_image)[0]), (8, 12)).argmax(0)
    expected = np.zeros((3, 3), np.int64)
    np.add.at(expected, (label.astype(np.int64), pred.numpy()), 1)
    result = ev.evaluate(model, dataset, tta=True, eval_size=(4, 4))  # eval_size: unused under TTA, as mmseg
    assert result.confusion.tolist() == expected.tolist()

    info = {"classes": dataset.classes, "palette": dataset.palette,
            "config": TrainConfig(dataset="folder", data_root=str(root), val_split="val")}
    monkeypatch.setattr(ev, "load_for_inference", lambda *a, **k: (model, info))
    assert cli.main(["eval", "weights.pt", "--tta", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "multi-scale + flip (--tta)" in out and f"{100 * result.miou:5.2f}" in out
