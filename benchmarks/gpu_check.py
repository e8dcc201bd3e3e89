"""`make gpu-check`: the GPU proof in one prepared command, sized for a short lease on one GPU.

  1. the gpu-marked tests (tests/test_gpu.py): bf16 steps of every method, the fused optimizers' device-side skip
     of a non-finite step, no host sync between logging steps, channels_last / compile against eager, checkpoints
     across devices, the demo preset and a probe through the CLI;
  2. benchmarks/throughput.py for every case, compile off and on, with the steps cut to fit: (a) ceiling, (b)
     ssl_lab in memory and from HDF5, (c) the per-sample reference, and the ViT-S/16 Barlow Twins case beside its
     published anchor; the RGB ResNet case also profiles one step (top-10 ops);
  3. <out>/gpu_check.json (everything) and <out>/gpu_check.md (the table for the README's speed section).

Each part runs in its own process, so a crash or an out-of-memory in one is reported and the others still run.
The command exits 1 if a test failed or a part did not run: the table it leaves is then marked incomplete.

    python benchmarks/gpu_check.py [--out gpu-check]     # on the GPU (the Makefile passes GPU_CHECK_OUT)
    python benchmarks/gpu_check.py --cpu                 # the same command at tiny CPU sizes (CI runs it)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import ANCHORS, CASES  # noqa: E402

# Targets the issue sets, on the GPU (same-run ratios): b/a per case, b/c for the ResNets, the anchor multiple.
TARGETS = {"b_over_a": {"resnet18_rgb": 0.90, "resnet15_jets": 0.85}, "b_over_c": 2.5, "anchor_multiple": 3.0}
PROFILED = "resnet18_rgb"
# GPU: steps per path cut so the whole command fits 8 minutes; CPU: the throughput --quick sizes and compile off only
# (Inductor builds C++ for every path on the CPU, a minute a case; the gpu tests' CPU version compiles a ViT block).
GPU_STEPS = {"steps": 20, "warmup": 6, "max_data_mb": 512}
CPU_ARGS = ["--quick", "--image-size", "16", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--workers", "1",
            "--threads", "1"]


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run one part in its own process, its output into `log`; (exit status, seconds). 124: timed out."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            fh.write(f"\ngpu_check: timed out after {timeout:.0f} s\n")
    return rc, time.monotonic() - start


def junit_counts(path: Path) -> dict[str, Any]:
    """Passed / failed / errors / skipped and the failing test ids, from pytest's JUnit XML."""
    if not path.is_file():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "tests": []}
    cases = ET.parse(path).getroot().iter("testcase")
    out: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "tests": []}
    for case in cases:
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        status = ("failed" if "failure" in kinds else "errors" if "error" in kinds
                  else "skipped" if "skipped" in kinds else "passed")
        out[status] += 1
        out["tests"].append({"test": name, "status": status, "seconds": float(case.get("time", 0))})
        if status in ("failed", "errors"):
            message = next(iter(case)).get("message", "")
            out["failures"].append(f"{name}: {message.splitlines()[0] if message else status}")
    return out


def gpu_tests(out: Path, cpu: bool, timeout: float) -> dict[str, Any]:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "tests/test_gpu.py", *(["--gpu-device=cpu"] if cpu else [])]
    rc, seconds = run(cmd, out / "gpu_tests.log", timeout)
    counts = junit_counts(xml)
    ok = rc == 0 and counts["passed"] > 0 and not counts["failed"] and not counts["errors"] and not counts["skipped"]
    return {"command": " ".join(cmd[1:]), "exit_status": rc, "seconds": round(seconds, 1), "ok": ok, **counts}


def throughput_runs(out: Path, cpu: bool, timeout: float, deadline: float) -> list[dict[str, Any]]:
    """Every case with compile off, then with compile on; a run that would start after `deadline` (monotonic
    clock) is recorded as not run, so the command ends inside its budget with what it measured."""
    runs = []
    for compile_on in (False, True):
        for case in CASES:
            if cpu and compile_on:
                continue
            if time.monotonic() > deadline:
                runs.append({"case": case, "compile": compile_on, "exit_status": None,
                             "error": "not run: the command's --budget was spent"})
                continue
            tag = f"{case}_compile_{'on' if compile_on else 'off'}"
            json_out = out / f"throughput_{tag}.json"
            sizes = CPU_ARGS if cpu else ["--steps", str(GPU_STEPS["steps"]), "--warmup", str(GPU_STEPS["warmup"]),
                                          "--max-data-mb", str(GPU_STEPS["max_data_mb"])]
            cmd = [sys.executable, "benchmarks/throughput.py", "--case", case,
                   "--compile", "on" if compile_on else "off", *sizes,
                   *(["--profile"] if case == PROFILED and not compile_on else []), "--out", str(json_out)]
            rc, seconds = run(cmd, out / f"throughput_{tag}.log", timeout)
            record: dict[str, Any] = {"case": case, "compile": compile_on, "exit_status": rc,
                                      "seconds": round(seconds, 1), "command": " ".join(cmd[1:])}
            if rc == 0 and json_out.is_file():
                record["run"] = json.loads(json_out.read_text())["runs"][0]
            else:
                record["error"] = last_line((out / f"throughput_{tag}.log").read_text())
            runs.append(record)
    return runs


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def verdicts(run: dict[str, Any]) -> dict[str, Any]:
    """Each target this case has, with the measured value and whether it is met."""
    case, r = run["case"], run["ratios"]
    out = {}
    if case in TARGETS["b_over_a"]:
        out["b_over_a"] = {"target": TARGETS["b_over_a"][case], "value": r["b_over_a"],
                           "met": r["b_over_a"] >= TARGETS["b_over_a"][case]}
    if case.startswith("resnet"):
        out["b_over_c"] = {"target": TARGETS["b_over_c"], "value": r["b_over_c"],
                           "met": r["b_over_c"] >= TARGETS["b_over_c"]}
    if case in ANCHORS:
        multiple = run["results"]["b_memory"]["images_per_s"] / ANCHORS[case]["gpu_augmentation"]
        out["anchor_multiple"] = {"target": TARGETS["anchor_multiple"], "value": multiple,
                                  "met": multiple >= TARGETS["anchor_multiple"]}
    return out


