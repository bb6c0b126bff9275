"""Where the run store lives: MongoDB URL, database name, pqa's data directory.

Precedence for the URL (first hit wins): the explicit argument (``--mongo-url``)
> env ``PQA_MONGO_URL`` > ``mongo_url`` in the config file (``$PQA_CONFIG``, else
``$XDG_CONFIG_HOME/pqa/config.toml``, else ``~/.config/pqa/config.toml``) > the
embedded SecantusDB server on ``127.0.0.1:$PQA_DB_PORT`` (default 27117), which
``pqa_experiments.store.db`` starts on demand. The database name is ``pqa`` unless the
URL has a path (``mongodb://host/mydb``).

URLs may carry a password: their parsing and redaction live in :mod:`.urls`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pqa_core.errors import UsageError

from pqa_experiments.store.urls import db_name_from_url, redact_url, validate_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # setup.py installs tomli there
    import tomli as tomllib

DEFAULT_PORT = 27117
EMBEDDED_HOST = "127.0.0.1"


@dataclass(frozen=True)
class MongoTarget:
    """A resolved run store: ``source`` is argument, env, config or embedded."""

    url: str
    db_name: str
    source: str

    @property
    def embedded(self) -> bool:
        return self.source == "embedded"

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)


def data_dir() -> Path:
    """``$PQA_HOME``, else ``$XDG_DATA_HOME/pqa``, else ``~/.local/share/pqa``."""
    if os.environ.get("PQA_HOME"):
        return Path(os.environ["PQA_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "pqa"


def config_path() -> Path:
    """``$PQA_CONFIG``, else ``$XDG_CONFIG_HOME/pqa/config.toml``, else ``~/.config/pqa/config.toml``."""
    if os.environ.get("PQA_CONFIG"):
        return Path(os.environ["PQA_CONFIG"]).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "pqa" / "config.toml"


def load_config() -> dict:
    """The parsed config file, ``{}`` when the default file is absent.

    A ``$PQA_CONFIG`` that names a missing file is an error: the user asked for it.
    """
    path = config_path()
    if not path.is_file():
        if os.environ.get("PQA_CONFIG"):
            raise UsageError(f"config file {path} (from PQA_CONFIG) does not exist")
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None


def db_port(port: int | None = None) -> int:
    """Embedded server port: argument > ``$PQA_DB_PORT`` > 27117."""
    if port is None:
        raw = os.environ.get("PQA_DB_PORT", "").strip()
        if not raw:
            return DEFAULT_PORT
        try:
            port = int(raw)
        except ValueError:
            raise UsageError(f"PQA_DB_PORT must be a port number, got {raw!r}") from None
    if not 0 < int(port) < 65536:
        raise UsageError(f"port must be between 1 and 65535, got {port}")
    return int(port)


def embedded_url(port: int | None = None) -> str:
    """URL of the embedded server (no database path: the name comes from ``db_name``)."""
    return f"mongodb://{EMBEDDED_HOST}:{db_port(port)}/"


def resolve_mongo(explicit: str | None = None) -> MongoTarget:
    """Apply the precedence rules; validates the URL it picks (:class:`UsageError`)."""
    if explicit is not None:
        if not explicit.strip():
            raise UsageError("--mongo-url is empty")
        url, source = explicit.strip(), "argument"
    elif os.environ.get("PQA_MONGO_URL", "").strip():
        url, source = os.environ["PQA_MONGO_URL"].strip(), "env"
    else:
        cfg_url = load_config().get("mongo_url")
        if cfg_url is not None and not isinstance(cfg_url, str):
            raise UsageError(f"mongo_url in {config_path()} must be a string")
        if cfg_url and cfg_url.strip():
            url, source = cfg_url.strip(), "config"
        else:
            url, source = embedded_url(), "embedded"
    validate_url(url, origin=_ORIGIN[source])
    return MongoTarget(url=url, db_name=db_name_from_url(url), source=source)


_ORIGIN = {
    "argument": "--mongo-url",
    "env": "PQA_MONGO_URL",
    "config": "mongo_url in the config file",
    "embedded": "the embedded default",
}


def resolve_mongo_url(explicit: str | None = None) -> str:
    """Just the URL of :func:`resolve_mongo`."""
    return resolve_mongo(explicit).url
