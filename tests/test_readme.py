"""An honest README: every command it shows is checked by a rule (tests/readme_blocks.py), and the quick ones run.

Fast lane: every command is classified (an unclassified one fails), every run.py command composes (each job of a
multirun, through ssl_lab's schema), every config key the prose names exists, make targets / pip extras / pytest
markers exist. Slow lane: the quick run.py and `python -m ssl_lab.<module>` commands run through the CLI on tiny
artefacts with tiny overrides, benchmark scripts offer the flags shown, and the ```python blocks run as written.
A failure prints one line per command: README line, command, last error line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import readme_blocks as rb
from ssl_lab.schema import check_config

ROOT = rb.ROOT
MARKDOWN = rb.README.read_text()
COMMANDS = rb.extract_commands(MARKDOWN)
TIMEOUT = 600


@pytest.fixture(scope="module")
def plans():
    rb.register_resolvers()
    return [(cmd, rb.classify(cmd)) for cmd in COMMANDS]


def report(failures: list[str], what: str) -> None:
    assert not failures, f"{len(failures)} README command(s) {what}:\n" + "\n".join(failures)


def line_of(cmd: rb.Command, message: str) -> str:
    return f"{cmd.where()}: {cmd.text}\n    -> {message}"


# ------------------------------------------------------------------------------------------------ the extractor
def test_extractor_splits_blocks_continuations_comments_and_inline_spans():
    md = "\n".join([
        "Run `python run.py task=linear",  # 1: an inline span that wraps onto the next line
        "pretrained=runs/<run>` or `make demo`; `.venv/bin/python` alone is a path, `backbone.pt` a file.",
        "```bash",
        "python run.py method=barlow \\",  # 4
        "    dataset=jets_sim   # a comment",
        "# a comment line",
        "make test  # another",  # 7
        "```",
        "```",
        "python run.py in an output block is no command",
        "```",
        "```python",
        "print('x')",  # 13
        "```",
    ])
    cmds = rb.extract_commands(md)
    assert [(c.line, c.source, c.argv) for c in cmds] == [
        (1, "inline", ["python", "run.py", "task=linear", "pretrained=runs/<run>"]),
        (2, "inline", ["make", "demo"]),
        (4, "bash", ["python", "run.py", "method=barlow", "dataset=jets_sim"]),
        (7, "bash", ["make", "test"]),
    ]
    assert [(b.line, b.text) for b in rb.python_blocks(md)] == [(13, "print('x')")]
    assert rb.strip_comment("a '#not' b#c # gone") == "a '#not' b#c"
    again = rb.extract_commands(md + "\nAgain: `make test`.")
    assert next(c for c in again if c.argv == ["make", "test"]).lines == [7, 15]


def test_classifier_rules_on_made_up_commands():
    rb.register_resolvers()

    def plan(text):
        return rb.classify(rb.Command(text, rb.split_command(text), [1], "bash"))

    assert plan("python run.py method=barlow").run
    assert not plan("python run.py -m method=simclr,barlow,byol").run  # 3 jobs: over budget, composed
    assert len(plan("python run.py -m method=simclr,barlow,byol").jobs) == 3
    assert len(plan("python run.py -m experiment=jets_compare").jobs) == 2  # the preset's own sweep
    optuna = plan("python run.py -m hparams_search=finetune_lr pretrained=random")
    assert len(optuna.jobs) == 20 and not optuna.run and not optuna.problems  # n_trials, over budget
    assert plan("python3 -m venv .venv").kind == "setup"
    def setup(text):
        return rb.check_setup(rb.Command(text, rb.split_command(text), [1], "bash"))

    assert setup(".venv/bin/pip install torch --index-url u") == [] and setup("pip install nosuchpkg")
    assert "devices" in plan("python run.py accelerator=ddp accelerator.devices=4").reason
    assert plan("python run.py method=nosuch").problems  # does not compose
    assert plan("python run.py method=simclr,barlow").problems  # a sweep without -m
    assert plan("python run.py --bogus").problems
    assert plan("python -m ssl_lab.nosuch x").kind == "unclassified"
    assert plan("rm -rf runs").kind == "unclassified"
    assert plan("python run.py run_dir=runs/<name> resume=auto").run
    assert rb.split_command("a=runs/<my run> 'b c'") == ["a=runs/<my run>", "b c"]
    assert rb.unknown_key("dataset.nosuch", {"dataset.path": 1}) and not rb.unknown_key("dataset.path", {
        "dataset.path": 1})
    assert not rb.unknown_key("augment.ops.<op>.p", {"augment.ops.blur.p": 0.5})
    assert not rb.unknown_key("+callbacks.stop._target_", {"callbacks": {}})
    assert rb.unknown_key("+optim.lr", {"optim.lr": 1})  # + on an existing key: Hydra refuses


# ------------------------------------------------------------------------------------------------ fast checks
def test_every_readme_command_is_classified(plans, record_property):
    assert len(COMMANDS) >= 10 and any(p.kind == "run.py" and p.run for _, p in plans), "extractor found nothing"
    lines = [f"{cmd.where()}: {cmd.text}\n    [{p.kind}{', run' if p.run else ''}] {p.reason}" for cmd, p in plans]
    print("\n".join(lines))  # -rP shows it: what is run, and why the rest is not
    record_property("readme_commands", json.dumps([{"lines": c.lines, "command": c.text, "kind": p.kind,
                                                    "run": p.run, "reason": p.reason} for c, p in plans]))
    report([line_of(cmd, f"unclassified: {p.reason}; add a rule in tests/readme_blocks.py")
            for cmd, p in plans if p.kind == "unclassified"], "match no rule")


def test_every_run_py_command_composes_and_passes_the_schema(plans):
    failures = []
    jobs = [(cmd, p.jobs, p.problems) for cmd, p in plans if p.kind == "run.py"]
    for cmd, _ in plans:
        if cmd.argv[0] == "make":  # the run.py lines of the target's recipe
            for target in cmd.argv[1:]:
                for recipe in rb.make_recipe(target):
                    args = rb.run_py_args(recipe.split())
                    if args is not None:
                        jobs.append((cmd, [rb.hydra_args(args).overrides], []))
    for cmd, job_list, problems in jobs:
        failures += [line_of(cmd, problem) for problem in problems]
        for job in [] if problems else job_list:
            try:
                check_config(rb.job_config(rb.compose(job)))
            except Exception as err:
                failures.append(line_of(cmd, f"job {' '.join(job)}: {rb.last_line(str(err))}"))
    assert len(jobs) >= 5
    report(failures, "do not compose")


def test_make_targets_pip_extras_set_up_packages_and_pytest_markers_exist(plans):
    checks = {"make": rb.check_make, "pip": rb.check_pip, "pytest": rb.check_pytest, "setup": rb.check_setup}
    failures = [line_of(cmd, problem) for cmd, p in plans if p.kind in checks for problem in checks[p.kind](cmd)]
    report(failures, "name a missing target, extra or marker")


def test_config_keys_named_in_the_prose_exist():
    rb.register_resolvers()
    keys, top = rb.known_config_keys()
    mentions = rb.config_key_mentions(MARKDOWN, top)
    assert len(mentions) > 20
    failures = [f"README.md:{line}: `{key}` -> {why}" for line, key in mentions
                for why in [rb.unknown_key(key, keys)] if why]
    report(failures, "name config keys that do not exist")


# ------------------------------------------------------------------------------------------------ tiny artefacts
class NoRule(Exception):
    """A command argument that no artefact rule can stand in for."""


class World:
    """Tiny stand-ins for what README commands point at (data files, pretraining runs), each made once."""

    def __init__(self, base: Path, cache: Path):
        self.base, self.cache = base, cache
        self._made: dict[str, Path] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._count = 0

    def once(self, key: str, make) -> Path:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]

    def fresh(self, name: str) -> Path:
        slug = re.sub(r"[^\w.-]+", "_", name)[:40]
        with self._guard:
            self._count += 1
            path = self.base / f"{self._count:03d}_{slug}"
        path.mkdir(parents=True)
        return path

    # data -----------------------------------------------------------------------------------------------------
    def h5(self, spec: dict) -> Path:
        def make() -> Path:
            path = self.fresh("h5") / "data.h5"
            n, c, side, rng = 40, int(spec["in_chans"]), 32, np.random.default_rng(0)
            shape = (n, side, side, c) if spec["layout"] == "NHWC" else (n, c, side, side)
            with h5py.File(path, "w") as f:
                f[spec["image_key"]] = rng.random(shape, dtype=np.float32)
                if spec.get("label_key"):
                    f[spec["label_key"]] = np.arange(n) % 2
                for key in spec.get("target_keys") or []:
                    f[key] = rng.random(n, dtype=np.float32) * 100
            return path
        return self.once("h5:" + json.dumps(spec, sort_keys=True), make)

    def h5_for(self, dataset, role: str) -> Path:
        """A file that satisfies the command's own dataset config; `role` path or labelled_path."""
        if dataset.get("split_keys"):
            raise NoRule("dataset.split_keys: no tiny-file rule for one key per split")
        labelled = role == "labelled_path" or not dataset.get("labelled_path")
        return self.h5({"image_key": dataset.image_key, "in_chans": dataset.in_chans, "layout": dataset.layout,
                        "label_key": dataset.label_key if labelled else None,
                        "target_keys": list(dataset.target_keys or []) if labelled else []})

    def h5_file(self) -> Path:  # python -m ssl_lab.<module> file.h5: a CMS-like jets file
        return self.h5({"image_key": "jet", "in_chans": 8, "layout": "NHWC", "label_key": "Y",
                        "target_keys": ["m", "pT"]})

    def image_folder(self, in_chans: int = 1) -> Path:
        def make() -> Path:
            root = self.fresh("folder")
            rng = np.random.default_rng(0)
            for label in ("a", "b"):
                (root / label).mkdir()
                for k in range(10):
                    pixels = rng.integers(0, 256, (40, 40, 3) if in_chans == 3 else (40, 40), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / label / f"{k:02d}.png")
            return root
        return self.once(f"folder:{in_chans}", make)

    def stl10(self) -> Path:
        def make() -> Path:
            root = self.fresh("stl10")
            d = root / "stl10_binary"
            d.mkdir()
            rng = np.random.default_rng(0)
            for part, n in (("unlabeled", 24), ("train", 20), ("test", 10)):
                rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(d / f"{part}_X.bin")
                if part != "unlabeled":
                    (np.arange(n) % 2 + 1).astype(np.uint8).tofile(d / f"{part}_y.bin")  # STL labels start at 1
            return root
        return self.once("stl10", make)

    def root_for(self, dataset) -> Path:
        target = str(dataset.get("_target_", ""))
        if target.endswith("STL10DataModule"):
            return self.stl10()
        if target.endswith("FolderDataModule"):
            return self.image_folder(int(dataset.in_chans))
        raise NoRule(f"dataset.root for {target}: no tiny-data rule")

    # runs -----------------------------------------------------------------------------------------------------
    def tiny_run(self, what: str, overrides: list[str]) -> Path:
        """A tiny run of `overrides` on the CPU, in a fresh folder: its run_dir."""
        run_dir = self.fresh(what) / "run"
        cfg = rb.job_config(rb.compose(rb.on_cpu(overrides)))
        args = [*rb.on_cpu(overrides), *rb.tiny_overrides(cfg, self.cache), f"run_dir={run_dir}"]
        out = cli([str(ROOT / "run.py"), *args], run_dir.parent)
        if out.returncode != 0:
            raise NoRule(f"the tiny {what} run {' '.join(args)} failed: {rb.last_line(out.stderr)}")
        return run_dir

    def pretrain_run(self, overrides: list[str]) -> Path:
        """A tiny pretraining run on the command's own dataset and backbone overrides."""
        return self.once("pretrain:" + " ".join(overrides), lambda: self.tiny_run("pretraining", overrides))

    def downstream_run(self) -> Path:
        """A tiny task=linear run on the tiny default pretraining run: a model.pt."""
        return self.once("downstream", lambda: self.tiny_run(
            "downstream", ["task=linear", f"pretrained={self.pretrain_run([])}"]))

    def copy_of_run(self) -> Path:
        target = self.fresh("copy") / "run"
        shutil.copytree(self.pretrain_run([]), target)
        return target

    def runs_folder(self) -> Path:
        folder = self.fresh("runs")
        shutil.copytree(self.pretrain_run([]), folder / "run_a")
        return folder


def cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # one torch thread per process: two processes at a time on 2 cores take half the time of one after the other
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir):
    return World(tmp_path_factory.mktemp("readme"), cache_dir)


# ------------------------------------------------------------------------------------------------ running
def materialise(overrides: list[str], plan: rb.Plan, world: World) -> list[str]:
    """The command's overrides with every path and placeholder replaced by a tiny artefact."""
    cfg, resume = plan.cfg, plan.cfg.get("resume") if plan.cfg is not None else None
    out = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key in ("dataset.path", "dataset.labelled_path"):
            arg = f"{key}={world.h5_for(cfg.dataset, key.split('.')[1])}"
        elif key == "dataset.root":
            arg = f"{key}={world.root_for(cfg.dataset)}"
        elif key == "run_dir":
            arg = f"run_dir={world.copy_of_run() if resume else world.fresh('run_dir') / 'run'}"
        out.append(arg)
    data = [a for a in out if a.split("=")[0].lstrip("+").split(".")[0] in ("dataset", "backbone")]
    for i, arg in enumerate(out):
        key, _, value = arg.partition("=")
        if key == "pretrained" and (rb.PLACEHOLDER.search(value) or value.startswith("runs/")):
            out[i] = f"pretrained={world.pretrain_run(data)}"
    left = [a for a in out if rb.PLACEHOLDER.search(a)]
    if left:
        raise NoRule(f"no artefact rule for {' '.join(left)}")
    return out


