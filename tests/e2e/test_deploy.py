"""The deployment files agree with each other and with the code, without a Docker engine:
Dockerfile stages, docker-compose.yml, deploy/nginx.conf, and the README's docker commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmoe.service.app import GRACEFUL_SHUTDOWN_S
from mmoe.service.repository import MODEL_FILE, ROUTING_FILE, scan
from mmoe.service.settings import Settings
from tests.docs import bash_commands, sections

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_PORT = 8000


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.args("ENV"):
            for token in shlex.split(line):
                key, _, value = token.partition("=")
                out[key] = value
        return out


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """Stages by name, in order; FROM references resolved against the global ARG defaults."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage needs a name: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda v: global_args[v.group(1)], m.group(1))
            current = stages[m.group(2)] = Stage(m.group(2), base)
        elif current is None:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                global_args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return stages


def exec_form(arg: str) -> list[str]:
    assert arg.startswith("["), f"shell form runs under sh, which does not pass on SIGTERM: {arg}"
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


def run_model_job(command: list[str], root: Path) -> list[str]:
    """Run a model job's script (`sh -ec SCRIPT`: compose's `model` service, the Kubernetes Job)
    with root/models as its /models and root/tmp as its /tmp, and a stub `mmoe` that writes
    each --out file; the mmoe commands it ran."""
    assert command[:2] == ["sh", "-ec"], command
    for folder in ("models", "tmp"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    calls = root / "calls"
    calls.write_text("")
    script = re.sub(r"(?<![\w./-])/(models|tmp)\b", lambda m: f"{root}/{m.group(1)}", command[2])
    stub = (
        'mmoe() { echo "$1" >> "$CALLS"; while [ $# -gt 0 ]; do\n'
        '  if [ "$1" = --out ]; then echo stub > "$2"; fi; shift\n'
        "done; }\n"
    )
    subprocess.run(
        ["sh", "-ec", stub + script],
        env={"PATH": os.environ["PATH"], "CALLS": str(calls)},
        check=True,
        capture_output=True,
        timeout=30,
    )
    return calls.read_text().split()


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def docker_section() -> str:
    """The docker sections of the documentation (README.md's example, docs/docker.md)."""
    return "\n".join(text for _, text in sections("docker"))


def readme_commands() -> list[list[str]]:
    """The `docker ...` command lines of the documentation's docker sections, as argv lists."""
    commands = [argv for argv in bash_commands(docker_section()) if argv[:1] == ["docker"]]
    for inline in re.findall(r"`(docker [^`]+)`", docker_section()):
        commands.append(shlex.split(inline))
    return commands


STAGES = dockerfile_stages((ROOT / "Dockerfile").read_text())
SETTINGS_ENV = {f"MMOE_{name.upper()}" for name in Settings.model_fields}


def test_runtime_stage_is_the_default_and_installs_only_the_serving_extra() -> None:
    runtime = STAGES["runtime"]
    assert list(STAGES)[-1] == "runtime", "the CPU server must be what `docker build .` builds"
    assert runtime.base == "python:3.11-slim"
    runs = " ".join(runtime.args("RUN"))
    assert "[serve]" in runs
    for heavy in ("mmoe_ranking_train", "torch", "gcc", "build-essential"):
        assert heavy not in runs, f"runtime stage installs {heavy}"
    for stage in STAGES.values():
        if stage.name != "train":
            assert "mmoe_ranking_train" not in " ".join(stage.args("RUN")), stage.name
    copied = " ".join(runtime.args("COPY"))
    assert "--from=train" not in copied


@pytest.mark.parametrize("name", ["runtime", "gpu"])
def test_server_stages_run_mmoe_serve_as_non_root_with_a_healthcheck(name: str) -> None:
    stage = STAGES[name]
    user = stage.args("USER")[-1].split(":")[0]
    assert user not in ("", "0", "root")
    assert stage.args("EXPOSE") == [str(DEPLOY_PORT)]
    env = stage.env()
    assert env["MMOE_HOST"] == "0.0.0.0"
    assert env["MMOE_PORT"] == str(DEPLOY_PORT)
    assert env["MMOE_MODEL_PATH"] == "/models/model.onnx"
    assert set(k for k in env if k.startswith("MMOE_")) <= SETTINGS_ENV
    # Exec form: the server is PID 1 and gets SIGTERM itself (graceful shutdown).
    assert exec_form(stage.args("CMD")[-1]) == ["mmoe", "serve"]
    (healthcheck,) = stage.args("HEALTHCHECK")
    assert "--start-period=" in healthcheck and "/readyz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck, "slim images have neither"


def test_gpu_and_train_stages() -> None:
    gpu, train = STAGES["gpu"], STAGES["train"]
    assert gpu.base.startswith("nvidia/cuda:") and "cudnn-runtime" in gpu.base
    assert "[serve-gpu]" in " ".join(gpu.args("RUN"))
    assert gpu.env()["MMOE_PROVIDER"] == "cuda"
    assert "mmoe_ranking_train" in " ".join(train.args("RUN"))  # the training wheel
    assert train.args("USER")[-1].split(":")[0] not in ("", "0", "root")


def test_compose_wires_the_job_the_servers_and_the_balancer() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) >= {"model", "server", "server-gpu", "lb"}
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["target"] in STAGES, f"{name}: no stage {svc['build']['target']}"

    job = services["model"]
    assert job["build"]["target"] == "train"
    assert "models:/models" in job["volumes"]
    script = " ".join(job["command"])
    config = re.search(r"--config (\S+)", script)
    assert config and (ROOT / config.group(1)).is_file(), "the job trains a config we ship"
    assert "/models/model.onnx" in script

    drain_s = GRACEFUL_SHUTDOWN_S
    for name in ("server", "server-gpu"):
        svc = services[name]
        assert svc["depends_on"]["model"]["condition"] == "service_completed_successfully"
        assert "models:/models:ro" in svc["volumes"]
        assert "ports" not in svc, f"{name} publishes a host port: `--scale` would collide"
        assert svc["restart"] in ("always", "unless-stopped", "on-failure")
        assert svc["deploy"]["resources"]["limits"]
        grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert grace and int(grace.group(1)) > drain_s, "docker would kill in-flight requests"
        assert set(svc["environment"]) <= SETTINGS_ENV, "unknown MMOE_* settings are ignored"
        healthcheck = svc["healthcheck"]
        image_healthcheck = json.loads(
            STAGES[svc["build"]["target"]].args("HEALTHCHECK")[0].split("CMD", 1)[1]
        )
        assert healthcheck["test"] == ["CMD", *image_healthcheck]

    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["MMOE_PROVIDER"] == "cuda"
    assert "server" in gpu["networks"]["default"]["aliases"], "lb must reach it as `server`"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    lb = services["lb"]
    assert lb["ports"]
    (conf_mount,) = lb["volumes"]
    assert (ROOT / conf_mount.split(":")[0]).resolve() == ROOT / "deploy" / "nginx.conf"
    assert set(compose["volumes"]) == {"models"}


