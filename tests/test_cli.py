"""The command line as a user runs it: synth, bench, demo, help and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from flowcore.fit import PRESETS
from flowcore.scorer import TRANSFORMS
from jobs.cli import MAX_TRANSFORMS, PRESET_NAMES, main


def test_preset_names_match_flowcore() -> None:
    assert tuple(PRESETS) == PRESET_NAMES
    assert len(TRANSFORMS) == MAX_TRANSFORMS


def test_help_is_fast_and_imports_no_torch() -> None:
    code = (
        "import sys; from jobs.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    for cmd in ("synth", "bench", "demo", "train", "evaluate", "score", "query"):
        r = subprocess.run(
            [sys.executable, "-m", "jobs.cli", cmd, "--help"], capture_output=True, text=True
        )
        assert r.returncode == 0 and "usage: flowscore" in r.stdout


def test_synth_cli_writes_archive(tmp_path, capsys) -> None:
    out = tmp_path / "arch"
    rc = main(
        [
            "synth",
            str(out),
            "--kind",
            "factory",
            "--images",
            "4",
            "--seed",
            "3",
            "--anomaly-rate",
            "0.5",
            "--quiet",
        ]
    )
    assert rc == 0
    assert "wrote 4 images (2 anomalous)" in capsys.readouterr().out
    lines = (out / "_truth" / "labels.csv").read_text().splitlines()
    assert lines[0] == "path,label" and len(lines) == 5
    assert len(list((out / "_truth" / "masks").rglob("*.png"))) == 2


def test_synth_cli_refuses_bad_input_with_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert main(["synth", str(tmp_path / "full"), "--images", "2", "--quiet"]) == 2
    assert "empty directory" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "a"), "--anomaly-rate", "2", "--quiet"]) == 2
    assert "anomaly_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path / "b"), "--images", "0"])
    assert e.value.code == 2


@pytest.mark.slow  # a whole bench run: about 7 s
def test_bench_json_has_design_fields_and_consistent_roofline(tmp_path) -> None:
    path = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--preset",
            "grain-quarter",
            "--images",
            "2",
            "--batch",
            "2",
            "--naive-rows",
            "2",
            "--threads",
            "1",
            "--pipeline-images",
            "0",
            "--json",
            str(path),
            "--quiet",
        ]
    )
    assert rc == 0
    r = json.loads(path.read_text())
    for key in (
        "images",
        "image_height",
        "image_width",
        "window",
        "stride",
        "components",
        "flow",
        "threads",
        "device",
        "gflop_per_image",
        "gemm_gflops",
        "roofline_images_per_s",
        "scorer_images_per_s",
        "pipeline_images_per_s",
        "naive_images_per_s",
        "decode_ms_per_image",
        "peak_rss_mb",
    ):
        assert key in r, key
    assert r["decode_ms_per_image"] > 0
    from flowcore.precision import has_bf16_units

    if has_bf16_units():  # the bf16 figures where the machine has the matrix units
        assert r["gemm_bf16_gflops"] > 0 and r["scorer_bf16_images_per_s"] > 0
        assert 0 <= r["bf16_median_abs_dll"] <= r["bf16_p99_abs_dll"]
    else:
        assert "gemm_bf16_gflops" not in r
    assert (r["window"], r["stride"], r["components"], r["threads"]) == (11, 2, 363, 1)
    # FLOPs from the shapes, by hand: 53×75 windows; projection 2·363·363 per window;
    # MAF 5 MADEs of 363->100->726 per window
    windows = 53 * 75
    by_hand = windows * (2 * 363 * 363 + 5 * (2 * 363 * 100 + 2 * 100 * 726))
    assert r["gflop_per_image"] == pytest.approx(by_hand / 1e9, rel=1e-3)
    assert r["roofline_images_per_s"] == pytest.approx(
        r["gemm_gflops"] / r["gflop_per_image"], rel=1e-2
    )
    assert r["scorer_images_per_s"] > 0 and r["naive_images_per_s"] > 0


@pytest.mark.ray
def test_bench_pipeline_scores_real_files_into_a_scratch_catalog(
    ray_session, tmp_path, monkeypatch
) -> None:
    """The pipeline figure comes from the real scoring job: every generated file is committed
    (a failed image would raise), in a catalog of its own, not the user's."""
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    path = tmp_path / "bench.json"
    args = ["bench", "--preset", "grain-quarter", "--images", "2", "--naive-rows", "1"]
    args += ["--height", "64", "--width", "96", "--pipeline-images", "20", "--quiet"]
    assert main([*args, "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["pipeline_images"] == 20 and r["pipeline_images_per_s"] > 0
    assert r["pipeline_command_images_per_s"] <= r["pipeline_images_per_s"]
    from flowcore.precision import has_bf16_units

    assert (r.get("pipeline_bf16_images_per_s") or 0) > 0 or not has_bf16_units()
    assert r["pipeline_fraction_of_roofline"] == pytest.approx(
        r["pipeline_images_per_s"] / r["roofline_images_per_s"], abs=1e-3
    )
    assert not (tmp_path / "home").exists()  # nothing written into the user's home


@pytest.mark.slow
def test_bench_memory_runs_score_twice_and_reports_growth(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    path = tmp_path / "bench.json"
    args = ["bench", "--preset", "grain-quarter", "--images", "2", "--naive-rows", "1"]
    args += ["--height", "64", "--width", "96", "--pipeline-images", "0", "--quiet"]
    assert main([*args, "--memory", "--memory-images", "3", "--json", str(path)]) == 0
    m = json.loads(path.read_text())["memory"]
    assert (m["small"]["images"], m["large"]["images"]) == (3, 12)
    for size in ("small", "large"):
        # a Python process with torch and Ray imported holds well over 100 MB
        assert m[size]["job_peak_rss_mb"] > 100 and m[size]["session_peak_pss_mb"] > 100
        assert m[size]["job_peak_anon_mb"] <= m[size]["job_peak_rss_mb"]
    assert m["job_rss_growth"] == pytest.approx(
        m["large"]["job_peak_rss_mb"] / m["small"]["job_peak_rss_mb"] - 1, abs=1e-3
    )
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_bench_tables_fills_measures_and_maintains_a_scratch_catalog(
    tmp_path, monkeypatch, capsys
) -> None:
    """``bench --tables``: the diff finds exactly the new files (it raises otherwise), the
    UPSERT commits them, the queries run, and maintain compacts; the user's home untouched."""
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    path = tmp_path / "tables.json"
    args = ["bench", "--tables", "3000", "--commits", "12", "--heatmap-cells", "8"]
    assert main([*args, "--quiet", "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["shape_before"]["data_files"] == 12 and r["shape_before"]["snapshots"] == 13
    # after: the 12 nightly files and the 1 % step's file compacted into one
    assert r["shape_after"]["data_files"] == 1
    for phase in ("before", "after"):
        assert r[f"idle_{phase}"]["todo"] == 0
        assert r[f"new_{phase}"]["todo"] == 30 and r[f"new_{phase}"]["commits"] == 1
        # and a file that failed for each started 1,000 images of a night (12 nights)
        assert r[f"idle_{phase}"]["listed"] == 3000 + 12
        assert r[f"query_{phase}"]["rss_mb"] > r[f"query_{phase}"]["base_mb"] > 0
    assert "nightly run, nothing new" in capsys.readouterr().out
    assert not (tmp_path / "home").exists()
    with pytest.raises(SystemExit):
        main(["bench", "--tables", "0"])


def test_bench_refuses_gpu_without_cuda(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(["bench", "--use-gpu", "--quiet"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_demo_runs_end_to_end(ray_session, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # few epochs: the test checks that every step runs and says what it did, not the model
    argv = ["demo", "--workdir", str(tmp_path / "d"), "--images", "24", "--max-epochs", "4"]
    rc = main([*argv, "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "registered models:/demo-grain/1" in out and "pixel AUROC" in out
    assert "flowscore query" in out and re.search(r"\((\d+) rows\)", out)
    assert "image AUROC on 2019 from the table" in out
    assert "nothing new to score" in out
    assert (tmp_path / "d" / "report" / "index.html").is_file()
    assert len(list((tmp_path / "d" / "report").rglob("*.png"))) >= 4
    assert (tmp_path / "d" / "evaluation" / "evaluation.json").is_file()
    assert (tmp_path / "home" / "models" / "demo-grain" / "1" / "weights.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_bench_measures_every_preset(preset, tmp_path) -> None:
    """``bench --preset P`` works for every preset the README recommends (CNN presets with
    their random backbone: speed does not depend on the weights), with the test-time
    transforms' cost counted in the FLOPs."""
    path = tmp_path / "bench.json"
    args = ["bench", "--preset", preset, "--images", "2", "--batch", "2", "--naive-rows", "1"]
    args += ["--height", "96", "--width", "128", "--pipeline-images", "0", "--quiet"]
    assert main([*args, "--no-bf16", "--json", str(path)]) == 0
    one = json.loads(path.read_text())
    assert one["scorer_images_per_s"] > 0 and one["gflop_per_image"] > 0
    assert (one["naive_images_per_s"] is None) == preset.startswith(("cnn", "grain-multi", "ae"))
    if preset == "grain-quarter":
        assert main([*args, "--no-bf16", "--test-transforms", "2", "--json", str(path)]) == 0
        two = json.loads(path.read_text())
        assert two["test_transforms"] == 2
        assert two["gflop_per_image"] == pytest.approx(2 * one["gflop_per_image"], rel=1e-3)
