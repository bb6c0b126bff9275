"""Omniboard, the Sacred run browser, installed from npm on first use and started safely.

Why a launcher: Omniboard 2.16.1 calls ``app.listen(port)`` with no host, so it listens on
every interface, and its own ``-u user:pass:secret`` basic auth only guards the ``/sacred``
API (``/api/v1/databases`` and the static bundle stay open, and the API can delete runs).
``start_board`` therefore runs it through a small Node launcher (``_LAUNCHER_JS``) that

- forces the listen host (default ``127.0.0.1``) and fails instead of silently moving to
  ``port + 1`` when the port is taken;
- refuses cross-origin requests and, on loopback, unexpected ``Host`` headers: Omniboard
  sends ``Access-Control-Allow-Origin: *`` and allows DELETE, so otherwise any web page in
  the user's browser (or a DNS-rebinding one) could read or delete runs on 127.0.0.1;
- when ``basic_auth`` is given, answers 401 to every request without the right
  credentials before Omniboard sees it, and also turns on Omniboard's own ``-u`` auth;
- keeps secrets off the command line (the Mongo URL goes in ``MONGO_URI``, the
  credentials in the environment, ``-u`` is added to ``process.argv`` in-process) and
  scrubs the Mongo and board passwords from everything Omniboard prints;
- exits when the Python process that started it goes away.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pqa_core.errors import PqaError
from pqa_core.storage.atomic import atomic_directory, write_atomic

from pqa_experiments.store.urls import describe_error, redact_text, redact_url, url_secrets

OMNIBOARD_VERSION = "2.16.1"
READY_MARK = "PQA_BOARD_LISTENING"


class BoardError(PqaError):
    """Omniboard could not be installed or started; the message is one line, with no secrets."""


def cache_dir() -> Path:
    """``$PQA_CACHE_DIR`` or ``~/.cache/pqa`` (same rule as ``pqa_core.modeling.llm``, without importing torch)."""
    return Path(os.environ.get("PQA_CACHE_DIR") or Path.home() / ".cache" / "pqa")


# --------------------------------------------------------------------------- npm installs

def _one_line(text: str, limit: int = 300) -> str:
    """The npm error lines of ``text`` (or its last line) squeezed into one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("npm error") or ln.startswith("npm ERR!")]
    picked = "; ".join(errors[:3]) if errors else (lines[-1] if lines else "no output")
    return picked if len(picked) <= limit else picked[: limit - 3] + "..."


