"""Unit tests of the Dockerfile and .dockerignore: what can be checked without
building the image (no container engine is needed or used).

The Dockerfile is parsed here into stages and instructions; each test checks one
promise of the image against the repository it is built from: the lock file and
pip flags of `make install`, a non-root user, no compiler in the final stage, an
entry point and command the CLI really has, a health check that really passes
against worker.health, and a build context that holds every file it copies.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from worker.cli import build_parser
from worker.health import HEALTHZ_PATH, serving
from worker.metrics import Metrics
from worker.settings import MetricsSettings
from worker.settings_doc import settings_rows

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME_LOCK = "requirements.lock"
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "cmake", "-dev")
# pip options that take a value, so the value is not mistaken for a flag.
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable",
    "-f", "--find-links", "-w", "--wheel-dir", "-i", "--index-url",
}  # fmt: skip
TARGET_OPTIONS = {"-r", "--requirement", "-e", "--editable"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuations joined, comments gone."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args} is not the exec (JSON) form"
    return [str(v) for v in value]


def pip_steps(command: str, verb: str) -> list[list[str]]:
    """Each `pip <verb> ...` of a shell command line, as its arguments."""
    steps = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        for i, word in enumerate(words):
            if word.endswith("pip") and words[i + 1 : i + 2] == [verb]:
                steps.append(words[i + 2 :])
    return steps


def flags(arguments: list[str]) -> set[str]:
    """The options of a pip command line, without their values, and without the
    ones naming what is installed (-r FILE, -e PATH: an editable install is the
    developer's venv, a wheel is the image's)."""
    found, skip = set(), False
    for word in arguments:
        if skip:
            skip = False
        elif word.startswith("-"):
            found.add(word.split("=")[0])
            skip = word in PIP_VALUE_OPTIONS
    return found - TARGET_OPTIONS


def requirement_files(arguments: list[str]) -> list[str]:
    return [
        Path(arguments[i + 1]).name
        for i, word in enumerate(arguments[:-1])
        if word in ("-r", "--requirement")
    ]


def makefile_install_steps() -> list[list[str]]:
    """The pip install lines of the Makefile's venv recipe, variables dropped."""
    steps = []
    for line in MAKEFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("\t") and "pip install" in line and "--upgrade" not in line:
            steps += pip_steps(line.replace("$(BIN)/", ""), "install")
    assert steps, "no pip install step in the Makefile"
    return steps


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile()[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_dockerfile_is_multi_stage_on_slim_python_of_the_supported_version(
    stages: list[Stage],
) -> None:
    """A build stage and a final stage, both on the slim image of the Python
    version pyproject.toml requires."""
    wanted = PYPROJECT["project"]["requires-python"].removeprefix(">=")

    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(rf"python:{re.escape(wanted)}-slim(-\w+)?", stage.base)


def test_dockerfile_builds_wheels_from_the_runtime_lock(stages: list[Stage]) -> None:
    """The build stage turns requirements.lock, the README's lock, into wheels."""
    wheel_steps = [
        step
        for stage in stages[:-1]
        for command in stage.all("RUN")
        for step in pip_steps(command, "wheel")
    ]

    assert any(requirement_files(s) == [RUNTIME_LOCK] for s in wheel_steps)
    assert any("--no-deps" in s and "." in s for s in wheel_steps)


def test_dockerfile_installs_the_lock_with_the_makefile_s_pip_flags(
    final: Stage,
) -> None:
    """The final stage installs requirements.lock with every flag `make install`
    uses for it, then the worker itself with --no-deps, like `make install`."""
    make_steps = makefile_install_steps()
    make_lock = next(s for s in make_steps if RUNTIME_LOCK in requirement_files(s))
    make_self = next(s for s in make_steps if "." in s)
    image_steps = [s for c in final.all("RUN") for s in pip_steps(c, "install")]
    image_lock = [s for s in image_steps if requirement_files(s)]
    image_self = [s for s in image_steps if "cio-worker" in s]

    assert [requirement_files(s) for s in image_lock] == [[RUNTIME_LOCK]]
    assert flags(make_lock) <= flags(image_lock[0])
    assert len(image_self) == 1
    assert flags(make_self) <= flags(image_self[0])
    assert "--no-deps" in flags(image_self[0])
    assert {"--no-index"} <= flags(image_lock[0]) & flags(image_self[0])


def test_runtime_lock_pins_every_dependency_the_package_imports() -> None:
    """Every third-party module imported under worker/ comes from a
    distribution pinned in requirements.lock, so the image can import it (a
    dependency missing from the lock would pass `make test` on a developer's
    venv and fail in the container)."""
    pinned = {
        _normalise(line.split("==")[0])
        for line in (ROOT / RUNTIME_LOCK).read_text(encoding="utf-8").splitlines()
        if "==" in line
    }
    providers = importlib.metadata.packages_distributions()
    missing = {}

    for module in sorted(_third_party_imports(ROOT / "worker")):
        dists = {_normalise(d) for d in providers.get(module, [module])}
        if not dists & pinned:
            missing[module] = sorted(dists)

    assert not missing, (
        f"imported but not pinned in {RUNTIME_LOCK} (add them to pyproject.toml "
        f"dependencies and re-lock with `make lock`): {missing}"
    )


def test_runtime_lock_pins_every_pyproject_dependency() -> None:
    """Each [project] dependency has a pinned line in requirements.lock."""
    pinned = {
        _normalise(line.split("==")[0])
        for line in (ROOT / RUNTIME_LOCK).read_text(encoding="utf-8").splitlines()
        if "==" in line
    }

    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        assert _normalise(name) in pinned, requirement


def test_dockerfile_final_stage_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    """USER is a numeric uid other than 0, so runAsNonRoot can verify it."""
    user = final.last("USER").split(":")[0]

    assert user.isdigit()
    assert int(user) != 0


def test_dockerfile_final_stage_has_no_build_tools(
    stages: list[Stage], final: Stage
) -> None:
    """No compiler is installed in the final stage, and it does not start from
    the build stage (which may have one)."""
    names = {stage.name for stage in stages[:-1]}
    installs = " ".join(
        command for command in final.all("RUN") if "apt-get install" in command
    )

    assert final.base not in names
    for tool in BUILD_TOOLS:
        assert tool not in installs
    for copy in final.all("COPY"):
        assert "--from" not in copy, "copy wheels through a bind mount only"


def test_dockerfile_entrypoint_is_the_console_script_and_cmd_a_real_command(
    final: Stage,
) -> None:
    """ENTRYPOINT names the cio-worker script of pyproject.toml, and the CMD
    parses as a command of the CLI."""
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    command = exec_form(final.last("CMD"))
    scripts = PYPROJECT["project"]["scripts"]

    assert entrypoint == ["cio-worker"]
    assert scripts["cio-worker"] == "worker.cli:main"
    assert build_parser().parse_args(command).command == "run"


def test_dockerfile_exposes_the_metrics_port(final: Stage) -> None:
    """EXPOSE is the default [metrics] port."""
    assert final.last("EXPOSE").split() == [str(MetricsSettings().port)]


def _healthcheck_command(final: Stage) -> list[str]:
    args = final.last("HEALTHCHECK")
    assert " CMD " in f" {args} "
    return exec_form(args.split("CMD", 1)[1].strip())


def test_dockerfile_healthcheck_probes_the_path_and_port_worker_health_serves(
    final: Stage,
) -> None:
    """The health check asks /healthz on the [metrics] port, read from the real
    setting's variable with the real default."""
    command = _healthcheck_command(final)
    code = command[-1]
    variables = {env for _, env, _, _ in settings_rows()}

    assert command[:2] == ["python", "-c"]
    assert f"{HEALTHZ_PATH}'" in code
    assert "CIO_METRICS__PORT" in variables
    assert f"os.environ.get('CIO_METRICS__PORT', '{MetricsSettings().port}')" in code


@pytest.mark.parametrize(("stalled", "passes"), [(False, True), (True, False)])
def test_dockerfile_healthcheck_command_passes_only_while_the_loop_turns(
    final: Stage, stalled: bool, passes: bool
) -> None:
    """Run the HEALTHCHECK's own command against worker.health on loopback: it
    exits 0 while the loop turns and fails once /healthz answers 503."""
    now = [100.0]
    metrics = Metrics(clock=lambda: now[0])
    settings = MetricsSettings(host="127.0.0.1", port=0, liveness_timeout_s=10)
    command = _healthcheck_command(final)

    with serving(settings, metrics) as server:
        if stalled:
            now[0] += 11
        result = subprocess.run(
            [sys.executable, *command[1:]],
            env={"CIO_METRICS__PORT": str(server.port)},
            capture_output=True,
            timeout=30,
            check=False,
        )

    assert (result.returncode == 0) is passes, result.stderr


def test_dockerfile_copies_only_files_that_exist_and_are_in_the_context(
    stages: list[Stage],
) -> None:
    """Every COPY source exists and .dockerignore does not leave it out."""
    rules = dockerignore_rules()
    sources = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            sources += words[:-1]

    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        )
        kept = [f for f in files if not ignored(f.relative_to(ROOT).as_posix(), rules)]
        assert kept, f"COPY {source}: .dockerignore leaves it out of the context"


