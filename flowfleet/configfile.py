"""What the agent's and the registry's TOML config files share.

Both are validated at load with pydantic (unknown keys rejected) and every error names
the file and the key, for example ``registry.toml: broker.port: Input should be a valid
integer``. Secrets (broker passwords, API tokens) never sit in a config file: the file
names a file (mode 0600) or an environment variable that holds them, and they are
never logged. This module imports nothing from the agent or the registry.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on Jetson images
    import tomli as tomllib

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # pattern of a *_env key's value


class ConfigError(ValueError):
    """Invalid configuration; the message names the file and the key."""


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe(exc: ValidationError, source: str) -> str:
    """All problems on one line, unknown keys first: 'file: key: problem; key: ...'."""
    problems = []
    for err in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(problems)


def read_toml(path: str | Path) -> dict:
    """The parsed TOML document at ``path``; ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def unreadable(key: str, path: str | None) -> str | None:
    """``key: file not found: path`` (or not readable), or None when it is readable."""
    if path is None or os.access(path, os.R_OK):
        return None
    why = "file not found" if not Path(path).exists() else "file not readable"
    return f"{key}: {why}: {path}"


def unset_env(key: str, name: str | None) -> str | None:
    """``key: environment variable NAME is not set``, or None."""
    if name and name not in os.environ:
        return f"{key}: environment variable {name} is not set"
    return None


def read_secret(key: str, path: str | None, env: str | None, *, strip_env: bool) -> str | None:
    """A secret from ``<key>_file`` (stripped) or the variable named by ``<key>_env``;
    errors name the config key, never the value."""
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}_file: cannot read: {exc.strerror}") from None
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{key}_env: environment variable {env} is not set")
        return value.strip() if strip_env else value
    return None


def check_broker_login(section, certificate: str) -> None:
    """The broker section's credentials hang together (agent and registry alike);
    raises ValueError with the first contradiction. ``certificate`` names whose client
    certificate it is, for the message."""
    if section.password_file and section.password_env:
        raise ValueError("give password_file or password_env, not both")
    if (section.password_file or section.password_env) and not section.username:
        raise ValueError("a password needs a username")
    if bool(section.cert_file) != bool(section.key_file):
        raise ValueError(f"cert_file and key_file go together ({certificate})")
    if section.cert_file and not section.ca_file:
        raise ValueError("a client certificate needs ca_file (TLS)")
