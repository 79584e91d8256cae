"""``tlops submit / schedule / runs`` against a real (fake) KFP v2beta1 HTTP server.

Each end-to-end test runs through up to three launchers:

* ``inproc``: a fresh ``typer.Typer()`` with ``tlops.kfp.cli.add_commands`` mounted, run with
  ``typer.testing.CliRunner``; a ``TlopsError`` is rendered the way ``tlops.cli.main`` does;
* ``subprocess``: a new Python process that mounts the commands on ``tlops.cli``'s app and runs the
  real ``tlops.cli.main()`` (real exit codes and ``error: ...`` lines);
* ``console-script``: the installed ``tlops`` script, skipped until ``tlops.cli`` mounts the
  commands itself (it then compiles the real pipeline, so expectations are derived from it).

The first two compile a tiny real KFP pipeline (``fake_kfp_server.compile_tiny_pipeline``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import typer
import yaml
from typer.testing import CliRunner

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import digits_config  # noqa: E402
from fake_kfp_server import TINY_PIPELINE_NAME, FakeKfpServer, compile_tiny_pipeline  # noqa: E402

from tlops.errors import ConfigError, TlopsError  # noqa: E402
from tlops.kfp import client as kfp_client  # noqa: E402
from tlops.kfp.cli import add_commands  # noqa: E402

TLOPS = Path(sys.executable).parent / "tlops"
TOKEN = "tok-3f9c2a7e-very-secret-4b1d"
CRON = "0 0 3 * * *"
CRON_ERROR = (
    "error: --cron must have 6 fields (seconds minutes hours day-of-month month day-of-week), "
    "got 5: '0 3 * * *'; e.g. '0 0 3 * * *' for 03:00 daily"
)
_SCRUB = ("KFP_TOKEN", "KF_PIPELINES_", "TLOPS_DEBUG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def _clean_env(home: Path, extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    env["HOME"] = str(home)  # kfp.Client reads/writes ~/.config/kfp/context.json
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------
# launchers


@dataclass
class Result:
    code: int
    out: str
    err: str
    tb: str = ""  # in-process only: the formatted exception, to check it holds no token

    def everything(self) -> str:
        return self.out + self.err + self.tb


_HARNESS = """
import sys
sys.path.insert(0, {tests!r})
import typer
from fake_kfp_server import compile_tiny_pipeline
from tlops import cli
from tlops.kfp.cli import add_commands
cli.app = typer.Typer(add_completion=False, no_args_is_help=True)
add_commands(cli.app, compile_tiny_pipeline)
cli.main()
"""


def sent_pipeline_spec(sent: dict) -> dict:
    """KFP's client sends the pipeline spec alone, or ``{pipeline_spec, platform_spec}`` when the
    package carries a platform spec (Kubernetes settings: tlops' pod security context and label)."""
    if "platform_spec" in sent:
        assert sent["platform_spec"]["platforms"]["kubernetes"], sent["platform_spec"]
        return sent["pipeline_spec"]
    return sent


class Launcher:
    name = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def __call__(self, args: list[str], env: Optional[dict] = None) -> Result:
        raise NotImplementedError

    def compile_fn(self) -> Callable:
        return compile_tiny_pipeline

    def reference_spec(self, config_file: Path) -> dict:
        """The pipeline spec this launcher's compile function makes for ``config_file``."""
        from tlops.config import load_config

        out = self.compile_fn()(load_config(config_file, []), self.tmp / "reference" / "pipeline.yaml")
        return next(yaml.safe_load_all(Path(out or self.tmp / "reference" / "pipeline.yaml").read_text()))

    def _subprocess(self, argv: list[str], env: Optional[dict]) -> Result:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_clean_env(self.tmp, env))
        return Result(p.returncode, p.stdout, p.stderr)


