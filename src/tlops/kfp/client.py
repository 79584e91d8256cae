"""Thin functions over ``kfp.Client``: connect, submit a compiled pipeline, schedule it, read runs.

Everything a user can get wrong (host, credentials, cron, parameters) fails with a ``TlopsError``
that names the problem and the fix. The API token is never logged, printed or put in an error:
every message built here goes through ``_redact``.

Network behaviour differs from a plain ``kfp.Client`` on purpose, so that an unreachable host
fails within seconds instead of hanging or retrying for half a minute:

* every request has a connect timeout (``CONNECT_TIMEOUT``) and a read timeout (``READ_TIMEOUT``);
  the generated ``kfp_server_api`` client sends none by default;
* urllib3 does not retry (its default is 3 retries of anything, each logged as a warning);
* the health check ``kfp.Client`` makes while it is created is tried once, not 5 times 5 s apart;
* redirects are not followed: an API endpoint that redirects is almost always a login page.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import yaml

from tlops.errors import TlopsError

log = logging.getLogger(__name__)

TOKEN_ENV = "KFP_TOKEN"
DEFAULT_TOKEN_FILE = Path("/var/run/secrets/kubeflow/pipelines/token")
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"  # same variable kfp.Client reads for its links

CONNECT_TIMEOUT = 5.0  # seconds per connection attempt
READ_TIMEOUT = 30.0  # seconds to wait for an answer once connected
CONNECT_RETRIES = 0  # extra connection attempts (urllib3 default: 3 retries of anything)

CRON_HINT = "(seconds minutes hours day-of-month month day-of-week)"


# --------------------------------------------------------------------------------------------
# validation that needs no network


def validate_cron(cron: str) -> str:
    """KFP's scheduler (robfig/cron) takes 6 fields, seconds first; a 5-field crontab line is
    the usual mistake and would be read with every field shifted by one."""
    n = len(cron.split())
    if n != 6:
        raise TlopsError(
            f"--cron must have 6 fields {CRON_HINT}, got {n}: '{cron}'; e.g. '0 0 3 * * *' for 03:00 daily"
        )
    return cron


def validate_host(host: str) -> str:
    host = (host or "").strip()
    if not re.match(r"^https?://[^/\s]+", host):
        raise TlopsError(
            f"--host must be the KFP API URL with its scheme, e.g. http://localhost:8080 or "
            f"https://kubeflow.example.com/pipeline; got {host!r}"
        )
    return host.rstrip("/")


def parse_params(items: Optional[list[str]]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}`` (values stay strings; see ``prepare_params``)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TlopsError(f"--param {item!r} must look like name=value")
        if key in out:
            raise TlopsError(f"--param {key} is given twice")
        out[key] = value
    return out


def read_package(package: Path) -> dict:
    """The pipeline spec (first YAML document) of a compiled KFP v2 package."""
    package = Path(package)
    if not package.is_file():
        raise TlopsError(f"compiled pipeline not found: {package}")
    if package.suffix not in (".yaml", ".yml"):
        raise TlopsError(f"compiled pipeline must be a KFP IR YAML file (.yaml), got {package}")
    try:
        docs = list(yaml.safe_load_all(package.read_text()))
    except yaml.YAMLError as e:
        raise TlopsError(f"compiled pipeline {package} is not valid YAML: {e}") from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise TlopsError(f"{package} is not a compiled KFP v2 pipeline (no pipelineInfo/root)")
    return spec


def pipeline_name(package: Path) -> str:
    return str(read_package(package)["pipelineInfo"].get("name") or Path(package).stem)


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def prepare_params(package: Path, params: Optional[dict]) -> dict[str, Any]:
    """Check ``params`` against the pipeline's declared inputs and convert string values to the
    declared type (``--param epochs=3`` must reach KFP as the integer 3, not the string "3")."""
    spec = read_package(package)
    declared: dict = (spec.get("root", {}).get("inputDefinitions", {}) or {}).get("parameters", {}) or {}
    params = dict(params or {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        takes = ", ".join(sorted(declared)) or "no parameters"
        raise TlopsError(f"--param {', '.join(unknown)}: the pipeline has no such parameter; it takes: {takes}")
    missing = sorted(
        k for k, d in declared.items() if k not in params and not d.get("isOptional") and "defaultValue" not in d
    )
    if missing:
        raise TlopsError(f"the pipeline needs --param {'=... --param '.join(missing)}=... (no default value)")
    out: dict[str, Any] = {}
    for key, value in params.items():
        out[key] = _coerce(key, value, declared[key].get("parameterType", "STRING"))
    return out


def _coerce(key: str, value: Any, ptype: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if ptype == "NUMBER_INTEGER":
            return int(value)
        if ptype == "NUMBER_DOUBLE":
            return float(value)
        if ptype == "BOOLEAN":
            v = value.strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError(value)
        if ptype == "LIST":
            v = json.loads(value)
            if not isinstance(v, list):
                raise ValueError(value)
            return v
        if ptype == "STRUCT":
            v = json.loads(value)
            if not isinstance(v, dict):
                raise ValueError(value)
            return v
    except ValueError:
        kind = {
            "NUMBER_INTEGER": "an integer",
            "NUMBER_DOUBLE": "a number",
            "BOOLEAN": "true or false",
            "LIST": "a JSON list",
            "STRUCT": "a JSON object",
        }[ptype]
        raise TlopsError(f"--param {key}={value}: the pipeline parameter {key} must be {kind}") from None
    return value


# --------------------------------------------------------------------------------------------
# token


def resolve_token(token: Optional[str] = None, token_file: Optional[Path] = None) -> Optional[str]:
    """Explicit token, else ``$KFP_TOKEN``, else the token file (``token_file``, else the in-cluster
    ``/var/run/secrets/kubeflow/pipelines/token`` if it exists), else ``None``."""
    if token:
        return token.strip()
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise TlopsError(f"--token-file {path} does not exist")
    elif DEFAULT_TOKEN_FILE.is_file():
        path = DEFAULT_TOKEN_FILE
    else:
        return None
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise TlopsError(f"cannot read token file {path}: {e.strerror or e}") from None
    if not text:
        raise TlopsError(f"token file {path} is empty")
    return text


# --------------------------------------------------------------------------------------------
# client


@functools.lru_cache(maxsize=None)
def _client_class():
    import kfp
    import kfp_server_api
    import urllib3

    class TlopsKfpClient(kfp.Client):
        """``kfp.Client`` with short timeouts, no retries, no redirects, and a single-try
        health check (the stock one retries 5 times with 5 s sleeps, even on 401)."""

        def __init__(self, *, tlops_host: str, tlops_token: Optional[str], **kwargs: Any) -> None:
            self.tlops_host = tlops_host
            self._tlops_token = tlops_token
            super().__init__(host=tlops_host, existing_token=tlops_token, **kwargs)
            self._tlops_harden()  # no-op when the constructor already ran the health check

        def _tlops_harden(self) -> None:
            api_client = self._healthz_api.api_client
            if getattr(api_client, "_tlops_hardened", False):
                return
            cfg = api_client.configuration
            cfg.retries = urllib3.Retry(
                total=None,
                connect=CONNECT_RETRIES,
                read=0,
                status=0,
                other=0,
                redirect=0,
                raise_on_redirect=False,  # hand the 3xx back so we can say where it points
                backoff_factor=0,
            )
            rest = kfp_server_api.rest.RESTClientObject(cfg)
            request = rest.request

            def request_with_timeout(method, url, *args, _request_timeout=None, **kwargs):
                return request(
                    method, url, *args, _request_timeout=_request_timeout or (CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs
                )

            rest.request = request_with_timeout
            api_client.rest_client = rest
            api_client._tlops_hardened = True

        def get_kfp_healthz(self, sleep_duration: int = 5):  # noqa: ARG002 - signature of the parent
            self._tlops_harden()
            return self._healthz_api.healthz_service_get_healthz()

    return TlopsKfpClient


def connect(
    host: str,
    token: Optional[str] = None,
    token_file: Optional[Path] = None,
    verify_ssl: bool = True,
    namespace: str = "kubeflow",
):
    """A ``kfp.Client`` for ``host``. ``namespace`` follows ``kfp.Client``: ``"kubeflow"`` (the
    default) means a single-user deployment; pass your profile namespace for multi-user KFP."""
    host = validate_host(host)
    tok = resolve_token(token, token_file)
    if not verify_ssl:
        log.warning(
            "TLS certificate verification is OFF for KFP at %s (--no-verify-ssl): anyone on the path can "
            "read the API token and the pipeline; use it only for a test cluster with a self-signed certificate",
            host,
        )
    cls = _client_class()
    with _errors_for(host, [tok] if tok else [], "connecting"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2 and later"
        client = cls(tlops_host=host, tlops_token=tok, namespace=namespace, verify_ssl=verify_ssl)
    log.debug("KFP client for %s (token: %s, namespace: %s)", host, "set" if tok else "none", namespace)
    return client


def _host(client) -> str:
    return getattr(client, "tlops_host", "") or getattr(getattr(client, "_existing_config", None), "host", "?")


def _secrets(client) -> list[str]:
    out = [getattr(client, "_tlops_token", None)]
    cfg = getattr(client, "_existing_config", None)
    if cfg is not None:
        out.append((getattr(cfg, "api_key", None) or {}).get("authorization"))
    return [s for s in out if isinstance(s, str) and s]


def _redact(text: str, secrets: list) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _ui_url(client, path: str) -> str:
    base = os.environ.get(UI_ENDPOINT_ENV) or _host(client)
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    return f"{base.rstrip('/')}/#/{path}"


# --------------------------------------------------------------------------------------------
# error mapping


def _server_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    body = (body or "").strip()
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        msg = data.get("message") or data.get("error") or ""
        if msg:
            return str(msg).strip()
    if body.lstrip().startswith("<"):
        return "(an HTML page)"
    return body[:300] + ("..." if len(body) > 300 else "")


def _errno_text(text: str) -> Optional[str]:
    m = re.search(r"\[Errno -?\d+\]\s*([^'\")]+)", text)
    return m.group(1).strip().rstrip(".").lower() if m else None


def _short_reason(e: BaseException, host: str = "") -> str:
    import urllib3.exceptions as ue

    if isinstance(e, ue.MaxRetryError) and e.reason is not None:
        e = e.reason
    if isinstance(e, getattr(ue, "NameResolutionError", ())):
        return f"cannot resolve host name {urlsplit(host).hostname!r}" if host else "cannot resolve host name"
    if isinstance(e, ue.NewConnectionError):
        text = str(e)
        if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
            return f"cannot resolve host name {urlsplit(host).hostname!r}" if host else "cannot resolve host name"
        return _errno_text(text) or "connection failed"
    if isinstance(e, ue.ConnectTimeoutError):
        return f"connection timed out after {CONNECT_TIMEOUT:g}s"
    if isinstance(e, ue.ReadTimeoutError):
        return f"no answer within {READ_TIMEOUT:g}s"
    if isinstance(e, ue.SSLError):
        return f"TLS error: {str(e).splitlines()[-1][:200]}"
    if isinstance(e, ue.ProxyError):
        return f"proxy error: {_short_reason(e.original_error, host) if getattr(e, 'original_error', None) else e}"
    if isinstance(e, ue.ProtocolError):
        return f"connection closed by the server ({_errno_text(str(e)) or str(e)[:120]})"
    if isinstance(e, ue.LocationValueError):
        return f"invalid URL ({e})"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"{type(e).__name__}: {str(e)[:200]}"


@contextlib.contextmanager
def _errors_for(host: str, secrets: list, action: str) -> Iterator[None]:
    """Turn kfp_server_api / urllib3 errors into a one-line ``TlopsError`` (token redacted, no chain)."""
    import kfp_server_api
    import urllib3.exceptions

    try:
        yield
    except TlopsError:
        raise
    except kfp_server_api.ApiException as e:
        raise TlopsError(_redact(_api_exception_message(e, host, action), secrets)) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise TlopsError(_redact(f"cannot reach KFP at {host}: {_short_reason(e, host)}", secrets)) from None


def _api_errors(client, action: str):
    return _errors_for(_host(client), _secrets(client), action)


def _api_exception_message(e, host: str, action: str) -> str:
    status, reason = e.status, (e.reason or "").strip()
    if not status:  # kfp_server_api turns urllib3 SSL errors into status 0
        first = reason.splitlines()[-1] if reason else "unknown error"
        hint = " (for a self-signed certificate pass --no-verify-ssl)" if "CERTIFICATE_VERIFY_FAILED" in reason else ""
        return f"cannot reach KFP at {host}: TLS error: {first[:200]}{hint}"
    if status in (401, 403):
        return f"KFP at {host} rejected the credentials ({status} {reason}): set KFP_TOKEN or --token-file"
    if 300 <= status < 400:
        location = ""
        for k, v in (e.headers or {}).items():
            if k.lower() == "location":
                location = v
        where = f" to {location}" if location else ""
        return (
            f"KFP at {host} redirected the request{where} ({status} {reason}) while {action}: --host must be the "
            "KFP API endpoint, and a redirect to a login page means no valid credentials: set KFP_TOKEN or --token-file"
        )
    msg = _server_message(e.body)
    return f"KFP at {host} answered {status} {reason} while {action}" + (f": {msg}" if msg else "")


@contextlib.contextmanager
def _package_errors(package: Path) -> Iterator[None]:
    """kfp parses the package into a PipelineSpec proto; a malformed one raises ValueError/ParseError."""
    from google.protobuf import json_format

    try:
        yield
    except (ValueError, json_format.Error) as e:
        raise TlopsError(f"{package} is not a valid compiled KFP pipeline: {str(e)[:300]}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """kfp.Client prints 'Experiment details: <link>' / 'Run details: <link>' to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------------------------
