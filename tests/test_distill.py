"""The distilled student (flowcore/distill.py): it learns its teacher's window grid, plugs into
the Scorer unchanged, and its bundle records the teacher and refuses malformed metadata."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SPEC, texture

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.distill import (
    DistilledConfig,
    DistilledFeaturizer,
    distill,
    spearman,
    teacher_record,
    weights_sha256,
)
from flowcore.flops import flops_per_image
from flowcore.synthetic import auroc
from flowcore.windows import to_tensor

OLD_BUNDLE = Path(__file__).parent / "data" / "bundle-format1-windows"
TOY = DistilledConfig(
    channels=16, depth=1, epochs=40, lr=5e-3, batch=4, patience=10, synthetic_copies=2
)


@pytest.fixture(scope="module")
def student(small_scorer):
    """A student of the session's small window scorer, trained in a few seconds (one torch
    thread: steps this small run 10-30x slower on two threads of a busy machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scorer, report = distill(
            small_scorer,
            texture(12, 48, 64, 1),
            texture(4, 48, 64, 2),
            TOY,
            teacher_info=teacher_record(small_scorer, uri="models:/toy/3", name="toy", version="3"),
        )
    finally:
        torch.set_num_threads(threads)
    return scorer, report


def test_spearman_matches_the_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_student_grid_has_the_teachers_shape(small_scorer):
    cfg = DistilledConfig(window=8, stride=4, scale=1.0, channels=4)
    feat = DistilledFeaturizer(cfg)
    for h, w in ((48, 64), (49, 67), (8, 8), (100, 30)):
        x = torch.rand(2, 3, h, w)
        feats, grid = feat.featurize(x)
        want = tuple(small_scorer.log_likelihood_grid(np.zeros((1, h, w, 3), np.uint8)).shape[1:])
        assert tuple(grid.shape) == (2, *want) and feats.shape[1] == cfg.features
    for stride, window, scale in ((3, 11, 1.0), (6, 20, 0.5), (1, 5, 1.0)):
        feat = DistilledFeaturizer(DistilledConfig(window=window, stride=stride, scale=scale))
        assert feat.featurize(torch.rand(1, 3, 61, 83))[1].shape[1:] == feat.grid_shape(61, 83)


def test_student_matches_its_teacher_on_held_out_images(small_scorer, student):
    scorer, report = student
    assert report.best_epoch >= 1 and math.isfinite(report.best_val_loss)
    test = texture(10, 48, 64, 3)
    t = small_scorer.log_likelihood_grid(np.stack(test)).numpy()
    s = scorer.log_likelihood_grid(np.stack(test)).numpy()
    assert s.shape == t.shape
    # the student explains most of the teacher's window-level variance on unseen images
    mse = float(((s - t) ** 2).mean())
    assert mse < 0.5 * float(t.var()), (mse, float(t.var()))
    assert spearman(s.ravel(), t.ravel()) > 0.7
    # an untrained student of the same shape does not
    raw = DistilledFeaturizer(scorer.featurizer.cfg)
    raw.target_mean.copy_(scorer.featurizer.target_mean)
    raw.target_std.copy_(scorer.featurizer.target_std)
    with torch.no_grad():
        r = raw.featurize(torch.as_tensor(np.stack(test)).permute(0, 3, 1, 2) / 255.0)[1]
    assert float(((r.numpy() - t) ** 2).mean()) > 2 * mse


def test_student_flags_what_its_teacher_flags(small_scorer, student):
    """A dark blob is far from the textures: both rank it above the normal images."""
    scorer, _ = student
    normal = texture(8, 48, 64, 4)
    bad = [img.copy() for img in texture(8, 48, 64, 5)]
    for img in bad:
        img[10:26, 20:36] = 20
    for model in (small_scorer, scorer):
        a = model.score(np.stack(normal)).summary["anomaly_score"]
        b = model.score(np.stack(bad)).summary["anomaly_score"]
        assert auroc(a, b) > 0.95
    assert math.isfinite(scorer.threshold)
    assert scorer.image_score.statistic == small_scorer.image_score.statistic