class InProc(Launcher):
    name = "inproc"

    def __call__(self, args: list[str], env: Optional[dict] = None) -> Result:
        app = typer.Typer(add_completion=False, no_args_is_help=True)
        add_commands(app, compile_tiny_pipeline)
        r = CliRunner().invoke(app, args, env=env)
        code, err, tb = r.exit_code, r.stderr, ""
        e = r.exception
        if e is not None and not isinstance(e, SystemExit):
            if not isinstance(e, TlopsError):
                raise e
            code = 2 if isinstance(e, ConfigError) else 1  # as tlops.cli.main
            err += f"error: {e}\n"
            tb = "".join(traceback.format_exception(e))
        return Result(code, r.stdout, err, tb)


class Subprocess(Launcher):
    name = "subprocess"

    def __call__(self, args: list[str], env: Optional[dict] = None) -> Result:
        return self._subprocess([sys.executable, "-c", _HARNESS.format(tests=str(TESTS)), *args], env)


class ConsoleScript(Launcher):
    name = "console-script"

    def __call__(self, args: list[str], env: Optional[dict] = None) -> Result:
        return self._subprocess([str(TLOPS), *args], env)

    def compile_fn(self) -> Callable:
        from tlops.kfp.pipeline import compile_pipeline

        return compile_pipeline


LAUNCHERS = {c.name: c for c in (InProc, Subprocess, ConsoleScript)}
SCRIPT = "console-script"


@pytest.fixture(params=["inproc", "subprocess", SCRIPT])
def cli(request, tmp_path) -> Launcher:
    """Every launcher: for the behaviour main() shapes (output lines, exit codes, error text)."""
    return LAUNCHERS[request.param](tmp_path)


@pytest.fixture(params=["inproc", SCRIPT])
def cli2(request, tmp_path) -> Launcher:
    """In-process and, once mounted, the console script (keeps the suite fast)."""
    return LAUNCHERS[request.param](tmp_path)


@pytest.fixture
def inproc(tmp_path) -> Launcher:
    return InProc(tmp_path)


@pytest.fixture(autouse=True)
def _kfp_isolation(monkeypatch, tmp_path):
    """No ambient KFP settings: no token, no kfp context file, no in-cluster token file."""
    import kfp

    for k in list(os.environ):
        if k.startswith(_SCRUB):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "home" / ".config" / "kfp" / "context.json"))
    monkeypatch.setattr(kfp_client, "DEFAULT_TOKEN_FILE", tmp_path / "no-such-token")


@pytest.fixture
def server():
    with FakeKfpServer() as s:
        yield s


@pytest.fixture
def config_file(tmp_path) -> Path:
    p = tmp_path / "digits.yaml"
    p.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    return p


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _test_params(spec: dict) -> tuple[list[str], dict]:
    """--param arguments for this pipeline and the typed values KFP must receive."""
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    if "greeting" in declared and "n" in declared:  # the tiny pipeline
        return ["--param", "greeting=hi there", "--param", "n=3"], {"greeting": "hi there", "n": 3}
    for name, d in sorted(declared.items()):
        if d.get("parameterType") == "STRING":
            return ["--param", f"{name}=tlops-test"], {name: "tlops-test"}
    return [], {}


# --------------------------------------------------------------------------------------------
# submit


def test_submit_uploads_spec_and_params_and_creates_experiment(cli, server, config_file):
    spec = cli.reference_spec(config_file)
    param_args, expected_params = _test_params(spec)
    r = cli(["submit", "--host", server.url, "--config", str(config_file), "--run-name", "nightly", *param_args])
    assert r.code == 0, r.everything()

    created = server.requests_to("POST", "/apis/v2beta1/experiments")
    assert [c["body"]["display_name"] for c in created] == ["tlops"]
    exp_id = next(iter(server.experiments.values()))["experiment_id"]

    (run_req,) = server.requests_to("POST", "/apis/v2beta1/runs")
    body = run_req["body"]
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == exp_id
    sent = sent_pipeline_spec(body["pipeline_spec"])
    assert sent["pipelineInfo"]["name"] == spec["pipelineInfo"]["name"]
    assert sent["root"]["dag"]["tasks"].keys() == spec["root"]["dag"]["tasks"].keys()
    assert body["runtime_config"].get("parameters", {}) == expected_params
    if cli.name != "console-script":
        assert spec["pipelineInfo"]["name"] == TINY_PIPELINE_NAME and expected_params

    run_id = next(iter(server.runs))
    assert r.out == f"submitted run {run_id} in experiment tlops: {server.url}/#/runs/details/{run_id}\n"


