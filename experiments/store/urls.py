"""MongoDB URLs and the secrets in them: validate, redact, scrub. The one place that knows them.

A URL may carry a password (``mongodb://user:pass@host/db``) or secret query options
(``authMechanismProperties``, ``...token...``). Every message, stored run document, log line
and recovery file that could contain a URL goes through :func:`redact_text` or a
:class:`Scrubber`, so no password is ever printed or stored. Nothing here imports Sacred.
"""
from __future__ import annotations

import re
from typing import Sequence
from urllib.parse import parse_qsl, unquote

from pqa_core.errors import UsageError

SCHEMES = ("mongodb", "mongodb+srv")
REDACTED = "***"
DEFAULT_DB_NAME = "pqa"
MIN_SECRET_LEN = 4  # a shorter password is scrubbed only inside its URL: replacing every "ab" would wreck a log

# Query options whose values are secrets in a MongoDB URI.
_SECRET_QUERY_KEY = re.compile(r"password|secret|token|authmechanismproperties", re.I)
# Credentials inside any URL embedded in free text ("scheme://user:pass@host").
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@?#]+)@")
# Where pymongo's one-line messages turn into a topology dump.
_ERROR_NOISE = (", Timeout:", " (configured timeouts", ", full error:")


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


def describe_error(exc: BaseException, secrets: Sequence[str] = (), limit: int = 300) -> str:
    """A pymongo (or any) error as one short line: its first clause, secrets removed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for cut in _ERROR_NOISE:
        text = text.split(cut)[0]
    return redact_text(text, list(secrets))[:limit]


class Scrubber:
    """Replaces ``secrets`` (and any URL credentials) in strings, bytes and containers, as stored
    run documents and recovery files need."""

    def __init__(self, secrets: Sequence[str] = ()):
        self.secrets = sorted(
            {s for s in secrets if s and (len(s) >= MIN_SECRET_LEN or "://" in s)}, key=len, reverse=True
        )
        self._bsecrets = [s.encode() for s in self.secrets]

    def text(self, s: str) -> str:
        if "://" not in s and not any(x in s for x in self.secrets):
            return s
        return redact_text(s, self.secrets)

    def data(self, b: bytes) -> bytes:
        if not any(x in b for x in self._bsecrets) and b"://" not in b:
            return b
        return redact_text(b.decode("utf-8", "surrogateescape"), self.secrets).encode("utf-8", "surrogateescape")

    def __call__(self, obj):
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self(k): self(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if isinstance(obj, tuple):  # namedtuples too; BSON stores them as arrays anyway
            return tuple(self(v) for v in obj)
        if isinstance(obj, bytes):
            return self.data(obj)
        return obj
