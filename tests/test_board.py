"""Omniboard end to end: a real Sacred run in SecantusDB, shown by Omniboard in headless Chromium.

Why this much: the board is only useful if the run list and the metric plot really render,
and only safe if it listens on loopback and its basic auth holds, so all of that is checked
against a live daemon and a live browser. Screenshots land in ``test-artifacts/``.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest

from pqa_experiments.board import omniboard as board_mod
from pqa_experiments.board.omniboard import BoardError, start_board, stop_board

from conftest import listen_addresses

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
RUN_NAME = "pqa_board_smoke"
LOSSES = [1.0, 0.6, 0.4, 0.3, 0.25]
BOARD_USER = "pqa"
BOARD_PASSWORD = "board-" + uuid.uuid4().hex[:12]

CHROMIUM = shutil.which("chromium")
NODE = shutil.which("node")
NPM = shutil.which("npm")
needs_node = pytest.mark.skipif(not NODE, reason="node is not installed (Node.js 20 is needed for Omniboard)")
needs_board = pytest.mark.skipif(
    not (NODE and NPM), reason="node/npm not installed: Omniboard comes from npm (see scripts/install_test_deps.sh)")
needs_browser = pytest.mark.skipif(
    not CHROMIUM, reason="chromium not installed (scripts/install_test_deps.sh installs the Debian package)")


# --------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _own_secantus():
    """A throwaway SecantusDB daemon; stands in when conftest's ``embedded_db`` is absent."""
    import pymongo

    exe = shutil.which("secantusd-py", path=str(Path(sys.executable).parent)) or shutil.which("secantusd-py")
    if exe is None:
        pytest.fail("secantusd-py not found: pip install SecantusDB==0.7.0b3")
    port = _free_port()
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--storage-path", ":memory:",
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"mongodb://127.0.0.1:{port}/"
    try:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=30000)
        client.admin.command("ping")
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def mongo_url(request):
    """conftest's ``embedded_db`` when it exists, else a daemon of our own."""
    try:
        url = request.getfixturevalue("embedded_db")
    except pytest.FixtureLookupError:
        url = None
    if url:
        yield url
        return
    with _own_secantus() as url:
        yield url


@pytest.fixture(scope="module")
def recorded_run(mongo_url):
    """One finished run of a real Sacred experiment with a ``train.loss`` series, in a fresh database."""
    import pymongo
    from sacred import Experiment
    from sacred.observers import MongoObserver

    db_name = "pqa_board_" + uuid.uuid4().hex[:8]
    ex = Experiment(RUN_NAME, save_git_info=False)
    observer = MongoObserver(url=mongo_url, db_name=db_name)
    ex.observers.append(observer)

    @ex.main
    def train(_run):
        for step, value in enumerate(LOSSES):
            _run.log_scalar("train.loss", value, step)
        return LOSSES[-1]

    run = ex.run(options={"--capture": "sys"})
    assert run.status == "COMPLETED" and run.result == LOSSES[-1]
    yield {"db_name": db_name, "run_id": run._id}
    client = pymongo.MongoClient(mongo_url)
    client.drop_database(db_name)
    client.close()


@pytest.fixture(scope="module")
def board(mongo_url, recorded_run):
    started = time.monotonic()
    proc, url = start_board(mongo_url, db_name=recorded_run["db_name"], port=0,
                            basic_auth=(BOARD_USER, BOARD_PASSWORD))
    print(f"omniboard answered after {time.monotonic() - started:.1f} s at {url}")
    yield {"proc": proc, "url": url, "port": int(url.rstrip("/").rsplit(":", 1)[1])}
    stop_board(proc)


# --------------------------------------------------------------------------- helpers

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never via a proxy


