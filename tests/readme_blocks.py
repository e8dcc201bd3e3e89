"""README command checker, part 1: find every command README.md shows and decide, by rules, how it is checked.

Commands are the lines of ```bash blocks (`\\` continuations joined, trailing `# comments` dropped) and the inline
code spans of the prose that start with python / make / pip / torchrun. ```python blocks are run as written (see
tests/test_readme.py); unlabelled ``` blocks show output or file trees and are not commands.

`classify` gives each command a Plan: which checks apply (compose, run, a static check) and, for what is not run,
why. A command no rule covers gets kind "unclassified", which tests/test_readme.py turns into a failure: a new
README command must be runnable or explicitly classified here, with a reason.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"

PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}
STARTERS = PYTHONS | {"make", "pip", "torchrun"}
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--info", "-p", "--package", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd"}
HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion"}
RUN_BUDGET = 2  # jobs x stages a command may cost to be run for real (a tiny stage takes ~6-8 s on 2 cores)
PLACEHOLDER = re.compile(r"<[^<>]+>")
FILE_SUFFIXES = {"pt", "ckpt", "yaml", "json", "csv", "md", "png", "h5", "npy", "log", "py", "txt", "bin", "lock"}
# python -m ssl_lab.<module>: which artefact each kind of input argument stands for (see World in test_readme.py)
MODULE_INPUTS = {
    "ssl_lab.inspect": {"h5": "h5_file", "folder": "image_folder"},
    "ssl_lab.prepare": {"h5": "h5_file"},
    "ssl_lab.compare": {"folder": "runs_folder"},
}


# ---------------------------------------------------------------------------------------------------- extraction
@dataclass
class Block:
    lang: str
    line: int  # README line of the first content line
    text: str


@dataclass
class Command:
    text: str  # as written, continuations joined, comment dropped, whitespace collapsed
    argv: list[str]
    lines: list[int]  # every README line that shows this command (duplicates are merged)
    source: str  # "bash" or "inline"

    @property
    def line(self) -> int:
        return self.lines[0]

    def where(self) -> str:
        return "README.md:" + ",".join(map(str, self.lines))


def fenced_blocks(markdown: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, start, body = stripped[3:].strip().lower(), number + 1, []
        elif lang is not None and stripped.startswith("```"):
            blocks.append(Block(lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise ValueError(f"README.md:{start - 1}: a ``` block is never closed")
    return blocks


def _without_blocks(markdown: str) -> str:
    """The prose: fenced blocks blanked out, line count kept."""
    out, inside = [], False
    for line in markdown.splitlines():
        fence = line.strip().startswith("```")
        out.append("" if inside or fence else line)
        if fence:
            inside = not inside
    return "\n".join(out)


def inline_spans(markdown: str) -> list[tuple[int, str]]:
    """(line, text) of every `code span` of the prose; a span may wrap onto the next line (joined by a space)."""
    prose = _without_blocks(markdown)
    spans = []
    for m in re.finditer(r"`([^`]+)`", prose):
        if "\n\n" in m.group(1):
            continue  # an unpaired backtick: the match runs across a paragraph break
        spans.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return spans


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) for each command of a bash block: `\\` continuations joined, comments dropped."""
    out, pending, start = [], "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = strip_comment(raw)
        if not pending:
            start = block.line + offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = " ".join((pending + line).split())
        pending = ""
        if text:
            out.append((start, text.removeprefix("$ ")))
    if pending.strip():
        out.append((start, " ".join(pending.split())))
    return out


def split_command(text: str) -> list[str]:
    """shlex words, with a placeholder that holds spaces (`runs/<pretraining run>`) kept as one word."""
    words: list[str] = []
    for word in shlex.split(text):
        if words and words[-1].count("<") > words[-1].count(">"):
            words[-1] += " " + word
        else:
            words.append(word)
    return words


def is_inline_command(argv: list[str]) -> bool:
    return len(argv) >= 2 and argv[0] in STARTERS


def extract_commands(markdown: str) -> list[Command]:
    """Every command of the bash blocks and the prose, in README order, one entry per distinct command."""
    found: list[tuple[int, str, str]] = []
    for block in fenced_blocks(markdown):
        if block.lang in ("bash", "sh", "shell", "console"):
            found += [(line, text, "bash") for line, text in bash_commands(block)]
    for line, text in inline_spans(markdown):
        try:
            argv = split_command(text)
        except ValueError:
            continue
        if is_inline_command(argv):
            found.append((line, text, "inline"))
    commands: dict[tuple[str, ...], Command] = {}
    for line, text, source in sorted(found):
        try:
            argv = split_command(text)
        except ValueError as err:
            argv = [f"<unparsable: {err}>"]
        key = tuple(argv)
        if key in commands:
            commands[key].lines.append(line)
        else:
            commands[key] = Command(text, argv, [line], source)
    return list(commands.values())