def run_run_py(cmd: rb.Command, plan: rb.Plan, world: World) -> str | None:
    """None if the command ran as it should, else the line to show."""
    hargs = rb.hydra_args(rb.run_py_args(cmd.argv))
    overrides = materialise(hargs.overrides, plan, world)
    cwd = world.fresh(f"cmd{cmd.line}")
    flags = ["-m"] if hargs.multirun else []
    if hargs.info_flags:
        args = [*flags, *hargs.info_flags, *overrides]
    elif plan.cfg.get("resume"):
        args = overrides
    else:
        where = f"hydra.sweep.dir={cwd / 'sweep'}" if hargs.multirun else f"run_dir={cwd / 'run'}"
        has_dir = any(o.startswith(("run_dir=", "hydra.sweep.dir=")) for o in overrides)
        args = [*flags, *rb.on_cpu(overrides), *rb.tiny_overrides(plan.cfg, world.cache), *([] if has_dir else
                                                                                             [where])]
    out = cli([str(ROOT / "run.py"), *args], cwd)
    if out.returncode != 0:
        return f"exit {out.returncode}: {rb.last_line(out.stderr or out.stdout)}"
    if hargs.info_flags:
        return None if out.stdout.strip() else "printed nothing"
    done = out.stdout.count(" finished; outputs in ")
    return None if done == len(plan.jobs) else f"{done} of {len(plan.jobs)} job(s) reported finishing"