def commented_environment(service: str) -> dict[str, str]:
    """The variables written as comments (`# MMOE_X: value`) in a service's `environment`
    in docker-compose.yml: the alternatives to uncomment."""
    text = (ROOT / "docker-compose.yml").read_text()
    block = re.search(rf"\n  {re.escape(service)}:.*?\n    environment:\n(.*?)\n    \w", text, re.S)
    assert block, f"no environment for {service}"
    found = re.findall(r"^      # (MMOE_\w+): (.+)$", block.group(1), re.M)
    return {name: yaml.safe_load(value) for name, value in found}


@pytest.mark.parametrize("name", ["server", "server-gpu"])
def test_compose_shows_the_repository_as_an_alternative_of_real_settings(name: str) -> None:
    commented = commented_environment(name)
    assert set(commented) <= SETTINGS_ENV, "unknown MMOE_* settings are ignored"
    environment = {**load_compose()["services"][name]["environment"], **commented}
    settings = Settings.model_validate(
        {  # compose's ${VAR:-default} as the default
            k.removeprefix("MMOE_").lower(): re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
            for k, v in environment.items()
        }
    )
    assert settings.model_repository == Path("/models/repository")
    assert settings.repository_poll_s > 0, "a version copied in is picked up without a restart"


def test_the_compose_job_puts_the_model_file_and_version_1_in_the_repository_once(
    tmp_path: Path,
) -> None:
    """The `model` job's script, run with a stub `mmoe`: the file, the item table and version 1
    of `demo` in the repository the servers are shown; nothing again once they are there."""
    command = load_compose()["services"]["model"]["command"]
    volume = tmp_path / "models"
    repo = volume / Path(commented_environment("server")["MMOE_MODEL_REPOSITORY"]).relative_to(
        "/models"
    )
    assert run_model_job(command, tmp_path) == ["data", "train", "export", "items"]
    assert (volume / "model.onnx").is_file() and (volume / "items.parquet").is_file()
    listing = scan(repo)
    assert not listing.errors
    assert {name: sorted(found) for name, found in listing.versions.items()} == {"demo": [1]}
    assert listing.policies["demo"].select([1, 2]) == {1, 2}
    assert not [p.name for p in volume.rglob(".*")], "a staged file left behind"
    assert run_model_job(command, tmp_path) == []
    shutil.rmtree(repo)  # a volume filled before there was a repository: placed, not trained
    assert run_model_job(command, tmp_path) == []
    assert sorted(scan(repo).versions) == ["demo"]


