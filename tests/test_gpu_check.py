"""`make gpu-check` cannot rot where no GPU is: its CPU mode runs here (CI), and its report logic is unit-tested."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from throughput import ANCHORS, CASES  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>
<testcase classname="tests.test_gpu" name="test_b" time="2.0">
  <failure message="assert 1 == 2&#10;more">x</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.1"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def fake_run(case: str, b: float, a: float = 1000.0, c: float = 100.0) -> dict:
    paths = {"a_ceiling": a, "b_memory": b, "b_h5": b, "c_reference": c}
    return {"case": case, "ratios": {"b_over_a": b / a, "b_over_c": b / c},
            "results": {k: {"images_per_s": v, "peak_gpu_mem_gb": 3.0} for k, v in paths.items()}}


def test_junit_counts_every_outcome_and_names_the_failure(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(JUNIT)
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failures"] == ["test_gpu::test_b: assert 1 == 2"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml")["passed"] == 0  # a crash before pytest wrote it


def test_verdicts_judge_each_target_the_issue_sets():
    rgb = gpu_check.verdicts(fake_run("resnet18_rgb", b=950.0))
    assert rgb["b_over_a"] == {"target": 0.90, "value": 0.95, "met": True} and rgb["b_over_c"]["met"]
    jets = gpu_check.verdicts(fake_run("resnet15_jets", b=800.0, c=400.0))
    assert not jets["b_over_a"]["met"] and not jets["b_over_c"]["met"]  # 0.80 < 0.85, 2.0 < 2.5
    anchor = ANCHORS["vit_s16_barlow"]["gpu_augmentation"]
    vit = gpu_check.verdicts(fake_run("vit_s16_barlow", b=3.5 * anchor, a=4 * anchor))
    assert vit["anchor_multiple"]["met"] and vit["anchor_multiple"]["value"] == pytest.approx(3.5)
    assert "b_over_a" not in vit  # no b/a target for the ViT cases


def test_markdown_marks_an_incomplete_check_and_a_failed_run():
    report = {"mode": "gpu", "seconds": 400.0, "complete": False, "problems": ["throughput vit_s_mae: OOM"],
              "environment": {"device": "NVIDIA H200", "date": "2026-12-03", "torch": "2.11", "cuda": "12.8"},
              "gpu_tests": {"passed": 9, "failed": 1, "errors": 0, "skipped": 0, "seconds": 60.0,
                            "failures": ["test_gpu::test_b: boom"]},
              "throughput": [{"case": "resnet18_rgb", "compile": False, "run": fake_run("resnet18_rgb", 950.0),
                              "verdicts": gpu_check.verdicts(fake_run("resnet18_rgb", 950.0))},
                             {"case": "vit_s_mae", "compile": True, "error": "CUDA out of memory"}]}
    md = gpu_check.markdown(report)
    assert "**Incomplete**: throughput vit_s_mae: OOM" in md and "- test_gpu::test_b: boom" in md
    assert "| resnet18_rgb | off | 1,000 | 950 | 950 | 100 | 0.95 | 9.50 | 3.0 | b_over_a 0.95 ≥ 0.9" in md
    assert "| vit_s_mae | on | failed: CUDA out of memory |" in md


def test_without_cuda_the_gpu_mode_refuses_with_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "--cpu" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_mode_runs_every_part_and_writes_the_table(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["gpu_tests"]
    assert tests["ok"] and tests["passed"] >= 6 and tests["failed"] == tests["skipped"] == 0
    assert all(t["test"].startswith("test_gpu::") and t["status"] == "passed" for t in tests["tests"])
    runs = {(t["case"], t["compile"]): t for t in report["throughput"]}
    assert set(runs) == {(c, False) for c in CASES}  # compile on: GPU mode only
    for t in runs.values():
        assert t["exit_status"] == 0 and t["run"]["ratios"]["b_over_a"] > 0
    assert len(report["profile_top_ops"]) == 10 and report["profile_top_ops"][0]["clock"] == "cpu"
    profiled = runs[(gpu_check.PROFILED, False)]["run"]
    settings = profiled["settings"]  # the profiled step comes after the timed ones and is not counted in them
    assert profiled["results"]["a_ceiling"]["timed_images"] == settings["steps"] * settings["batch_size"]
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {case} | off |" in md for case in CASES) and "published 871 samples/s" in md
    assert report["complete"] and "Incomplete" not in md


def test_a_spent_budget_records_every_remaining_run_as_not_run(tmp_path):
    runs = gpu_check.throughput_runs(tmp_path, cpu=False, timeout=1, deadline=0.0)  # the past: nothing starts
    assert [(r["case"], r["compile"]) for r in runs] == [(c, on) for on in (False, True) for c in CASES]
    assert all(r["exit_status"] is None and "budget" in r["error"] for r in runs) and not list(tmp_path.iterdir())