def python_blocks(markdown: str) -> list[Block]:
    return [b for b in fenced_blocks(markdown) if b.lang in ("python", "py")]


# ---------------------------------------------------------------------------------------------------- composing
def register_resolvers() -> None:
    """Load run.py as a module (not run): it registers the resolvers the CLI composes with (or_else)."""
    spec = importlib.util.spec_from_file_location("ssl_lab_run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def compose(overrides: list[str]) -> DictConfig:
    """The config `python run.py <overrides>` composes, Hydra's node included (a copy: callers may change it)."""
    return _compose(tuple(overrides)).copy()


@functools.lru_cache(maxsize=512)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF), job_name="readme"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def job_config(cfg: DictConfig) -> DictConfig:
    """The run's config, without Hydra's node (what ssl_lab.tasks.run receives)."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return OmegaConf.create(data)


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a (container of a) config; lists are leaves, an empty dict is a leaf `{}`."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    out: dict[str, Any] = {}
    if isinstance(node, dict) and node:
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = node
    return out


@dataclass
class HydraArgs:
    multirun: bool
    info_flags: list[str]  # --help, --cfg job, ...: Hydra prints and exits, nothing runs
    overrides: list[str]
    unknown_flags: list[str]


def hydra_args(args: list[str]) -> HydraArgs:
    multirun, info, overrides, unknown = False, [], [], []
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_VALUE_FLAGS:
            value = next(it, "")
            if arg in HYDRA_INFO_FLAGS:
                info += [arg, value]
        elif arg in HYDRA_INFO_FLAGS or arg == "--resolve":
            info.append(arg)
        elif arg.startswith("-"):
            unknown.append(arg)
        else:
            overrides.append(arg)
    return HydraArgs(multirun, info, overrides, unknown)


def _sweeps(overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """Each override as its list of job values (one element unless it sweeps), and the keys they set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    options, keys = [], set()
    for text, override in zip(overrides, parsed):
        key = override.get_key_element()
        keys.add(key.lstrip("+~"))
        if override.is_interval_sweep():  # an optimiser's range: its two ends stand for the values it tries
            options.append([f"{key}={override.value().start}", f"{key}={override.value().end}"])
        elif override.is_sweep_override():
            options.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            options.append([text])
    return options, keys


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command starts: one without -m; the cartesian product of the sweeps
    (the command line's, then those a preset puts under hydra.sweeper.params) with -m; a sweeper that samples
    (Optuna) starts hydra.sweeper.n_trials jobs, drawn here from that product in turn."""
    if not multirun:
        return [list(overrides)]
    options, keys = _sweeps(overrides)
    first = [choice[0] for choice in options]
    sweeper = compose(first).hydra.sweeper
    params = sweeper.get("params") or {}
    preset = [f"{key}={value}" for key, value in params.items() if key not in keys]
    if preset:
        more, _ = _sweeps(preset)
        options += more
    jobs = [list(job) for job in itertools.product(*options)]
    trials = sweeper.get("n_trials")
    return [jobs[i % len(jobs)] for i in range(trials)] if trials else jobs


# ---------------------------------------------------------------------------------------------------- classifying
@dataclass
class Plan:
    kind: str  # run.py | module | benchmark | make | pip | pytest | unclassified
    run: bool = False  # run for real (with tiny overrides where it trains)
    reason: str = ""  # how it is checked, or why it is not run
    jobs: list[list[str]] = field(default_factory=list)  # run.py: each job's overrides, as written
    hydra: HydraArgs | None = None
    problems: list[str] = field(default_factory=list)  # found while classifying (composition errors)
    cfg: DictConfig | None = None  # run.py: the first job's composed config (placeholders stood in for)


def stand_in(arg: str) -> str:
    """A placeholder made composable, for the compose check: `runs/<pretraining run>` -> `runs/pretraining_run`."""
    return PLACEHOLDER.sub(lambda m: re.sub(r"\W+", "_", m.group(0)).strip("_"), arg)


def run_py_args(argv: list[str]) -> list[str] | None:
    """The arguments given to run.py (python run.py ..., torchrun ... run.py ...), None if run.py is not run."""
    for i, arg in enumerate(argv):
        if Path(arg).name == "run.py":
            return argv[i + 1:]
    return None


def classify(cmd: Command, composer: Callable[[list[str]], DictConfig] = compose) -> Plan:
    argv = cmd.argv
    head = argv[0]
    if head in PYTHONS and len(argv) > 1 and Path(argv[1]).name == "run.py" or head == "torchrun":
        return _classify_run_py(cmd, composer)
    if head in PYTHONS and len(argv) > 2 and argv[1] == "-m":
        module = argv[2]
        if module == "pytest":
            return Plan("pytest", reason="the test suite itself: not run; its -m marker expression is checked")
        if module in MODULE_INPUTS:
            return Plan("module", run=True, reason=f"run on tiny inputs ({', '.join(MODULE_INPUTS[module])})")
        if module.startswith("ssl_lab."):
            return Plan("unclassified", reason=f"python -m {module}: no input rule in MODULE_INPUTS")
    if head in PYTHONS and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        return Plan("benchmark", reason="timed benchmark: its --help must offer every flag shown; --quick is run "
                                        "when no test in tests/ runs it")
    if head == "make":
        return Plan("make", reason="Makefile must have the target; the run.py lines of its recipe must compose "
                                   "(the recipe itself installs and runs for minutes: not run here)")
    if head in PYTHONS and argv[1:3] == ["-m", "venv"]:
        return Plan("setup", reason="makes a virtual environment: not run")
    if Path(head).name == "pip" and argv[1:2] == ["install"]:
        if all(a == "-e" or re.fullmatch(r"\.(\[[\w,-]+\])?", a) for a in argv[2:]):
            return Plan("pip", reason="pyproject.toml must define the extra")
        return Plan("setup", reason="pip install of named packages (reaches the network: not run); each must be a "
                                    "dependency pyproject.toml lists")
    return Plan("unclassified", reason="no rule for this command")


def _classify_run_py(cmd: Command, composer: Callable[[list[str]], DictConfig]) -> Plan:
    args = run_py_args(cmd.argv)
    if args is None:
        return Plan("unclassified", reason="torchrun without run.py")
    hargs = hydra_args([stand_in(a) for a in args])
    plan = Plan("run.py", hydra=hargs)
    if hargs.unknown_flags:
        plan.problems.append(f"unknown flag(s) {' '.join(hargs.unknown_flags)}")
        plan.reason = "bad flags"
        return plan
    try:
        plan.jobs = expand_jobs(hargs.overrides, hargs.multirun)
        first = composer(plan.jobs[0])
    except Exception as err:  # composition errors are reported by the compose test, with the message
        plan.problems.append(last_line(str(err)))
        plan.reason = "does not compose"
        return plan
    cfg = plan.cfg = job_config(first)
    launcher = first.hydra.runtime.choices.get("hydra/launcher", "basic")
    devices = cfg.accelerator.get("devices", 1)
    devices = devices if isinstance(devices, int) else 1
    nodes = int(cfg.accelerator.get("num_nodes", 1) or 1)
    stages = len(cfg.task.stages) if cfg.task.name == "pipeline" else 1
    resume = cfg.get("resume")
    if hargs.info_flags:
        plan.run, plan.reason = True, f"{' '.join(hargs.info_flags)}: run as written (prints, trains nothing)"
    elif cmd.argv[0] == "torchrun":
        plan.reason = "compose only: torchrun starts one process per device"
    elif launcher != "basic":
        plan.reason = f"compose only: hydra/launcher={launcher} submits jobs to a cluster"
    elif devices * nodes > 1:
        plan.reason = f"compose only: needs {devices * nodes} devices ({devices} x {nodes} node(s))"
    elif resume in ("auto", "extend", "force"):
        plan.run, plan.reason = True, f"resume={resume}: run as written into a copy of a tiny pretraining run"
    elif len(plan.jobs) * stages > RUN_BUDGET:
        what = f"{len(plan.jobs)} job(s) x {stages} stage(s)"
        plan.reason = f"compose only: {what} is over the run budget of {RUN_BUDGET} (every job composes)"
    else:
        gpu = " (accelerator=gpu run as accelerator=cpu)" if "accelerator=gpu" in hargs.overrides else ""
        plan.run, plan.reason = True, f"run with tiny overrides, {len(plan.jobs)} job(s){gpu}"
    return plan


def last_line(text: str) -> str:
    """The line of an error output worth showing: ssl_lab's one-line error, else the last error-looking line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for pattern in (r"ssl_lab: error", r"(Error|Exception|error)\b"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:400]
    return (lines[-1] if lines else "(no output)")[:400]


# ---------------------------------------------------------------------------------------------------- tiny runs
def tiny_overrides(cfg: DictConfig, cache_dir: Path) -> list[str]:
    """Overrides that shrink a composed run to seconds on a CPU, each only where the key exists in it (so they
    never turn a valid command into an invalid one): 2 steps of 1 epoch, batch 8, 32 px, narrow heads."""
    keys = flat(cfg)
    out: list[str] = []

    def put(key: str, value: Any) -> None:
        if key in keys:
            out.append(f"{key}={value}")

    for key, value in (("trainer.max_epochs", 1), ("trainer.limit_train_batches", 2),
                       ("trainer.log_every_n_steps", 1), ("trainer.enable_progress_bar", "false"),
                       ("dataset.batch_size", 8), ("dataset.num_workers", 0), ("dataset.cache_dir", cache_dir),
                       ("dataset.n_per_class", 8), ("dataset.n", 24), ("dataset.image_size", 32),
                       ("augment.size", 32), ("method.proj_output_dim", 16), ("method.out_dim", 64)):
        put(key, value)
    out.append(("" if "trainer.limit_val_batches" in keys else "+") + "trainer.limit_val_batches=1")
    for key, value in keys.items():
        if key.startswith("method.") and key.endswith("hidden_dims") and isinstance(value, list) and value:
            put(key, "[" + ",".join(["32"] * len(value)) + "]")
        elif key.startswith("task.") and key.endswith("max_epochs"):
            put(key, 1)
        elif key.startswith("task.") and key.endswith(".lrs"):
            put(key, "[0.1]")
        elif key.startswith("task.") and key.endswith(".weight_decays"):
            put(key, "[0]")
    return out


def on_cpu(overrides: Iterable[str]) -> list[str]:
    """accelerator=gpu becomes accelerator=cpu; without an accelerator choice, accelerator=cpu is added."""
    out = ["accelerator=cpu" if o == "accelerator=gpu" else o for o in overrides]
    return out if any(o.startswith("accelerator=") for o in out) else [*out, "accelerator=cpu"]


def placeholder_alternatives(arg: str) -> list[str]:
    """`<file.h5 or folder>` -> ['file.h5', 'folder']; a plain argument is its own only alternative."""
    m = PLACEHOLDER.fullmatch(arg)
    return [a.strip() for a in m.group(0)[1:-1].split(" or ")] if m else [arg]


def input_kind(arg: str) -> str | None:
    if arg.endswith(".h5") or "h5" in arg:
        return "h5"
    if "folder" in arg or "dir" in arg:
        return "folder"
    return None


# ---------------------------------------------------------------------------------------------------- static rules
def make_targets(makefile: Path = ROOT / "Makefile") -> set[str]:
    targets = set()
    for line in makefile.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-][A-Za-z0-9_. -]*?)\s*:(?!=)", line)
        if m and not line.startswith(".PHONY"):
            targets.update(m.group(1).split())
    return targets