# operations


def _experiment(client, name: str):
    """Get the experiment called ``name``, creating it if there is none."""
    with _api_errors(client, f"getting experiment {name!r}"), _quiet():
        try:
            return client.create_experiment(name=name)  # kfp: get by name, else create
        except ValueError as e:  # e.g. "Multiple experiments is found with name X."
            raise TlopsError(f"KFP at {_host(client)}: {e}") from None


def submit(client, package: Path, *, experiment: str, run_name: Optional[str], params: dict) -> dict:
    """Create a run of the compiled ``package`` in ``experiment`` (created if missing).

    Returns ``{"run_id", "experiment_id", "experiment", "run_name", "url"}``."""
    package = Path(package)
    params = prepare_params(package, params)
    run_name = run_name or f"{pipeline_name(package)} {_dt.datetime.now().strftime('%Y-%m-%d %H-%M-%S')}"
    exp = _experiment(client, experiment)
    with _api_errors(client, "creating the run"), _package_errors(package), _quiet():
        run = client.run_pipeline(
            experiment_id=exp.experiment_id,
            job_name=run_name,
            pipeline_package_path=str(package),
            params=params,
        )
    return {
        "run_id": run.run_id,
        "experiment_id": exp.experiment_id,
        "experiment": experiment,
        "run_name": run_name,
        "url": _ui_url(client, f"runs/details/{run.run_id}"),
    }


