"""Every shell command of README.md and docs/*.md runs here, so the documentation cannot drift from the code.

The commands are read from the ```bash blocks (no list of commands lives in this file). Each one runs in a
sandbox — a temporary folder whose entries link to the repository's, with its own empty ``data/`` and
``runs/`` — so relative paths work and nothing is written into the checkout. Per command:

- ``pip install``: not run; every ``-r``/``-c`` file and local path it names must exist.
- ``pytest``: not run (it is this suite).
- ``python main.py ...``, ``python -m tools.<tool> ...`` (also behind ``torchrun``/``srun``): run with the
  tool's tiny overrides appended (later flags win: generated 32 px data, a 2-block ViT, one epoch, wandb
  offline, outputs inside the sandbox); it must exit 0.
- a command whose last line ends with a comment holding ``needs: gpu``, ``needs: voc`` (the real Pascal
  VOC 2012 on disk) or ``needs: network`` (several: ``needs: voc, network``; other words may come before,
  e.g. ``# extend a finished run; needs: gpu``) runs as written (only its outputs redirected into the
  sandbox, with no GPU and no network whatever the machine) and must fail the way a missing resource does:
  exit status > 0, no traceback, ``error: <one line>`` lines (main.py: exactly one), none about its
  arguments; a main.py command's flags must still parse. (A main.py command that stops at config validation
  here is checked in this process: main() prints that ConfigError as its one line, exit status 2.)
- ``needs: hours`` (hours of CPU): run with the tiny overrides under ``pytest -m slow`` only.

Placeholders: ``runs/<anything>`` is a finished tiny Barlow Twins run (a fresh copy per command, made by
``python main.py`` at the start of the test), ``<anything>`` that run's name, ``OUT_DIR`` a new folder;
``...`` (more flags) is dropped. A command of a tool with no rule below fails with a message saying so.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.conftest import TINY_DATA

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS_FAILING_HERE = {"gpu", "voc", "network"}
NEEDS_TIME = "hours"
SANDBOX_OWN = {"data", "runs", "wandb"}  # never linked: written by the commands
BASE_RUN = "readme-base"
TIMEOUT_S = 300
# Whatever the machine: no GPU and no network for the commands (a `needs: gpu|network` command fails the same
# way on a workstation as in CI, and nothing starts a 2 GB download), the proxy being a closed local port.
ISOLATED = {"CUDA_VISIBLE_DEVICES": "", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
WORKERS = max(2, min(4, os.cpu_count() or 2))

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```bash[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
_COMMENT = re.compile(r"(?:^|\s)#(?P<text>.*)$")
_NEEDS = re.compile(r"\bneeds:\s*(?P<list>[\w-]+(?:\s*,\s*[\w-]+)*)")
_RUN_PLACEHOLDER = re.compile(r"(?<![\w/])runs/<[^<>\s]+>")
_NAME_PLACEHOLDER = re.compile(r"<[^<>\s]+>")
_DIR_PLACEHOLDERS = ("OUT_DIR",)
_LAUNCHERS = ("torchrun", "srun", "mpirun")


# ---------------------------------------------------------------- reading the documents
@dataclass(frozen=True)
class Command:
    source: str
    """``README.md:12`` (file and line of the command's first line)."""
    text: str
    """The command without its trailing comment, continuation lines joined."""
    needs: frozenset[str]

    @property
    def uses_base_run(self) -> bool:
        return bool(_NAME_PLACEHOLDER.search(self.text))


def document_commands(path: Path, root: Path = ROOT) -> list[Command]:
    text = path.read_text()
    commands = []
    for block in _BLOCK.finditer(text):
        first_line = text.count("\n", 0, block.start("body")) + 1
        indent = len(block.group("indent"))
        lines = [line[indent:] if line[:indent].strip() == "" else line for line in block.group("body").splitlines()]
        i = 0
        while i < len(lines):
            start, joined = i, lines[i].rstrip()
            while joined.endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            stripped = joined.strip()
            if not stripped or stripped.startswith("#"):  # comments, shebang, #SBATCH lines
                continue
            comment = _COMMENT.search(stripped)
            body = stripped[:comment.start()].strip() if comment else stripped
            marker = _NEEDS.search(comment.group("text")) if comment else None
            needs = frozenset(n.strip() for n in marker.group("list").split(",")) if marker else frozenset()
            where = f"{path.relative_to(root)}:{first_line + start}"
            for part in re.split(r"\s+&&\s+", body):
                commands.append(Command(where, part.strip(), needs))
    return commands


def all_commands() -> list[Command]:
    return [c for path in DOCUMENTS for c in document_commands(path)]


# ---------------------------------------------------------------- running them
@dataclass
class Context:
    """Where one command runs: its sandbox, its output folder, the data and the base run."""
    sandbox: Path
    data_root: Path
    base_run: Optional[Path] = None
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.sandbox / "runs"


def _flag_value(args: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def main_sandbox(args: list[str], ctx: Context) -> list[str]:
    return [f"--log.output_dir={ctx.out}", "--log.wandb_mode=offline"]


def main_tiny(args: list[str], ctx: Context) -> list[str]:
    values = {
        "data.dataset": "synthetic", "data.root": str(ctx.data_root),
        **{f"data.{k}": v for k, v in TINY_DATA.items()},
        "data.img_size": 32, "data.batch_size": 8, "data.num_workers": 0,
        "barlow.proj_dim": 64, "segmentation.hidden_dim": 16,
        "callbacks.emergence_img_size": 32,  # the DINO protocol's 512 px costs more than the whole tiny run
        # a resumed run continues the base run (1 epoch) by one epoch
        "trainer.max_epochs": 2 if _flag_value(args, "--trainer.resume") else 1,
        "trainer.log_every_n_steps": 1, "trainer.progress_bar": "false",
    }
    if _flag_value(args, "--data.dataset") in ("folder", "imagenet"):
        # an image folder: the generated set's images, its VOC layout as the labelled evaluation set
        from datamodules.synthetic_voc import ensure_synthetic_voc  # local: the generated set's own folder name

        voc = ensure_synthetic_voc(ctx.data_root, TINY_DATA["synthetic_train"], TINY_DATA["synthetic_val"],
                                   TINY_DATA["synthetic_size"], 0)
        values.update({"data.dataset": "folder", "data.root": str(voc / "VOCdevkit" / "VOC2012" / "JPEGImages"),
                       "data.eval_root": str(voc), "data.subfolders": "", "data.file_list": "",
                       "data.index_dir": str(ctx.out / "index")})
    backbone = _flag_value(args, "--backbone.name")
    if backbone is None or backbone.startswith("vit"):
        values.update({"backbone.depth": 2, "backbone.embed_dim": 32, "backbone.num_heads": 2, "backbone.patch_size": 8})
    return [f"--{k}={v}" for k, v in values.items()]


def reproduce_sandbox(args: list[str], ctx: Context) -> list[str]:
    return ["--output-dir", str(ctx.out)]


def reproduce_tiny(args: list[str], ctx: Context) -> list[str]:
    # Its own tiny mode, planned and validated for every config without running them (the smoke runs
    # themselves are tests/test_reproduce.py's subject; ten of them would not fit this test's budget).
    return ["--smoke", "--dry-run"]


def proxy_study_sandbox(args: list[str], ctx: Context) -> list[str]:
    return ["--output-dir", str(ctx.out)]


def proxy_study_tiny(args: list[str], ctx: Context) -> list[str]:
    sets = [x for flag in main_tiny([], ctx) for x in ("--set", flag[2:])]
    return ["--budgets", "1", "--heads", "linear", "--no-floors", *sets]


def method_study_tiny(args: list[str], ctx: Context) -> list[str]:
    sets = [x for flag in main_tiny([], ctx) for x in ("--set", flag[2:])]
    return ["--budgets", "1", "--methods", "bt-global", "--heads", "linear", "--lrs", "0.01", "--no-floors",
            "--probe-epochs", "1", "--max-probe-epochs", "1", *sets]


def synthetic_voc_tiny(args: list[str], ctx: Context) -> list[str]:
    return ["--train", "4", "--val", "2", "--size", "16"]


def emergence_sandbox(args: list[str], ctx: Context) -> list[str]:
    return [f"--log.output_dir={ctx.out}"]


def emergence_tiny(args: list[str], ctx: Context) -> list[str]:
    return [*main_tiny(args, ctx), "--num-images", "4"]


def _nothing(args: list[str], ctx: Context) -> list[str]:
    return []


@dataclass(frozen=True)
class Tool:
    sandbox: Callable[[list[str], Context], list[str]]
    """Flags that only redirect outputs into the sandbox (given to every command)."""
    tiny: Callable[[list[str], Context], list[str]]
    """Flags that make an unmarked command small enough for this test."""


TOOLS = {
    "main.py": Tool(main_sandbox, main_tiny),
    "tools.reproduce": Tool(reproduce_sandbox, reproduce_tiny),
    "tools.proxy_study": Tool(proxy_study_sandbox, proxy_study_tiny),
    "tools.method_study": Tool(proxy_study_sandbox, method_study_tiny),
    "tools.synthetic_voc": Tool(_nothing, synthetic_voc_tiny),
    "tools.emergence": Tool(emergence_sandbox, emergence_tiny),
    "tools.list": Tool(_nothing, _nothing),  # reads the registries: nothing to shrink or redirect
    "tools.export": Tool(_nothing, _nothing),  # reads a run (the copy of runs/<run>), writes into its export/
    "tools.report": Tool(_nothing, _nothing),  # reads a run (the copy of runs/<run>), writes its report.html
}
UNKNOWN_TOOL = Tool(_nothing, _nothing)  # marked commands only: run as written (in the sandbox)


@dataclass
class Outcome:
    tool: str
    args: list[str]
    """The command's own arguments (placeholders substituted), without the sandbox and tiny flags."""
    ctx: Context
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        tail = "\n".join((self.stdout + self.stderr).strip().splitlines()[-25:])
        return f"ran: {shlex.join(self.argv)}\nexit status {self.returncode}; output ends with:\n{tail}"


class NotRun(Exception):
    """What the command is checked for instead of running it (pip, pytest)."""


def make_sandbox(path: Path) -> Path:
    path.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in SANDBOX_OWN and not entry.name.startswith("."):
            (path / entry.name).symlink_to(entry)
    for name in ("data", "runs"):
        (path / name).mkdir()
    return path


def substitute(text: str, ctx: Context) -> str:
    if _NAME_PLACEHOLDER.search(text):
        assert ctx.base_run is not None
        copy = ctx.out / ctx.base_run.name
        if not copy.exists():  # each command resumes its own copy: commands run in parallel
            shutil.copytree(ctx.base_run, copy)
        text = _RUN_PLACEHOLDER.sub(str(copy), text)
        text = _NAME_PLACEHOLDER.sub(ctx.base_run.name, text)
    for placeholder in _DIR_PLACEHOLDERS:
        text = re.sub(rf"\b{placeholder}\b", str(ctx.sandbox / placeholder.lower()), text)
    return text


def expand(tokens: list[str], cwd: Path) -> list[str]:
    out = []
    for token in tokens:
        if token == "...":  # "more flags" in the documentation
            continue
        token = os.path.expandvars(token)
        matches = sorted(glob.glob(token, root_dir=cwd)) if any(c in token for c in "*?[") else []
        out += matches or [token]
    return out


def python_program(tokens: list[str]) -> tuple[str, list[str], list[str]]:
    """(tool name, interpreter arguments, tool arguments) of a command that runs Python code."""
    if tokens and tokens[0] in _LAUNCHERS:  # a launcher starts the script on every process: run it once
        script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if script is None:
            raise AssertionError(f"{tokens[0]} command without a .py script")
        return tokens[script], [tokens[script]], tokens[script + 1:]
    if tokens and re.fullmatch(r"python(3(\.\d+)?)?", tokens[0]):
        if len(tokens) > 2 and tokens[1] == "-m":
            return tokens[2], ["-m", tokens[2]], tokens[3:]
        if len(tokens) > 1:
            return tokens[1], [tokens[1]], tokens[2:]
    raise AssertionError(f"no rule to check `{shlex.join(tokens)}`: run it from python, or add its tool to "
                         f"TOOLS in tests/test_readme_commands.py")


def check_not_run(tokens: list[str], ctx: Context) -> None:
    """pip and pytest commands are checked, not run."""
    if tokens[0] == "pytest" or tokens[:3] in (["python", "-m", "pytest"],):
        raise NotRun("the test suite itself")
    if tokens[0] == "pip" or tokens[:3] == ["python", "-m", "pip"]:
        args = tokens[tokens.index("install") + 1:]
        files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-r", "--requirement", "-c", "--constraint", "-e")]
        files += [a for a in args if a.startswith((".", "/"))]
        missing = [f for f in files if not (ctx.sandbox / f).exists()]
        assert not missing, f"pip install names missing files: {missing}"
        raise NotRun("pip install: its files exist")


def prepare(command: Command, ctx: Context) -> tuple[dict, str, list[str], list[str]]:
    """(environment, tool name, interpreter arguments, tool arguments); raises NotRun for pip/pytest."""
    tokens = expand(shlex.split(substitute(command.text, ctx)), ctx.sandbox)
    env = {**os.environ, **ISOLATED}
    # A wandb service started by an in-process run of an earlier test is advertised in WANDB_SERVICE; children
    # that inherit it share that one service, and two of them resuming copies of one run collide on its ID.
    env.pop("WANDB_SERVICE", None)
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):  # VAR=value command ...
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    check_not_run(tokens, ctx)
    return (env, *python_program(tokens))


def config_error_here(command: Command, ctx: Context) -> Optional[Outcome]:
    """A marked main.py command that stops at config validation here, checked in this process: main()
    prints exactly ``error: <ConfigError>`` and exits 2 for it (tests/test_config.py), and this spares a
    process that would import torch, timm and Lightning only to report a missing folder. None when the
    config is valid here (the command then runs as a process)."""
    from config.loading import ConfigError, parse_config
    from config.validation import validate

    env, name, program, args = prepare(command, ctx)
    if name != "main.py":
        return None
    cwd = os.getcwd()
    os.chdir(ctx.sandbox)  # the command's relative paths; only the main thread changes directory
    try:
        validate(parse_config([*args, *main_sandbox(args, ctx)]))
    except ConfigError as err:
        return Outcome(name, args, ctx, [sys.executable, *program, *args], 2, "", f"error: {err}\n")
    finally:
        os.chdir(cwd)
    return None


def run_command(command: Command, ctx: Context, tiny: bool) -> Outcome:
    env, name, program, args = prepare(command, ctx)
    tool = TOOLS.get(name)
    if tool is None and tiny:
        raise AssertionError(f"no rule for {name} in TOOLS (tests/test_readme_commands.py): add its tiny flags")
    tool = tool or UNKNOWN_TOOL
    argv = [sys.executable, *program, *args, *tool.sandbox(args, ctx), *(tool.tiny(args, ctx) if tiny else [])]
    try:
        done = subprocess.run(argv, cwd=ctx.sandbox, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        return Outcome(name, args, ctx, argv, -1, str(err.stdout or ""), f"{err.stderr or ''}\ntimed out after {TIMEOUT_S} s")
    return Outcome(name, args, ctx, argv, done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------- parallel execution
COMMANDS = all_commands()


def _id(command: Command) -> str:
    words = " ".join(command.text.split()[:4])
    return f"{command.source} {words}"


def _selected(session, slow: bool) -> list[Command]:
    names = ("test_documented_command",) if not slow else ("test_long_documented_command",)
    return [item.callspec.params["command"] for item in session.items
            if getattr(item, "originalname", None) in names and hasattr(item, "callspec")]


class Runner:
    """Starts the selected commands in parallel (those with placeholders once the base run exists)."""

    def __init__(self, commands: list[Command], tmp: Path, data_root: Path):
        self.tmp, self.data_root = tmp, data_root
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)
        self.lock = threading.Lock()
        self.futures: dict[Command, Future] = {}
        self.base: Optional[Future] = None
        if any(c.uses_base_run for c in commands):
            self.base = self.pool.submit(self._make_base_run)
        # placeholder-free commands first: they do not wait for the base run
        for command in sorted(commands, key=lambda c: c.uses_base_run):
            if command.needs & NEEDS_FAILING_HERE and not command.uses_base_run:
                self._check_config_here(command)
            self.result(command)

    def _check_config_here(self, command: Command) -> None:
        ctx = Context(make_sandbox(self.tmp / f"pre{len(self.futures):02d}"), self.data_root)
        future: Future = Future()
        try:
            outcome = config_error_here(command, ctx)
        except Exception as err:  # NotRun, or a rule's AssertionError: reported by the command's test
            future.set_exception(err)
            self.futures[command] = future
            return
        if outcome is not None:
            future.set_result(outcome)
            self.futures[command] = future

    def _make_base_run(self) -> Path:
        ctx = Context(make_sandbox(self.tmp / "base"), self.data_root)
        argv = [sys.executable, "main.py", *main_tiny([], ctx), *main_sandbox([], ctx), f"--log.run_name={BASE_RUN}"]
        done = subprocess.run(argv, cwd=ctx.sandbox, env={k: v for k, v in {**os.environ, **ISOLATED}.items() if k != "WANDB_SERVICE"}, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert done.returncode == 0, f"the base run failed:\n{done.stderr[-3000:]}"
        return ctx.out / BASE_RUN

    def _run(self, command: Command, index: int) -> Outcome:
        base = self.base.result() if command.uses_base_run and self.base is not None else None
        ctx = Context(make_sandbox(self.tmp / f"cmd{index:02d}"), self.data_root, base)
        tiny = not (command.needs & NEEDS_FAILING_HERE)
        return run_command(command, ctx, tiny)

    def result(self, command: Command) -> Future:
        with self.lock:
            if command not in self.futures:
                self.futures[command] = self.pool.submit(self._run, command, len(self.futures))
            return self.futures[command]


@pytest.fixture(scope="session")
def runner(request, tmp_path_factory, data_cache) -> Runner:
    runner = Runner(_selected(request.session, slow=False), tmp_path_factory.mktemp("readme"), data_cache)
    yield runner
    runner.pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="session")
def slow_runner(request, tmp_path_factory, data_cache) -> Runner:
    runner = Runner(_selected(request.session, slow=True), tmp_path_factory.mktemp("readme-slow"), data_cache)
    yield runner
    runner.pool.shutdown(wait=False, cancel_futures=True)


def check(command: Command, future: Future, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        outcome = future.result()
    except NotRun:
        return
    if not command.needs & NEEDS_FAILING_HERE:
        assert outcome.returncode == 0, f"{command.source}: `{command.text}` failed\n{outcome.describe()}"
        return
    needs = ", ".join(sorted(command.needs))
    where = f"{command.source} (marked `needs: {needs}`)"
    if outcome.tool == "main.py":  # it may not run here, but every flag it gives must still exist
        from config.loading import ConfigError, parse_config

        monkeypatch.chdir(outcome.ctx.sandbox)
        try:
            parse_config(outcome.args)
        except ConfigError as err:
            pytest.fail(f"{where}: its flags do not parse: {err}")
    assert outcome.returncode != 0, f"{where} ran here: fix the marker (or the command)\n{outcome.describe()}"
    assert outcome.returncode > 0, f"{where}: expected a clean failure\n{outcome.describe()}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, \
        f"{where}: a traceback instead of one error line\n{outcome.describe()}"
    errors = [line.strip() for line in (outcome.stdout + outcome.stderr).splitlines() if line.strip().startswith("error:")]
    assert errors, f"{where}: no `error:` line\n{outcome.describe()}"
    assert not any("--help" in line for line in errors), \
        f"{where}: fails on its arguments, not on what it needs\n{outcome.describe()}"
    if outcome.tool == "main.py":
        assert len([line for line in outcome.stderr.splitlines() if line.startswith("error:")]) == 1, \
            f"{where}: not exactly one error line\n{outcome.describe()}"


# ---------------------------------------------------------------- the tests
@pytest.mark.parametrize("command", [c for c in COMMANDS if NEEDS_TIME not in c.needs], ids=_id)
def test_documented_command(command: Command, runner: Runner, monkeypatch):
    check(command, runner.result(command), monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if NEEDS_TIME in c.needs], ids=_id)
def test_long_documented_command(command: Command, slow_runner: Runner, monkeypatch):
    check(command, slow_runner.result(command), monkeypatch)


def test_markers_are_known():
    known = NEEDS_FAILING_HERE | {NEEDS_TIME}
    unknown = [(c.source, sorted(c.needs - known)) for c in COMMANDS if c.needs - known]
    assert not unknown, f"unknown `needs:` markers (known: {', '.join(sorted(known))}): {unknown}"


def test_the_documents_have_commands():
    """The reader finds the blocks: a broken fence or a renamed language would silently test nothing."""
    assert any(c.source.startswith("README.md") and c.text.startswith("python main.py") for c in COMMANDS)
    assert any(c.source.startswith("docs/") for c in COMMANDS)


# ---------------------------------------------------------------- the reader itself
def test_reader_joins_lines_splits_chains_and_reads_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n"
        "```bash\n"
        "# a comment line\n"
        "pip install -r requirements.txt && python main.py --a 1\n"
        "python main.py --b 2 \\\n"
        "    --c 3     # extend it; needs: gpu, voc\n"
        "```\n"
        "```python\n"
        "python main.py --not-bash\n"
        "```\n"
        "- item\n"
        "  ```bash\n"
        "  srun python main.py --d 4   # needs: network\n"
        "  ```\n"
    )
    commands = document_commands(doc, root=tmp_path)
    assert [(c.source, c.text, sorted(c.needs)) for c in commands] == [
        ("doc.md:4", "pip install -r requirements.txt", []),
        ("doc.md:4", "python main.py --a 1", []),
        ("doc.md:5", "python main.py --b 2 --c 3", ["gpu", "voc"]),
        ("doc.md:13", "srun python main.py --d 4", ["network"]),
    ]


def test_placeholders_and_launchers(tmp_path):
    base = tmp_path / "base" / BASE_RUN
    (base / "checkpoints").mkdir(parents=True)
    ctx = Context(make_sandbox(tmp_path / "box"), tmp_path / "data", base)
    text = substitute("python main.py --trainer.resume runs/<run>/checkpoints/last.ckpt --log.run_name <run> "
                      "-o OUT_DIR", ctx)
    copy = ctx.out / BASE_RUN
    assert text == f"python main.py --trainer.resume {copy}/checkpoints/last.ckpt --log.run_name {BASE_RUN} " \
                   f"-o {ctx.sandbox / 'out_dir'}"
    assert (copy / "checkpoints").is_dir()
    assert python_program(["torchrun", "--nnodes", "2", "main.py", "--x", "1"]) == ("main.py", ["main.py"], ["--x", "1"])
    assert python_program(["python", "-m", "tools.reproduce", "--dry-run"]) == ("tools.reproduce", ["-m", "tools.reproduce"], ["--dry-run"])
    with pytest.raises(AssertionError, match="no rule"):
        python_program(["make", "all"])
    assert expand(["--a", "...", "config/experiments/table2/dino_vits8_*.yaml"], ctx.sandbox) == [
        "--a", *sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "config/experiments/table2/dino_vits8_*.yaml")))]