def ensure_npm_package(name: str, version: str, check: Sequence[str] = ()) -> Path:
    """Install ``name@version`` from npm into ``<cache>/<name>/<version>`` once; return that prefix.

    The install goes to a temp dir next to the target and is renamed into place, so a
    half-finished install is never used; a file lock stops parallel callers from
    downloading twice. ``check`` lists paths (relative to the prefix) that must exist.
    """
    target = cache_dir() / name / version
    if target.is_dir() and all((target / c).exists() for c in check):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise BoardError(f"npm not found on PATH; install Node.js 20 and npm to get {name}@{version}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir() and all((target / c).exists() for c in check):
            return target  # another process installed it while we waited
        log_file = target.parent / f"npm-install-{version}.log"
        with atomic_directory(target) as tmp:  # an incomplete leftover is replaced whole
            cmd = [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--ignore-scripts",
                   "--loglevel=error", f"{name}@{version}"]
            env = dict(os.environ, npm_config_update_notifier="false")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            except subprocess.TimeoutExpired:
                raise BoardError(f"npm install {name}@{version} timed out after 900 s") from None
            log_file.write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise BoardError(f"npm install {name}@{version} failed (exit {proc.returncode}): "
                                 f"{_one_line(proc.stderr or proc.stdout)} (full log: {log_file})")
            missing = [c for c in check if not (tmp / c).exists()]
            if missing:
                raise BoardError(f"npm install {name}@{version} finished but {missing[0]} is missing "
                                 f"(full log: {log_file})")
    return target


OMNIBOARD_BIN = "node_modules/.bin/omniboard"
OMNIBOARD_ENTRY = "node_modules/omniboard/dist/start.js"


def ensure_omniboard(version: str = OMNIBOARD_VERSION) -> Path:
    """Path to the ``omniboard`` executable, installing ``omniboard@version`` from npm on first use."""
    return ensure_npm_package("omniboard", version, check=(OMNIBOARD_BIN, OMNIBOARD_ENTRY)) / OMNIBOARD_BIN


# Browser driver for the Omniboard test (tests/test_board.py, scripts/install_test_deps.sh).
# playwright-core downloads no browser; the test points it at the Debian chromium.
PLAYWRIGHT_CORE_VERSION = "1.65.1"


def ensure_playwright_core(version: str = PLAYWRIGHT_CORE_VERSION) -> Path:
    """The ``playwright-core`` package folder (for ``require``), installed from npm on first use."""
    rel = "node_modules/playwright-core"
    return ensure_npm_package("playwright-core", version, check=(f"{rel}/package.json",)) / rel


# --------------------------------------------------------------------------- the database URL

def omniboard_mongo_uri(mongo_url: str, db_name: str) -> str:
    """``mongo_url`` with ``db_name`` as its path, keeping the auth database it had.

    Omniboard reads the database from the URI path. In a MongoDB URI the path is also the
    default auth database, so when credentials are present and no ``authSource`` is given,
    the old default (the old path, else ``admin``) is made explicit.
    """
    parts = urlsplit(mongo_url)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise BoardError(f"not a MongoDB URL: {redact_url(mongo_url)}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if "@" in parts.netloc and not any(k.lower() == "authsource" for k, _ in query):
        query.append(("authSource", parts.path.strip("/") or "admin"))
    return urlunsplit(parts._replace(path="/" + quote(db_name, safe=""), query=urlencode(query)))


def parse_basic_auth(basic_auth: Union[None, str, Tuple[str, str]]) -> Optional[Tuple[str, str]]:
    """``(user, password)`` from ``"user:password"`` or a pair; ``BoardError`` on anything unusable."""
    if basic_auth is None:
        return None
    if isinstance(basic_auth, str):
        if ":" not in basic_auth:
            raise BoardError("basic auth must be given as user:password")
        user, password = basic_auth.split(":", 1)
    else:
        user, password = basic_auth
    if not user or not password:
        raise BoardError("basic auth needs a non-empty user and password")
    if ":" in user or ":" in password:  # HTTP basic splits at the first ':'; Omniboard's -u at every ':'
        raise BoardError("basic auth user and password may not contain ':'")
    return user, password


# --------------------------------------------------------------------------- the launcher

_LAUNCHER_JS = r"""'use strict';
// pqa launcher for Omniboard (written by pqa_experiments.board.omniboard; see its docstring for why).
const net = require('net');
const http = require('http');
const crypto = require('crypto');

const env = process.env;
const host = env.PQA_BOARD_HOST || '127.0.0.1';
const entry = env.PQA_OMNIBOARD_ENTRY;
const auth = env.PQA_BOARD_AUTH || '';
const secrets = (env.PQA_BOARD_REDACT || '').split('\n').filter(Boolean);
const parentPid = Number(env.PQA_BOARD_PARENT_PID || 0);
const layout = JSON.parse(env.PQA_BOARD_LAYOUT || 'null');  // pqa_experiments.board.columns.layout()
delete env.PQA_BOARD_AUTH;
delete env.PQA_BOARD_REDACT;

// Everything Omniboard prints goes through here; no secret reaches the log.
for (const stream of [process.stdout, process.stderr]) {
  const write = stream.write.bind(stream);
  stream.write = (chunk, ...rest) => {
    let text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    for (const s of secrets) text = text.split(s).join('***');
    return write(text, ...rest);
  };
}

const loopback = /^(127\.\d+\.\d+\.\d+|localhost|::1)$/.test(host);

function deny(res, status, text, headers = {}) {
  res.statusCode = status;
  for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
  res.setHeader('Content-Type', 'text/plain');
  res.end(text + '\n');
}

// The run table opens on pqa's columns (Omniboard keeps a table's layout in the browser's localStorage,
// written on its first load: the page's script reorders that first layout once, pqa's columns first and
// the raw config sections hidden, still listed in "Show/Hide Columns"), and metrics are shown rounded as
// pqa's CLI rounds them (the run list's JSON only; what is stored is untouched).
function pageScript() {
  return `<script>(function () {
  var KEY = 'default|RunsTable|1', DONE = 'pqa|layout|' + KEY, L = ${JSON.stringify(layout)};
  try {
    if (localStorage.getItem(DONE)) return;
    localStorage.setItem(DONE, '1');
    if (localStorage.getItem(KEY)) return;  // the user's own layout stays
    var metric = new RegExp(L.metrics), timer = setInterval(function () {
      var state = JSON.parse(localStorage.getItem(KEY) || 'null');
      if (!state || !state.columnOrder || !state.columnOrder.length || !state.dropdownOptions) return;
      var has = function (c) { return state.columnOrder.indexOf(c) >= 0; };
      var pqa = L.first.filter(has).concat(state.columnOrder.filter(function (c) { return metric.test(c); }));
      if (!pqa.length) return;
      clearInterval(timer);
      var lead = ['_id', 'experiment_name', 'status'].filter(has);
      var hidden = state.columnOrder.filter(function (c) { return c.indexOf('c_') === 0 && pqa.indexOf(c) < 0; });
      var order = lead.concat(pqa, state.columnOrder.filter(function (c) {
        return lead.indexOf(c) < 0 && pqa.indexOf(c) < 0 && hidden.indexOf(c) < 0; }));
      var options = {};
      state.dropdownOptions.forEach(function (o) { options[o.value] = o; });
      state.columnOrder = order;
      state.dropdownOptions = order.concat(hidden).filter(function (c) { return options[c]; }).map(function (c) {
        return Object.assign({}, options[c], {selected: hidden.indexOf(c) < 0}); });
      localStorage.setItem(KEY, JSON.stringify(state));
      location.reload();
    }, 200);
    setTimeout(function () { clearInterval(timer); }, 60000);
  } catch (e) { /* no localStorage: Omniboard's own layout */ }
})();</script>`;
}

function roundMetric(v) {  // as pqa_experiments.cli.common.fmt prints a number
  if (typeof v !== 'number' || !isFinite(v)) return v;
  return Math.abs(v) >= 1 || v === 0 ? Number(v.toFixed(2)) : Number(v.toPrecision(4));
}

function rewrite(req, res) {
  const path = (req.url || '').split('?')[0];
  // a database's pages and API sit under its path (/<db>/..., /<db>/api/v1/...)
  const page = req.method === 'GET' && !/(^|\/)api\//.test(path) && !/\.[a-z0-9]+$/i.test(path);
  const runs = req.method === 'GET' && /(^|\/)api\/v1\/Runs$/.test(path);
  if (!layout || !(page || runs)) return;
  const chunks = [];
  const write = res.write.bind(res), end = res.end.bind(res);
  res.write = (chunk, encoding) => { if (chunk) chunks.push(Buffer.from(chunk, encoding)); return true; };
  res.end = (chunk, encoding, callback) => {
    if (typeof chunk === 'function') { callback = chunk; chunk = undefined; }
    if (chunk) chunks.push(Buffer.from(chunk, encoding));
    let body = Buffer.concat(chunks);
    const type = String(res.getHeader('Content-Type') || '');
    try {
      if (page && type.startsWith('text/html')) {
        body = Buffer.from(body.toString('utf8').replace('</head>', pageScript() + '</head>'));
      } else if (runs && type.startsWith('application/json') && res.statusCode === 200) {
        const metric = new RegExp(layout.metrics);
        const data = JSON.parse(body.toString('utf8'));
        for (const run of Array.isArray(data) ? data : []) {
          for (const key of Object.keys(run)) if (metric.test(key)) run[key] = roundMetric(run[key]);
        }
        body = Buffer.from(JSON.stringify(data));
      }
    } catch (e) { /* left as Omniboard sent it */ }
    if (!res.headersSent && res.statusCode !== 304) res.setHeader('Content-Length', body.length);
    return end(body, callback);
  };
}

// In front of Omniboard's handler: Omniboard answers any origin with CORS '*' and allows
// DELETE, so without this any web page open in the user's browser could drive the local
// board (cross-origin requests, or DNS rebinding to 127.0.0.1). Then basic auth, if set.
function guard(server) {
  const expected = crypto.createHash('sha256').update(auth).digest();
  const handlers = server.listeners('request');
  server.removeAllListeners('request');
  server.on('request', (req, res) => {
    const port = server.address().port;
    const hostHeader = (req.headers.host || '').toLowerCase();
    if (loopback && ![`127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`, `${host}:${port}`].includes(hostHeader)) {
      return deny(res, 403, 'Forbidden: unexpected Host header.');
    }
    const origin = req.headers.origin;
    if (origin !== undefined) {
      let originHost = null;
      try { originHost = new URL(origin).host.toLowerCase(); } catch (e) { /* "null" or junk */ }
      if (originHost !== hostHeader) return deny(res, 403, 'Forbidden: cross-origin request.');
    }
    if (auth) {
      const m = /^Basic\s+(\S+)\s*$/i.exec(req.headers.authorization || '');
      const given = m ? Buffer.from(m[1], 'base64').toString('utf8') : '';
      const digest = crypto.createHash('sha256').update(given).digest();
      if (!crypto.timingSafeEqual(digest, expected)) {
        return deny(res, 401, 'Authentication required.',
                    { 'WWW-Authenticate': 'Basic realm="pqa board", charset="UTF-8"' });
      }
    }
    rewrite(req, res);
    for (const h of handlers) h.call(server, req, res);
  });
}

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (!(this instanceof http.Server)) return listen.apply(this, args);
  const port = Number(args[0]);
  const callback = args.find((a) => typeof a === 'function');
  guard(this);
  // Registered before Omniboard's own handler, which would retry on port + 1.
  this.once('error', (e) => {
    console.error(e.code === 'EADDRINUSE' ? `pqa board: ${host}:${port} is already in use`
                                          : `pqa board: cannot listen on ${host}:${port}: ${e.message}`);
    process.exit(3);
  });
  this.once('listening', () => {
    const a = this.address();
    console.log(`PQA_BOARD_LISTENING ${a.address} ${a.port}`);
  });
  return callback ? listen.call(this, port, host, callback) : listen.call(this, port, host);
};

if (auth) {  // Omniboard's own -u auth too, fed in-process so it never shows in `ps`.
  process.argv.push('-u', `${auth}:${crypto.randomBytes(24).toString('hex')}`);
}
if (parentPid) {
  setInterval(() => { if (process.ppid !== parentPid) process.exit(0); }, 1000).unref();
}
require(entry);
"""


def _launcher_path() -> Path:
    """Write the launcher into the cache once per content version; return its path."""
    digest = hashlib.sha256(_LAUNCHER_JS.encode()).hexdigest()[:12]
    path = cache_dir() / "omniboard" / f"pqa-launch-{digest}.js"
    if not path.exists():
        write_atomic(path, _LAUNCHER_JS)
    return path


def _check_mongo(mongo_url: str, secrets: Sequence[str], timeout_s: float = 5.0) -> None:
    """Fail fast with a clear line when MongoDB is unreachable (Omniboard would retry for 30 s)."""
    import pymongo

    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=int(timeout_s * 1000),
                                 connectTimeoutMS=int(timeout_s * 1000))
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001 - any driver error becomes one user-facing line
        raise BoardError(f"cannot reach MongoDB at {redact_url(mongo_url)}: "
                         f"{describe_error(exc, secrets, limit=200)}") from None
    finally:
        client.close()


def _url_host(host: str) -> str:
    """A host to put in the browser URL: wildcard binds are reached through loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy


def _probe(url: str, timeout: float = 2.0) -> bool:
    """True once the HTTP server answers at all (a 401 counts)."""
    try:
        with _DIRECT.open(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def start_board(mongo_url: str, db_name: str = "pqa", host: str = "127.0.0.1", port: int = 9000,
                basic_auth: Union[None, str, Tuple[str, str]] = None, *, version: str = OMNIBOARD_VERSION,
                timeout: float = 60.0, mongo_timeout: float = 5.0, log_path: Optional[Union[str, Path]] = None,
                columns: bool = False) -> Tuple[subprocess.Popen, str]:
    """Start Omniboard on ``host:port`` for database ``db_name``; return ``(process, url)`` once it answers.

    ``port=0`` picks a free port. ``basic_auth`` is ``"user:password"`` or ``(user, password)``.
    MongoDB must answer a ping within ``mongo_timeout`` seconds, Omniboard within ``timeout``.
    Omniboard's output (passwords scrubbed) goes to ``log_path``, by default a file under
    ``<cache>/omniboard/logs`` (also set as ``process.log_path``). Stop it with ``stop_board``.
    ``columns``: the run table opens on pqa's columns, the raw config sections hidden, metrics rounded
    (``columns.layout``).
    """
    node = shutil.which("node")
    if node is None:
        raise BoardError("node not found on PATH; install Node.js 20 to run Omniboard")
    creds = parse_basic_auth(basic_auth)
    uri = omniboard_mongo_uri(mongo_url, db_name)
    secrets = sorted(set(url_secrets(mongo_url) + url_secrets(uri) + ([creds[1]] if creds else [])),
                     key=len, reverse=True)
    _check_mongo(uri, secrets, mongo_timeout)
    prefix = ensure_omniboard(version).parents[2]  # <prefix>/node_modules/.bin/omniboard
    entry = prefix / OMNIBOARD_ENTRY

    if log_path is None:
        logs = cache_dir() / "omniboard" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"board-{port}-", suffix=".log", dir=logs)
        os.close(fd)
        log_path = Path(name)
    log_path = Path(log_path)
    env = {k: v for k, v in os.environ.items() if k not in ("OMNIBOARD_CONFIG", "MONGO_URI", "PORT")}
    env.update(MONGO_URI=uri, PORT=str(int(port)), PQA_BOARD_HOST=host, PQA_OMNIBOARD_ENTRY=str(entry),
               PQA_BOARD_PARENT_PID=str(os.getpid()), PQA_BOARD_REDACT="\n".join(secrets))
    if columns:
        from pqa_experiments.board.columns import layout

        env["PQA_BOARD_LAYOUT"] = json.dumps(layout())
    if creds:
        env["PQA_BOARD_AUTH"] = f"{creds[0]}:{creds[1]}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([node, str(_launcher_path())], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(prefix))
    proc.log_path = log_path  # type: ignore[attr-defined]

    deadline = time.monotonic() + timeout
    bound_port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = redact_text(log_path.read_text(errors="replace"), secrets).strip().splitlines()
            reason = next((ln for ln in reversed(tail) if ln.startswith("pqa board:")), tail[-1] if tail else "")
            raise BoardError(f"Omniboard exited with code {proc.returncode}: {reason[:200]} (log: {log_path})")
        if bound_port is None:
            m = re.search(rf"^{READY_MARK} (\S+) (\d+)$", log_path.read_text(errors="replace"), re.M)
            if m:
                bound_port = int(m.group(2))
        if bound_port is not None:
            url = f"http://{_url_host(host)}:{bound_port}/"
            if _probe(url):
                return proc, url
        time.sleep(0.1)
    stop_board(proc)
    raise BoardError(f"Omniboard did not answer within {timeout:.0f} s (log: {log_path})")


def stop_board(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a board started by ``start_board`` and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