def test_student_bundle_round_trip_records_the_teacher(small_scorer, student, tmp_path):
    scorer, _ = student
    out = save_bundle(scorer, tmp_path / "b")
    meta = json.loads((out / "flowscore.json").read_text())
    assert meta["kind"] == "distilled" and meta["flow"] is None
    assert meta["featurizer"]["type"] == "distilled"
    teacher = meta["teacher"]
    assert teacher["uri"] == "models:/toy/3" and teacher["version"] == "3"
    assert teacher["weights_sha256"] == weights_sha256(small_scorer)
    back = load_bundle(out)
    assert back.flow is None and back.featurizer.teacher == scorer.featurizer.teacher
    assert back.threshold == scorer.threshold and back.heatmap_clip == scorer.heatmap_clip
    imgs = np.stack(texture(3, 48, 64, 6))
    assert np.array_equal(back.score(imgs).grid, scorer.score(imgs).grid)
    fl = flops_per_image(back, 48, 64)
    assert fl["flow"] == 0 and fl["total"] > 0 and fl["windows"] == 11 * 15


def test_teacher_hash_changes_with_its_weights(small_scorer):
    h = weights_sha256(small_scorer)
    other = load_bundle(OLD_BUNDLE)
    assert weights_sha256(other) != h and len(h) == 64
    assert weights_sha256(small_scorer) == h


def test_old_bundles_still_load_as_flows():
    scorer = load_bundle(OLD_BUNDLE)
    assert scorer.flow is not None and not isinstance(scorer.featurizer, DistilledFeaturizer)
    meta = json.loads((OLD_BUNDLE / "flowscore.json").read_text())
    assert "kind" not in meta and "teacher" not in meta


def _edit(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    p = dst / "flowscore.json"
    meta = json.loads(p.read_text())
    change(meta)
    p.write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m.pop("teacher"), "teacher"),
        (lambda m: m.update(teacher={"uri": 3}), "teacher"),
        (lambda m: m.update(teacher={"bogus": "x"}), "teacher"),
        (lambda m: m.update(teacher="models:/x/1"), "teacher"),
        (lambda m: m.pop("kind"), "kind"),
        (lambda m: m.update(kind="flow"), "kind"),
        (lambda m: m.update(kind="student"), "kind"),
        (lambda m: m.update(flow={"type": "maf"}), "no flow"),
        (lambda m: m["featurizer"].update(channels=-1), "channels"),
        (lambda m: m["featurizer"].update(channels=8), "shape"),
        (lambda m: m["featurizer"].update(channels="16"), "channels"),
        (lambda m: m["featurizer"].update(layers=3), "layers"),
        (lambda m: m.update(threshold="high"), "threshold"),
    ],
)
def test_malformed_distilled_bundle_is_one_bundle_error(student, tmp_path, change, needle):
    scorer, _ = student
    good = save_bundle(scorer, tmp_path / "good")
    bad = _edit(good, tmp_path / "bad", change)
    with pytest.raises(BundleError) as e:
        load_bundle(bad)
    assert needle in str(e.value)


def test_a_flow_bundle_that_says_distilled_is_refused(small_scorer, tmp_path):
    good = save_bundle(small_scorer, tmp_path / "good")
    bad = _edit(good, tmp_path / "bad", lambda m: m.update(kind="distilled"))
    with pytest.raises(BundleError, match="kind"):
        load_bundle(bad)