def test_pip_commands_are_checked_for_their_files(tmp_path):
    ctx = Context(make_sandbox(tmp_path / "box"), tmp_path)
    with pytest.raises(NotRun):
        check_not_run(["pip", "install", "-r", "requirements.txt"], ctx)
    with pytest.raises(AssertionError, match="missing files"):
        check_not_run(["pip", "install", "-r", "requirements-gone.txt"], ctx)


def test_a_command_that_drifted_from_the_code_fails(tmp_path, monkeypatch):
    ctx = Context(make_sandbox(tmp_path / "box"), tmp_path)
    unmarked = Command("doc.md:1", "python main.py --data.batchsize 8", frozenset())
    outcome = run_command(unmarked, ctx, tiny=True)
    assert outcome.returncode == 2  # a config error, reported before anything heavy is imported
    done: Future = Future()
    done.set_result(outcome)
    with pytest.raises(AssertionError, match="doc.md:1: `python main.py --data.batchsize 8` failed"):
        check(unmarked, done, monkeypatch)

    # marked: it is expected to stop here, but not because a flag no longer exists
    marked = Command("doc.md:2", "python main.py --data.root /datasets/voc --data.batchsize 8", frozenset({"voc"}))
    stopped: Future = Future()
    stopped.set_result(config_error_here(marked, ctx))
    with pytest.raises(pytest.fail.Exception, match="its flags do not parse"):
        check(marked, stopped, monkeypatch)
