"""What never reaches MLflow: secret environment values and URL credentials in params, tags and artifacts."""

from __future__ import annotations

import os
import re
from typing import Any

# Environment variables whose values must never reach MLflow (params, tags, config.json).
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY", re.IGNORECASE)
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (AWS keys, MLflow tokens, ...), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """``value`` with URL credentials (``scheme://user:pass@``) and secret env values replaced by ``***``;
    dicts and lists are redacted recursively, other types returned as they are."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if not isinstance(value, str):
        return value
    out = _USERINFO.sub(r"\1***@", value)
    for secret in secrets:
        out = out.replace(secret, "***")
    return out


def strip_credentials(uri: str | None) -> str | None:
    """``uri`` without ``user:pass@`` (for files users share: MLflow auth then comes from the environment)."""
    return _USERINFO.sub(r"\1", uri) if uri else uri