def _status(url: str, auth: tuple | None = None, **extra_headers) -> int:
    headers = dict(extra_headers)
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, headers=headers)
    try:
        with DIRECT.open(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _png_rgb(path: Path):
    """(width, height, rows of RGB tuples) of an 8-bit non-interlaced PNG, as Chromium writes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color in (2, 6), f"unexpected PNG format {header}"
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, rows = bytearray(stride), []
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return width, height, rows


def _assert_real_screenshot(path: Path, min_w: int, min_h: int) -> list:
    assert path.is_file() and path.stat().st_size > 10_000, f"{path} missing or tiny"
    width, height, rows = _png_rgb(path)
    assert width >= min_w and height >= min_h, f"{path} is only {width}x{height}"
    colours = {px for row in rows[::4] for px in row[::4]}
    assert len(colours) > 50, f"{path} looks blank ({len(colours)} colours)"
    return rows


BROWSER_JS = r"""
const { chromium } = require(process.env.PW_CORE);
const path = require('path');
const env = process.env;
(async () => {
  const out = {};
  const context = await chromium.launchPersistentContext(env.USER_DATA_DIR, {
    executablePath: env.CHROMIUM, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run'],
    httpCredentials: { username: env.BOARD_USER, password: env.BOARD_PASSWORD },
    viewport: { width: 1400, height: 900 },
  });
  try {
    const page = context.pages()[0] || await context.newPage();
    const t0 = Date.now();
    await page.goto(env.BOARD_URL, { waitUntil: 'networkidle', timeout: 60000 });
    const row = page.locator('.public_fixedDataTable_bodyRow', { hasText: env.RUN_NAME }).first();
    await row.waitFor({ state: 'visible', timeout: 60000 });
    out.list_ms = Date.now() - t0;
    out.page_url = page.url();
    out.row_text = await row.innerText();
    await page.screenshot({ path: path.join(env.OUT_DIR, 'omniboard-runs.png') });

    await row.locator('.status-text', { hasText: env.RUN_NAME }).click();
    const details = page.locator('.fixedDataTableRowLayout_rowExpanded').first();
    await details.waitFor({ state: 'visible', timeout: 30000 });
    const legend = page.locator('.metrics-plot-view .legendtext', { hasText: 'train.loss' });
    await legend.first().waitFor({ state: 'visible', timeout: 30000 });
    out.details_text = await details.innerText();
    out.legend = await page.locator('.metrics-plot-view .legendtext').allTextContents();
    out.traces = await page.locator('.metrics-plot-view .js-plotly-plot').evaluate(
      (el) => (el.data || []).map((t) => ({ name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []) })));
    out.detail_ms = Date.now() - t0;
    await page.screenshot({ path: path.join(env.OUT_DIR, 'omniboard-run-detail.png') });
    await page.locator('.metrics-plot-view .js-plotly-plot').screenshot(
      { path: path.join(env.OUT_DIR, 'omniboard-metric-plot.png') });
  } finally {
    await context.close();
  }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
"""


# --------------------------------------------------------------------------- tests

def test_mongo_uri_for_omniboard_keeps_auth_database():
    uri = board_mod.omniboard_mongo_uri("mongodb://u:p%40ss@h1:1,h2:2/admin?replicaSet=rs", "runs")
    assert uri == "mongodb://u:p%40ss@h1:1,h2:2/runs?replicaSet=rs&authSource=admin"
    assert board_mod.omniboard_mongo_uri("mongodb://h:1", "pqa") == "mongodb://h:1/pqa"
    assert board_mod.omniboard_mongo_uri("mongodb://u:p@h/?authSource=x", "pqa").endswith("/pqa?authSource=x")
    with pytest.raises(BoardError):
        board_mod.omniboard_mongo_uri("http://h:1", "pqa")


def test_basic_auth_argument_is_validated():
    assert board_mod.parse_basic_auth("me:secret") == ("me", "secret")
    for bad in ("nocolon", ":pw", "me:", "me:pa:ss", ("me", "")):
        with pytest.raises(BoardError):
            board_mod.parse_basic_auth(bad)


def test_missing_npm_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PQA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BoardError, match=r"^npm not found on PATH") as info:
        board_mod.ensure_omniboard()
    assert "\n" not in str(info.value)


@needs_board
def test_failed_npm_install_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PQA_CACHE_DIR", str(tmp_path))
    with pytest.raises(BoardError, match=r"^npm install omniboard@0\.0\.0-no-such-version failed") as info:
        board_mod.ensure_npm_package("omniboard", "0.0.0-no-such-version")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "omniboard" / "0.0.0-no-such-version").exists()  # nothing half-installed
    assert not [p for p in (tmp_path / "omniboard").iterdir() if p.name.startswith(".0.0.0")]


@needs_node
def test_unreachable_mongo_error_hides_password():
    url = f"mongodb://someone:Sup3rSecret%21@127.0.0.1:{_free_port()}/"
    with pytest.raises(BoardError, match="cannot reach MongoDB") as info:
        start_board(url, port=0, mongo_timeout=1.0)
    assert "Sup3rSecret" not in str(info.value) and "\n" not in str(info.value)


@needs_node
def test_launcher_scrubs_secrets_from_output(tmp_path, monkeypatch):
    """Whatever Omniboard prints passes through the launcher, which masks the passwords."""
    monkeypatch.setenv("PQA_CACHE_DIR", str(tmp_path))
    entry = tmp_path / "fake-omniboard.js"
    entry.write_text("console.log('uri ' + process.env.MONGO_URI); console.error(new Error('pw Sup3r/Secret'));"
                     "process.stdout.write(Buffer.from('buf Sup3r/Secret\\n'));")
    env = dict(os.environ, MONGO_URI="mongodb://u:Sup3r%2FSecret@h/pqa", PQA_OMNIBOARD_ENTRY=str(entry),
               PQA_BOARD_REDACT="\n".join(board_mod.url_secrets("mongodb://u:Sup3r%2FSecret@h/pqa")))
    out = subprocess.run([NODE, str(board_mod._launcher_path())], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "uri ***" in text and "pw ***" in text and "buf ***" in text
    assert "Sup3r" not in text


@needs_board
def test_taken_port_is_an_error_not_port_plus_one(mongo_url, recorded_run):
    """Omniboard alone would quietly move to port + 1; the launcher makes that a clear error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BoardError, match=rf"127\.0\.0\.1:{port} is already in use"):
            start_board(mongo_url, db_name=recorded_run["db_name"], port=port)


@needs_board
def test_board_listens_on_loopback_only(board):
    port = board["port"]
    assert listen_addresses(port) == {"127.0.0.1"}
    if shutil.which("ss"):
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        local = {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}
        assert local == {"127.0.0.1"}, out


@needs_board
def test_basic_auth_rejects_requests_without_credentials(board, recorded_run):
    base = board["url"]
    for path in ("", "sacred", "sacred/api/v1/Runs", "api/v1/databases", "static/js/"):
        assert _status(base + path) == 401, path
        assert _status(base + path, (BOARD_USER, "wrong")) == 401, path
    assert _status(base + "sacred/api/v1/Runs/count", (BOARD_USER, BOARD_PASSWORD)) == 200
    req = urllib.request.Request(base + "sacred/api/v1/Runs/count", headers={
        "Authorization": "Basic " + base64.b64encode(f"{BOARD_USER}:{BOARD_PASSWORD}".encode()).decode()})
    with DIRECT.open(req, timeout=10) as resp:
        assert json.load(resp) == {"count": 1}
    cmdline = Path(f"/proc/{board['proc'].pid}/cmdline").read_bytes()
    assert BOARD_PASSWORD.encode() not in cmdline


@needs_board
def test_cross_origin_and_rebound_host_are_refused(board):
    """Omniboard says CORS '*' and allows DELETE; the launcher keeps other web pages out."""
    runs, creds, port = board["url"] + "sacred/api/v1/Runs/count", (BOARD_USER, BOARD_PASSWORD), board["port"]
    assert _status(runs, creds, Origin=f"http://127.0.0.1:{port}") == 200  # the board's own page
    assert _status(runs, creds, Origin="http://evil.example") == 403
    assert _status(runs, creds, Origin="null") == 403
    assert _status(runs, creds, Host=f"evil.example:{port}") == 403  # DNS rebinding to 127.0.0.1
    assert _status(runs, creds, Host=f"localhost:{port}") == 200


@needs_board
@needs_browser
def test_browser_shows_run_and_metric_plot(board, recorded_run, tmp_path):
    pw_core = board_mod.ensure_playwright_core()
    ARTIFACTS.mkdir(exist_ok=True)
    for name in ("omniboard-runs.png", "omniboard-run-detail.png", "omniboard-metric-plot.png"):
        (ARTIFACTS / name).unlink(missing_ok=True)
    script = tmp_path / "browse.js"
    script.write_text(BROWSER_JS)
    env = dict(os.environ, PW_CORE=str(pw_core), CHROMIUM=CHROMIUM, USER_DATA_DIR=str(tmp_path / "profile"),
               BOARD_URL=board["url"], BOARD_USER=BOARD_USER, BOARD_PASSWORD=BOARD_PASSWORD,
               RUN_NAME=RUN_NAME, OUT_DIR=str(ARTIFACTS))
    out = subprocess.run([NODE, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"browser script failed:\n{out.stderr[-3000:]}"
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"run list after {seen['list_ms']} ms, metric plot after {seen['detail_ms']} ms")

    run_id = str(recorded_run["run_id"])
    assert seen["page_url"].rstrip("/").endswith("/sacred")
    assert RUN_NAME in seen["row_text"] and "COMPLETED" in seen["row_text"]
    assert run_id in seen["row_text"].split()
    assert f"Details for: {RUN_NAME} (Id: {run_id})" in " ".join(seen["details_text"].split())
    assert "train.loss" in seen["legend"]
    loss = [t for t in seen["traces"] if t["name"] == "train.loss"]
    assert loss and loss[0]["y"] == LOSSES and loss[0]["x"] == list(range(len(LOSSES)))

    _assert_real_screenshot(ARTIFACTS / "omniboard-runs.png", 1000, 600)
    _assert_real_screenshot(ARTIFACTS / "omniboard-run-detail.png", 1000, 600)
    rows = _assert_real_screenshot(ARTIFACTS / "omniboard-metric-plot.png", 400, 200)
    # plotly draws the first trace in #1f77b4; the line must be in the picture, not only in the DOM
    blue = sum(1 for row in rows for (r, g, b) in row if abs(r - 31) < 40 and abs(g - 119) < 40 and abs(b - 180) < 40)
    assert blue > 100, f"no train.loss line in the plot screenshot ({blue} blue pixels)"


@needs_board
def test_cli_prints_url_and_stops_on_ctrl_c(mongo_url, recorded_run):
    url = mongo_url.rstrip("/") + "/" + recorded_run["db_name"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pqa_experiments.cli.board import board; board()", "--port", "0",
         "--mongo-url", url, "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        board_url = proc.stdout.readline().strip()
        assert board_url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else board_url
        assert listen_addresses(int(board_url.rstrip("/").rsplit(":", 1)[1])) == {"127.0.0.1"}  # pqa board's default
        assert _status(board_url + "sacred/api/v1/Runs/count") == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "board stopped" in err
    port = int(board_url.rstrip("/").rsplit(":", 1)[1])
    deadline = time.monotonic() + 10
    while listen_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listen_addresses(port), "Omniboard kept running after Ctrl-C"


# --------------------------------------------------------------------------- pqa's columns in Omniboard

PQA_RUNS = (("cosine", 12.5), ("dot", 7.25))


def _record_pqa_like_runs(mongo_url: str, db_name: str, recall_k: int = 3) -> None:
    """Finished runs with pqa's config layout and final eval metrics (as ``pqa run`` logs them)."""
    from sacred import Experiment
    from sacred.observers import MongoObserver

    for selector, em in PQA_RUNS:
        ex = Experiment("pqa_pipeline", save_git_info=False)
        ex.add_config({"model": {"llm": "tiny", "d_z": 384, "num_memory_tokens": 2}, "selector": {"name": selector},
                       "query_encoder": {"name": "minilm"}, "projection": {"name": "mlp2x_gelu"},
                       "read": {"top_k": recall_k, "epochs": 1}, "write": {"epochs": 2}})
        ex.observers.append(MongoObserver(url=mongo_url, db_name=db_name))

        @ex.main
        def main(_run):
            _run.log_scalar("write.loss", 3.0, 1)
            for name, value in (("EM", em), ("F1", em + 10 + 1 / 3), (f"Recall@{recall_k}", 80.0)):
                _run.log_scalar(f"eval.{name}", value, 0)
            return {"EM": em}

        ex.run(options={"--capture": "sys"})


@pytest.fixture
def pqa_runs_db(mongo_url, mongo_client):
    db_name = "pqa_columns_" + uuid.uuid4().hex[:8]
    _record_pqa_like_runs(mongo_url, db_name)
    yield mongo_client[db_name]
    mongo_client.drop_database(db_name)


def test_seeded_columns_leave_the_users_own_choices_alone(pqa_runs_db, mongo_url):
    from pqa_experiments.board.columns import CUSTOM, METRIC, seed_columns

    db = pqa_runs_db
    db[CUSTOM].insert_one({"name": "sel", "config_path": "config.selector.name"})  # the user's own
    db[METRIC].insert_one({"name": "EM", "metric_name": "eval.EM", "extrema": "max", "lastn": 1})
    added = seed_columns(db)
    assert "selector" not in added["custom"] and {"projection", "LLM", "top_k"} <= set(added["custom"])
    assert added["metric"] == ["F1", "Recall@3"]
    assert db[METRIC].find_one({"name": "EM"})["extrema"] == "max"  # not overwritten
    assert db[CUSTOM].count_documents({"config_path": "config.selector.name"}) == 1
    db[METRIC].delete_one({"name": "F1"})  # the user removes a column pqa added
    db[CUSTOM].update_one({"name": "top_k"}, {"$set": {"name": "k"}})  # and renames one
    assert seed_columns(db) == {"custom": [], "metric": []}
    assert db[METRIC].count_documents({"name": "F1"}) == 0 and db[CUSTOM].count_documents({"name": "top_k"}) == 0
    _record_pqa_like_runs(mongo_url, db.name, recall_k=5)  # a new k: a new column, the rest as the user left it
    assert seed_columns(db) == {"custom": [], "metric": ["Recall@5"]}


@needs_board
@needs_browser
def test_pqa_board_opens_on_components_hyper_parameters_and_final_metrics(pqa_runs_db, mongo_url, tmp_path):
    url = mongo_url.rstrip("/") + "/" + pqa_runs_db.name
    proc = subprocess.Popen(
        [sys.executable, "-m", "pqa_experiments.cli.main", "board", "--port", "0", "--mongo-url", url, "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        board_url = proc.stdout.readline().strip()
        assert board_url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else board_url
        script = tmp_path / "columns.js"
        script.write_text(COLUMNS_JS)
        env = dict(os.environ, PW_CORE=str(board_mod.ensure_playwright_core()), CHROMIUM=CHROMIUM,
                   USER_DATA_DIR=str(tmp_path / "profile"), BOARD_URL=board_url, OUT_DIR=str(ARTIFACTS))
        ARTIFACTS.mkdir(exist_ok=True)
        out = subprocess.run([NODE, str(script)], env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, f"browser script failed:\n{out.stderr[-3000:]}"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "added columns to Omniboard: selector, query_encoder, projection" in err
    shown = json.loads(out.stdout.strip().splitlines()[-1])
    cells = shown["cells"]  # run id -> column title -> cell text
    for run_id, (selector, em) in zip(("1", "2"), PQA_RUNS):
        row = cells[run_id]
        assert (row["Selector"], row["Projection"], row["LLM"], row["Top K"]) == (selector, "mlp2x_gelu", "tiny", "3")
        assert (float(row["EM"]), float(row["Recall@3"])) == (em, 80.0)
        assert row["F1"] == f"{em + 10 + 1 / 3:.2f}"  # rounded as the CLI rounds it, not 22.833333333333332
    assert [t for t in shown["first"] if t][:4] == ["Id", "Experiment Name", "Status", "Selector"]  # pqa's first
    assert not {"Model", "Read", "Write", "Data"} & set(shown["seen"])  # the raw config sections are hidden
    _assert_real_screenshot(ARTIFACTS / "omniboard-pqa-columns.png", 1000, 600)


# Reads every cell of the run table: the table draws only the columns in view, so it scrolls right
# and collects header titles and cells at each position.
COLUMNS_JS = r"""
const { chromium } = require(process.env.PW_CORE);
const path = require('path');
(async () => {
  const context = await chromium.launchPersistentContext(process.env.USER_DATA_DIR, {
    executablePath: process.env.CHROMIUM, headless: true, viewport: { width: 1400, height: 900 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'] });
  try {
    const page = context.pages()[0] || await context.newPage();
    await page.goto(process.env.BOARD_URL, { waitUntil: 'networkidle', timeout: 60000 });
    await page.locator('.public_fixedDataTable_bodyRow', { hasText: 'pqa_pipeline' }).first()
      .waitFor({ state: 'visible', timeout: 60000 });
    // pqa's page script rewrites Omniboard's first layout and reloads the page once: read after that reload
    await page.waitForEvent('framenavigated', { timeout: 20000 }).catch(() => null);
    await page.waitForLoadState('networkidle');
    await page.locator('.public_fixedDataTable_bodyRow', { hasText: 'pqa_pipeline' }).first()
      .waitFor({ state: 'visible', timeout: 60000 });
    await page.screenshot({ path: path.join(process.env.OUT_DIR, 'omniboard-pqa-columns.png') });
    const cells = {}, seen = [];
    let first = null;
    const box = await page.locator('.public_fixedDataTable_main').first().boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    for (let step = 0; step < 40; step++) {
      const titles = await page.locator('.public_fixedDataTable_header .public_fixedDataTableCell_main').allInnerTexts();
      if (first === null) first = titles.map((t) => t.trim());
      titles.forEach((t) => { if (t.trim() && !seen.includes(t.trim())) seen.push(t.trim()); });
      for (const row of await page.locator('.public_fixedDataTable_bodyRow').all()) {
        const texts = await row.locator('.public_fixedDataTableCell_main').allInnerTexts();
        if (texts.length !== titles.length) continue;
        const id = texts[titles.indexOf('Id')].trim();
        cells[id] = cells[id] || {};
        titles.forEach((title, i) => { if (title) cells[id][title.trim()] = texts[i].trim(); });
      }
      await page.mouse.wheel(600, 0);
      await page.waitForTimeout(150);
    }
    console.log(JSON.stringify({cells, first, seen}));
  } finally {
    await context.close();
  }
})().catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
"""