def make_recipe(target: str, makefile: Path = ROOT / "Makefile") -> list[str]:
    """The recipe lines (tab-indented) of a Makefile target."""
    lines, inside = [], False
    for line in makefile.read_text().splitlines():
        if line.startswith("\t"):
            if inside:
                lines.append(line.strip())
            continue
        m = re.match(r"^([A-Za-z0-9_.-][A-Za-z0-9_. -]*?)\s*:(?!=)", line)
        inside = bool(m) and target in m.group(1).split()
    return lines


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def check_make(cmd: Command) -> list[str]:
    targets = make_targets()
    names = [a for a in cmd.argv[1:] if not a.startswith("-") and "=" not in a]
    return [f"Makefile has no target {name!r} (targets: {', '.join(sorted(targets))})"
            for name in names if name not in targets]


def check_pip(cmd: Command) -> list[str]:
    extras = pyproject()["project"].get("optional-dependencies", {})
    asked = [e for a in cmd.argv for m in [re.fullmatch(r"\.\[([\w,-]+)\]", a)] if m for e in m.group(1).split(",")]
    return [f"pyproject.toml has no extra {e!r} (extras: {', '.join(sorted(extras))})" for e in asked
            if e not in extras]


def check_setup(cmd: Command) -> list[str]:
    """A named package that a set-up line installs must be one this project depends on."""
    if Path(cmd.argv[0]).name != "pip":
        return []
    deps = {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in pyproject()["project"]["dependencies"]}
    names, skip = [], False
    for arg in cmd.argv[2:]:
        if skip or arg.startswith("-"):
            skip = arg in ("--index-url", "-i", "--extra-index-url") and not skip
            continue
        names.append(re.split(r"[<>=!~\[]", arg, maxsplit=1)[0].lower())
    return [f"{name!r} is not a dependency in pyproject.toml" for name in names if name not in deps]


