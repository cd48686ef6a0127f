"""The Inception-ResNet-v2 detector: the real model, weights loading, leakage guards, the
Ray Tune sweep (each trial a Ray Train fine-tune) with export and reload, and the
hub-unreachable error through the CLI. The fine-tune's lost-worker recovery, driver-kill
resume and held-out evaluation run in the whole-pipeline scenario (tests/test_pipeline.py),
on a real cluster with the DCGAN's own fakes.

The sweep's trials fine-tune a small timm network (resnet10t): the sweep, export and reload
do not depend on the architecture, and two Inception-ResNet-v2 trials cost ~40 s more on 2
cores. The study's network itself trains a step, loads ImageNet-headed weights (below) and is
served traced (tests/test_serving.py)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from deepfake_ray import checkpoint, cli, storage
from deepfake_ray.data import datasets, decode, sample
from deepfake_ray.detector import data, loop, metrics, train, tune
from deepfake_ray.errors import UsageError
from deepfake_ray.models import detector
from tests.cli_output import error_lines
from tests.processes import signal_driver_once
from tests.detector_checks import assert_exported_model
from tests.detector_stages import build, checkerboard_face, write_stage
from tests.images import encode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ("detector.max_train_per_class=8", "detector.keep_checkpoints=1")


# --- the model -----------------------------------------------------------------------

def test_inception_resnet_v2_at_128px_trains_and_has_the_study_head():
    model = detector.create()
    assert detector.count_parameters(model) == 54_309_538  # Keras: 54,339,810 (+30,272 BN)
    pre = detector.preprocessing(model)
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5]  # from timm's config
    pixels = np.stack([sample.face(0, i, 64) for i in range(2)])
    x = detector.to_input(pixels, 128, pre["mean"], pre["std"])
    assert x.shape == (2, 3, 128, 128) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.classif.weight.detach().clone()
    loss_sum, correct = detector.train_step(model, opt, x, torch.tensor([0, 1]))
    assert np.isfinite(float(loss_sum)) and 0 <= int(correct) <= 2 and not torch.equal(before, model.classif.weight)
    assert model.conv2d_1a.conv.weight.grad is not None  # the backbone learns too
    model.eval()
    assert detector.predict(model, x).shape == (2, 2)
    loss, p = detector.eval_step(model, x, torch.tensor([0, 1]))  # the validation's, in plain torch
    logits = detector.predict(model, x)
    assert loss == pytest.approx(-float(torch.log_softmax(logits, 1)[[0, 1], [0, 1]].sum()), rel=1e-5)
    assert np.allclose(p, torch.softmax(logits.double(), 1)[:, 1].numpy())


def nondeterministic_on_cuda() -> set[str]:
    """The autograd nodes of ops that torch.use_deterministic_algorithms lists as having no
    deterministic CUDA form, made here on the CPU (where they have one)."""
    import torch.nn.functional as F

    x = torch.rand(1, 2, 4, 4, requires_grad=True)
    grid = torch.zeros(1, 2, 2, 2)
    made = [F.adaptive_avg_pool2d(x, 3), F.adaptive_max_pool2d(x, 3), F.avg_pool3d(x[None], 1),
            F.fractional_max_pool2d(x, 2, output_size=2), F.pad(x, (1, 1, 1, 1), mode="reflect"),
            F.interpolate(x, scale_factor=2, mode="bilinear"), F.interpolate(x, scale_factor=2, mode="bicubic"),
            F.grid_sample(x, grid, align_corners=False), F.nll_loss(x[:, :, 0, 0], torch.tensor([1])),
            F.cross_entropy(x[:, :, 0, 0], torch.tensor([1]))]
    return {type(t.grad_fn).__name__ for t in made}


def autograd_ops(tensor: torch.Tensor) -> set[str]:
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(parent for parent, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_training_either_network_calls_no_op_pytorch_cannot_run_deterministically_on_a_gpu(monkeypatch):
    """With deterministic=true PyTorch warns of ops that have no deterministic CUDA form
    and runs them anyway: the detector's loss was one (NLLLoss, by cross-entropy), in
    training and validation. It is now the logistic loss of the logit difference, the
    same numbers. Every op of both networks' training steps, as they call backward, is
    checked against PyTorch's list."""
    from deepfake_ray.models import dcgan

    flagged, graphs = nondeterministic_on_cuda(), []
    assert {"NllLossBackward0", "AdaptiveAvgPool2DBackward0"} <= flagged  # the check can see them
    backward = torch.autograd.backward

    def recorded(tensors, *args, **kwargs):
        graphs.append(autograd_ops(tensors))
        return backward(tensors, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", recorded)
    model = detector.create(num_classes=2, pretrained="none")
    pre = detector.preprocessing(model)
    x = detector.to_input(np.stack([sample.face(0, i, 64) for i in range(2)]), 75, pre["mean"], pre["std"])
    detector.train_step(model, torch.optim.AdamW(model.parameters()), x, torch.tensor([0, 1]))
    G, D = dcgan.build(32, 16, 8, 8)
    opt_g, opt_d = dcgan.optimizers(G, D, 2e-4, 0.5)
    dcgan.gan_step(G, D, opt_g, opt_d, torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 16))
    assert len(graphs) >= 3 and all("ConvolutionBackward0" in g for g in graphs)
    assert not set().union(*graphs) & flagged

    logits = torch.randn(64, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (64,))
    for reduction in ("mean", "sum"):
        assert float(detector.two_class_loss(logits, y, reduction)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, y, reduction=reduction)), rel=1e-12)

    def refused(*args, **kwargs):
        raise AssertionError("NLLLoss has no deterministic CUDA form, forward too")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", refused)  # validation's loss
    monkeypatch.setattr(torch.nn.functional, "nll_loss", refused)
    detector.eval_step(model.eval(), x, torch.tensor([0, 1]))


def test_normalization_is_that_of_the_weights_named_not_of_the_architectures_default():
    """vit_small_patch16_224's default weights take inputs at mean 0.5, its DINO weights
    at ImageNet's: fine-tuning the DINO ones at 0.5 starts from features off their range."""
    dino = detector.preprocessing(detector.create("vit_small_patch16_224", hub_name="vit_small_patch16_224.dino"))
    assert dino["mean"] == pytest.approx([0.485, 0.456, 0.406])
    default = detector.preprocessing(detector.create("vit_small_patch16_224", hub_name=detector.HUB_NAME))
    assert default["mean"] == pytest.approx([0.5, 0.5, 0.5])  # another arch's name: the arch's default
    unknown = detector.create("vit_small_patch16_224", hub_name="vit_small_patch16_224.no_such_tag")
    assert detector.preprocessing(unknown)["mean"] == pytest.approx([0.5, 0.5, 0.5])  # trains, from none or a file


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_with_an_imagenet_head_load_into_the_two_class_model(tmp_path, suffix):
    imagenet = detector.create(num_classes=1000)  # randomly initialised, 1000-way head
    path = str(tmp_path / f"imagenet{suffix}")
    if suffix == ".pth":
        torch.save({"state_dict": imagenet.state_dict()}, path)
    else:
        from safetensors.torch import save_file
        save_file(imagenet.state_dict(), path)
    model = detector.create(num_classes=2, pretrained=path)
    assert model.classif.weight.shape == (2, 1536)
    assert torch.equal(model.conv2d_1a.conv.weight, imagenet.conv2d_1a.conv.weight)
    assert torch.equal(model.block8.conv2d.weight, imagenet.block8.conv2d.weight)