def schedule(
    client,
    package: Path,
    *,
    experiment: str,
    job_name: str,
    cron: str,
    params: dict,
    max_concurrency: int = 1,
    catchup: bool = False,
) -> dict:
    """Create an enabled recurring run of ``package`` on a 6-field cron schedule.

    Returns ``{"recurring_run_id", "experiment_id", "experiment", "job_name", "cron",
    "max_concurrency", "catchup", "url"}``."""
    validate_cron(cron)
    if int(max_concurrency) < 1:
        raise TlopsError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    package = Path(package)
    params = prepare_params(package, params)
    exp = _experiment(client, experiment)
    with _api_errors(client, "creating the recurring run"), _package_errors(package), _quiet():
        rr = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=job_name,
            cron_expression=cron,
            max_concurrency=int(max_concurrency),
            no_catchup=not catchup,
            params=params,
            pipeline_package_path=str(package),
            enabled=True,
        )
    return {
        "recurring_run_id": rr.recurring_run_id,
        "experiment_id": exp.experiment_id,
        "experiment": experiment,
        "job_name": job_name,
        "cron": cron,
        "max_concurrency": int(max_concurrency),
        "catchup": bool(catchup),
        "url": _ui_url(client, f"recurringrun/details/{rr.recurring_run_id}"),
    }


