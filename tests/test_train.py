"""``flowscore train`` and ``flowscore evaluate`` end to end: real Ray Train (2 CPU workers,
gloo), real MLflow (SQLite store and a real server), S3 through moto_server, a worker that
really raises. Models are small so that each training run takes well under a minute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SPEC

from flowcore.bundle import load_bundle
from flowcore.fit import feature_rows, image_generator, spec_from_dict, split_holdout
from flowcore.flows import build_flow
from jobs.cli import main
from pipelines import tracking
from pipelines.archive import decode_image, list_archive, read_bytes
from pipelines.synth import write_archive

pytestmark = [pytest.mark.timeout(600)]


def _archive(root: Path, images: int = 16, seed: int = 0) -> Path:
    out = root / "archive"
    write_archive(
        out, kind="harvest", images=images, seed=seed, anomaly_rate=0.25, height=128, width=160
    )
    return out


def _config(root: Path, extra: str = "") -> Path:
    p = root / "tiny.toml"
    p.write_text(TINY_SPEC + extra)
    return p


def _train(archive: str, name: str, cfg: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--archive",
            archive,
            "--name",
            name,
            "--preset",
            "grain-quarter",
            "--config",
            str(cfg),
            "--workers",
            "2",
            "--skip-labelled-anomalies",
            *extra,
        ]
    )


def _val_nll(bundle_dir: Path, archive: str) -> tuple[float, float]:
    """Held-out NLL of the trained flow and of the same flow untrained, on windows of the
    held-out whole images (recomputed here from the archive and the bundle's record)."""
    scorer = load_bundle(bundle_dir)
    meta = scorer.training_stats
    spec = spec_from_dict(meta["spec"])
    from pipelines.truth import read_labels

    labels = read_labels(archive)
    entries = [e for e in sorted(list_archive(archive), key=lambda e: e.path) if not labels[e.path]]
    _, val = split_holdout([e.path for e in entries], spec.val_fraction, spec.seed)
    assert len(val) == meta["val_images"]
    rows = torch.cat(
        [
            feature_rows(
                scorer.featurizer,
                spec,
                [decode_image(read_bytes(entries[i].image_uri)).rgb],
                200,
                image_generator(5, entries[i].path),
            )
            for i in val
        ]
    )
    torch.manual_seed(spec.seed)
    untrained = build_flow(spec.features, spec.flow).eval()
    with torch.no_grad():
        trained_nll = -float(scorer.flow.log_prob(rows).mean())
        untrained_nll = -float(untrained.log_prob(rows).mean())
    return trained_nll, untrained_nll


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """One model trained with 2 workers on a local archive, MLflow on SQLite."""
    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWSCORE_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        archive = _archive(root)
        code = _train(str(archive), "grain-test", _config(root))
        assert code == 0
        yield root, archive


@pytest.mark.ray
def test_train_registers_a_model_that_loads_by_alias_and_scores(trained, capsys, monkeypatch):
    root, archive = trained
    monkeypatch.setenv("FLOWSCORE_HOME", str(root / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resolved = tracking.resolve_model("models:/grain-test@champion")
    assert resolved.version == "1"
    scorer = load_bundle(resolved.path)
    img = decode_image(read_bytes(next(iter(list_archive(str(archive)))).image_uri)).rgb
    sb = scorer.score(img[None])
    assert sb.grid.shape[0] == 1 and np.isfinite(sb.grid).all()
    assert np.isfinite(scorer.threshold)
    # the precision check ran (held-out and training images); bf16 listed only if it passed
    check = scorer.training_stats["precision_check"]
    assert check["precision"] == "bf16" and check["images"] >= 1
    assert scorer.validated_precisions == (("fp32", "bf16") if check["passed"] else ("fp32",))
    trained_nll, untrained_nll = _val_nll(resolved.path, str(archive))
    # whitened PCA features make the untrained flow (≈ a standard normal) a fair Gaussian
    # model already; training must still beat it clearly
    assert trained_nll < untrained_nll - 0.25
    # one MLflow run with the config as parameters and per-epoch metrics
    c = tracking.client()
    run = c.get_run(scorer.training_stats["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["spec.flow.blocks"] == "2"
    assert run.data.params["spec.fit.max_epochs"] == "3"
    hist = c.get_metric_history(run.info.run_id, "val_nll")
    assert sorted(m.step for m in hist) == [1, 2, 3]
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"bundle", "plots", "overlays"} <= arts


@pytest.mark.ray
def test_second_version_moves_champion_unless_no_promote(trained, monkeypatch):
    root, archive = trained
    monkeypatch.setenv("FLOWSCORE_HOME", str(root / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the second version also trains on synthetic anomalies through Ray Train (rows labelled
    # by the data tasks, the hinge in the workers) and picks its image statistic on them; it
    # also fits the global score on the training images that Ray Data decodes
    cfg = root / "synthetic.toml"
    cfg.write_text(
        'image_statistic = "auto"\nimage_global = true\n'
        + TINY_SPEC
        + "synthetic_anomalies = true\n"
    )
    assert _train(str(archive), "grain-test", cfg, "--no-promote", "--max-epochs", "2") == 0
    assert tracking.resolve_model("models:/grain-test@champion").version == "1"
    second = tracking.resolve_model("models:/grain-test/2")
    assert second.version == "2"
    stats = load_bundle(second.path).training_stats
    assert stats["spec"]["fit"]["synthetic_anomalies"] is True
    choice = stats["image_statistic_choice"]
    assert choice["chosen"] in choice["auroc_by_candidate"] and choice["anomalous_images"] > 0
    assert np.isfinite(stats["best_val_nll"])
    scorer = load_bundle(second.path)
    assert scorer.global_score is not None and scorer.global_score.components >= 1
    img = decode_image(read_bytes(next(iter(list_archive(str(archive)))).image_uri)).rgb
    sb = scorer.score(img[None])
    tail = float(scorer.summarize(torch.as_tensor(sb.grid))["anomaly_score"][0])
    gs = scorer.global_score
    assert float(sb.summary["anomaly_score"][0]) >= (tail - gs.tail_centre) / gs.tail_spread - 1e-4


@pytest.mark.ray
def test_evaluate_reports_flow_and_baselines(trained, monkeypatch, capsys):
    root, archive = trained
    monkeypatch.setenv("FLOWSCORE_HOME", str(root / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = root / "eval.json"
    # a kind for each anomalous image, as synth --kind texture writes: evaluate splits by it
    labels = (archive / "_truth" / "labels.csv").read_text().splitlines()[1:]
    bad = [p for p, lab in (line.rsplit(",", 1) for line in labels) if lab == "1"]
    kinds = {p: "first" if i % 2 == 0 else "second" for i, p in enumerate(sorted(bad))}
    (archive / "_truth" / "defects.csv").write_text(
        "path,defect\n" + "".join(f"{p},{k}\n" for p, k in kinds.items())
    )
    code = main(
        [
            "evaluate",
            "--archive",
            str(archive),
            "--model",
            "models:/grain-test@champion",
            "--json",
            str(out),
            "--out",
            str(root / "eval"),
            "--baseline-rows",
            "3000",
            "--precision",
            "both",
        ]
    )
    assert code == 0
    rep = json.loads(out.read_text())
    # fp32 for the tables, bf16 beside it, with the gates on these images
    cmp = rep["precision_comparison"]
    assert rep["precision"] == "fp32"
    assert cmp["fp32"]["image_auroc"] == pytest.approx(rep["image_auroc"]["flow"])
    assert cmp["fp32"]["pixel_auroc"] == pytest.approx(rep["pixel_auroc"]["flow"])
    assert abs(cmp["bf16"]["pixel_auroc"] - cmp["fp32"]["pixel_auroc"]) < 0.05
    assert 0 <= cmp["median_abs_dll"] <= cmp["p99_abs_dll"] and cmp["quality_spearman"] > 0.9
    methods = {"flow", "isolation_forest", "one_class_svm", "gaussian", "pca_nn"}
    assert {"model_uri", "images", "anomalous", "image_auroc", "pixel_auroc"} <= set(rep)
    assert set(rep["image_auroc"]) == methods and set(rep["pixel_auroc"]) == methods
    assert rep["images"] == 16 and 0 < rep["anomalous"] < 16
    for kind in ("image_auroc", "pixel_auroc"):
        for v in rep[kind].values():
            assert v is not None and 0.0 <= v <= 1.0
    # the synthetic anomalies are large and colourful: the flow's heatmap finds them
    assert rep["pixel_auroc"]["flow"] > 0.8
    # the model's own statistic, and the flow's AUROC under every candidate statistic
    stat = rep["image_statistic"]
    assert (
        stat
        == load_bundle(tracking.resolve_model("models:/grain-test/1").path).image_score.statistic
    )
    by_stat = rep["image_auroc_by_statistic"]
    assert set(by_stat) >= {"neg_p05", "neg_p01", "neg_min", "neg_mean_k_lowest", "p50_minus_p01"}
    assert by_stat[stat] == pytest.approx(rep["image_auroc"]["flow"])
    # split by kind of defect: each kind against all normal images, both kinds present
    assert set(rep["flow_image_auroc_by_defect"]) == set(kinds.values())
    assert (root / "eval" / "roc_image.png").is_file()
    assert (root / "eval" / "roc_pixel.png").is_file()
    table = capsys.readouterr().out
    assert "isolation_forest" in table and "pixel AUROC" in table
    assert "fp32 | bf16: image AUROC" in table
    c = tracking.client()
    mv = c.get_model_version("grain-test", "1")
    run = c.get_run(mv.tags["eval.run_id"])
    assert run.data.tags["flowscore.model_version"] == "1"
    assert run.data.metrics["pixel_auroc.flow"] == pytest.approx(rep["pixel_auroc"]["flow"])


@pytest.mark.ray
@pytest.mark.faults
def test_worker_that_raises_once_resumes_from_its_checkpoint(
    ray_session, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    marker = tmp_path / "raised"
    monkeypatch.setenv("FLOWSCORE_FAULT_TRAIN", f"2:{marker}")
    archive = _archive(tmp_path, images=12, seed=3)
    assert _train(str(archive), "faulty", _config(tmp_path)) == 0
    assert marker.read_text().startswith("raised at epoch 2")
    err = capsys.readouterr().err
    assert "resuming from the checkpoint of epoch 1" in err
    c = tracking.client()
    scorer = load_bundle(tracking.resolve_model("models:/faulty@champion").path)
    run_id = scorer.training_stats["mlflow_run_id"]
    steps = [m.step for m in c.get_metric_history(run_id, "val_nll")]
    assert sorted(steps) == [1, 2, 3]  # every epoch once: epoch 1 kept, 2 redone once
    assert scorer.training_stats["epochs"] == 3


@pytest.mark.ray
@pytest.mark.faults
def test_killed_job_resumes_with_resume_flag(ray_session, tmp_path, monkeypatch, capsys):
    """A job whose training fails for good (no retries left) continues with --resume from
    its last checkpoint, in the same MLflow run, with the same featurizer."""
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLOWSCORE_FAULT_TRAIN", f"3:{tmp_path / 'raised'}")
    archive = _archive(tmp_path, images=12, seed=4)
    cfg = _config(tmp_path)
    with pytest.raises(Exception, match="injected worker failure"):
        _train(str(archive), "resumable", cfg, "--max-failures", "0")
    state = json.loads((tmp_path / "home" / "train" / "resumable" / "state.json").read_text())
    assert state["status"] == "failed"
    capsys.readouterr()
    assert _train(str(archive), "resumable", cfg, "--resume") == 0
    err = capsys.readouterr().err
    assert "resuming from the checkpoint of epoch 2" in err
    assert "reusing the fitted one" in err
    c = tracking.client()
    run = c.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_nll")) == [1, 2, 3]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow_server
def test_train_from_s3_against_an_mlflow_server(
    ray_session, s3_server, mlflow_server, tmp_path, monkeypatch
):
    from conftest import make_bucket

    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    local = _archive(tmp_path, images=12, seed=5)
    make_bucket("train-archive")
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(local) + "/", "train-archive/harvest/", recursive=True)
    # checkpoints on S3 too, as a cluster of several nodes needs them (--storage-path)
    ckpt = "s3://train-archive/ray-checkpoints"
    cfg = _config(tmp_path)
    assert _train("s3://train-archive/harvest", "s3-grain", cfg, "--storage-path", ckpt) == 0
    fs.invalidate_cache()
    stored = fs.find("train-archive/ray-checkpoints")
    assert any("/checkpoint_" in k for k in stored), stored[:20]
    state = json.loads((tmp_path / "home" / "train" / "s3-grain" / "state.json").read_text())
    assert state["ray_storage"] == ckpt
    c = tracking.client()
    resolved = tracking.resolve_model("models:/s3-grain@champion")
    scorer = load_bundle(resolved.path)
    assert scorer.training_stats["archive"] == "s3://train-archive/harvest"
    run = c.get_run(scorer.training_stats["mlflow_run_id"])
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in v for v in run.data.params.values())
    assert run.data.params["job.archive"] == "s3://train-archive/harvest"
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_nll")) == [1, 2, 3]


@pytest.mark.ray
def test_ray_trains_controller_looks_at_its_workers_every_half_second(ray_session):
    """The embedded Ray's processes (Ray Train's controller among them) poll workers every
    0.5 s instead of Ray's 2 s: a finished or failed worker group is noticed sooner."""
    import ray

    from pipelines.raycluster import TRAIN_POLL_ENV, TRAIN_POLL_S

    @ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get(TRAIN_POLL_ENV)

    assert ray.get(seen.remote()) == TRAIN_POLL_S == "0.5"


def test_bad_config_names_file_and_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[fit]\nlearning_rate = 0.1\n")
    archive = tmp_path / "a"
    archive.mkdir()
    code = main(["train", "--archive", str(archive), "--name", "x", "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "learning_rate" in err


def test_empty_archive_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    archive = tmp_path / "empty"
    (archive / "_truth").mkdir(parents=True)
    code = main(["train", "--archive", str(archive), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no images" in err and str(archive) in err


def test_evaluate_without_ground_truth_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    archive = _archive(tmp_path, images=4)
    import shutil

    shutil.rmtree(archive / "_truth")
    code = main(["evaluate", "--archive", str(archive), "--model", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err
    assert code == 2 and "no ground truth" in err


def test_readme_config_example_is_a_valid_override(tmp_path):
    from jobs.train import load_spec

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "grain.toml").write_text(block)
    spec = load_spec("grain-full", str(tmp_path / "grain.toml"))
    assert spec.featurizer.components == 64 and spec.flow.blocks == 8
    assert spec.fit.max_epochs == 80 and spec.dequantize and spec.val_fraction == 0.15
