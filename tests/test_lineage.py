"""Which stages a run keeps, continues or makes anew, from the markers in a work directory
(written by the same calls the stages make when they complete; no stage runs here)."""
from __future__ import annotations

import pytest

from deepfake_ray import config, lineage, pipeline
from deepfake_ray.data import prepare
from deepfake_ray.detector import evaluate, train as detector_train
from deepfake_ray.errors import UsageError
from deepfake_ray.gan import generate, train as gan_train

STAGES = (prepare.STAGE, gan_train.STAGE, generate.STAGE, detector_train.STAGE, evaluate.STAGE)


def completed_run(workdir: str):
    """A work directory whose every stage completed with the tiny preset's settings."""
    cfg = config.build("tiny", workdir=workdir)
    for stage in STAGES:
        lineage.complete(cfg, stage, {}, lineage.made(cfg, stage))
    return cfg


def test_a_stage_whose_input_was_remade_is_made_anew_with_any_settings(tmp_path):
    """Its old output is thrown away anyway: other settings for it protect nothing."""
    made = completed_run(str(tmp_path))
    other = config.build("tiny", None, ["detector.jpeg_aug_prob=0.5"], workdir=made.workdir)
    with pytest.raises(UsageError, match=r"detector.jpeg_aug_prob=0.0 \(asked: 0.5\)"):
        lineage.current(other, detector_train.STAGE)  # it would be kept: refused
    lineage.complete(made, generate.STAGE, {}, lineage.made(made, generate.STAGE))  # fakes made again
    assert lineage.current(other, detector_train.STAGE) is None  # to be made anew: fine


def test_a_pipeline_that_continues_the_gan_takes_new_settings_for_the_stages_after_it(tmp_path):
    """More GAN epochs remake the fakes, so the detector is made anew: `pipeline --set
    gan.epochs=N --set detector.X=...` was refused, leaving only --force (all from scratch)."""
    made = completed_run(str(tmp_path))
    more = config.build("tiny", None, [f"gan.epochs={made.gan.epochs + 2}", "detector.jpeg_aug_prob=0.5"],
                        workdir=made.workdir)
    pipeline.preflight(more)  # no UsageError
    alone = config.build("tiny", None, ["detector.jpeg_aug_prob=0.5"], workdir=made.workdir)
    with pytest.raises(UsageError, match=r"detector.jpeg_aug_prob=0.0 \(asked: 0.5\)"):
        pipeline.preflight(alone)  # nothing before it changes: the detector would be kept
