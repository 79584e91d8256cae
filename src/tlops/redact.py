"""Keep credentials out of everything tlops writes: logs, errors, manifests, MLflow tags."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact(text: str, extra: tuple[str, ...] | list[str] = ()) -> str:
    """Replace credential values from the environment (and ``extra``) with ``***``."""
    for val in [os.environ.get(v) for v in SECRET_ENV] + list(extra):
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text


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