def test_the_docs_put_files_whole_into_the_repository() -> None:
    """docs/docker.md's `docker compose run ... model sh -ec SCRIPT`: a service that mounts the
    volume writable where the servers mount it, and each file written beside its final name
    (a dot name, which the servers ignore) and renamed into the repository."""
    services = load_compose()["services"]
    repo = Path(commented_environment("server")["MMOE_MODEL_REPOSITORY"])
    scripts = [
        (argv, argv[argv.index("-ec") + 1])
        for argv in readme_commands()
        if argv[1:3] == ["compose", "run"] and "-ec" in argv
    ]
    assert scripts
    placed = set()
    for argv, script in scripts:
        service = services[argv[argv.index("-ec") - 2]]
        assert "models:/models" in service["volumes"], "the servers mount models:/models:ro"
        written: set[Path] = set()
        for line in script.strip().splitlines():
            words = shlex.split(line)
            if words[0] == "cp":
                written.add(Path(words[2]))
            elif words[0] == "mv":
                source, target = map(Path, words[1:])
                assert source in written and source.parent == target.parent, line
                assert source.name.startswith("."), line
                rel = target.relative_to(repo)
                assert rel.parts == (ROUTING_FILE,) or (
                    rel.parts[0] == "demo" and rel.parts[1].isdigit() and rel.name == MODEL_FILE
                ), line
                placed.add(rel.name)
    assert placed == {ROUTING_FILE, MODEL_FILE}


def test_nginx_proxies_to_the_servers_and_accepts_the_service_body_limit() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    services = load_compose()["services"]
    upstream = re.search(r"http://([\w-]+):(\d+)", conf)
    assert upstream, "no upstream in deploy/nginx.conf"
    assert upstream.group(1) in services
    assert int(upstream.group(2)) == DEPLOY_PORT
    assert "resolver 127.0.0.11" in conf, "without Docker's DNS, nginx never sees new replicas"
    size = re.search(r"client_max_body_size\s+(\d+)([km]?);", conf)
    assert size, "nginx's default body limit is 1 MiB"
    limit = int(size.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[size.group(2)]
    assert limit >= Settings().max_body_bytes


def test_readme_docker_commands_match_the_files() -> None:
    compose = load_compose()
    services = compose["services"]
    profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    images = {svc["build"]["target"]: svc["image"] for svc in services.values() if "build" in svc}
    takes_value = {
        "--scale", "-s", "--signal", "--profile", "-t", "--timeout", "--tail", "-f", "-v",
        "--volume", "-e", "--env",
    }  # fmt: skip
    commands = readme_commands()
    assert any(argv[:3] == ["docker", "compose", "up"] for argv in commands)
    assert any("--scale" in argv for argv in commands)
    for argv in commands:
        if argv[1] == "compose":
            rest = argv[2:]
            while rest and rest[0].startswith("-"):  # global options
                if rest[0] == "--profile":
                    assert rest[1] in profiles, f"no profile {rest[1]}: {shlex.join(argv)}"
                rest = rest[2:]
            sub, args = rest[0], rest[1:]
            named: list[str] = []
            i = 0
            while i < len(args):
                arg = args[i]
                if arg == "--scale":
                    named.append(args[i + 1].split("=")[0])
                    i += 2
                elif arg in takes_value and not (sub == "logs" and arg == "-f"):
                    i += 2
                elif arg.startswith("-"):
                    i += 1
                else:
                    named.append(arg)
                    i += 1
                    if sub == "run":  # the service; the rest is its command
                        break
            for name in named:
                assert name in services, f"no service {name!r}: {shlex.join(argv)}"
        elif argv[1] == "build":
            target = argv[argv.index("--target") + 1] if "--target" in argv else list(STAGES)[-1]
            assert target in STAGES, shlex.join(argv)
            tag = argv[argv.index("-t") + 1]
            if target in images:
                assert tag == images[target], f"compose calls the {target} image {images[target]}"
    for var in re.findall(r"\b((?:SERVER|TRAIN|LB)_[A-Z]+)\b", docker_section()):
        assert "${" + var in (ROOT / "docker-compose.yml").read_text(), var


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "runs", "data", "models", "results"} <= ignored
    for stage in STAGES.values():
        for copy in stage.args("COPY"):
            if "--from=" not in copy:
                for src in shlex.split(copy)[:-1]:
                    assert src.rstrip("/") not in ignored, f"COPY {src} is in .dockerignore"
                    assert (ROOT / src).exists(), f"COPY {src}: no such path"


def test_exported_model_is_readable_by_the_containers_user(tiny_onnx: Path) -> None:
    # The server runs as uid 10001 and reads a model mounted from the host.
    assert tiny_onnx.stat().st_mode & 0o044 == 0o044, oct(tiny_onnx.stat().st_mode)