def fmt(x: float | None, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    env, tests = report["environment"], report["gpu_tests"]
    head = [f"**{env['device']}**, {env['date']}, torch {env['torch']}, CUDA {env['cuda'] or '-'}, "
            f"`make gpu-check` ({report['mode']} mode, {report['seconds']:.0f} s)", ""]
    if not report["complete"]:
        head += ["**Incomplete**: " + "; ".join(report["problems"]), ""]
    head.append(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                f"{tests['skipped']} skipped ({tests['seconds']:.0f} s)")
    head += [f"- {failure}" for failure in tests["failures"]]
    rows = ["", "| case | compile | (a) ceiling | (b) in memory | (b) HDF5 | (c) reference | b/a | b/c | peak GiB | "
                "targets |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["throughput"]:
        if "run" not in t:
            rows.append(f"| {t['case']} | {'on' if t['compile'] else 'off'} | failed: {t.get('error', '')} |"
                        " | | | | | | |")
            continue
        run, res = t["run"], t["run"]["results"]
        ips = {k: res[k]["images_per_s"] for k in res}
        peak = max((res[k]["peak_gpu_mem_gb"] or 0.0) for k in res) or None
        judged = ", ".join(f"{k} {v['value']:.2f} {'≥' if v['met'] else '<'} {v['target']}"
                           for k, v in t.get("verdicts", {}).items())
        rows.append(f"| {t['case']} | {'on' if t['compile'] else 'off'} | {fmt(ips['a_ceiling'])} | "
                    f"{fmt(ips['b_memory'])} | {fmt(ips['b_h5'])} | {fmt(ips['c_reference'])} | "
                    f"{run['ratios']['b_over_a']:.2f} | {run['ratios']['b_over_c']:.2f} | {fmt(peak, 1)} | {judged} |")
    anchors = [f"- {case}: published {a['gpu_augmentation']:.0f} samples/s (GPU augmentation) and "
               f"{a['cpu_augmentation']:.0f} (CPU augmentation), {a['source']}" for case, a in ANCHORS.items()]
    profile = report.get("profile_top_ops") or []
    prof = ["", f"Top ops of one {PROFILED} step ({profile[0]['clock'] if profile else '-'} time):", "",
            "| op | calls | self ms | share |", "|---|---|---|---|",
            *[f"| `{p['op']}` | {p['calls']} | {p['self_ms']:.3f} | {100 * p['share']:.1f} % |" for p in profile]]
    return "\n".join([*head, *rows, "", *anchors, *prof]) + "\n"


def environment(cpu: bool) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and not cpu
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu-check"), help="output folder")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks the command itself (CI)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no further benchmark run starts (default 420 on a GPU, none on the CPU)")
    p.add_argument("--part-timeout", type=float, default=None,
                   help="seconds one part may run (default: 240 for the tests, 150 per benchmark run on a GPU)")
    args = p.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run `python benchmarks/gpu_check.py --cpu` for the CPU mode",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "environment": environment(args.cpu)}
    report["gpu_tests"] = gpu_tests(out, args.cpu, args.part_timeout or (600 if args.cpu else 240))
    budget = args.budget if args.budget is not None else (float("inf") if args.cpu else 420.0)
    report["throughput"] = throughput_runs(out, args.cpu, args.part_timeout or (300 if args.cpu else 150),
                                           start + budget)
    problems = [] if report["gpu_tests"]["ok"] else [f"gpu tests: exit {report['gpu_tests']['exit_status']}, "
                                                     f"{report['gpu_tests']['failed']} failed"]
    for t in report["throughput"]:
        if "run" in t:
            t["verdicts"] = verdicts(t["run"])
            if t["run"].get("profile_top_ops"):
                report["profile_top_ops"] = t["run"]["profile_top_ops"]
        else:
            problems.append(f"throughput {t['case']} compile={'on' if t['compile'] else 'off'}: {t['error']}")
    report.update(problems=problems, complete=not problems, seconds=round(time.monotonic() - start, 1))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