def test_submit_reuses_the_experiment(cli2, server, config_file):
    cli = cli2
    existing = server.add_experiment("nightly-exp")
    for _ in range(2):
        r = cli(["submit", "--host", server.url, "-c", str(config_file), "--experiment", "nightly-exp"])
        assert r.code == 0, r.everything()
        assert "in experiment nightly-exp:" in r.out
    assert server.requests_to("POST", "/apis/v2beta1/experiments") == []
    lookups = server.requests_to("GET", "/apis/v2beta1/experiments")
    assert lookups and all(
        json.loads(q["query"]["filter"])["predicates"][0]["stringValue"] == "nightly-exp" for q in lookups
    )
    runs = server.requests_to("POST", "/apis/v2beta1/runs")
    assert [q["body"]["experiment_id"] for q in runs] == [existing["experiment_id"]] * 2
    # default run name: '<config name> <time>'
    assert all(q["body"]["display_name"].startswith("t-digits ") for q in runs)


def test_submit_applies_set_overrides(server, config_file):
    seen = {}

    def compile_fn(cfg, out):
        seen["epochs"] = cfg.train.epochs
        return compile_tiny_pipeline(cfg, out)

    app = typer.Typer()
    add_commands(app, compile_fn)
    r = CliRunner().invoke(app, ["submit", "--host", server.url, "-c", str(config_file), "--set", "train.epochs=4"])
    assert r.exit_code == 0, r.output
    assert seen == {"epochs": 4}


# --------------------------------------------------------------------------------------------
# schedule