def run_module(cmd: rb.Command, world: World) -> str | None:
    module, args = cmd.argv[2], cmd.argv[3:]
    inputs = [i for i, a in enumerate(args) if rb.PLACEHOLDER.fullmatch(a) or a.endswith(".h5")][:1]
    problems = []
    for alternative in rb.placeholder_alternatives(args[inputs[0]]) if inputs else [None]:
        argv = list(args)
        if inputs:
            kind = rb.input_kind(alternative)
            maker = rb.MODULE_INPUTS[module].get(kind)
            if maker is None:
                return f"no artefact rule for input {alternative!r} of {module}"
            argv[inputs[0]] = str(getattr(world, maker)())
        out = cli(["-m", module, *argv], world.fresh(f"mod{cmd.line}"))
        if out.returncode != 0:
            problems.append(f"{alternative}: exit {out.returncode}: {rb.last_line(out.stderr or out.stdout)}")
    return "; ".join(problems) or None


def quick_is_tested(script: str) -> bool:
    """Whether a test in tests/ (other than this file) runs the benchmark's --quick mode."""
    stem = Path(script).stem
    return any(stem in text and "--quick" in text
               for path in (ROOT / "tests").glob("test_*.py") if path.name != "test_readme.py"
               for text in [path.read_text()])


def run_quick(script: str, world: World) -> str | None:
    source = (ROOT / script).read_text()
    threads = ["--threads", "1"] if '"--threads"' in source else []
    out = cli([str(ROOT / script), "--quick", *threads], world.fresh(Path(script).stem))
    return None if out.returncode == 0 else f"--quick: exit {out.returncode}: {rb.last_line(out.stderr)}"


def run_block(block: rb.Block, world: World) -> str | None:
    """A ```python block as written; `runs/<... downstream ...>` stands for a tiny downstream run (model.pt), any
    other `runs/<...>` for a tiny pretraining run (backbone.pt)."""
    def run_for(m: re.Match) -> str:
        downstream = re.search(r"downstream|linear|finetune|joint|supervised", m.group(0))
        return str(world.downstream_run() if downstream else world.pretrain_run([]))

    code = re.sub(r"runs/<[^<>]+>", run_for, block.text)
    left = rb.PLACEHOLDER.findall(code)
    if left:
        return f"no artefact rule for {left}"
    cwd = world.fresh(f"py{block.line}")
    (cwd / "block.py").write_text(code)
    out = cli([str(cwd / "block.py")], cwd)
    return None if out.returncode == 0 else f"exit {out.returncode}: {rb.last_line(out.stderr)}"