def _ts(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, _dt.datetime):
        if value.year <= 1970:  # KFP reports "not finished yet" as the epoch
            return None
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="seconds") + "Z"
    return str(value)


def _run_dict(client, run) -> dict:
    err = getattr(run, "error", None)
    err_text = None
    if err is not None:
        err_text = getattr(err, "message", None) or None
        if err_text is None and getattr(err, "code", None):
            err_text = f"code {err.code}"
    rc = getattr(run, "runtime_config", None)
    return {
        "id": run.run_id,
        "name": run.display_name,
        "state": run.state or "UNKNOWN",
        "created_at": _ts(run.created_at),
        "finished_at": _ts(run.finished_at),
        "error": err_text,
        "experiment_id": run.experiment_id,
        "parameters": dict(getattr(rc, "parameters", None) or {}),
        "url": _ui_url(client, f"runs/details/{run.run_id}"),
    }


def list_runs(client, experiment: Optional[str], limit: int) -> list[dict]:
    """The newest ``limit`` runs (of ``experiment`` if given), newest first."""
    if limit < 1:
        raise TlopsError(f"--limit must be at least 1, got {limit}")
    experiment_id = None
    if experiment:
        with _api_errors(client, f"looking up experiment {experiment!r}"):
            try:
                experiment_id = client.get_experiment(experiment_name=experiment).experiment_id
            except ValueError as e:
                if str(e).startswith("No experiment is found"):
                    raise TlopsError(f"no experiment named {experiment!r} at {_host(client)}") from None
                raise TlopsError(f"KFP at {_host(client)}: {e}") from None
    with _api_errors(client, "listing runs"):
        resp = client.list_runs(page_size=limit, sort_by="created_at desc", experiment_id=experiment_id)
    return [_run_dict(client, r) for r in (resp.runs or [])][:limit]


def get_run(client, run_id: str) -> dict:
    with _api_errors(client, f"getting run {run_id}"):
        run = client.get_run(run_id)
    return _run_dict(client, run)
