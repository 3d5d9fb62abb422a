"""Every command of the README's "Quick start", "Using it", "Your own data (zero code)", "Python API"
and "Export" sections runs as written, in order, in a fresh copy of the repository with
``../shared/data`` beside it (a link to the real one, when there is one).

How the commands run (one test per command, in README order; a test runs the commands before it
first, so any one of them can be selected alone):

* ``bash`` blocks line by line, ``\\`` continuations joined and ``#`` comments dropped: ``semiseg ...``
  in-process through :func:`semiseg.cli.main` (what the ``semiseg`` script calls), anything else
  (``mkdir``, ``cp``) through ``bash -c``, in the copy's folder;
* ``python`` blocks with ``exec``, one namespace for all of them, in the copy's folder.

How they are shrunk (the only changes to what is written, so that everything takes ≈ a minute on
two cores): ``train.iters=N`` (``--set`` and ``"train.iters": N``) becomes ``train.iters=1`` and
``semiseg demo --iters N`` becomes ``--iters 1``.

What is skipped, each with its reason: ``make demo`` / ``make test`` (they run this suite: recursion;
CI runs ``make test``), the environment set-up (``python3 -m venv``, ``pip install``: network and
gigabytes of wheels), commands whose data is not there (``../shared/data`` absent) and the commands
that use what a skipped or failed command would have made.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO

SECTIONS = ("Quick start", "Using it", "Your own data (zero code)", "Python API", "Export")
ITERS = 1  # training steps of every README training command here


@dataclass
class Command:
    section: str
    kind: str  # "bash" or "python"
    text: str  # as written (bash: continuations joined, comments kept)
    line: int  # README line where it starts

    @property
    def id(self) -> str:
        return f"{self.section.split(' (')[0].lower().replace(' ', '_')}:L{self.line}"


def _section(lines: list[str], title: str) -> tuple[int, list[str]]:
    """(index of the first line, lines) of a ``##`` / ``###`` section's own text, up to the next
    heading of any level (so "Using it" stops at its first subsection)."""
    heads = [i for i, line in enumerate(lines) if re.match(rf"^#{{2,3}} {re.escape(title)}\s*$", line)]
    assert len(heads) == 1, f"README.md has {len(heads)} sections titled {title!r}"
    start = end = heads[0] + 1
    inside = False  # '#' lines inside fenced code blocks are comments, not headings
    while end < len(lines) and (inside or not re.match(r"^#{1,6} ", lines[end])):
        inside ^= lines[end].startswith("```")
        end += 1
    return start, lines[start:end]


def extract(readme: Path = REPO / "README.md") -> list[Command]:
    """The commands of :data:`SECTIONS`' fenced ``bash`` and ``python`` blocks, in README order."""
    lines = readme.read_text().splitlines()
    commands: list[Command] = []
    for title in SECTIONS:
        start, body = _section(lines, title)
        i = 0
        while i < len(body):
            fence = re.match(r"^```(\w*)\s*$", body[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(body)) if body[j].startswith("```"))
            block, kind = body[i + 1 : end], fence.group(1)
            if kind == "python":
                commands.append(Command(title, "python", "\n".join(block), start + i + 2))
            elif kind in ("bash", "sh", "shell"):
                pending, first = "", 0
                for k, text in enumerate(block):
                    if not pending:
                        first = start + i + 2 + k
                    if text.rstrip().endswith("\\"):
                        pending += text.rstrip()[:-1] + " "
                        continue
                    joined = (pending + text).strip()
                    pending = ""
                    if shlex.split(joined, comments=True):
                        commands.append(Command(title, "bash", joined, first))
            i = end + 1
    return commands


COMMANDS = extract()


def shrink(command: Command) -> str:
    """The command with its training budget cut to :data:`ITERS` steps (module docstring)."""
    text = re.sub(r"train\.iters=\d+", f"train.iters={ITERS}", command.text)
    text = re.sub(r'"train\.iters":\s*\d+', f'"train.iters": {ITERS}', text)
    text = re.sub(r"(semiseg demo\b.*--iters )\d+", rf"\g<1>{ITERS}", text)
    if re.match(r"semiseg demo\b", text) and "--iters" not in text:
        text += f" --iters {ITERS}"
    return text


def _paths(words: list[str]) -> list[str]:
    """Words of a command that look like relative paths (``runs/x``, ``../shared/data/...``)."""
    return [w.rstrip("/") for w in words if "/" in w and not w.startswith(("-", "/", "http"))]


@dataclass
class Outcome:
    status: str  # "passed", "failed" or "skipped"
    detail: str = ""