def warm_simulation_caches(todo, world: World) -> None:
    """Write the simulated datasets the runs read, once, before runs start two at a time (two processes that
    simulate the same file into one cache_dir at once can break each other's temporary file)."""
    from hydra.utils import get_class, instantiate

    from ssl_lab.data.simulated import SimulatedDataModule

    for _, plan in todo:
        cfg = plan.cfg
        if cfg is None or cfg.get("resume") or not issubclass(get_class(cfg.dataset._target_), SimulatedDataModule):
            continue
        tiny = rb.compose([*plan.jobs[0], *rb.tiny_overrides(cfg, world.cache)])
        instantiate(rb.job_config(tiny).dataset).prepare_data()


@pytest.fixture(scope="module")
def executed(plans, world):
    """Everything the slow lane runs, two processes at a time (one torch thread each): {kind: [(where, text,
    problem or None)]}."""
    todo = [(cmd, p) for cmd, p in plans if p.run and p.kind in ("run.py", "module") and not p.problems]
    scripts = sorted({cmd.argv[1] for cmd, p in plans if p.kind == "benchmark" and (ROOT / cmd.argv[1]).is_file()})
    quick = [s for s in scripts if '"--quick"' in (ROOT / s).read_text() and not quick_is_tested(s)]
    warm_simulation_caches(todo, world)
    jobs = [("command", cmd.where(), cmd.text, lambda c=cmd, p=plan: run_command(c, p, world)) for cmd, plan in todo]
    jobs += [("help", s, s, lambda s=s: cli([str(ROOT / s), "--help"], world.fresh("help"))) for s in scripts]
    jobs += [("quick", s, s, lambda s=s: run_quick(s, world)) for s in quick]
    jobs += [("block", f"README.md:{b.line}", "```python block", lambda b=b: run_block(b, world))
             for b in rb.python_blocks(MARKDOWN)]

    def one(job):
        kind, where, text, call = job
        start = time.monotonic()
        try:
            result = call()
        except NoRule as err:
            result = str(err)
        except subprocess.TimeoutExpired:
            result = f"timed out after {TIMEOUT} s"
        print(f"{time.monotonic() - start:6.1f} s  {where}: {text}")
        return kind, where, text, result

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, jobs))
    out: dict[str, list] = {}
    for kind, where, text, result in results:
        out.setdefault(kind, []).append((where, text, result))
    return out


def run_command(cmd: rb.Command, plan: rb.Plan, world: World) -> str | None:
    return run_run_py(cmd, plan, world) if plan.kind == "run.py" else run_module(cmd, world)


def failing(rows) -> list[str]:
    return [f"{where}: {text}\n    -> {problem}" for where, text, problem in rows if problem]


@pytest.mark.slow
def test_quick_readme_commands_run(executed):
    assert len(executed["command"]) >= 5
    report(failing(executed["command"]), "fail when run")


@pytest.mark.slow
def test_benchmark_scripts_offer_the_flags_shown_and_quick_modes_run(plans, executed):
    helps = {where: out for where, _, out in executed.get("help", [])}
    failures = failing(executed.get("quick", []))
    benches = [cmd for cmd, p in plans if p.kind == "benchmark"]
    assert benches and helps
    for cmd in benches:
        out = helps.get(cmd.argv[1])
        if out is None:
            failures.append(line_of(cmd, f"{cmd.argv[1]} does not exist"))
        elif out.returncode != 0:
            failures.append(line_of(cmd, f"--help: exit {out.returncode}: {rb.last_line(out.stderr)}"))
        else:
            absent = [flag for flag in rb.benchmark_flags(cmd) if not re.search(rf"{flag}\b", out.stdout)]
            if absent:
                failures.append(line_of(cmd, f"--help does not offer {', '.join(absent)}"))
    report(failures, "name benchmark flags or scripts that do not work")


@pytest.mark.slow
def test_python_blocks_run_as_written(executed):
    assert executed.get("block"), "README.md has no ```python block"
    report(failing(executed["block"]), "(```python blocks) fail")