def check_pytest(cmd: Command) -> list[str]:
    markers = {m.split(":")[0].strip() for m in pyproject()["tool"]["pytest"]["ini_options"].get("markers", [])}
    builtin = {"skip", "skipif", "xfail", "parametrize", "usefixtures", "filterwarnings"}
    argv, problems = cmd.argv, []
    start = argv.index("pytest") + 1 if "pytest" in argv else len(argv)
    for i in range(start, len(argv) - 1):
        if argv[i] == "-m":
            names = set(re.findall(r"[A-Za-z_]\w*", argv[i + 1])) - {"and", "or", "not"}
            problems += [f"marker {n!r} is not registered in pyproject.toml" for n in sorted(names - markers - builtin)]
    return problems


def benchmark_flags(cmd: Command) -> list[str]:
    return sorted({m for a in cmd.argv[2:] for m in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", a)})


# ---------------------------------------------------------------------------------------------------- config keys
def config_key_mentions(markdown: str, top_keys: set[str]) -> list[tuple[int, str]]:
    """(line, key) of every dotted config key an inline span of the prose names (`dataset.foo=1`, `task.bar`,
    `+optim.fused=false`, `~augment.ops.blur`): a first part that is a top-level config key, and not a file name
    (`backbone.pt`)."""
    out = []
    for line, span in inline_spans(markdown):
        for token in span.replace("'", " ").replace('"', " ").replace("`", " ").split():
            key = token.split("=", 1)[0].rstrip(",.;:)").lstrip("(")
            bare = key.lstrip("+~")
            parts = bare.split(".")
            if len(parts) < 2 or parts[0] not in top_keys or parts[-1] in FILE_SUFFIXES:
                continue
            if all(re.fullmatch(r"\w+|<[\w ]+>", p) for p in parts):
                out.append((line, key))
    return out


def known_config_keys(composer: Callable[[list[str]], DictConfig] = compose) -> tuple[dict[str, Any], set[str]]:
    """Every dotted key of every choice of every config group (and of each hydra/launcher), with its value; and
    the top-level keys."""
    keys: dict[str, Any] = {}
    runs = [[]]
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        runs += [[f"{group.name}={c.stem}"] for c in sorted(group.glob("*.yaml"))]
    runs += [[f"hydra/launcher={c.stem}"] for c in sorted((CONF / "hydra" / "launcher").glob("*.yaml"))]
    for overrides in runs:
        for key, value in flat(composer(overrides)).items():
            keys.setdefault(key, value)
    return keys, {k.split(".")[0] for k in keys}


def unknown_key(key: str, keys: dict[str, Any]) -> str | None:
    """Why a key named in the README is not in the config, None when it is. `<name>` parts match any key;
    `+key` must be new under an existing node, `~key` must exist; a free-form `{}` node takes any sub-key."""
    add = key.startswith("+")
    bare = key.lstrip("+~")
    pattern = re.compile("^" + r"\.".join(r"[^.]+" if PLACEHOLDER.fullmatch(p) else re.escape(p)
                                          for p in bare.split(".")) + r"(\.|$)")
    exists = any(pattern.match(k) for k in keys)
    parents = [".".join(bare.split(".")[:i]) for i in range(1, bare.count(".") + 1)]
    free_form = any(keys.get(p) == {} for p in parents)
    if add:
        if exists:
            return f"{key}: `+` adds a key, but {bare} already exists (Hydra refuses); drop the +"
        parent = parents[-1]
        if not (free_form or any(k.startswith(parent + ".") for k in keys)):
            return f"{key}: no config node {parent}"
        return None
    if exists or free_form:
        return None
    return f"{bare}: no such key in any config choice"