def test_weights_saved_from_ddp_load_and_a_part_missing_is_refused(tmp_path):
    """A checkpoint of a DistributedDataParallel model names every weight `module.*`: the
    same weights. One that lacks part of the backbone would leave those layers random."""
    import timm

    torch.manual_seed(0)
    state = timm.create_model("resnet10t", num_classes=1000).state_dict()
    ddp = str(tmp_path / "ddp.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ddp)
    model = detector.create("resnet10t", 2, ddp)
    assert torch.equal(model.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    partial = str(tmp_path / "partial.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(UsageError, match=r"do not fit resnet10t: \d+ missing keys \(e.g. \['layer4"):
        detector.create("resnet10t", 2, partial)


def test_weights_from_s3_load_without_unpickling(s3_server):
    bucket = s3_server("detector-weights")
    head = {"classif.weight": torch.ones(1000, 1536), "conv2d_1a.conv.weight": torch.zeros(32, 3, 3, 3)}
    buf = io.BytesIO()
    torch.save({"model": head, "note": "a wrapper key"}, buf)
    storage.write_bytes(f"{bucket}/irv2.pth", buf.getvalue())
    state = detector.read_weights(f"{bucket}/irv2.pth")
    assert set(state) == set(head) and torch.equal(state["classif.weight"], head["classif.weight"])
    buf = io.BytesIO()
    torch.save({"weights": head, "hook": print}, buf)  # a pickled function: refused
    storage.write_bytes(f"{bucket}/evil.pth", buf.getvalue())
    with pytest.raises(UsageError, match="not a safetensors file or a torch state dict"):
        detector.read_weights(f"{bucket}/evil.pth")


def test_frozen_backbone_trains_only_the_head():
    model = detector.create()
    detector.set_backbone_frozen(model, True)
    detector.train_mode(model, frozen=True)
    stem, head = model.conv2d_1a.conv.weight.detach().clone(), model.classif.weight.detach().clone()
    running = model.conv2d_1a.bn.running_mean.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = detector.to_input(np.stack([sample.face(0, i, 32) for i in range(2)]), 75, [0.5] * 3, [0.5] * 3)
    detector.train_step(model, opt, x, torch.tensor([0, 1]))
    assert torch.equal(stem, model.conv2d_1a.conv.weight) and not torch.equal(head, model.classif.weight)
    assert torch.equal(running, model.conv2d_1a.bn.running_mean)  # batch-norm statistics kept
    detector.set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_recalibrated_batchnorm_makes_eval_mode_agree_with_training():
    """Running statistics that lag the weights (as after a few steps from scratch) make
    eval-mode scores meaningless; recomputing them from training inputs puts eval mode
    back in line with training, and a frozen backbone's statistics are left alone."""
    torch.manual_seed(0)
    model = detector.create("resnet10t", 2, "none")
    x = detector.to_input(np.stack([sample.face(0, i, 32) for i in range(16)]), 64, [0.5] * 3, [0.5] * 3)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        in_training = model.train()(x)
        for m in layers:  # statistics of weights long gone
            m.running_mean.fill_(2.0)
            m.running_var.fill_(0.05)
        stale = model.eval()(x)
        model.train()
        detector.recalibrate_batchnorm(model, [x[:8], x[8:]])
        recalibrated = model.eval()(x)
    assert stale.std(0).max() < 0.01 < in_training.std(0).min()  # every image scored alike
    assert (recalibrated - in_training).abs().max() < 0.1  # up to per-batch vs whole-set variance
    assert all(m.momentum == 0.1 for m in layers)  # training goes on as before

    detector.train_mode(model, frozen=True)
    kept = [m.running_mean.clone() for m in layers]
    detector.recalibrate_batchnorm(model, [x])
    assert all(torch.equal(k, m.running_mean) for k, m in zip(kept, layers))


def test_weights_of_another_architecture_are_refused(tmp_path):
    import timm

    path = str(tmp_path / "resnet.pth")
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(UsageError, match="do not fit inception_resnet_v2"):
        detector.create(pretrained=path)
    with pytest.raises(UsageError, match="no such file"):
        detector.create(pretrained=str(tmp_path / "missing.pth"))


# --- leakage guards (manifests only, no Ray) --------------------------------------------

def test_a_diverged_epoch_ranks_last_instead_of_failing_the_run():
    labels = np.array([0, 0, 1, 1])
    good = metrics.epoch_validation(labels, np.array([0.1, 0.2, 0.8, 0.9]), 1.0)
    assert good["val_auc"] == 1.0 and 0.2 < good["val_threshold"] < 0.8
    diverged = metrics.epoch_validation(labels, np.array([np.nan, 0.2, np.nan, 0.9]), float("nan"))
    assert math.isnan(diverged["val_auc"]) and diverged["val_threshold"] == 0.5
    assert loop.better(good, diverged) and not loop.better(diverged, good)


def test_of_epochs_alike_by_roc_auc_the_lower_validation_loss_is_the_best_and_a_later_one_wins_a_tie():
    """A small validation split often gives several epochs a ROC-AUC of 1.0: the best epoch
    (exported, its threshold served) is then the one of the lower validation loss, and of
    equal ones the later, whose checkpoint Ray Train keeps."""
    worse = {"epoch": 0, "val_auc": 1.0, "val_loss": 0.5}
    lower = {"epoch": 1, "val_auc": 1.0, "val_loss": 0.2}
    again = {"epoch": 2, "val_auc": 1.0, "val_loss": 0.2}
    assert loop.better(lower, worse) and not loop.better(worse, lower)
    assert loop.best_of([worse, lower]) is lower and loop.best_of([lower, worse]) is lower
    assert loop.better(again, lower) and loop.best_of([worse, lower, again]) is again


def test_held_out_metrics_carry_95_percent_intervals_as_defined():
    """A recall of 1.0000 on a few hundred fakes is not a perfect detector: each rate comes
    with its Wilson interval (scipy's own, as the oracle), and ROC-AUC with DeLong's, whose
    variance is checked against its definition (every fake against every real, ties half)."""
    from scipy.stats import binomtest

    from deepfake_ray.detector import metrics

    labels = np.repeat([0, 1], [300, 200])
    p_fake = np.clip(np.random.default_rng(3).normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(2)  # ties
    m = metrics.classification(labels, p_fake, 0.5)
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    assert m["false_positive_rate"] == fp / 300 and m["fake_share"] == 0.4
    for key, k, n in (("accuracy", tn + tp, 500), ("precision", tp, tp + fp), ("recall", tp, 200),
                      ("false_positive_rate", fp, 300)):
        expected = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert m["ci95"][key] == pytest.approx([expected.low, expected.high], rel=1e-9), key
    fakes, reals = p_fake[labels == 1], p_fake[labels == 0]
    wins = (fakes[:, None] > reals[None, :]) + 0.5 * (fakes[:, None] == reals[None, :])
    se = math.sqrt(wins.mean(1).var(ddof=1) / 200 + wins.mean(0).var(ddof=1) / 300)
    assert wins.mean() == pytest.approx(m["roc_auc"])
    assert m["ci95"]["roc_auc"] == pytest.approx([m["roc_auc"] - 1.959964 * se, m["roc_auc"] + 1.959964 * se])
    perfect = metrics.classification(np.repeat([0, 1], 490), np.repeat([0.1, 0.9], 490), 0.5)
    assert perfect["recall"] == 1.0 and perfect["ci95"]["recall"][0] == pytest.approx(0.99223, abs=1e-5)
    assert perfect["ci95"]["false_positive_rate"][1] == pytest.approx(1 - 0.99223, abs=1e-5)
    one_class = metrics.classification(np.zeros(5, int), np.full(5, 0.2), 0.5)
    assert one_class["ci95"]["roc_auc"] is None and one_class["ci95"]["recall"] is None
    # one score for every image: ROC-AUC 0.5 with no spread to measure, not "0.5000-0.5000"
    collapsed = metrics.classification(np.repeat([0, 1], 4), np.full(8, 0.5), 0.5)
    assert collapsed["roc_auc"] == 0.5 and collapsed["ci95"]["roc_auc"] is None


def test_held_out_metrics_take_fakes_as_positive_and_the_threshold_balances_both_classes():
    """evaluate's figures on a split worked by hand: 1 = fake is the positive class, a
    score at the threshold is a fake (as the service labels it), and the threshold chosen
    on validation is the cut of the best balanced accuracy, not the one that flags most."""
    from deepfake_ray.detector import metrics

    labels = np.array([0, 0, 0, 1, 1])
    p_fake = np.array([0.1, 0.4, 0.7, 0.6, 0.9])
    m = metrics.classification(labels, p_fake, 0.6)  # the fake at 0.6 exactly: flagged
    # rows: actual real, actual fake; columns: predicted real, predicted fake
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]
    assert (m["accuracy"], m["recall"]) == (0.8, 1.0) and m["precision"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert m["average_precision"] == pytest.approx(1 / 2 + 2 / 3 / 2)  # fakes at ranks 1 and 3
    # reals at 0.1 and 0.5, fakes at 0.3, 0.8 and 0.9: above 0.65 two of three fakes and no
    # real (J = 2/3); above 0.2 every fake, but half the reals too (J = 1/2)
    val = metrics.epoch_validation(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.5, 0.3, 0.8, 0.9]), 1.0)
    assert val["val_threshold"] == pytest.approx(0.65)
    assert (val["val_acc"], val["val_acc_at_threshold"]) == (pytest.approx(0.6), pytest.approx(0.8))
    # scores no cut separates better than chance (inverted, the top one saturated at 1.0):
    # the cut "above every score" sat on that 1.0; such a model gets 0.5, as a one-class set
    inverted = metrics.epoch_validation(np.array([0, 0, 1, 1]), np.array([1.0, 0.9, 0.2, 0.1]), 1.0)
    assert inverted["val_threshold"] == 0.5


def test_calibration_tells_probabilities_from_overconfident_scores():
    """Two detectors rank the same images alike (same ROC-AUC); only one's p_fake can be
    read as a probability."""
    from sklearn.metrics import brier_score_loss

    from deepfake_ray.detector import metrics

    labels = np.array([1] * 7 + [0] * 3 + [1] * 2 + [0] * 8)  # 7 of 10 fake at 0.7, 2 of 10 at 0.2
    calibrated = np.array([0.7] * 10 + [0.2] * 10)
    overconfident = np.array([0.99] * 10 + [0.01] * 10)
    good = metrics.classification(labels, calibrated, 0.5)
    bad = metrics.classification(labels, overconfident, 0.5)
    assert good["roc_auc"] == bad["roc_auc"] and good["accuracy"] == bad["accuracy"] == 0.75
    assert good["ece"] == pytest.approx(0.0) and bad["ece"] == pytest.approx((0.29 + 0.19) / 2)
    assert good["brier"] == pytest.approx(brier_score_loss(labels, calibrated)) and good["brier"] < bad["brier"]
    bins = metrics.reliability(labels, calibrated)
    assert [(b["bin"], b["n"], b["fraction_fake"]) for b in bins] == [(2, 10, 0.2), (7, 10, 0.7)]


def test_a_false_positive_budgets_threshold_flags_no_more_reals_than_it_allows():
    """A short decimal, copied as printed: it flags what was measured (a midpoint printed
    to 4 digits flagged one more); none where too many reals score 1, or too few reals
    tell the share (its 1.0 had flagged 10% for a budget of 5%)."""
    labels = np.array([0] * 100 + [1] * 100)
    reals, fakes = np.linspace(0.0, 0.99, 100), np.linspace(0.5, 1.0, 100)
    five, one, tenth = metrics.budget_thresholds(labels, np.r_[reals, fakes], labels, np.r_[reals, fakes])
    # 5 reals of 100 may be flagged (0.95-0.99): the cut is above 0.94, up to a fake's 0.9444
    assert five["threshold"] == 0.941 and five["validation_false_positive_rate"] == 0.05
    assert one["threshold"] == 0.981 and one["validation_false_positive_rate"] == 0.01  # above 0.98, to 0.9848
    assert (tenth["threshold"], tenth["note"]) == (None, "needs 1,000 validation reals or more")
    close = np.r_[np.full(19, 0.99991), [0.99993], np.full(20, 0.99994)]  # a budget of 1 real in 20
    assert metrics.budget_threshold(labels[80:120], close, 0.05) == 0.99992  # not 0.9999, below them all
    saturated = np.r_[np.linspace(0, 0.5, 90), np.ones(10), fakes]
    assert metrics.budget_threshold(labels, saturated, 0.05).startswith("no threshold up to 1 keeps it")


def test_a_confident_detectors_scores_keep_their_order_and_its_threshold_its_figures():
    """In float32 every logit gap of 17 or more was p_fake 1.0 exactly: confident fakes
    and a confidently wrong real tied, costing ROC-AUC and the threshold its margin."""
    import torch

    from deepfake_ray.detector import metrics
    from deepfake_ray.models import detector

    gaps = torch.tensor([-3.0, 20.0, 24.0, 28.0, 32.0])  # one real (its gap 20), then fakes
    p = detector.p_fake(torch.stack([torch.zeros(5), gaps], dim=1))
    labels = np.array([0, 0, 1, 1, 1])
    assert p.dtype == np.float64 and len(set(p.tolist())) == 5 and p[-1] < 1.0
    broken = detector.p_fake(torch.tensor([[0.0, float("inf")], [float("nan"), 1.0], [0.0, 1.0]]))
    assert np.isnan(broken[:2]).all() and np.isfinite(broken[2])  # a broken model's, as the softmax's
    assert metrics.roc_auc(labels, p) == 1.0
    scores = np.float32([0.2, 0.9999999, 0.99999994, 0.99999994])  # as float32 scores come
    checked = metrics.epoch_validation(np.array([0, 0, 1, 1]), scores, 1.0)
    # the accuracy at its threshold is the one classification() (evaluate, serve) gives
    at = metrics.classification(np.array([0, 0, 1, 1]), scores, checked["val_threshold"])
    assert checked["val_acc_at_threshold"] == at["accuracy"] == 1.0


def test_with_nothing_flagged_precision_is_undefined_not_zero():
    """Under a harsh robustness condition the model may flag no test image: a precision of
    0 would read as every flag wrong."""
    from deepfake_ray.detector import metrics

    none_flagged = metrics.classification(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 0.5)
    assert math.isnan(none_flagged["precision"]) and none_flagged["recall"] == 0.0
    assert metrics.classification(np.array([0, 1, 1]), np.array([0.6, 0.2, 0.3]), 0.5)["precision"] == 0.0


def test_evaluating_a_model_whose_output_is_nan_says_it_is_broken():
    """Not scikit-learn's "Input contains NaN" from deep inside the metrics."""
    from deepfake_ray.detector import evaluate

    scores = {"clean": np.array([0.2, 0.9, 0.4]), "jpeg_q95": np.array([0.2, np.nan, np.nan])}
    with pytest.raises(UsageError, match=r"not a number for 2 of 3 test images \(jpeg_q95\): it is broken "
                                         r".* train-detector --force --set detector.lr=3e-05"):
        evaluate.check_finite(scores, {"lr": 3e-4})


def test_selection_is_balanced_capped_and_keeps_test_apart(tiny_cfg, capsys):
    cfg = tiny_cfg("detector.max_train_per_class=12")
    build(cfg.workdir, 60, 32)
    sel = data.select(cfg)
    assert sel.counts == {"train": {"real": 12, "fake": 12}, "val": {"real": 6, "fake": 6},
                          "test": {"real": 6, "fake": 6}}
    test = set(sel.hashes["test"][0] + sel.hashes["test"][1])
    seen = set(sum((sel.hashes[s][c] for s in ("train", "val") for c in (0, 1)), []))
    assert test and not test & seen
    assert set(sel.fingerprints) == {"real_manifest_sha1", "fake_manifest_sha1"}
    assert data.select(cfg).hashes == sel.hashes  # the seed's subsample, the same every run
    # the cap is of training images: validation and the held-out test keep every image
    capped = data.select(tiny_cfg("detector.max_train_per_class=4", workdir=cfg.workdir)).counts
    assert capped == {"train": {"real": 4, "fake": 4}, "val": {"real": 6, "fake": 6}, "test": {"real": 6, "fake": 6}}
    # Ray Train splits equally. 12 val images shared by 16 workers: four would validate nothing
    with pytest.raises(UsageError, match="validation split selects 12 images, fewer than 1 for each of resources.workers=16"):
        data.select(tiny_cfg("resources.workers=16", "detector.max_train_per_class=0", workdir=cfg.workdir))
    # 24 train images for 16 workers: one each, a batch of one, which is skipped: none would train
    with pytest.raises(UsageError, match=r"train split selects 24 images, fewer than 2 for each of "
                                         r"resources.workers=16, .* \(or raise detector.max_train_per_class\)"):
        data.select(tiny_cfg("resources.workers=16", "detector.max_train_per_class=12", workdir=cfg.workdir))
    twelve = tiny_cfg("resources.workers=12", "detector.max_train_per_class=12", workdir=cfg.workdir)
    assert data.select(twelve).counts["train"] == {"real": 12, "fake": 12}
    # 2 images a worker and batches of 16: an epoch is one step, said (it was silent)
    assert ("warning: detector.batch_size=16 is more than the 2 training images each of resources.workers=12 "
            "gets: an epoch is one step") in capsys.readouterr().err


def test_an_image_in_two_splits_is_an_error(tiny_cfg):
    cfg = tiny_cfg()
    build(cfg.workdir, 20, 32, reals=False)
    face = sample.face(0, 0, 32)
    write_stage(datasets.data_dir(cfg.workdir), [(face, "train"), (face, "test"),
                                                 (sample.face(0, 1, 32), "val")])
    with pytest.raises(UsageError, match="two splits"):
        data.select(cfg)


def test_an_image_both_real_and_fake_is_an_error(tiny_cfg):
    cfg = tiny_cfg()
    build(cfg.workdir, 20, 32, fakes=False)
    face = sample.face(0, 0, 32)  # the reals' first image
    write_stage(datasets.fakes_dir(cfg.workdir), [(face, "train"), (checkerboard_face(1, 1, 32), "val")])
    with pytest.raises(UsageError, match="both the real and the fake"):
        data.select(cfg)


def test_fakes_encoded_differently_from_reals_are_an_error(tiny_cfg):
    cfg = tiny_cfg()
    build(cfg.workdir, 20, 32, fake_quality=75)
    with pytest.raises(UsageError, match="encoded differently"):
        data.select(cfg)
    cfg = tiny_cfg("data.resolution=64")
    build(cfg.workdir, 20, 32)
    with pytest.raises(UsageError, match="data.resolution=32"):
        data.select(cfg)


def test_missing_fakes_say_which_command_makes_them(tiny_cfg):
    cfg = tiny_cfg()
    build(cfg.workdir, 20, 32, fakes=False)
    with pytest.raises(UsageError, match="deepfake-ray generate"):
        data.select(cfg)


def test_a_split_with_no_fakes_names_the_command_that_makes_more(tiny_cfg):
    """`generate --num N` alone is refused on complete fakes: the hint must say --force."""
    cfg = tiny_cfg()
    build(cfg.workdir, 20, 32, fakes=False)
    write_stage(datasets.fakes_dir(cfg.workdir), [(checkerboard_face(1, i, 32), "train") for i in range(3)])
    with pytest.raises(UsageError, match=r"the validation split holds 2 real and 0 fake images; both are needed: "
                                         r"more fakes: `deepfake-ray generate --force --num N` with N above the 3"):
        data.select(cfg)


@pytest.mark.parametrize("auc,said", [(0.5, "0.5000, near chance (0.5)"), (0.2, "0.2000, below chance (0.5): its scores "
                                                                       "are inverted"),
                                      (float("nan"), "not a number")])
def test_a_detector_at_chance_is_warned_of_and_a_working_one_is_not(auc, said):
    """A sweep published a constant-output detector (0.50) as `ok`, with nothing said."""
    line = metrics.near_chance("train-detector", "the best epoch's validation", auc)
    assert line.startswith(f"train-detector: warning: the best epoch's validation ROC-AUC {said}; the detector "
                           "does not tell fakes from reals: train longer, with another detector.lr")
    assert metrics.near_chance("train-detector", "the best epoch's validation", 0.9) is None


def test_unknown_architecture_is_refused_before_training(tiny_cfg):
    with pytest.raises(UsageError, match=r"detector.arch='inceptoin_resnet_v2' is not a timm model"):
        train.check_settings(tiny_cfg("detector.arch=inceptoin_resnet_v2"))
    train.check_settings(tiny_cfg("detector.arch=resnet10t"))  # any timm network is accepted
    # a weights tag timm lacks is refused with pretrained=hub only (train-detector's own check)
    train.check_settings(tiny_cfg("detector.hub_name=inception_resnet_v2.tf_in1kk", "detector.pretrained=none"))


# --- the decoded views -------------------------------------------------------------------

def test_a_split_decodes_to_exactly_its_images_as_tensors(ray_session, tiny_cfg):
    cfg = tiny_cfg("data.decode_batch_size=4")  # small batches: many hold no test image
    build(cfg.workdir, 60, 32)
    sel = data.select(cfg)
    blocks = ray.get(data.dataset(cfg, sel, "test").to_arrow_refs())
    rows = [row for b in blocks for row in b.select(["sha1", "label"]).to_pylist()]
    assert sorted((r["sha1"], r["label"]) for r in rows) == sorted(
        (h, label) for label in (0, 1) for h in sel.hashes["test"][label])
    types = {str(b.schema.field("pixels").type) for b in blocks}
    assert types == {"ArrowTensorTypeV2(shape=(32, 32, 3), dtype=uint8)"}, types


def test_training_images_are_recompressed_and_blurred_and_validation_left_clean(ray_session, tiny_cfg):
    """The augmentation every preset but `tiny` trains with: each training image
    re-encoded and blurred (here always), validation, which picks the threshold, as stored."""
    build(tiny_cfg().workdir, 60, 32)
    sel = data.select(tiny_cfg())

    def pixels(view) -> list[bytes]:
        return sorted(row["pixels"].tobytes() for row in view.take_all())

    clean = data.training_views(tiny_cfg(), sel)
    augmented = data.training_views(tiny_cfg("detector.jpeg_aug_prob=1.0", "detector.blur_aug_prob=1.0"), sel)
    before, after = pixels(clean["train"]), pixels(augmented["train"])
    assert len(after) == len(before) > 0 and {len(b) for b in after} == {32 * 32 * 3}
    assert len(set(after) & set(before)) <= len(before) // 10  # each image changed, but for a rare mild draw
    assert pixels(augmented["val"]) == pixels(clean["val"])
    # validation (which picks the threshold and the best epoch) is its own split, not training's
    assert len(pixels(clean["val"])) == sum(sel.counts["val"].values()) and not set(pixels(clean["val"])) & set(before)
    # a degraded image is stored again at the quality prepare stored at (the one serve
    # re-encodes uploads at), not at a data.jpeg_quality this command line set otherwise
    stored_at_70 = dataclasses.replace(sel, jpeg_quality=70)
    at_40 = data.training_views(tiny_cfg("detector.jpeg_aug_prob=1.0", "detector.jpeg_aug_quality=[40,40]",
                                         "detector.blur_aug_prob=0", "data.jpeg_quality=95"), stored_at_70)
    def as_trained(clean: bytes) -> bytes:  # at 40 then stored at 70
        at_40 = data.jpeg(np.frombuffer(clean, np.uint8).reshape(32, 32, 3), 40)
        return decode.decode_jpeg(decode.encode_jpeg(at_40, 70)).tobytes()

    expected = sorted(map(as_trained, before))
    assert pixels(at_40["train"]) == expected



def test_datasets_made_in_order_keep_their_blocks_in_order_however_tasks_finish(ray_session):
    """The first block's task sleeps 2 s, the others not: it finishes last. Made
    in_order(True), a dataset keeps the blocks' order (then the read, the one-off shuffle
    and the split are a rerun's), though it runs after the `with`; this process's own
    setting is left as it was."""
    import time

    from ray.data import DataContext

    def first_late(batch: dict) -> dict:
        time.sleep(2.0 if int(batch["id"][0]) == 0 else 0.0)
        return batch

    def ids(ordered: bool) -> list[int]:
        with datasets.in_order(ordered):
            ds = ray.data.range(40, override_num_blocks=4).map_batches(first_late, batch_size=None)
        return [int(i) for i in ds.materialize().to_pandas()["id"]]

    setting = DataContext.get_current().execution_options.preserve_order
    assert ids(True) == list(range(40))
    assert ids(False) != list(range(40))  # the test can see an order lost
    assert DataContext.get_current().execution_options.preserve_order == setting


@pytest.mark.parametrize("as_jpegs", [False, True])
def test_with_deterministic_a_rerun_draws_the_same_augmented_batches_each_epoch(
        ray_session, tiny_cfg, monkeypatch, as_jpegs):
    """deterministic=true: the same images in the same order with the same blur and JPEG
    draws, epoch by epoch, for views made anew over the same stages (a rerun); each epoch
    draws afresh. Decoded once, or kept as JPEGs and decoded as each epoch reads them."""
    build(tiny_cfg().workdir, 60, 32)
    sel = data.select(tiny_cfg())
    cfg = tiny_cfg("deterministic=true", "detector.jpeg_aug_prob=0.5", "detector.blur_aug_prob=0.5")
    if as_jpegs:
        monkeypatch.setattr(datasets, "DECODED_SHARE", 0.0)  # an object store too small for them

    def epochs(view) -> list[tuple[bytes, ...]]:
        return [tuple(row["pixels"].tobytes() for row in view.take_all()) for _ in range(2)]

    first = epochs(data.training_views(cfg, sel)["train"])
    assert first == epochs(data.training_views(cfg, sel)["train"])
    assert set(first[0]) != set(first[1])  # other draws, not only another order
    clean = {row["pixels"].tobytes() for row in data.training_views(tiny_cfg(), sel)["train"].take_all()}
    assert 0 < len(set(first[0]) & clean) < len(clean)  # each kind drawn at half: some images untouched


def test_training_images_too_many_for_the_object_store_are_kept_as_jpegs_and_read_alike(
        ray_session, tiny_cfg, monkeypatch, capsys):
    """1M reals and their fakes, decoded, take ~88 GB of the object store for the whole
    training: kept as the stored JPEGs then, decoded as each epoch reads them, into the
    very pixels (and labels) the decoded views hold, augmented alike."""
    build(tiny_cfg().workdir, 60, 32)
    sel = data.select(tiny_cfg())

    def rows(view) -> list:
        assert set(view.schema().names) == {"pixels", "label"}
        return sorted((row["label"], row["pixels"].tobytes()) for row in view.take_all())

    at_40 = ("detector.jpeg_aug_prob=1.0", "detector.jpeg_aug_quality=[40,40]", "detector.blur_aug_prob=0")
    decoded = [data.training_views(tiny_cfg(*aug), sel) for aug in ((), at_40)]
    assert "decoded would take" not in capsys.readouterr().out
    monkeypatch.setattr(datasets, "DECODED_SHARE", 0.0)  # an object store too small for them
    kept = [data.training_views(tiny_cfg(*aug), sel) for aug in ((), at_40)]
    images = sum(sel.counts[s]["real"] + sel.counts[s]["fake"] for s in ("train", "val"))
    assert (f"train-detector: {images:,} images decoded would take 0.0 GB of the cluster's "
            in capsys.readouterr().out)
    for views, expected in zip(kept, decoded):
        assert rows(views["train"]) == rows(expected["train"]) and rows(views["val"]) == rows(expected["val"])

def test_training_batches_mix_the_classes_though_each_part_holds_one(ray_session, tiny_cfg):
    """Each stage's images part holds one class. Drawn as the trainer draws them (a local
    shuffle buffer of 16 batches over the blocks in random order), batches must not come
    out of one class: batch norm would learn from the batch's make-up."""
    cfg = tiny_cfg("detector.max_train_per_class=0", "detector.jpeg_aug_prob=0", "detector.blur_aug_prob=0")
    build(cfg.workdir, 800, 32)  # 640 train images of each class, one part each
    train = data.training_views(cfg, data.select(cfg))["train"]
    size = cfg.detector.batch_size
    shares = [batch["label"].mean() for batch in train.iter_batches(
        batch_size=size, local_shuffle_buffer_size=16 * size, batch_format="numpy") if len(batch["label"]) == size]
    assert len(shares) == 1280 // size
    lopsided = sum(share > 0.8 or share < 0.2 for share in shares)
    assert lopsided <= len(shares) // 10, shares  # by chance ~2% (1.7 of 80); one part a class: 26


def test_augmentation_applies_each_kind_at_its_own_probability():
    """Training's augmentation: blur alone, JPEG alone, each at its probability (1: every
    image, 0: none), the JPEG quality drawn from its range."""
    pixels = np.stack([sample.face(0, i, 32) for i in range(4)])
    batch = {"label": np.array([0, 1, 0, 1]), "pixels": pixels}

    def augmented(jpeg_prob, blur_prob):
        return data.augment_batch(batch, jpeg_prob=jpeg_prob, jpeg_quality=(40, 40), blur_prob=blur_prob,
                                  blur_sigma=(1.5, 1.5))["pixels"]

    assert (augmented(0.0, 0.0) == pixels).all()
    assert all((out == data.jpeg(img, 40)).all() for out, img in zip(augmented(1.0, 0.0), pixels))
    assert all((out == data.blur(img, 1.5)).all() for out, img in zip(augmented(0.0, 1.0), pixels))


def test_an_augmented_training_image_is_the_one_the_service_scores_for_that_upload():
    """The service encodes an upload not in the stored encoding as the stored images are
    before scoring it; training fed its degraded images without that last encoding, so the
    detector learnt on images unlike those it is shown."""
    pixels = np.stack([sample.face(0, i, 32) for i in range(4)])
    trained = data.augment_batch({"label": np.zeros(4), "pixels": pixels}, jpeg_prob=1.0, jpeg_quality=(40, 40),
                                 blur_prob=0.0, blur_sigma=(1.0, 1.0), stored_quality=95)["pixels"]
    for img, seen in zip(pixels, trained):
        upload = decode.open_image(encode(Image.fromarray(img), "JPEG", quality=40))  # the same image, degraded
        assert (seen == decode.as_stored(upload, 32, 95)).all()


# --- evaluate, without training --------------------------------------------------------

def test_evaluate_measures_the_test_split_alone_at_the_models_threshold_and_chooses_budgets_on_validation(
        ray_session, tiny_cfg, capsys):
    """A randomly initialised detector stands in for a trained one (the trained one is
    evaluated in tests/test_pipeline.py, a slow test). The test split is smaller than
    validation, so the counts tell which split was scored; each degraded condition is
    scored on its own degraded images; a model whose manifests changed is refused.
    Validation images are scored clean, for a threshold per false-positive budget."""
    from deepfake_ray.detector import evaluate
    from tests.detector_checks import assert_held_out_evaluation

    cfg = tiny_cfg()
    splits = ["train"] * 8 + ["val"] * 20 + ["test"] * 4
    write_stage(datasets.data_dir(cfg.workdir), [(sample.face(0, i, 32), s) for i, s in enumerate(splits)])
    write_stage(datasets.fakes_dir(cfg.workdir), [(checkerboard_face(1, i, 32), s) for i, s in enumerate(splits)])
    torch.manual_seed(0)
    net = detector.create("resnet10t", num_classes=2, pretrained="none")
    meta = {"arch": "resnet10t", "num_classes": 2, "class_names": ["real", "fake"], "resolution": 32,
            "input_size": 75, "preprocessing": detector.preprocessing(net), "threshold": 0.37,
            "jpeg_quality": 95, "metrics": {"epoch": 0, "val_auc": float("nan"), "val_threshold": 0.37},
            "fingerprints": {"real_manifest_sha1": "before", "fake_manifest_sha1": "before"}}
    model = train.model_dir(cfg.workdir)
    checkpoint.save_model(model, net.state_dict(), meta)
    storage.mark_complete(train.stage_dir(cfg.workdir), {"epochs": 1})
    history = [{"epoch": e, "train_acc": 0.5, "val_acc": 0.5, "train_loss": 0.7, "val_loss": 0.7} for e in (0, 1)]
    storage.write_json(storage.join(train.stage_dir(cfg.workdir), "history.json"), history)
    with pytest.raises(UsageError, match="manifest changed since the detector was trained"):
        evaluate.run(cfg)
    checkpoint.save_model(model, net.state_dict(), {**meta, "fingerprints": data.select(cfg, ("test",)).fingerprints})

    capsys.readouterr()
    summary = evaluate.run(cfg)
    # said before the scoring, which is silent for minutes at Celeb 100k's size in a job's log
    out = capsys.readouterr().out
    assert re.match(r"evaluate: scoring 8 held-out test images, clean and under 5 degradations, and 40 "
                    r"validation images \(clean: thresholds are chosen on them\), with model "
                    r"resnet10t@[0-9a-f]{12}\n", out)
    # what the figures measure, said beside them: a ROC-AUC near 1.0 read alone claims more
    assert "evaluate: these measure fakes of this run's own DCGAN only, not other generators'" in out
    metrics = assert_held_out_evaluation(cfg)
    assert metrics["n"] == summary["n"] == 8 and (metrics["n_real"], metrics["n_fake"]) == (4, 4)
    assert metrics["threshold"] == 0.37 and metrics["validation"] == {"epoch": 0, "val_auc": None,
                                                                      "val_threshold": 0.37}
    assert "(threshold 0.37 from validation; 95% intervals)" in out
    # every image's score, the test split's under each condition: metrics.json's accuracy from it
    table = pq.read_table(storage.join(evaluate.eval_dir(cfg.workdir), "scores.parquet"))
    # joined with the manifests as the README says (pyarrow joins only keys of one type), and
    # validation's missing degraded scores are null, as in score's tables (not NaN)
    manifest = pq.read_table(storage.join(cfg.workdir, "data", "manifest.parquet"))
    counted = table.to_pandas()
    assert table.join(manifest.select(["sha1", "path"]), "sha1", join_type="inner").num_rows == (
        counted["truth"] == "real").sum()
    assert table["p_fake_blur_1_0"].null_count == (counted["split"] == "val").sum()
    # names a SQL engine, Spark or BigQuery loads as they are: no dots
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in table.column_names), table.column_names
    scores = table.to_pandas()
    keys = list(zip(scores["split"], scores["sha1"]))
    assert keys == sorted(keys)  # one order, rerun after rerun (not the order scoring tasks ended)
    test, val = scores[scores["split"] == "test"], scores[scores["split"] == "val"]
    assert (len(test), len(val), (val["truth"] == "real").sum()) == (8, 40, 20)
    assert val["p_fake"].notna().all() and val["p_fake_blur_1_0"].isna().all()
    assert ((test["p_fake"] >= 0.37) == (test["truth"] == "fake")).mean() == pytest.approx(metrics["accuracy"])
    # a threshold per false-positive budget, from validation's 20 reals: 5% flags at most one
    budgets = storage.read_json(storage.join(evaluate.eval_dir(cfg.workdir), "thresholds.json"))
    five, one, tenth = budgets
    val_reals = val[val["truth"] == "real"]["p_fake"]
    assert (val_reals >= five["threshold"]).sum() <= 1 and five["validation_false_positive_rate"] <= 0.05
    assert (val_reals >= five["threshold"]).mean() == five["validation_false_positive_rate"]
    test_reals = test[test["truth"] == "real"]["p_fake"]
    assert (test_reals >= five["threshold"]).mean() == five["test_false_positive_rate"]
    assert (one["threshold"], one["note"]) == (None, "needs 100 validation reals or more")
    assert tenth["threshold"] is None and five["note"] is None
    assert len({frozenset(b) for b in budgets}) == 1  # every row has every key, for a table
    # each names the model it holds for, as metrics.json does
    assert {b["model"] for b in budgets} == {metrics["model"]}
    assert (f"5.0% of reals flagged: threshold {five['threshold']!r} -> held-out false-positive "
            f"rate {five['test_false_positive_rate']:.4f}") in out
    for name in ("metrics.json", "robustness.json", "thresholds.json"):  # valid JSON (no NaN), for jq and browsers
        json.loads(storage.read_text(storage.join(evaluate.eval_dir(cfg.workdir), name)),
                   parse_constant=lambda constant: pytest.fail(f"{name} holds {constant}"))
    robustness = storage.read_json(storage.join(evaluate.eval_dir(cfg.workdir), "robustness.json"))
    for condition in ("jpeg_q50", "downscale_0.5", "blur_1.0"):  # other images, other scores
        assert robustness[condition]["brier"] != robustness["clean"]["brier"], condition
    assert evaluate.run(cfg) == summary  # complete: not scored again
    assert summary["budget_thresholds"] == {"0.05": five["threshold"], "0.01": None, "0.001": None}
    # one made before the budgets is kept, and said to be
    marker = storage.join(evaluate.eval_dir(cfg.workdir), "_COMPLETE.json")
    storage.write_json(marker, {k: v for k, v in storage.read_json(marker).items() if k != "budget_thresholds"})
    capsys.readouterr()
    evaluate.run(cfg)
    assert "was made before thresholds per false-positive budget: --force evaluates again" in capsys.readouterr().out
    storage.write_json(marker, {k: v for k, v in summary.items() if k != "scores_columns"})  # the dots' time
    evaluate.run(cfg)
    assert "was made before eval/scores.parquet's column names lost their dots (p_fake_blur_1.0 is " \
        "p_fake_blur_1_0 now): --force evaluates again" in capsys.readouterr().out
    # a threshold set by hand in model.json makes another model, whose metrics these are not
    edited = {**storage.read_json(storage.join(model, "model.json")), "threshold": 0.6}
    storage.write_json(storage.join(model, "model.json"), edited)
    capsys.readouterr()
    again = evaluate.run(cfg)
    assert again["model"] == checkpoint.model_id(edited) != summary["model"]
    assert assert_held_out_evaluation(cfg)["threshold"] == 0.6
    assert "(threshold 0.6 set in model.json; validation chose 0.37; 95% intervals)" in capsys.readouterr().out


def test_each_robustness_condition_degrades_the_image_as_named():
    """eval/robustness.json's rows are named by what was done to the images: JPEG at that
    quality (the lower, the further from the original), half size and back, Gaussian blur."""
    img = sample.face(0, 0, 32)
    error = {name: np.abs(data.transform(img, name).astype(int) - img).mean()
             for name in ("clean", "jpeg_q95", "jpeg_q75", "jpeg_q50", "downscale_0.5", "blur_1.0", "blur_2.0")}
    assert error["clean"] == 0
    assert 0 < error["jpeg_q95"] < error["jpeg_q75"] < error["jpeg_q50"], error
    assert error["downscale_0.5"] > 0 and 0 < error["blur_1.0"] < error["blur_2.0"], error
    assert (data.transform(img, "jpeg_q50") == data.jpeg(img, 50)).all()


# --- the CLI without the model hub ----------------------------------------------------

def test_a_metric_json_keeps_as_null_is_said_as_n_a_not_a_traceback():
    """A ROC-AUC of a split of one class is NaN, written as null since the JSON files are
    strict: the lines that format it from a marker or model.json failed on None."""
    from deepfake_ray.detector import evaluate

    assert evaluate.STAGE.describe({"roc_auc": None}) == "test ROC-AUC n/a"
    assert evaluate.STAGE.describe({"roc_auc": 0.98765}) == "test ROC-AUC 0.9877"


def test_no_threshold_for_any_budget_is_one_line_saying_why():
    """Too few validation reals for every budget was four lines, one offering to set a
    threshold in model.json where there was none to set."""
    from deepfake_ray.detector import evaluate

    budgets = metrics.budget_thresholds(np.array([0] * 9 + [1] * 9), np.linspace(0, 1, 18),
                                        np.array([0, 1]), np.array([0.2, 0.9]))
    assert evaluate.budget_table(budgets, "runs/x/detector/model") == (
        "thresholds for a false-positive budget: none chosen on the validation split's 9 reals (5.0%: needs "
        "20 validation reals or more; 1.0%: needs 100 validation reals or more; 0.1%: needs 1,000 "
        "validation reals or more)")


def test_an_export_cut_short_leaves_no_metadata_that_would_vouch_for_it(tmp_path, monkeypatch):
    """best/ is rewritten whenever an epoch beats it. Killed after the new weights but
    before their model.json, it must not show the old epoch's metrics over the new
    weights: the resumed run would trust them and publish a model that fails its hash."""
    from deepfake_ray import checkpoint

    best = str(tmp_path / "best")
    checkpoint.save_model(best, {"w": torch.zeros(3)}, {"metrics": {"val_auc": 0.9}})
    assert loop.best_so_far(str(tmp_path)) == {"val_auc": 0.9}

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "write_json", killed)  # the process dies before model.json
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(best, {"w": torch.ones(3)}, {"metrics": {"val_auc": 0.8}})
    monkeypatch.undo()
    assert loop.best_so_far(str(tmp_path)) is None  # nothing vouched for: the next epoch exports

    checkpoint.save_model(best, {"w": torch.ones(3)}, {"metrics": {"val_auc": 0.8}})
    monkeypatch.setattr(storage, "read_bytes", lambda uri: (_ for _ in ()).throw(
        OSError("AWS Error SLOW_DOWN: Please reduce your request rate")))  # S3, throttling
    with pytest.raises(OSError, match="SLOW_DOWN"):  # the worker fails and is retried: no
        loop.best_so_far(str(tmp_path))            # epoch overwrites a best it could not read


def test_a_resumed_run_puts_back_the_best_from_its_checkpoint_or_says_it_cannot(tiny_cfg, monkeypatch):
    """best/ and history.json hold a lost epoch 3 (exported, then no checkpoint). On resume
    the best restored epoch (1 of 2) is exported again from its kept checkpoint, and
    history.json lists the restored epochs; without an intact checkpoint best/ is kept, said so.
    (The case where the best is the epoch just restored runs in tests/test_pipeline.py.)"""
    from deepfake_ray import checkpoint, training
    from deepfake_ray.detector import loop

    cfg = tiny_cfg()
    out = storage.join(cfg.workdir, "detector")
    run = {"out_dir": out, "resolution": 32, "jpeg_quality": 95, "lr": 1e-4, "fingerprints": {},
           "counts": {}, "parameters": 1}

    def epoch(n: int, auc: float) -> dict:
        return {"epoch": n, "train_loss": 0.5, "val_loss": 1 - auc, "val_auc": auc, "val_threshold": 0.5}

    history, lost = [epoch(0, 0.9), epoch(1, 0.8)], epoch(2, 0.95)
    said = []
    monkeypatch.setattr(training, "say", said.append)
    for kept, weights in ((False, 2.0), (True, 0.0)):
        loop.export(out, {"w": torch.full((1,), 2.0)}, lost, cfg, run, {})
        storage.write_json(storage.join(out, "history.json"), [*history, lost])
        monkeypatch.setattr(training, "state_at_epoch", lambda e: (
            {"model": {"w": torch.full((1,), float(e))}} if kept else None))
        best = loop.restore_best(run, cfg, None, history, {})
        state, meta = checkpoint.load_model(storage.join(out, "best"))
        assert float(state["w"]) == weights and meta["epoch"] == best["epoch"] == (0 if kept else 2)
        assert storage.read_json(storage.join(out, "history.json")) == history
    assert said == ["[deepfake-ray] detector: no intact checkpoint of best epoch 1; best/ keeps what it holds",
                    "[deepfake-ray] detector: best/ held epoch 3, which no checkpoint vouches for; "
                    "exported the best checkpointed epoch, 1, again"]


def test_local_weights_reach_a_clusters_workers_as_they_are_now(s3_server, tmp_path, monkeypatch):
    """On a cluster the workers cannot read the driver's disk, so a local weights file is
    copied into the S3 work directory. Rewritten, or replaced by another file of that name
    (weights of one architecture are all one size), it is copied anew, not taken for the
    old copy."""
    from deepfake_ray import config, runtime

    monkeypatch.setattr(runtime, "on_cluster", lambda: True)  # a cluster's driver
    import timm
    from safetensors.torch import save

    weights = tmp_path / "weights.safetensors"
    versions = []
    for seed in (0, 1):  # two trainings of one small architecture: same size, other bytes
        torch.manual_seed(seed)
        versions.append(save(timm.create_model("test_resnet", num_classes=10).state_dict()))
    # a local work directory on a cluster is one every node shares: the weights beside it
    # on the driver's disk were "no such file" in the workers on the GPU nodes
    for workdir in (f"{s3_server('pretrained-copies')}/runs/r1", str(tmp_path / "shared" / "r1")):
        loaded = []
        for content in (versions[0], versions[1], versions[0]):
            weights.write_bytes(content)
            cfg = config.build("tiny", None, [f"detector.pretrained={weights}", "detector.arch=test_resnet"],
                               workdir=workdir)
            uri = train.resolve_pretrained(cfg)
            assert uri.startswith(f"{workdir}/detector/pretrained/weights-") and uri.endswith(".safetensors")
            loaded.append(storage.read_bytes(uri))
        assert loaded == [versions[0], versions[1], versions[0]]
    inside = tmp_path / "shared" / "r1" / "mine.safetensors"  # already where every node reads
    inside.write_bytes(versions[0])
    cfg = config.build("tiny", None, [f"detector.pretrained={inside}", "detector.arch=test_resnet"],
                       workdir=str(tmp_path / "shared" / "r1"))
    assert train.resolve_pretrained(cfg) == str(inside)


def test_a_pretrained_file_named_from_the_users_folder_reaches_the_workers_by_its_whole_path(tmp_path, monkeypatch):
    """Ray Train runs its workers in folders of their own: weights named relative to the
    user's folder (or by `~`) passed the driver's checks and were no file there. The run
    records a relative name as the whole path (config.yaml, its marker: a rerun from
    elsewhere reads them), and hands its workers whole paths."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), "weights.safetensors")
    whole = str(tmp_path / "weights.safetensors")
    for given, recorded in (("weights.safetensors", whole), ("~/weights.safetensors", "~/weights.safetensors")):
        cfg = cli.build_config(cli.parse(["train-detector", "--preset", "tiny", "--workdir", "w", "--set",
                                          f"detector.pretrained={given}", "--set", "detector.arch=test_resnet"]))
        assert cfg.detector.pretrained == recorded
        assert train.resolve_pretrained(cfg) == whole  # what the workers open


def test_weights_that_do_not_fit_exit_2_from_the_driver_without_retries(ray_session, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    workdir = str(tmp_path / "work")
    build(workdir, 20, 32)
    weights = str(tmp_path / "resnet.safetensors")
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    code = cli.main(["train-detector", "--preset", "tiny", "--workdir", workdir,
                     "--set", f"detector.pretrained={weights}"])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"deepfake-ray train-detector: error: weights from {weights} do not fit "
                             "inception_resnet_v2:") and "pass a state dict of that architecture" in err[0]
    assert not storage.exists(os.path.join(workdir, "detector", "run"))  # no Train run was started


def test_a_folder_or_a_damaged_safetensors_file_as_pretrained_exits_2_with_one_line(ray_session, tmp_path, capsys):
    workdir = str(tmp_path / "work")
    build(workdir, 20, 32)
    folder, damaged = tmp_path / "model", tmp_path / "cut.safetensors"
    folder.mkdir()
    damaged.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\": \"F32\"")  # cut short
    for spec, says in [(folder, f"is a folder: pass a weights file (safetensors or state dict); of a "
                                f"model folder, {folder}/weights.safetensors"),
                       (damaged, "is not a readable safetensors file (")]:
        code = cli.main(["train-detector", "--preset", "tiny", "--workdir", workdir,
                         "--set", f"detector.pretrained={spec}"])
        err = error_lines(capsys)
        assert code == 2 and len(err) == 1 and f"detector.pretrained={spec} {says}" in err[0], err
    assert not storage.exists(os.path.join(workdir, "detector", "run"))  # no Train run was started


def test_an_unreadable_pretrained_file_is_refused_before_the_pipeline_trains_anything(tmp_path, capsys):
    """Checked only for being there: a socket or a pipe (or a teammate's file of mode 600)
    was first read when train-detector started, after the GAN had trained, and was a
    traceback. (A socket: a pipe's open would hang, should the check ever regress.)"""
    import socket

    from deepfake_ray.models import detector

    pipe = str(tmp_path / "weights.safetensors")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(pipe)
    workdir = str(tmp_path / "work")
    code = cli.main(["pipeline", "--preset", "tiny", "--workdir", workdir, "--set", f"detector.pretrained={pipe}"])
    assert code == 2 and error_lines(capsys) == [
        f"deepfake-ray pipeline: error: detector.pretrained={pipe} is not a regular file: pass a weights file"]
    assert not os.path.exists(os.path.join(workdir, "data"))
    with pytest.raises(UsageError, match=rf"detector.pretrained={pipe}: cannot read it \("):
        detector.read_weights(pipe)  # what a worker reads, should the file change after the check
    listening.close()


def test_pretrained_hub_without_network_exits_2_with_the_fix(ray_session, tmp_path):
    workdir = str(tmp_path / "work")
    build(workdir, 20, 32)
    # the hub boundary: offline, with an empty cache; the CLI joins this session's Ray
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "deepfake_ray.cli", "train-detector", "--preset", "tiny",
         "--workdir", workdir, "--set", "detector.pretrained=hub"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "ray: in-process" not in done.stdout  # RAY_ADDRESS's cluster joined, as --address's
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("deepfake-ray train-detector: error: cannot download "
                           "inception_resnet_v2.tf_in1k from the model hub (")
    assert last.endswith("pass a local or s3:// weights file with --set detector.pretrained=PATH")
    assert not storage.exists(os.path.join(workdir, "detector", "_COMPLETE.json"))


# --- Ray Train, export, reload, evaluate; Ray Tune ---------------------------------------

def test_a_sweep_whose_every_trial_diverged_says_to_lower_the_rates(tiny_cfg):
    """Scores that are not finite at every rate: no trial is published as the detector."""
    from types import SimpleNamespace

    cfg = tiny_cfg()
    results = []
    for trial_id, lr in (("t0", 0.5), ("t1", 0.9)):
        out = tune.trial_dir(cfg.workdir, trial_id)
        nan = float("nan")
        checkpoint.save_model(storage.join(out, "best"), {}, {
            "lr": lr, "epoch": 0, "threshold": 0.5, "metrics": {"val_auc": nan, "val_loss": nan, "val_acc": 0.0}})
        storage.write_json(storage.join(out, "history.json"), [{"epoch": 0}])
        results.append(SimpleNamespace(metrics={"trial_id": trial_id}, error=None, path=out, config={"lr": lr}))
    with pytest.raises(UsageError, match=r"rates 5.00e-01..9.00e-01: they diverged; sweep lower ones, e.g. "
                                         r"`deepfake-ray tune --force --set tune.lr_max=0.0001`"):
        tune.collect(cfg, results)


def test_a_sweep_publishes_its_trial_of_the_highest_roc_auc_one_that_failed_only_if_none_finished(tiny_cfg):
    """The best trial (results.csv's first row, the model published as detector/) is the one
    of the highest validation ROC-AUC among the trials that finished: one that ended in an
    error stopped short, whatever its score so far."""
    from types import SimpleNamespace

    cfg = tiny_cfg("tune.epochs=3")
    results = []
    for trial_id, lr, auc, error in (("t0", 1e-4, 0.7, None), ("t1", 3e-4, 0.9, None),
                                     ("t2", 5e-4, 0.95, "RayTaskError: a worker died")):
        out = tune.trial_dir(cfg.workdir, trial_id)
        checkpoint.save_model(storage.join(out, "best"), {}, {
            "lr": lr, "epoch": 0, "threshold": 0.5, "metrics": {"val_auc": auc, "val_loss": 0.3, "val_acc": 0.8}})
        # t0 diverged in its second epoch and stopped there: not ASHA's stop
        storage.write_json(storage.join(out, "history.json"), [{"epoch": 0, "train_loss": 0.6}] + (
            [{"epoch": 1, "train_loss": float("nan")}] if trial_id == "t0" else []))
        results.append(SimpleNamespace(metrics={"trial_id": trial_id}, error=error, path=out, config={"lr": lr}))
    rows = tune.collect(cfg, results)
    assert list(rows["trial_id"]) == ["t1", "t0", "t2"] and list(rows["status"]) == ["ok", "ok", "error"]
    assert list(rows["stopped_early"]) == [True, False, False]  # of 3 epochs
    assert rows["diverged_at"].tolist()[1] == 2 and rows["diverged_at"].isna().tolist() == [True, False, True]
    with open(os.path.join(tune.tune_dir(cfg.workdir), "results.csv")) as f:
        written = list(csv.DictReader(f))
    assert [r["trial_id"] for r in written] == ["t1", "t0", "t2"]
    # counts as whole numbers, also in a column with gaps ("2", not "2.0")
    assert [(r["diverged_at"], r["best_epoch"], r["epochs_run"]) for r in written] == [
        ("", "1", "1"), ("2", "1", "2"), ("", "1", "1")]


def test_a_training_that_diverged_publishes_no_detector(tiny_cfg):
    """Its NaN scores would be reported as "real" by score and serve."""
    cfg = tiny_cfg()
    run = storage.join(cfg.workdir, "detector")
    nan = float("nan")
    checkpoint.save_model(storage.join(run, "best"), {}, {
        "lr": 0.5, "epoch": 1, "threshold": 0.5, "metrics": {"val_auc": nan, "val_loss": nan, "val_acc": 0.5}})
    storage.write_json(storage.join(run, "history.json"), [{"epoch": 0}, {"epoch": 1}])
    with pytest.raises(UsageError, match=r"training diverged at detector.lr=0.5: .* --force --set detector.lr=0.05"):
        train.publish(cfg, run, 1.0, {})
    assert not storage.exists(storage.join(run, "model")) and storage.completed(run) is None


def test_a_retrained_detector_says_it_replaced_a_threshold_set_by_hand(tiny_cfg, capsys):
    """A threshold set in model.json for a false-positive budget was overwritten by the next
    train-detector (more epochs, a sweep, new data) without a word: the service then flagged
    reals at another rate."""
    cfg = tiny_cfg()
    run = storage.join(cfg.workdir, "detector")
    good = {"epoch": 0, "train_loss": 0.6, "val_auc": 0.8, "val_loss": 0.5, "val_acc": 0.7, "val_threshold": 0.42}
    checkpoint.save_model(storage.join(run, "best"), {}, {"lr": 0.01, "epoch": 0, "threshold": 0.42, "metrics": good})
    storage.write_json(storage.join(run, "history.json"), [good])
    train.publish(cfg, run, 1.0, {})  # validation's own threshold: nothing to say
    assert "set by hand" not in capsys.readouterr().out
    model = storage.join(train.model_dir(cfg.workdir), "model.json")
    storage.write_json(model, {**storage.read_json(model), "threshold": 0.871})  # a 1% budget's
    train.publish(cfg, run, 1.0, {})
    assert ("note: the new model's threshold is 0.42, chosen on validation; the one set by hand in the model it "
            "replaced, 0.871, is gone: pick again from eval/thresholds.json") in capsys.readouterr().out


def test_a_training_that_diverged_after_a_good_epoch_publishes_that_epoch_and_says_so(tiny_cfg, capsys):
    """The loop stops at the first epoch whose training loss is NaN (AdamW keeps NaN
    weights NaN: each epoch left was wasted compute); the best epoch before it is published,
    with a warning that names both epochs, as the run asked for more."""
    cfg = tiny_cfg()
    run = storage.join(cfg.workdir, "detector")
    good = {"epoch": 0, "train_loss": 0.6, "val_auc": 0.8, "val_loss": 0.5, "val_acc": 0.7}
    checkpoint.save_model(storage.join(run, "best"), {}, {
        "lr": 0.01, "epoch": 0, "threshold": 0.5, "metrics": good})
    storage.write_json(storage.join(run, "history.json"), [good, {**good, "epoch": 1, "train_loss": float("nan")}])
    assert metrics.diverged({"train_loss": float("nan")}) and not metrics.diverged(good)
    train.publish(cfg, run, 1.0, {})
    out = capsys.readouterr().err  # with the errors, as every warning
    assert ("train-detector: warning: training diverged at epoch 2 and stopped there; the model is epoch 1's, "
            "the best before it; to do better, train anew with a lower rate: deepfake-ray train-detector "
            "--force --set detector.lr=0.001") in out
    assert storage.exists(storage.join(run, "model", checkpoint.META))
    history = storage.read_json(storage.join(run, "history.json"))  # a sweep's best trial: tune refuses detector.lr
    assert train.diverged_late(history, {"lr": 0.01, "epoch": 0}, tuned=True).endswith(
        "to do better, sweep lower rates: deepfake-ray tune --force --set tune.lr_min=1e-05 --set tune.lr_max=0.001")


def test_tune_sweeps_two_learning_rates_and_exports_the_best(ray_session, tiny_cfg, capsys, monkeypatch):
    overrides = [*FAST, "tune.samples=2", "tune.epochs=1", "tune.lr_min=1e-5", "tune.lr_max=1e-3",
                 "detector.arch=resnet10t",
                 "resources.use_gpu=true"]  # as the celeb100k preset: where there is none, on CPU
    cfg = tiny_cfg(*overrides)
    build(cfg.workdir, 60, 32, quality=90)  # the run's own data.jpeg_quality is 95
    ctrl_c = signal.getsignal(signal.SIGINT)
    result = tune.run(cfg)
    printed = capsys.readouterr().out
    # a line per trial epoch and per trial ended, with the metric judged on, not Tune's table
    assert len(re.findall(r"tune: trial \S+ \(lr \d\.\d\de-\d\d\) epoch 1/1  val ROC-AUC \d\.\d{4}; best so far",
                          printed)) == 2, printed
    assert sorted(re.findall(r"tune: trial \S+ \(lr [^)]+\) finished; (\d of 2) trials ended", printed)) == [
        "1 of 2", "2 of 2"]
    assert "Trial status" not in printed
    assert "tune: reading the images once for every trial (train: " in printed
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # no handler of Tune's left to swallow the next Ctrl-C
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ  # a notebook's own Tuner.fit() keeps Tune's
    if not torch.cuda.is_available():  # not left waiting, with Ray Train, for a GPU none can add
        assert "resources.use_gpu is true but this machine has no GPU: running on CPU" in printed
    out = tune.tune_dir(cfg.workdir)
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert [r["best_epoch"] for r in rows] == ["1", "1"]  # of one: counted from 1, as printed
    assert all(float(r["val_loss"]) > 0 for r in rows)
    lrs = [float(r["lr"]) for r in rows]  # those the run's seed draws: the same on a rerun
    assert sorted(lrs) == pytest.approx(sorted(tune.rates(cfg))) and all(1e-5 <= lr <= 1e-3 for lr in lrs)
    assert len(set(lrs)) == 2 and tune.rates(cfg) != tune.rates(tiny_cfg(*overrides, f"seed={cfg.seed + 1}"))
    assert storage.read_bytes(os.path.join(out, "lr.png"))[:4] == b"\x89PNG"
    best = storage.read_json(os.path.join(tune.trial_dir(cfg.workdir, rows[0]["trial_id"]), "history.json"))
    meta = assert_exported_model(cfg, best)  # the best trial's best epoch, reloadable
    assert meta["arch"] == "resnet10t"  # and timm's normalization for it, not the study net's
    assert meta["jpeg_quality"] == 90  # as its images were stored: served images are encoded so
    assert meta["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["lr"] == pytest.approx(float(rows[0]["lr"])) == pytest.approx(result["lr"])
    assert meta["config"]["detector"]["lr"] == pytest.approx(result["lr"])
    assert storage.completed(train.stage_dir(cfg.workdir))["tuned"] is True
    assert json.loads(storage.read_text(os.path.join(out, "_COMPLETE.json")))["trials"] == 2
    # the trials' checkpoints go once the model is published (nothing reads them again; the
    # rerun below publishes without them); each trial's best/ and history stay
    trials = [os.path.join(out, "trials", r["trial_id"]) for r in rows]
    assert all(os.path.isdir(os.path.join(t, "run")) and not any(
        n.startswith("epoch_") for n in os.listdir(os.path.join(t, "run"))) for t in trials)
    assert all(os.path.exists(os.path.join(t, "best", "model.json")) for t in trials)
    assert "tune: deleted the trials' 2 checkpoint folders" in printed

    # the detector is recorded as made: train-detector at another rate is refused, and at
    # the swept one more epochs cannot continue it (its run lies with the trials)
    train_detector = ["train-detector", "--preset", "tiny", "--workdir", cfg.workdir]
    train_detector += [a for kv in overrides for a in ("--set", kv)]
    assert cli.main(train_detector) == 2
    assert f"detector.lr={result['lr']} (asked: {cfg.detector.lr})" in error_lines(capsys)[0]
    longer = train_detector + ["--set", f"detector.lr={result['lr']!r}", "--set", "detector.epochs=2"]
    assert cli.main(longer) == 2
    err = error_lines(capsys)
    lr = f"{result['lr']:.2e}"
    assert len(err) == 1 and f"is the best trial of `deepfake-ray tune` (lr {lr}; the pipeline keeps it with " \
        f"--set tune.enabled=true), which cannot be trained further or remade with detector.epochs=1 (asked: " \
        f"2)" in err[0] and f"`deepfake-ray train-detector --workdir {cfg.workdir} --force --set detector.lr={lr}`" \
        in err[0], err
    # being remade by train-detector, the detector is no longer the sweep's: tune is not
    # complete (a pipeline with tune.enabled sweeps, or restores the sweep, again). Its
    # training is cut short as it starts: a whole run would add ~55 s to this test. The
    # model in use stays until its successor is published: a service scaling up, or a
    # score, found none for the whole training
    in_use = checkpoint.load_meta(train.model_dir(cfg.workdir))

    def interrupted(*_, **__):
        assert checkpoint.load_meta(train.model_dir(cfg.workdir)) == in_use
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fine_tune", interrupted)
    assert cli.main(train_detector + ["--force", "--set", f"detector.lr={result['lr']!r}"]) == 130
    assert storage.completed(train.stage_dir(cfg.workdir)) is None and storage.completed(out) is None
    monkeypatch.undo()  # rerun, the sweep is restored, not retrained, and its best published again
    capsys.readouterr()
    assert tune.run(cfg)["lr"] == result["lr"]
    assert "has finished: publishing its best trial as detector/model (--force sweeps anew)" in capsys.readouterr().out
    assert storage.completed(train.stage_dir(cfg.workdir))["tuned"] is True


def test_sigterm_during_training_is_a_stop_with_exit_143(ray_session, tiny_cfg, capsys, monkeypatch):
    """`ray job stop`, `timeout` or a container's stop while a training runs: Ray's wait
    on the run answers the exception our SIGTERM handler raises with a KeyboardInterrupt
    of its own, so the command said "interrupted" and exited 130, as for a Ctrl-C."""
    cfg = tiny_cfg(*FAST)
    build(cfg.workdir, 60, 32)
    monkeypatch.setattr(train, "worker_loop", signal_driver_once(signal.SIGTERM, os.path.join(cfg.workdir, "sent")))
    sets = [a for kv in FAST for a in ("--set", kv)]
    assert cli.main(["train-detector", "--preset", "tiny", "--workdir", cfg.workdir, *sets]) == 143
    assert error_lines(capsys) == ["deepfake-ray train-detector: stopped (SIGTERM); run the same command "
                                   "again: finished stages are skipped and a training resumes from its "
                                   "last checkpoint"]
    assert storage.completed(train.stage_dir(cfg.workdir)) is None


def test_a_sweep_runs_where_train_detector_just_fits_its_trials_taking_no_cpu(ray_session, tiny_cfg, capsys):
    """On the in-process Ray a trial takes no CPU. Holding a tenth of one beside its
    workers, where workers and a Ray Data task just fit (as train-detector's own advice
    makes them), its per-epoch data tasks found none free and the sweep waited forever; it
    then was refused. It now sweeps, at the seed's rate. The detector it replaces had a
    threshold set by hand: said (the sweep removed that model before publishing its own)."""
    cpus = ray.cluster_resources()["CPU"]
    cfg = tiny_cfg(*FAST, "tune.samples=1", "tune.epochs=1", "detector.arch=resnet10t",
                   f"resources.cpus_per_worker={cpus - 1:g}", "resources.data_cpus=1")
    build(cfg.workdir, 60, 32)
    checkpoint.save_model(train.model_dir(cfg.workdir), {}, {"threshold": 0.871, "metrics": {"val_threshold": 0.5}})
    assert tune.concurrency(cfg) == 1
    assert tune.run(cfg)["lr"] == pytest.approx(tune.rates(cfg)[0])
    assert "the one set by hand in the model it replaced, 0.871, is gone" in capsys.readouterr().out


def test_a_detector_trained_on_two_workers_validates_on_the_whole_split_and_retrains_alike_though_one_is_lost(
        ray_session, tiny_cfg, capsys):
    """Users train on 4-16 GPU workers, the other tests on one: the paths only several take
    (each worker's validation scores gathered, the model wrapped anew as its backbone
    unfreezes) ran nowhere. Its validation ROC-AUC is the whole split's, not one worker's
    half's: the exported model scores the split to the same figure. With deterministic=true
    a retrain gives the same weights: which worker gets which blocks, in what order, with
    which augmentation draws and flips, are the first run's (on CPU), though a worker is
    lost and the run resumes after its last checkpoint (a resumed epoch drew the first
    epoch's block order and augmentations, and the second rank other flips). (The default
    split, by locality and as blocks finish, feeds two workers in the GAN's tests.)"""
    from deepfake_ray.detector import train as detector_train

    overrides = (*FAST, "detector.arch=resnet10t", "resources.workers=2", "detector.epochs=2",
                 "detector.freeze_backbone_epochs=1", "deterministic=true", "detector.jpeg_aug_prob=0.5",
                 "detector.blur_aug_prob=0.5")
    cfg = tiny_cfg(*overrides)
    build(cfg.workdir, 60, 32)  # validation: 6 reals and 6 fakes, 6 for each worker
    detector_train.run(cfg)
    said = "2 workers x batch 16 (32 a step), input 75 px, pretrained=none, deterministic\n"
    assert said in capsys.readouterr().out
    history = storage.read_json(os.path.join(cfg.workdir, "detector", "history.json"))
    assert [(h["epoch"], h["workers"]) for h in history] == [(0, 2), (1, 2)]
    meta = assert_exported_model(cfg, history)
    state, _ = checkpoint.load_model(train.model_dir(cfg.workdir))
    model = detector.from_meta(meta, state)
    rows = data.dataset(cfg, data.select(cfg, ("val",), trained=False), "val").take_all()
    assert len(rows) == 12
    pixels, labels = np.stack([r["pixels"] for r in rows]), np.array([r["label"] for r in rows])
    scored = detector.p_fake(detector.predict(model, detector.meta_input(pixels, meta)))
    assert meta["metrics"]["val_auc"] == pytest.approx(metrics.roc_auc(labels, scored), abs=1e-9)
    # the last rank exits at the end of the last epoch, before its checkpoint: Ray Train
    # starts the workers again, resumed after the first epoch, which they train again
    detector_train.run(tiny_cfg(*overrides, "detector.fail_at_epoch=1", "detector.max_failures=1"), force=True)
    again = storage.read_json(os.path.join(cfg.workdir, "detector", "history.json"))
    assert [h["restored"] for h in again] == [False, True]
    assert [(h["train_loss"], h["val_loss"]) for h in again] == [(h["train_loss"], h["val_loss"]) for h in history]
    assert checkpoint.load_meta(train.model_dir(cfg.workdir))["weights_sha256"] == meta["weights_sha256"]


def test_a_sweep_asked_to_run_more_trials_at_once_than_fit_runs_what_fits_and_says_so(ray_session, tiny_cfg, capsys):
    """tune.max_concurrent_trials=2 where one trial's workers fill the CPUs: both trials'
    workers started, their per-epoch data tasks found no CPU, and the sweep waited forever
    with no line."""
    cpus = ray.cluster_resources()["CPU"]
    cfg = tiny_cfg("tune.samples=3", "tune.max_concurrent_trials=2",
                   f"resources.cpus_per_worker={cpus - 1:g}", "resources.data_cpus=1")
    assert tune.concurrency(cfg) == 1
    assert ("tune.max_concurrent_trials=2, but only 1 trial(s) fit this machine at once"
            in capsys.readouterr().out)
    roomy = tiny_cfg("tune.samples=3", "tune.max_concurrent_trials=2", "resources.cpus_per_worker=1",
                     "resources.data_cpus=1", "resources.workers=1")
    assert tune.concurrency(roomy) == min(2, cpus // 2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["ctrl-c", "sigusr1"])
def test_a_stop_during_a_sweep_is_an_interrupt_not_a_finished_sweep(ray_session, tiny_cfg, capsys, monkeypatch, sig):
    """Tune's own Ctrl-C handler, and its SIGUSR1 one (Slurm's warning before a time limit),
    ended the sweep and returned as if it had finished: its half-trained trials were
    published and the sweep marked complete (exit 0). It is an interrupt: exit 130, nothing
    published, the sweep left to resume, and the detector in use before this `tune
    --force` still in place."""
    from ray.tune import Tuner

    overrides = [*FAST, "tune.samples=1", "tune.epochs=1", "detector.arch=resnet10t"]
    cfg = tiny_cfg(*overrides)
    build(cfg.workdir, 60, 32)
    in_use = train.model_dir(cfg.workdir)
    checkpoint.save_model(in_use, {}, {"lr": 1e-4, "epoch": 0, "threshold": 0.5, "metrics": {}})
    storage.mark_complete(train.stage_dir(cfg.workdir), {"model": in_use})
    monkeypatch.setattr(tune, "trial", signal_driver_once(sig, os.path.join(cfg.workdir, "pressed")))
    args = ["tune", "--preset", "tiny", "--workdir", cfg.workdir, "--force"]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's, whatever ran before
    usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        assert cli.main(args + [a for kv in overrides for a in ("--set", kv)]) == (
            130 if sig == signal.SIGINT else 128 + sig)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the next stage's Ctrl-C
        assert signal.getsignal(signal.SIGUSR1) == usr1  # the command's handlers went with it
    finally:
        signal.signal(signal.SIGINT, previous)
    stopped = "interrupted" if sig == signal.SIGINT else "stopped (SIGUSR1)"
    assert f"{stopped}; run it again without --force" in capsys.readouterr().err
    out = tune.tune_dir(cfg.workdir)
    assert not os.path.exists(os.path.join(out, "results.csv"))
    assert storage.completed(out) is None
    assert storage.completed(train.stage_dir(cfg.workdir)) == {"model": in_use}
    assert checkpoint.load_meta(in_use)["lr"] == 1e-4
    assert Tuner.can_restore(os.path.join(cfg.workdir, "tune"))  # rerun: resumed
    tune.make_tuner(tiny_cfg(*overrides, "tune.max_concurrent_trials=2"), None, "", {})  # as a rerun would
    assert ("resuming the interrupted sweep in" in (said := capsys.readouterr().out)
            and "as many trials at once as when it began" in said)


def test_workers_flip_different_images_and_an_epoch_the_same_after_a_resume(monkeypatch):
    """Each GPU's generator starts from one default seed: unseeded, every worker would
    mirror the same positions of its batch. Seeded by rank and epoch they differ, each
    epoch flips others, and an epoch flips the same images whatever was drawn before it
    (the epochs before, or none in a run resumed at it)."""
    from deepfake_ray import training

    saved = torch.get_rng_state()
    batch = torch.arange(64 * 2, dtype=torch.float32).reshape(64, 1, 1, 2)

    def flips(rank: int, epoch: int) -> torch.Tensor:
        monkeypatch.setattr(training, "rank", lambda: rank)
        training.seed_epoch(5, epoch)
        return detector.random_hflip(batch)

    try:
        straight = flips(0, 3)
        torch.rand(1000)  # drawn before the epoch, as a run that did not resume at it did
        assert torch.equal(straight, flips(0, 3))
        assert not torch.equal(flips(0, 3), flips(1, 3)) and not torch.equal(flips(0, 3), flips(0, 4))
    finally:
        torch.set_rng_state(saved)


def test_a_detector_is_scored_on_a_gpu_in_the_precision_it_was_validated_in(monkeypatch):
    """detector.mixed_precision (off: fp32 trained faster on an H200) is the precision of
    training and validation, which chooses the threshold; evaluate and serving take it
    from the model, and models exported before the setting keep the bfloat16 they had."""
    from deepfake_ray import config
    from deepfake_ray.models import detector_autocast

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for preset in ("demo", "celeb100k"):
        assert detector_autocast({"config": config.to_dict(config.build(preset))}, gpu) is None
    mixed = {"config": config.to_dict(config.build("celeb100k", None, ["detector.mixed_precision=true"]))}
    assert detector_autocast(mixed, gpu) is torch.bfloat16
    assert detector_autocast({"config": {"detector": {}}}, gpu) is torch.bfloat16  # exported before it
    assert detector_autocast(mixed, cpu) is None


def test_every_figure_is_a_png_made_without_switching_a_notebooks_plotting_backend():
    """Importing the figures set matplotlib's backend to Agg for the whole process, so a
    notebook's inline plots stopped showing after `evaluate`; a figure whose drawing failed
    stayed in pyplot's registry."""
    script = """
import sys
import numpy as np
from deepfake_ray.detector import figures
from deepfake_ray.gan.figures import losses_png
labels = np.array([0, 1, 0, 1])
pngs = [figures.confusion([[3, 1], [0, 4]]),
        figures.roc(labels, {"clean": np.array([.1, .9, .2, .8])}, {"clean": 1.0}),
        figures.reliability([{"mean_p_fake": 0.2, "fraction_fake": 0.0, "n": 2}], 0.1),
        figures.curves([{"epoch": 0, "train_acc": .5, "val_acc": .6, "train_loss": .7, "val_loss": .6}]),
        figures.lr_sweep([1e-4, 1e-3], [0.8, 0.9], best_lr=1e-3),
        losses_png([1.0, 0.9], [0.7, 0.6], [0])]
assert all(p.startswith(b"\\x89PNG\\r\\n\\x1a\\n") for p in pngs)
print("pyplot" in " ".join(sys.modules), __import__("os").environ["MPLBACKEND"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "svg"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "svg"]
