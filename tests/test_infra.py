"""The deployment files under ``infra/`` parse, say what they must, and agree with the project.

Every file is parsed (YAML, TOML, systemd units, the Dockerfile, the compose file) and its
essentials checked: kinds and API versions, the GPU resource of the worker group, schedules,
shared ``FLOWSCORE_HOME`` storage, secrets kept out of job specs and manifests, and version pins
that must equal ``pyproject.toml``'s. Then every ``flowscore`` command that any file runs
(container commands, entrypoints, ``ExecStart=``, compose commands, the Dockerfile's
``ENTRYPOINT``/``CMD``, shell blocks of ``infra/README.md``, usage lines in the files' comments)
is parsed by the CLI's own parser with abbreviations turned off, so a misspelt or shortened
flag (``--actor 2``) fails.
"""

from __future__ import annotations

import argparse
import configparser
import copy
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import build_parser
from jobs.nightly import load_job

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
README = INFRA / "README.md"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "compose" / "compose.yaml"
RAYCLUSTER = INFRA / "k8s" / "raycluster.yaml"
RAYJOB = INFRA / "k8s" / "rayjob-train.yaml"
CRONJOB = INFRA / "k8s" / "cronjob-nightly.yaml"
LAUNCHER = INFRA / "ray" / "cluster-aws.yaml"
SERVICE = INFRA / "systemd" / "flowscore-nightly.service"
TIMER = INFRA / "systemd" / "flowscore-nightly.timer"
ENV_EXAMPLE = INFRA / "flowscore.env.example"
JOB_SPECS = sorted((INFRA / "jobs").glob("*.toml"))

