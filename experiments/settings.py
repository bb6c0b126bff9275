"""Where the run store lives: MongoDB URL, database name, pqa's data directory.

Precedence for the URL (first hit wins): the explicit argument (``--mongo-url``)
> env ``PQA_MONGO_URL`` > ``mongo_url`` in the config file (``$PQA_CONFIG``, else
``$XDG_CONFIG_HOME/pqa/config.toml``, else ``~/.config/pqa/config.toml``) > the
embedded SecantusDB server on ``127.0.0.1:$PQA_DB_PORT`` (default 27117), which
``pqa_experiments.db`` starts on demand. The database name is ``pqa`` unless the
URL has a path (``mongodb://host/mydb``).

URLs may carry a password, so every message built here goes through
:func:`redact_url`; nothing in this module ever echoes a raw URL.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote

from pqa_core.errors import UsageError

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

DEFAULT_DB_NAME = "pqa"
DEFAULT_PORT = 27117
EMBEDDED_HOST = "127.0.0.1"
SCHEMES = ("mongodb", "mongodb+srv")
REDACTED = "***"

# Query options whose values are secrets in a MongoDB URI.
_SECRET_QUERY_KEY = re.compile(r"password|secret|token|authmechanismproperties", re.I)
# Credentials inside any URL embedded in free text ("scheme://user:pass@host").
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@?#]+)@")


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
    if tomllib is None:
        raise UsageError(f"reading {path} needs Python 3.11+ or the tomli package")
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


def _split(url: str) -> tuple[str, str, str, str, str]:
    """``(scheme, userinfo, hosts, "/path", query)`` without validating; tolerant of junk."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", "", "", ""
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    path = slash + path  # "" when the URL has no "/" after the hosts
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    return scheme, userinfo, hosts, path, query


def _stray_at(url: str, userinfo: str) -> bool:
    """An ``@`` outside the parsed credentials: a password with an unescaped ``/?#``."""
    return url.count("@") != (userinfo.count("@") + 1 if userinfo else 0)


def validate_url(url: str, origin: str = "MongoDB URL") -> str:
    """Check the shape of a MongoDB URL; the one-line error never shows the password."""
    scheme, userinfo, hosts, path, query = _split(url)
    if scheme.lower() not in SCHEMES:
        shown = f"{scheme}://" if scheme else redact_url(url)[:40]
        raise UsageError(
            f"{origin}: unsupported MongoDB URL scheme in {shown!r}; "
            "expected mongodb://host[:port][/db] or mongodb+srv://host[/db]"
        )
    if _stray_at(url, userinfo):
        raise UsageError(
            f"{origin}: malformed MongoDB URL {redact_url(url)}: percent-encode "
            "'@', '/', '?', '#' and ':' in the user name and password"
        )
    if not hosts or any(not h for h in hosts.split(",")):
        raise UsageError(f"{origin}: no host in MongoDB URL {redact_url(url)}")
    db = unquote(path[1:])
    if db and re.search(r'[/\\. "$]', db):
        raise UsageError(f"{origin}: invalid database name {db!r} in {redact_url(url)}")
    return url


def db_name_from_url(url: str, default: str = DEFAULT_DB_NAME) -> str:
    """The URL path is the database name; ``default`` when it has none."""
    return unquote(_split(url)[3][1:]) or default


def redact_url(url: str) -> str:
    """The URL with user, password and secret query values replaced by ``***``.

    Errs towards hiding: an ``@`` outside the credentials (a password with an
    unescaped ``/`` or ``?``) hides everything up to the last ``@``.
    """
    scheme, userinfo, hosts, path, query = _split(url)
    if not scheme:
        # Not URL-shaped: still never show what could be credentials.
        return REDACTED + "@" + url.rpartition("@")[2] if "@" in url else redact_text(url)
    if _stray_at(url, userinfo):
        return f"{scheme}://{REDACTED}@" + url.rpartition("@")[2]
    out = f"{scheme}://"
    if userinfo:
        out += f"{REDACTED}@" if ":" not in userinfo else f"{REDACTED}:{REDACTED}@"
    out += hosts + path
    if query:
        parts = []
        for item in query.split("&"):
            key, eq, _value = item.partition("=")
            parts.append(f"{key}={REDACTED}" if eq and _SECRET_QUERY_KEY.search(key) else item)
        out += "?" + "&".join(parts)
    return out


def url_secrets(url: str) -> list[str]:
    """Strings from ``url`` that must never be stored: the URL itself and its password."""
    _scheme, userinfo, _hosts, _path, query = _split(url)
    found = {url}
    user, colon, password = userinfo.partition(":")
    if colon and password:
        found.update({password, unquote(password)})
    for key, value in parse_qsl(query, keep_blank_values=False):
        if _SECRET_QUERY_KEY.search(key) and value:
            found.add(value)
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with URL credentials and each of ``secrets`` replaced by ``***``.

    A secret that is itself a URL becomes its :func:`redact_url` form, which
    keeps logs readable ("connecting to mongodb://***:***@db:27017/").
    """
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, redact_url(secret) if "://" in secret else REDACTED)
    return _URL_CREDENTIALS.sub(lambda m: m["scheme"] + _redacted_userinfo(m["userinfo"]) + "@", text)


def _redacted_userinfo(userinfo: str) -> str:
    return f"{REDACTED}:{REDACTED}" if ":" in userinfo else REDACTED