def test_extreme_and_infinite_targets_keep_the_loss_finite():
    from flowcore.distill import _loss

    for kind in ("mse", "huber"):
        cfg = DistilledConfig(window=8, stride=4, channels=4, quality_weight=1.0, loss=kind)
        student = DistilledFeaturizer(cfg)
        img = texture(1, 48, 64, 7)[0]
        grid = torch.zeros(11, 15)
        grid[0, 0], grid[1, 1], grid[2, 2] = -4.5e5, -math.inf, math.nan
        loss = _loss(student, [(img, grid)], [0], cfg)
        assert math.isfinite(float(loss))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_the_losses_are_squared_error_and_smooth_l1_of_the_standardised_grids():
    """``mse`` (the default) weighs a window 5 standard deviations off 25 times as much as one
    1 off; ``huber`` about 9 times: what the tail statistic of the image score needs is the
    former (README: image AUROC 0.982 against 0.857 on harvest)."""
    from flowcore.distill import _loss

    img = texture(1, 48, 64, 7)[0]
    for kind in ("mse", "huber"):
        cfg = DistilledConfig(window=8, stride=4, channels=4, loss=kind)
        student = DistilledFeaturizer(cfg)
        student.target_mean.fill_(3.0)
        student.target_std.fill_(2.0)
        with torch.no_grad():
            z = student.head(student(to_tensor(img[None], student.device)))[:, 0]
        target = torch.full_like(z, 3.0) + 2.0 * torch.linspace(-6.0, 1.0, z.numel()).reshape(
            z.shape
        )
        d = z - (target - 3.0) / 2.0
        want = (d**2).mean() if kind == "mse" else torch.nn.functional.smooth_l1_loss(d, 0 * d)
        with torch.no_grad():
            got = _loss(student, [(img, target[0])], [0], cfg)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert DistilledConfig().loss == "mse"


def test_config_is_validated():
    bads = ({"channels": 0}, {"depth": 9}, {"stride": 0}, {"lr": -1.0}, {"epochs": 1.5})
    for bad in (*bads, {"target_floor": 0.0}, {"target_floor": math.inf}, {"loss": "l1"}):
        with pytest.raises(ValueError):
            DistilledConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_distill_from_a_registered_model_then_evaluate_and_score(
    ray_session, tmp_path, monkeypatch, capsys
):
    """train → train --distill-from → evaluate → score, through the real CLI, Ray and MLflow."""
    from jobs.cli import main
    from pipelines import tracking
    from pipelines.synth import write_archive

    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    archive = tmp_path / "archive"
    write_archive(
        archive, kind="harvest", images=16, seed=0, anomaly_rate=0.25, height=128, width=160
    )
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_SPEC)
    common = ["--archive", str(archive), "--skip-labelled-anomalies"]
    teacher_cmd = ["train", *common, "--name", "t", "--preset", "grain-quarter", "--config"]
    assert main([*teacher_cmd, str(cfg)]) == 0
    student_cmd = ["train", *common, "--name", "s", "--distill-from", "models:/t@champion"]
    assert main([*student_cmd, "--max-epochs", "4"]) == 0
    assert "models:/s/1" in capsys.readouterr().out
    resolved = tracking.resolve_model("models:/s@champion")
    student = load_bundle(resolved.path)
    teacher_path = tracking.resolve_model("models:/t/1").path
    assert isinstance(student.featurizer, DistilledFeaturizer) and student.flow is None
    rec = student.featurizer.teacher
    assert rec["name"] == "t" and rec["version"] == "1" and rec["uri"] == "models:/t@champion"
    assert rec["weights_sha256"] == weights_sha256(load_bundle(teacher_path))
    assert math.isfinite(student.threshold)
    assert student.training_stats["distill"]["best_epoch"] >= 1
    out = tmp_path / "eval.json"
    evaluate = ["evaluate", "--archive", str(archive), "--model", "models:/s@champion"]
    assert main([*evaluate, "--json", str(out), "--baseline-rows", "2000"]) == 0
    rep = json.loads(out.read_text())
    assert 0.0 <= rep["image_auroc"]["flow"] <= 1.0 and rep["images"] == 16
    score = ["score", "--archive", str(archive), "--model", "models:/s@champion"]
    assert main(score) == 0
    assert main(["query", "SELECT count(*) AS n FROM image_scores", "--format", "json"]) == 0
    assert '"n": 16' in capsys.readouterr().out