def test_schedule_sends_cron_concurrency_and_no_catchup(cli, server, config_file):
    spec = cli.reference_spec(config_file)
    param_args, expected_params = _test_params(spec)
    r = cli(["schedule", "--host", server.url, "--config", str(config_file), "--cron", CRON, *param_args])
    assert r.code == 0, r.everything()

    (req,) = server.requests_to("POST", "/apis/v2beta1/recurringruns")
    body = req["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == CRON
    assert "periodic_schedule" not in body["trigger"]
    assert body["max_concurrency"] in ("1", 1)
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["display_name"] == "t-digits"  # default job name: the config name
    assert body["experiment_id"] == next(iter(server.experiments.values()))["experiment_id"]
    assert sent_pipeline_spec(body["pipeline_spec"])["pipelineInfo"]["name"] == spec["pipelineInfo"]["name"]
    assert body["runtime_config"].get("parameters", {}) == expected_params

    rr_id = next(iter(server.recurring_runs))
    assert r.out == f"scheduled t-digits ({rr_id}): cron '{CRON}', max concurrency 1, catch-up off\n"


def test_schedule_catchup_concurrency_and_job_name(inproc, server, config_file):
    r = inproc(
        [
            "schedule",
            "--host",
            server.url,
            "-c",
            str(config_file),
            "--cron",
            "0 */30 * * * *",
            "--job-name",
            "half-hourly",
            "--experiment",
            "sched",
            "--max-concurrency",
            "2",
            "--catchup",
        ]
    )
    assert r.code == 0, r.everything()
    (req,) = server.requests_to("POST", "/apis/v2beta1/recurringruns")
    assert req["body"]["no_catchup"] is False
    assert req["body"]["max_concurrency"] in ("2", 2)
    assert req["body"]["display_name"] == "half-hourly"
    assert [c["body"]["display_name"] for c in server.requests_to("POST", "/apis/v2beta1/experiments")] == ["sched"]
    assert r.out.endswith("cron '0 */30 * * * *', max concurrency 2, catch-up on\n")


def test_schedule_rejects_5_field_cron_before_any_request(cli, server, config_file):
    r = cli(["schedule", "--host", server.url, "--config", str(config_file), "--cron", "0 3 * * *"])
    assert r.code == 1
    assert CRON_ERROR in r.err.splitlines()
    assert r.out == ""
    assert server.requests == []


@pytest.mark.parametrize("cron", ["0 0 3 * *", "0 0 0 3 * * *", "", "@daily"])
def test_validate_cron(cron):
    with pytest.raises(TlopsError, match=r"--cron must have 6 fields .* got \d+: '"):
        kfp_client.validate_cron(cron)
    assert kfp_client.validate_cron("0 0 3 * * *") == "0 0 3 * * *"
    assert kfp_client.validate_cron("0 0 9 ? * 2-6") == "0 0 9 ? * 2-6"


# --------------------------------------------------------------------------------------------
# errors: credentials, reachability, server messages


def test_rejected_credentials_never_show_the_token(cli, server, config_file):
    server.fail_all(401)
    r = cli(["submit", "--host", server.url, "--config", str(config_file)], env={"KFP_TOKEN": TOKEN})
    assert r.code == 1
    assert f"error: KFP at {server.url} rejected the credentials (401 " in r.err
    assert r.err.rstrip().endswith("set KFP_TOKEN or --token-file")
    assert TOKEN not in r.everything()
    assert server.requests, "the request never reached the server"
    assert all(q["headers"].get("authorization") == f"Bearer {TOKEN}" for q in server.requests)


def test_forbidden_is_a_credentials_error_too(inproc, server):
    server.fail_all(403, f"user with token {TOKEN} may not list runs")  # a server that echoes the token
    r = inproc(["runs", "list", "--host", server.url], env={"KFP_TOKEN": TOKEN})
    assert r.code == 1
    assert (
        f"error: KFP at {server.url} rejected the credentials (403 Forbidden): set KFP_TOKEN or --token-file" in r.err
    )
    assert TOKEN not in r.everything()


def test_server_error_messages_are_shown_and_redacted(inproc, server):
    server.fail_all(500, f"database is locked (caller {TOKEN})")
    r = inproc(["runs", "get", "abc", "--host", server.url], env={"KFP_TOKEN": TOKEN})
    assert r.code == 1
    assert (
        f"error: KFP at {server.url} answered 500 Internal Server Error while connecting: "
        "database is locked (caller ***)" in r.err
    )
    assert TOKEN not in r.everything()

    server.fail_all(None)
    r = inproc(["runs", "get", "no-such-run", "--host", server.url])
    assert r.code == 1
    assert (
        f"error: KFP at {server.url} answered 404 Not Found while getting run no-such-run: Run no-such-run not found"
        in r.err
    )


def test_unreachable_host_fails_fast(cli, config_file):
    host = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    r = cli(["submit", "--host", host, "--config", str(config_file)], env={"KFP_TOKEN": TOKEN})
    elapsed = time.monotonic() - t0
    assert r.code == 1
    assert f"error: cannot reach KFP at {host}: connection refused" in r.err
    assert elapsed < 15, f"took {elapsed:.1f}s"
    assert TOKEN not in r.everything()


def test_silent_server_times_out(inproc, monkeypatch):
    """A server that accepts the connection but never answers: the read timeout, not a hang."""
    monkeypatch.setattr(kfp_client, "READ_TIMEOUT", 0.5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)  # never accept()ed: the kernel completes the handshake, nobody answers
    try:
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        r = inproc(["runs", "list", "--host", host])
        assert r.code == 1
        assert f"error: cannot reach KFP at {host}: no answer within 0.5s" in r.err
        assert time.monotonic() - t0 < 10
    finally:
        sock.close()


def test_redirect_to_a_login_page_is_reported_not_followed(inproc, server):
    server.fail_all(302, "login", headers={"Location": "https://dex.example.com/auth?client=kfp"})
    r = inproc(["runs", "list", "--host", server.url])
    assert r.code == 1
    assert (
        f"error: KFP at {server.url} redirected the request to https://dex.example.com/auth?client=kfp (302 Found) "
        "while connecting: --host must be the KFP API endpoint" in r.err
    )
    assert len(server.requests) == 1


def test_host_needs_a_scheme(inproc, server):
    r = inproc(["runs", "list", "--host", f"127.0.0.1:{server.port}"])
    assert r.code == 1
    assert "error: --host must be the KFP API URL with its scheme" in r.err
    assert server.requests == []


# --------------------------------------------------------------------------------------------
# tokens


def test_token_file_is_sent_as_bearer(inproc, server, tmp_path):
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    r = inproc(["runs", "list", "--host", server.url, "--token-file", str(tf)])
    assert r.code == 0, r.everything()
    assert server.requests and all(q["headers"].get("authorization") == f"Bearer {TOKEN}" for q in server.requests)
    assert TOKEN not in r.everything()


def test_missing_token_file_is_an_error(inproc, server, tmp_path):
    r = inproc(["runs", "list", "--host", server.url, "--token-file", str(tmp_path / "nope")])
    assert r.code == 1
    assert f"error: --token-file {tmp_path / 'nope'} does not exist" in r.err
    assert server.requests == []


def test_no_token_sends_no_authorization(inproc, server):
    r = inproc(["runs", "list", "--host", server.url])
    assert r.code == 0, r.everything()
    assert server.requests and all("authorization" not in q["headers"] for q in server.requests)


def test_token_resolution_order(tmp_path, monkeypatch):
    f = tmp_path / "t"
    f.write_text(" from-file \n")
    default = tmp_path / "default-token"
    monkeypatch.setattr(kfp_client, "DEFAULT_TOKEN_FILE", default)
    assert kfp_client.resolve_token(None, None) is None
    default.write_text("from-default")
    assert kfp_client.resolve_token(None, None) == "from-default"
    assert kfp_client.resolve_token(None, f) == "from-file"
    monkeypatch.setenv("KFP_TOKEN", "from-env")
    assert kfp_client.resolve_token(None, f) == "from-env"
    assert kfp_client.resolve_token("explicit", f) == "explicit"
    monkeypatch.delenv("KFP_TOKEN")
    f.write_text("\n")
    with pytest.raises(TlopsError, match="is empty"):
        kfp_client.resolve_token(None, f)


# --------------------------------------------------------------------------------------------
# parameters


def test_params_are_checked_against_the_pipeline_before_any_request(inproc, server, config_file):
    base = ["submit", "--host", server.url, "-c", str(config_file)]
    r = inproc(base + ["--param", "nope=1"])
    assert r.code == 1 and "error: --param nope: the pipeline has no such parameter; it takes: greeting, n" in r.err
    r = inproc(base + ["--param", "n=three"])
    assert r.code == 1 and "error: --param n=three: the pipeline parameter n must be an integer" in r.err
    r = inproc(base + ["--param", "greeting"])
    assert r.code == 1 and "error: --param 'greeting' must look like name=value" in r.err
    r = inproc(base + ["--param", "n=1", "--param", "n=2"])
    assert r.code == 1 and "error: --param n is given twice" in r.err
    assert server.requests == []


# --------------------------------------------------------------------------------------------
# runs list / get


def _seed_runs(server: FakeKfpServer) -> tuple[dict, list[dict]]:
    exp = server.add_experiment("tlops")
    other = server.add_experiment("other")
    runs = [
        server.add_run(
            "digits nightly 1", "SUCCEEDED", exp["experiment_id"], "2024-05-01T03:00:00Z", "2024-05-01T03:20:00Z"
        ),
        server.add_run(
            "digits nightly 2",
            "FAILED",
            exp["experiment_id"],
            "2024-05-02T03:00:00Z",
            "2024-05-02T03:05:00Z",
            error="fine-tune: CUDA out of memory",
            parameters={"greeting": "hi"},
        ),
        server.add_run("digits nightly 3", "RUNNING", exp["experiment_id"], "2024-05-03T03:00:00Z"),
        server.add_run("someone else", "SUCCEEDED", other["experiment_id"], "2024-05-04T03:00:00Z"),
    ]
    return exp, runs


def test_runs_list_prints_the_servers_runs(cli2, server):
    cli = cli2
    exp, runs = _seed_runs(server)
    r = cli(["runs", "list", "--host", server.url, "--experiment", "tlops"])
    assert r.code == 0, r.everything()
    lines = r.out.splitlines()
    assert lines[0].split() == ["RUN", "ID", "NAME", "STATE", "CREATED"]
    body = lines[1:]
    assert len(body) == 3  # not the other experiment's run
    for line, run in zip(body, [runs[2], runs[1], runs[0]], strict=True):  # newest first
        assert line.startswith(run["run_id"])
        assert run["display_name"] in line and run["state"] in line
        assert line.rstrip().endswith(run["created_at"])
    (listing,) = server.requests_to("GET", "/apis/v2beta1/runs")
    assert listing["query"]["experiment_id"] == exp["experiment_id"]
    assert listing["query"]["page_size"] == "20"
    assert listing["query"]["sort_by"] == "created_at desc"

    r = cli(["runs", "list", "--host", server.url, "--limit", "2"])
    assert r.code == 0, r.everything()
    assert [ln.split()[0] for ln in r.out.splitlines()[1:]] == [runs[3]["run_id"], runs[2]["run_id"]]


def test_runs_list_unknown_experiment_and_empty(inproc, server):
    r = inproc(["runs", "list", "--host", server.url, "--experiment", "ghost"])
    assert r.code == 1 and f"error: no experiment named 'ghost' at {server.url}" in r.err
    r = inproc(["runs", "list", "--host", server.url])
    assert r.code == 0 and r.out == "no runs\n"


def test_runs_get_prints_the_runs_fields(cli2, server):
    cli = cli2
    _, runs = _seed_runs(server)
    failed = runs[1]
    r = cli(["runs", "get", failed["run_id"], "--host", server.url])
    assert r.code == 0, r.everything()
    fields = dict(re.match(r"(\w+):\s+(.*)$", ln).groups() for ln in r.out.splitlines())
    assert fields["id"] == failed["run_id"]
    assert fields["name"] == "digits nightly 2"
    assert fields["state"] == "FAILED"
    assert fields["created_at"] == "2024-05-02T03:00:00Z"
    assert fields["finished_at"] == "2024-05-02T03:05:00Z"
    assert fields["error"] == "fine-tune: CUDA out of memory"
    assert fields["parameters"] == "greeting=hi"
    assert fields["url"] == f"{server.url}/#/runs/details/{failed['run_id']}"

    running = runs[2]
    r = cli(["runs", "get", running["run_id"], "--host", server.url])
    fields = dict(re.match(r"(\w+):\s+(.*)$", ln).groups() for ln in r.out.splitlines())
    assert fields["state"] == "RUNNING" and fields["finished_at"] == "-" and "error" not in fields


# --------------------------------------------------------------------------------------------
# the fake server itself


def test_fake_server_records_and_stops():
    s = FakeKfpServer().start()
    import urllib.request

    with urllib.request.urlopen(f"{s.url}/apis/v2beta1/healthz") as resp:
        assert json.loads(resp.read())["multi_user"] is False
    assert s.requests[0]["method"] == "GET" and s.requests[0]["path"] == "/apis/v2beta1/healthz"
    port = s.port
    s.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/apis/v2beta1/healthz", timeout=2)
    assert not any(t.name == "fake-kfp" for t in threading.enumerate())


def test_malformed_package_is_a_clear_error(server, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pipelineInfo": {"name": "x"}, "root": {"dag": {"tasks": {}}}, "noSuchField": 1}))
    client = kfp_client.connect(server.url)
    with pytest.raises(TlopsError, match=r"bad\.yaml is not a valid compiled KFP pipeline"):
        kfp_client.submit(client, bad, experiment="tlops", run_name="r", params={})
    assert server.requests_to("POST", "/apis/v2beta1/runs") == []