def test_dockerfile_copies_the_files_the_image_needs_at_run_time(
    final: Stage,
) -> None:
    """The default settings file and the schemas it names are in the image."""
    copied = " ".join(final.all("COPY"))

    assert "schemas/" in copied
    assert "config/worker.toml" in copied


def test_dockerfile_build_stage_copies_what_the_package_build_reads(
    stages: list[Stage],
) -> None:
    """pyproject.toml, the README it names as readme, and the package."""
    copied = " ".join(c for stage in stages[:-1] for c in stage.all("COPY"))

    for needed in ("pyproject.toml", PYPROJECT["project"]["readme"], "worker/"):
        assert needed in copied


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/config",
        ".cache/kafka/bin/kafka-server-start.sh",
        "tests/unit/test_dockerfile.py",
        "bench/run.py",
        "build/lib/worker/cli.py",
        "worker/__pycache__/cli.cpython-311.pyc",
        "cio_worker.egg-info/PKG-INFO",
        ".env",
    ],
)
def test_dockerignore_leaves_out_local_state_and_caches(path: str) -> None:
    """Virtualenvs, git, the Kafka download, tests and bytecode stay out."""
    assert ignored(path, dockerignore_rules())


def dockerignore_rules() -> list[tuple[bool, str]]:
    """(is_exception, pattern) per line, in order."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, line.lstrip("!").strip("/")))
    return rules


def ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    decision = False
    for negated, pattern in rules:
        regex = _pattern_regex(pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            decision = not negated
    return decision


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("**/"):
        return re.compile(r"(?:.*/)?" + _glob(pattern[3:]))
    return re.compile(_glob(pattern))


def _glob(pattern: str) -> str:
    # fnmatch's translation, with * kept inside one path segment.
    translated = fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(r")\Z")
    return translated.replace(".*", "[^/]*")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports(package: Path) -> set[str]:
    modules = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {
        m for m in modules if m not in sys.stdlib_module_names and m != package.name
    }
