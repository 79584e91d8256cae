"""Keep credentials out of everything tlops writes: logs, errors, manifests, MLflow tags.

Credentials reach tlops only through the environment (``AWS_*``, ``MLFLOW_TRACKING_PASSWORD``
/ ``_TOKEN``, ``KFP_TOKEN``, ...) or secret files (``--token-file``, Kubernetes Secrets exposed
as env vars). The config never holds one: URLs with a ``user:password@`` part are refused at
validation (``tlops.config``), and every message that may echo a value goes through
``redact`` / ``scrub_urls``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "KFP_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)

# scheme://user[:password]@host  ->  scheme://***@host
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+)@")


def secret_values() -> list[str]:
    """The credential values currently in the environment (for scrubbing and for tests)."""
    return [v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= 4]


def scrub_urls(text: str) -> str:
    """Replace the ``user:password@`` part of every URL in ``text`` with ``***@``."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}***@", text)


def redact(text: str, extra: tuple[str, ...] | list[str] = ()) -> str:
    """Replace credential values from the environment (and ``extra``) with ``***``, and drop the
    ``user:password@`` part of any URL."""
    for val in secret_values() + [v for v in extra if v and len(v) >= 4]:
        text = text.replace(val, "***")
    return scrub_urls(text)


def safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part (git/HTTP URLs may carry a token there)."""
    if "://" not in url:
        return url  # a path, or scp-like git syntax (user@host:repo) whose user is not a secret
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)