@dataclass
class Clone:
    """A fresh copy of the repository, ``shared`` beside it, and the commands run so far."""

    root: Path
    done: dict[str, Outcome] = field(default_factory=dict)
    tainted: dict[str, str] = field(default_factory=dict)  # path -> id of the command that lost it
    namespace: dict = field(default_factory=lambda: {"__name__": "__readme__"})

    def run_until(self, target: Command) -> Outcome:
        for command in COMMANDS:
            if command.id not in self.done:
                self.done[command.id] = self._run(command)
            if command is target:
                return self.done[command.id]
        raise AssertionError(f"{target.id} is not a README command")

    def _skip_reason(self, command: Command, text: str) -> str | None:
        words = shlex.split(text, comments=True) if command.kind == "bash" else []
        if words[:2] == ["make", "test"]:
            return "`make test` runs this test suite (recursion); CI runs it (.ci/run)"
        if words[:1] == ["make"]:
            return (
                f"`{' '.join(words)}` builds .venv and trains 1500 steps (≈ 2 min) from inside the test "
                "suite that `make test` runs (recursion); `semiseg demo` itself is tested in test_cli.py"
            )
        if words[:3] == ["python3", "-m", "venv"] or (words and Path(words[0]).name.startswith("pip")):
            return "sets up the Python environment (network, gigabytes of wheels): not from a test"
        for path in _paths(words) or re.findall(r"\"(runs/[^\"]+)\"", command.text):
            for lost, by in self.tainted.items():
                if path == lost or path.startswith(lost + "/"):
                    return f"uses {lost}, which {by} did not make (skipped or failed)"
        for path in _paths(words):
            if path.startswith("../") and not (self.root / path).exists():
                return f"needs {path}, absent here (docs/datasets.md says where to get the datasets)"
        if words[:2] == ["semiseg", "train"]:
            root = self._data_root(words)
            if root is not None and not (self.root / root).exists():
                return f"needs data.root {root}, absent here (docs/datasets.md says where to get it)"
        return None

    def _data_root(self, words: list[str]) -> str | None:
        from semiseg.config import load_config_file
        from semiseg.config_load import resolve_config_paths

        args, overrides, configs = words[2:], [], []
        for flag, value in zip(args, args[1:]):
            if flag == "--set":
                overrides.append(value)
            elif flag in ("--config", "-c"):
                configs.append(value)  # several: merged in order, as the CLI does
        if not configs:
            return None
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            root = load_config_file(resolve_config_paths(configs), overrides).data.root
        finally:
            os.chdir(cwd)
        return root if root and not Path(root).is_absolute() and root.startswith("..") else None

    def _run(self, command: Command) -> Outcome:
        text = shrink(command)
        reason = self._skip_reason(command, text)
        if reason is not None:
            self._taint(command, text)
            return Outcome("skipped", reason)
        out, cwd = io.StringIO(), os.getcwd()
        os.chdir(self.root)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                if command.kind == "python":
                    exec(compile(text, f"README.md:{command.line}", "exec"), self.namespace)
                    ok = True
                elif text.startswith("semiseg "):
                    from semiseg.cli import main

                    ok = main(shlex.split(text, comments=True)[1:]) == 0
                else:
                    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
                    proc = subprocess.run(
                        ["bash", "-c", text], capture_output=True, text=True, env=env, timeout=120
                    )
                    out.write(proc.stdout + proc.stderr)
                    ok = proc.returncode == 0
        except Exception as exc:  # noqa: BLE001 - reported as the command's failure
            out.write(f"\n{type(exc).__name__}: {exc}")
            ok = False
        finally:
            os.chdir(cwd)
        if not ok:
            self._taint(command, text)
        return Outcome("passed" if ok else "failed", out.getvalue()[-3000:])

    def _taint(self, command: Command, text: str) -> None:
        words = shlex.split(text, comments=True) if command.kind == "bash" else []
        paths = _paths(words) + re.findall(r"\"(runs/[^\"]+)\"", text)
        for path in paths:  # what the command would have made (inputs such as configs/ exist)
            if not path.startswith("..") and not (self.root / path).exists():
                self.tainted.setdefault(path, f"README.md line {command.line}")