# what every deployment hands flowscore through the environment
SETTINGS = (
    "MLFLOW_TRACKING_URI",
    "FLOWSCORE_CATALOG_URI",
    "FLOWSCORE_WAREHOUSE",
    "AWS_ENDPOINT_URL",
)
# DESIGN.md, "Job spec"
SPEC_KEYS = {
    "job": {"name", "archive", "model"},
    "score": {"actors", "use_gpu", "heatmaps", "commit_every", "max_error_rate"},
}


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pins() -> dict[str, str]:
    """``name -> version`` of every ``name[extras]==version`` dependency in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for dep in project["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;,\s]+)", dep)
        if m:
            out[m.group(1).lower()] = m.group(2)
    out["flowscore"] = project["version"]
    return out


PINS = pins()


# ---------------------------------------------------------------- the command checker


def strict_parser() -> argparse.ArgumentParser:
    """flowscore's parser with prefix matching off: argparse would otherwise accept
    ``--actor`` for ``--actors``."""
    parser = build_parser()
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser


def subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("flowscore's parser has no subcommands")


SUBCOMMANDS = subcommands()
# added by another change; their checks are expected failures only while they are missing
NEW_SUBCOMMANDS = {"run", "report"}


def rejects(argv: list[str]) -> bool:
    """Whether flowscore's (strict) parser refuses ``argv`` (the arguments after
    ``flowscore``). ``--help`` only needs a real subcommand."""
    if "-h" in argv or "--help" in argv:
        return not (argv[0] in ("-h", "--help") or argv[0] in SUBCOMMANDS)
    try:
        strict_parser().parse_args(argv)
    except SystemExit:
        return True
    return False


OPERATORS = set("();<>|&")
WRAPPERS = {"sudo", "exec", "env", "nohup", "time", "command"}
# tokens after which the next ``flowscore`` starts a command: `ray job submit ... -- flowscore
# run ...`, `kubectl exec POD -- flowscore ...`, `docker compose run --rm flowscore ...`
ARGV_FOLLOWS = {"--", "--rm"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*flowscore:[\w.+-]+$")


def is_flowscore(token: str) -> bool:
    return token == "flowscore" or token.endswith("/bin/flowscore") or bool(IMAGE.match(token))


def logical_lines(text: str) -> Iterator[str]:
    """Shell lines: backslash continuations joined, and lines joined while a quote is open."""
    buf = ""
    for line in text.replace("\\\n", " ").splitlines():
        buf = f"{buf}\n{line}" if buf else line
        try:
            shlex.split(buf, comments=True)
        except ValueError:
            continue
        yield buf
        buf = ""
    assert not buf.strip(), f"unbalanced quotes in shell text: {buf[:120]!r}"


def shell_tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def commands_in(text: str) -> list[list[str]]:
    """Every flowscore command line in shell text, as ``[flowscore, arg, ...]``.

    A command starts at ``flowscore`` (or ``…/bin/flowscore``, or a flowscore image name) in
    command position (first word, after an operator, assignments or sudo/exec/env), or right
    after ``--`` / ``--rm``; it runs to the next operator or redirection. Quoted scripts that
    mention flowscore (``sh -c '…'``, ``ray exec CONFIG '…'``) are searched too. A bare
    ``flowscore`` with no arguments (a name, a service run with its default command) is left
    out."""
    found: list[list[str]] = []
    for line in logical_lines(text):
        cmd: list[str] | None = None
        at_start, prev = True, ""
        for tok in shell_tokens(line):
            if tok and set(tok) <= OPERATORS:
                if cmd is not None:
                    if tok[0] in "<>" and len(cmd) > 1 and cmd[-1].isdigit():
                        cmd.pop()  # the 2 of 2>&1
                    found.append(cmd)
                    cmd = None
                at_start, prev = tok[0] not in "<>", tok
                continue
            if cmd is not None:
                cmd.append(tok)
            elif is_flowscore(tok) and (
                at_start or prev in ARGV_FOLLOWS or tok.endswith("/bin/flowscore")
            ):
                cmd = [tok]
            else:
                if "flowscore" in tok and any(c.isspace() for c in tok):
                    found.extend(commands_in(tok))
                at_start = at_start and bool(ASSIGNMENT.match(tok) or tok in WRAPPERS)
            prev = tok
        if cmd is not None:
            found.append(cmd)
    return [c for c in found if len(c) > 1]


# ---------------------------------------------------------------- where commands live


def yaml_strings(node: Any) -> Iterator[str]:
    """Every string value in a YAML tree, and every list of strings as one shell line (an
    exec-form command such as ``[ray, job, submit, ..., --, flowscore, run, ...]``)."""
    if isinstance(node, dict):
        for v in node.values():
            yield from yaml_strings(v)
    elif isinstance(node, list):
        if node and all(isinstance(v, str) for v in node):
            yield shlex.join(node)
        for v in node:
            yield from yaml_strings(v)
    elif isinstance(node, str):
        yield node


def image_argv(node: Any, *, compose: bool) -> Iterator[list[str]]:
    """Containers of the flowscore image that rely on its ``ENTRYPOINT ["flowscore"]``: their
    arguments are a flowscore command (compose: ``command`` without ``entrypoint``; Kubernetes:
    ``args`` without ``command``)."""
    if isinstance(node, dict):
        image = node.get("image")
        if isinstance(image, str) and IMAGE.match(image):
            args = node.get("command") if compose else node.get("args")
            overridden = "entrypoint" in node if compose else "command" in node
            if args is not None and not overridden:
                yield ["flowscore", *(shlex.split(args) if isinstance(args, str) else args)]
        for v in node.values():
            yield from image_argv(v, compose=compose)
    elif isinstance(node, list):
        for v in node:
            yield from image_argv(v, compose=compose)


def yaml_commands(path: Path, *, compose: bool = False) -> list[list[str]]:
    out: list[list[str]] = []
    for doc in yaml_docs(path):
        for text in yaml_strings(doc):
            if "flowscore" in text:
                out.extend(commands_in(text))
        out.extend(image_argv(doc, compose=compose))
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_commands() -> list[list[str]]:
    ins = dockerfile_instructions(DOCKERFILE)
    out: list[list[str]] = []
    for word, rest in ins:
        if word == "RUN":
            out.extend(commands_in(rest))
    entry = [json.loads(r) for w, r in ins if w == "ENTRYPOINT"][-1]
    cmd = [json.loads(r) for w, r in ins if w == "CMD"][-1]
    if entry == ["flowscore"]:
        out.append([*entry, *cmd])
    return out


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """All values of a key that systemd allows more than once (configparser keeps the last)."""
    out, current = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key}="):
            out.append(line.partition("=")[2])
    return out


def systemd_commands() -> list[list[str]]:
    return [
        c
        for v in unit_values(SERVICE, "Service", "ExecStart")
        for c in commands_in(v.lstrip("-@:+!"))
    ]


def readme_blocks() -> list[str]:
    return re.findall(r"```(?:sh|bash|shell|console)\n(.*?)```", README.read_text(), flags=re.S)


def inline_commands(text: str) -> list[list[str]]:
    """Commands in `backticks` that are a whole command line (not a command's name, not
    abridged with …)."""
    out: list[list[str]] = []
    for span in re.findall(r"`([^`\n]+)`", text):
        if span.startswith(("flowscore ", "ray job submit ")) and "…" not in span:
            out.extend(c for c in commands_in(span) if len(c) > 2)
    return out


def readme_commands() -> list[list[str]]:
    return [c for block in readme_blocks() for c in commands_in(block)] + inline_commands(
        README.read_text()
    )


def comment_commands(path: Path) -> list[list[str]]:
    """Usage lines in a file's ``#`` comments (what readers copy): lines that start a
    flowscore command or a `ray job submit` / `docker compose run` / `kubectl exec` of one,
    continuation lines joined, and commands in backticks."""
    lines = [
        ln.strip()[1:].strip() for ln in path.read_text().splitlines() if ln.strip()[:1] == "#"
    ]
    text = "\n".join(lines).replace("\\\n", " ")
    out = inline_commands(text)
    for line in text.splitlines():
        words = line.split()
        if (
            len(words) > 1 and words[0] == "flowscore" and words[1] in SUBCOMMANDS
        ) or line.startswith(("ray job submit ", "docker compose run ", "kubectl exec ")):
            out.extend(commands_in(line))
    return out


COMMENTED = [DOCKERFILE, COMPOSE, RAYCLUSTER, RAYJOB, CRONJOB, LAUNCHER, SERVICE, TIMER, *JOB_SPECS]

SOURCES = {
    "Dockerfile": dockerfile_commands,
    "compose": lambda: yaml_commands(COMPOSE, compose=True),
    "raycluster": lambda: yaml_commands(RAYCLUSTER),
    "rayjob": lambda: yaml_commands(RAYJOB),
    "cronjob": lambda: yaml_commands(CRONJOB),
    "cluster-aws": lambda: yaml_commands(LAUNCHER),
    "systemd": systemd_commands,
    "README": readme_commands,
    **{f"comments of {p.relative_to(INFRA)}": (lambda p=p: comment_commands(p)) for p in COMMENTED},
}


def all_commands() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for name, find in SOURCES.items():
        for cmd in find():
            if (name, cmd) not in out:
                out.append((name, cmd))
    return out


COMMANDS = all_commands()


def command_param(source: str, cmd: list[str]) -> Any:
    marks = []
    if cmd[1] in NEW_SUBCOMMANDS and cmd[1] not in SUBCOMMANDS:
        marks.append(
            pytest.mark.xfail(strict=False, reason=f"`flowscore {cmd[1]}` is not in the CLI yet")
        )
    return pytest.param(cmd, marks=marks, id=f"{source}: {shlex.join(cmd[1:])[:70]}")


@pytest.mark.parametrize("argv", [command_param(s, c) for s, c in COMMANDS])
def test_every_flowscore_command_in_infra_is_real(argv):
    assert argv[1] in SUBCOMMANDS or argv[1] in ("-h", "--help"), f"no such command: {argv}"
    assert not rejects(argv[1:]), f"flowscore's parser rejects: {shlex.join(argv)}"


def test_the_command_checker_catches_typos_and_skips_non_commands():
    found = commands_in(
        "flowscore score --archive a --model m --actor 2\n"
        "sudo useradd --system -g flowscore flowscore\n"
        "ray job submit --address http://h:8265 -- flowscore run j.toml --ray-address auto\n"
        "docker compose run --rm flowscore query 'select 1' 2>&1 | tee log\n"
        "ray exec c.yaml 'flowscore query \"select 2\"'\n"
        "docker compose logs flowscore; docker compose run --rm flowscore\n"
    )
    assert found == [
        ["flowscore", "score", "--archive", "a", "--model", "m", "--actor", "2"],
        ["flowscore", "run", "j.toml", "--ray-address", "auto"],
        ["flowscore", "query", "select 1"],
        ["flowscore", "query", "select 2"],
    ]
    assert rejects(found[0][1:])  # argparse alone would take --actor for --actors
    assert not rejects(["score", "--archive", "a", "--model", "m", "--actors", "2"])
    assert rejects(["score", "--archive", "a", "--model", "m", "--use-gpus"])
    assert rejects(["nonsense"])


def test_the_files_run_the_commands_they_are_for():
    by_source: dict[str, list[list[str]]] = {}
    for source, cmd in COMMANDS:
        by_source.setdefault(source, []).append(cmd[1:])
    assert ["run", "/etc/flowscore/harvest-nightly.toml"] in by_source["systemd"]
    assert ["demo", "--workdir", "/var/lib/flowscore/demo"] in by_source["Dockerfile"]
    assert ["run", "/jobs/harvest-nightly.toml"] in by_source["compose"]
    assert {"run", "train", "synth"} <= {c[0] for c in by_source["compose"]}
    assert ["run", "harvest-nightly-gpu.toml", "--ray-address", "auto"] in by_source["cronjob"]
    assert [c[0] for c in by_source["rayjob"]] == ["train"]
    assert {"run", "train", "query", "report"} <= {c[0] for c in by_source["README"]}
    # on a cluster, every driver joins it instead of starting a private local Ray
    for source in ("cronjob", "rayjob"):
        for cmd in by_source[source]:
            assert cmd[cmd.index("--ray-address") + 1] == "auto", cmd


def test_every_run_command_names_a_job_spec_in_infra_jobs():
    names = {p.name for p in JOB_SPECS}
    runs = [c for _, c in COMMANDS if c[1] == "run"]
    assert runs
    for cmd in runs:
        assert Path(cmd[2]).name in names, cmd


# ---------------------------------------------------------------- README


def git_ignored(rel: str) -> bool:
    """Whether infra/.gitignore (anchored patterns only) keeps ``rel`` out of git: local copies
    of the examples, built wheels."""
    for line in (INFRA / ".gitignore").read_text().splitlines():
        if line.startswith("/"):
            pattern = line[1:]
            if rel == pattern or (pattern.endswith("/") and rel.startswith(pattern)):
                return True
    return False


def test_the_readme_explains_every_file():
    text = README.read_text()
    for path in sorted(INFRA.rglob("*")):
        rel = path.relative_to(INFRA).as_posix()
        if path.is_dir() or rel == "README.md" or git_ignored(rel):
            continue
        assert f"`{rel}`" in text, f"infra/README.md does not mention {rel}"
    # the two facts a cluster deployment must not miss
    assert "shared" in text and "$FLOWSCORE_HOME/train/NAME/ray" in text
    assert "for **one machine**" in text


# ---------------------------------------------------------------- job specs


def test_job_specs_are_in_designs_format_and_hold_no_secrets():
    assert {p.name for p in JOB_SPECS} >= {"harvest-nightly.toml", "harvest-nightly-gpu.toml"}
    for path in JOB_SPECS:
        data = tomllib.loads(path.read_text())
        assert set(data) <= set(SPEC_KEYS) and "job" in data, path
        for section, keys in data.items():
            assert set(keys) <= SPEC_KEYS[section], (path, section)
        spec = load_job(path)  # the project's own checks
        assert spec.archive.startswith("s3://") and spec.model.startswith("models:/")
        assert not re.search(r"password|secret|token|key_id|://[^/@]*@", path.read_text(), re.I)
    assert tomllib.loads((INFRA / "jobs" / "harvest-nightly.toml").read_text()) == {
        "job": {
            "name": "harvest-nightly",
            "archive": "s3://farm-archive/harvest",
            "model": "models:/harvest-grain@champion",
        },
        "score": {
            "actors": 1,
            "use_gpu": False,
            "heatmaps": True,
            "commit_every": 5000,
            "max_error_rate": 0.05,
        },
    }


def test_the_env_example_names_every_setting():
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
            assert value == value.strip() and not value.startswith(("'", '"')), line
            values[key] = value
    assert set(SETTINGS) <= set(values)
    assert values["FLOWSCORE_CATALOG_URI"].startswith("postgresql+psycopg2://")
    assert values["FLOWSCORE_WAREHOUSE"].startswith("s3://")


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_a_non_root_flowscore_image_with_the_production_extras():
    ins = dockerfile_instructions(DOCKERFILE)
    words = [w for w, _ in ins]
    assert "FROM" in words
    assert [json.loads(r) for w, r in ins if w == "ENTRYPOINT"] == [["flowscore"]]
    user = [r for w, r in ins if w == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    copies = " ".join(r for w, r in ins if w == "COPY")
    for part in ("pyproject.toml", "flowcore", "pipelines", "jobs"):
        assert part in copies
    runs = " ".join(r for w, r in ins if w == "RUN")
    assert "pip install /src" in runs  # flowscore itself, from the copied source tree
    for extra in ('"ray[default]', '"pyiceberg[sql-postgres]', "psycopg2-binary", "boto3"):
        assert extra in runs
    args = dict(r.partition("=")[::2] for w, r in ins if w == "ARG")
    assert args["TORCH_VERSION"] == PINS["torch"]
    assert args["TORCHVISION_VERSION"] == PINS["torchvision"]
    assert args["RAY_VERSION"] == PINS["ray"]
    assert args["PYICEBERG_VERSION"] == PINS["pyiceberg"]
    assert "TORCH_INDEX_URL" in args  # the CPU / GPU switch
    env = " ".join(r for w, r in ins if w == "ENV")
    assert "FLOWSCORE_HOME=/var/lib/flowscore" in env
    # the build context is an allow-list: the project, never .venv, demo output or env files
    ignore = [
        line
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**"
    assert {line for line in ignore if line.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!flowcore/",
        "!pipelines/",
        "!jobs/",
    }


# ---------------------------------------------------------------- systemd


def test_systemd_service_and_timer():
    svc = unit(SERVICE)
    assert svc["Service"]["Type"] == "oneshot"
    assert svc["Service"]["EnvironmentFile"].lstrip("-") == "/etc/flowscore/flowscore.env"
    (exec_start,) = unit_values(SERVICE, "Service", "ExecStart")
    assert exec_start.split()[0].endswith("/bin/flowscore")
    assert exec_start.split()[1:] == ["run", "/etc/flowscore/harvest-nightly.toml"]
    env = dict(v.partition("=")[::2] for v in unit_values(SERVICE, "Service", "Environment"))
    assert env["FLOWSCORE_HOME"] == "/var/lib/flowscore"
    assert svc["Service"]["StateDirectory"] == "flowscore"
    assert svc["Service"]["User"] not in ("root", "0")

    timer = unit(TIMER)
    assert timer["Timer"]["OnCalendar"].strip()
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"].get("Unit", SERVICE.name) == SERVICE.name
    assert TIMER.stem == SERVICE.stem
    assert timer["Install"]["WantedBy"] == "timers.target"


# ---------------------------------------------------------------- compose


def test_compose_runs_mlflow_postgres_minio_and_flowscore():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"mlflow", "postgres", "minio", "minio-init", "flowscore"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on") or []:
            assert dep in services, (name, dep)

    env = services["flowscore"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["FLOWSCORE_CATALOG_URI"].startswith("postgresql+psycopg2://")
    assert env["FLOWSCORE_CATALOG_URI"].endswith("@postgres:5432/iceberg")
    assert env["FLOWSCORE_WAREHOUSE"].startswith("s3://")
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["FLOWSCORE_HOME"] == "/var/lib/flowscore"

    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert "mlflow:5000" in mlflow["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "iceberg" in (COMPOSE.parent / "postgres-init.sql").read_text()

    # the buckets the stack uses are the ones minio-init makes
    init = " ".join(services["minio-init"]["command"])
    buckets = set(re.findall(r"local/([a-z0-9-]+)", init))
    used = {
        env["FLOWSCORE_WAREHOUSE"],
        mlflow["MLFLOW_ARTIFACTS_DESTINATION"],
        load_job(INFRA / "jobs" / "harvest-nightly.toml").archive,
    }
    assert {u.removeprefix("s3://").split("/")[0] for u in used} <= buckets

    # no credential is written into the file: each comes from .env
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key) or re.search(
                r"://[^/]*:[^/]*@", value
            ):
                assert "${" in value, f"{name}.{key} holds a literal credential"
    # and the .env that holds them is never committed
    assert "/compose/.env" in (INFRA / ".gitignore").read_text().split()

    # the image is built from infra/Dockerfile, the job specs mounted from infra/jobs
    build = services["flowscore"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    sources = {
        dst: src for src, dst in (v.split(":")[:2] for v in services["flowscore"]["volumes"])
    }
    assert (COMPOSE.parent / sources["/jobs"]).resolve() == (INFRA / "jobs").resolve()


# ---------------------------------------------------------------- Kubernetes

API_VERSIONS = {
    "ConfigMap": "v1",
    "PersistentVolumeClaim": "v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "CronJob": "batch/v1",
}


def test_every_yaml_file_parses_and_every_manifest_is_well_formed():
    paths = sorted(INFRA.rglob("*.yaml"))
    assert {COMPOSE, LAUNCHER, RAYCLUSTER, RAYJOB, CRONJOB} <= set(paths)
    for path in paths:
        assert yaml_docs(path), path
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml_docs(path):
            assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], (path.name, doc["kind"])
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def container(pod_template: dict[str, Any]) -> dict[str, Any]:
    containers = pod_template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_raycluster_has_a_cpu_head_and_autoscaled_gpu_workers_on_shared_storage():
    docs = yaml_docs(RAYCLUSTER)
    rc = one(docs, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == PINS["ray"]
    assert spec["enableInTreeAutoscaling"] is True

    settings = one(docs, "ConfigMap")
    assert settings["apiVersion"] == "v1"
    assert {"MLFLOW_TRACKING_URI", "FLOWSCORE_WAREHOUSE", "AWS_ENDPOINT_URL"} <= set(
        settings["data"]
    )
    # secrets live in the Secret, never in the ConfigMap
    assert "FLOWSCORE_CATALOG_URI" not in settings["data"]
    assert not any(re.search(r"SECRET|PASSWORD|KEY_ID|TOKEN", k) for k in settings["data"])
    home = settings["data"]["FLOWSCORE_HOME"]

    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    head = spec["headGroupSpec"]["template"]
    groups = spec["workerGroupSpecs"]
    gpu_groups = [
        g for g in groups if "nvidia.com/gpu" in container(g["template"])["resources"]["limits"]
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        res = container(g["template"])["resources"]
        assert str(res["limits"]["nvidia.com/gpu"]) == "1"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
    assert "nvidia.com/gpu" not in str(container(head)["resources"])

    images = {container(t)["image"] for t in [head, *(g["template"] for g in groups)]}
    assert len(images) == 1 and IMAGE.match(images.pop())
    for template in [head, *(g["template"] for g in groups)]:
        c = container(template)
        refs = {(k, v["name"]) for e in c["envFrom"] for k, v in e.items() if k.endswith("Ref")}
        assert refs == {
            ("configMapRef", settings["metadata"]["name"]),
            ("secretRef", "flowscore-credentials"),
        }
        claims = {
            v["name"]
            for v in template["spec"]["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims} == {home}
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True

    assert spec["authOptions"]["mode"] == "token"


def test_rayjob_trains_on_the_raycluster():
    rc = one(yaml_docs(RAYCLUSTER), "RayCluster")
    job = one(yaml_docs(RAYJOB), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    (cmd,) = commands_in(job["spec"]["entrypoint"])
    assert cmd[:2] == ["flowscore", "train"] and "--use-gpu" in cmd


def test_cronjob_submits_the_nightly_job_to_the_head_service():
    rc = one(yaml_docs(RAYCLUSTER), "RayCluster")
    docs = yaml_docs(CRONJOB)
    cron = one(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields)
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure")
    c = container(pod)
    argv = c["command"] + c.get("args", [])
    assert argv[:3] == ["ray", "job", "submit"]
    address = argv[argv.index("--address") + 1]
    assert address == f"http://{rc['metadata']['name']}-head-svc:8265"  # KubeRay's head service
    flowscore_argv = argv[argv.index("--") + 1 :]
    assert flowscore_argv[:2] == ["flowscore", "run"]

    # the job spec comes from the ConfigMap, mounted in the uploaded working directory
    jobs_cm = one(docs, "ConfigMap")
    workdir = argv[argv.index("--working-dir") + 1]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounted = {}
    for m in c["volumeMounts"]:
        source = volumes[m["name"]].get("configMap", {}).get("name")
        if source == jobs_cm["metadata"]["name"]:
            mounted[m["mountPath"]] = m.get("subPath")
    assert f"{workdir}/{flowscore_argv[2]}" in mounted
    for key, text in jobs_cm["data"].items():
        assert text == (INFRA / "jobs" / key).read_text(), f"ConfigMap {key} != infra/jobs/{key}"

    # the only credential here, the Ray token, comes from the RayCluster's auth Secret
    env = {e["name"]: e for e in c.get("env", [])}
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": rc["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    for e in env.values():
        if re.search(r"TOKEN|SECRET|PASSWORD|KEY", e["name"]):
            assert "value" not in e, e["name"]


def test_configmap_job_specs_pass_the_projects_checks(tmp_path):
    jobs_cm = one(yaml_docs(CRONJOB), "ConfigMap")
    for key, text in jobs_cm["data"].items():
        (tmp_path / key).write_text(text)
        spec = load_job(tmp_path / key)
        assert spec.use_gpu  # the cluster's spec scores on GPUs


def test_manifests_hold_no_secret_values():
    for path in (RAYCLUSTER, RAYJOB, CRONJOB):
        for doc in yaml_docs(path):
            assert doc["kind"] != "Secret", f"{path.name}: create Secrets with kubectl"


# ---------------------------------------------------------------- Ray cluster launcher


def test_ray_cluster_launcher_config():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] for t in workers)
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers)
    # Ray's own images of the pinned Ray and of the Dockerfile's Python on every node
    py = dict(r.partition("=")[::2] for w, r in dockerfile_instructions(DOCKERFILE) if w == "ARG")[
        "PYTHON_VERSION"
    ].replace(".", "")
    assert cfg["docker"]["head_image"] == f"rayproject/ray:{PINS['ray']}-py{py}-cpu"
    assert cfg["docker"]["worker_image"] == f"rayproject/ray:{PINS['ray']}-py{py}-gpu"
    # installs this version of flowscore with the production extras
    setup = " ".join(cfg["setup_commands"])
    assert f"flowscore-{PINS['flowscore']}-py3-none-any.whl" in setup
    assert f'"pyiceberg[sql-postgres]=={PINS["pyiceberg"]}"' in setup
    assert "psycopg2-binary" in setup
    # shared FLOWSCORE_HOME on every node
    opts = " ".join(cfg["docker"]["run_options"])
    home = re.search(r"FLOWSCORE_HOME=(\S+)", opts).group(1)
    assert f":{home}" in opts
    # Ray's own schema (unknown or misspelt fields fail)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))