def _copy_repository(dest: Path) -> None:
    """The files a fresh clone has (tracked and new, as in this working tree), or README + configs."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        names = [os.fsdecode(n) for n in listed if n]
    except (OSError, subprocess.CalledProcessError):
        names = ["README.md", "configs"]
    for name in names:
        src, dst = REPO / name, dest / name
        if src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    base = tmp_path_factory.mktemp("readme")
    root = base / "semiseg"
    root.mkdir()
    _copy_repository(root)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (base / "shared").symlink_to(shared)
    return Clone(root)


def test_commands_without_their_data_skip_with_a_reason(tmp_path):
    """No ../shared/data: the CHASE_DB1 commands skip, naming what is missing, and so do the
    commands that use their run; the others do not."""
    clone = Clone(tmp_path)
    using = [c for c in COMMANDS if c.section == "Using it"]
    train = next(c for c in using if "chase_db1" in c.text and c.text.startswith("semiseg train"))
    assert "needs data.root ../shared/data/chase_db1" in clone._skip_reason(train, shrink(train))
    clone._taint(train, shrink(train))
    later = [c for c in using[using.index(train) + 1 :] if "runs/chase" in c.text]
    assert later and all("which README.md line" in clone._skip_reason(c, shrink(c)) for c in later)
    assert clone._skip_reason(using[0], shrink(using[0])) is None  # semiseg list


def test_the_sections_hold_commands():
    """The extraction finds commands in every section (so the tests below cannot pass doing nothing)."""
    for title in SECTIONS:
        assert [c for c in COMMANDS if c.section == title], f"no command found under {title!r}"
    assert len(COMMANDS) >= 15
    kinds = {c.kind for c in COMMANDS}
    assert kinds == {"bash", "python"}


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command(clone: Clone, command: Command):
    outcome = clone.run_until(command)
    if outcome.status == "skipped":
        pytest.skip(f"README.md line {command.line}: {outcome.detail}")
    assert outcome.status == "passed", f"README.md line {command.line}: {shrink(command)}\n{outcome.detail}"


def test_what_the_readme_says_they_make(clone: Clone):
    """After every command ran: the commands that need no dataset did run, and did what the text
    around them says (two own-data runs in new folders, each with best.pt; nothing outside runs/
    but my_data/)."""
    for command in COMMANDS:
        clone.run_until(command)
    ran = [c for c in COMMANDS if clone.done[c.id].status == "passed"]
    for title in ("Your own data (zero code)", "Python API", "Export"):
        assert [c for c in ran if c.section == title], f"nothing under {title!r} ran"
    for run in ("runs/run", "runs/run-2"):
        assert (clone.root / run / "best.pt").is_file(), run
    assert not (clone.root / "overlay.png").exists() and not (clone.root / "exported").exists()


# ----------------------------------------------------------------------------------------------
# make env on a CPU-only machine (README "Quick start"): a torch already in .venv is kept
# ----------------------------------------------------------------------------------------------

FAKE_PYTHON = """#!/bin/sh
# Stands in for python: logs its arguments; `-m venv DIR` makes DIR/bin/python (this script);
# `-c 'import torch, torchvision'` succeeds when the venv has a file named has_torch.
echo "$*" >> "$FAKE_LOG"
here=$(dirname "$0")
case "$*" in
  "-m venv"*) eval "dir=\\${$#}"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python" ;;
  "-c import torch, torchvision") [ -f "$here/has_torch" ] ;;
esac
"""


def _make_env(tmp_path: Path, has_venv: bool, has_torch: bool, *make_args: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    work = tmp_path / ("with" if has_venv else "without")
    (work / "bin").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", work / "pyproject.toml")
    fake = work / "bin" / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    if has_venv:
        (work / "venv" / "bin").mkdir(parents=True)
        shutil.copy(fake, work / "venv" / "bin" / "python")
        if has_torch:
            (work / "venv" / "bin" / "has_torch").write_text("")
    log = work / "log"
    proc = subprocess.run(
        ["make", "-f", str(REPO / "Makefile"), "env", f"PYTHON={fake}", f"VENV={work / 'venv'}", *make_args],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "FAKE_LOG": str(log)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (work / "venv" / ".installed").is_file()
    return log.read_text().splitlines()


def test_make_env_keeps_a_torch_already_in_the_venv(tmp_path):
    calls = _make_env(tmp_path, has_venv=True, has_torch=True)
    assert not any("venv" in c.split()[:2] for c in calls)  # the existing .venv is used
    assert not any("torch==" in c for c in calls)  # e.g. the CPU build: kept
    assert calls[-1] == "-m pip install -q -e .[dev]"


def test_make_env_installs_torch_into_a_new_venv_from_the_index_given(tmp_path):
    index = "https://download.pytorch.org/whl/cpu"
    calls = _make_env(tmp_path, False, False, f"TORCH_INDEX_URL={index}", "VENV_FLAGS=--system-site-packages")
    assert calls[0].startswith("-m venv --system-site-packages ")
    assert f"-m pip install -q torch==2.14.1 torchvision==0.29.1 --index-url {index}" in calls
