"""`aflow data status|fetch` end to end: real subprocesses, a real local HTTP server, archives
built at test time (in tmp_path) from the split files of $AFLOW_DATA_DIR (or --data-dir).
Needs those files; skipped without them. Nothing here is ever written into the repository."""

from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aflow.data import ARCHIVE_NAME, PINNED_SHA256, REQUIRED
from tests.conftest import no_data

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def originals(request) -> dict[str, bytes]:
    """The checked split files, by name (skips unless every one is in the data directory)."""
    value = request.config.getoption("--data-dir") or os.environ.get("AFLOW_DATA_DIR")
    if not value or not Path(value).is_dir():
        no_data("no benchmark data: pass --data-dir or set AFLOW_DATA_DIR (the AFlow split files)")
    missing = [n for n in REQUIRED if not (Path(value) / n).is_file()]
    if missing:
        no_data(f"the data directory {value} lacks {', '.join(missing)}")
    return {n: (Path(value) / n).read_bytes() for n in REQUIRED}


def env_for(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AFLOW_") and not k.lower().endswith("_proxy")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")  # never the user's ~/.local/share
    env["PYTHONPATH"] = str(REPO)  # the subprocess imports this checkout's aflow
    env.update(extra)
    return env


def aflow_data(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aflow.cli", "data", *args], capture_output=True, text=True,
                          env=env_for(tmp_path, **env), cwd=REPO, timeout=120)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aflow: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def regular(name: str, content: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, io.BytesIO(content)


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def build_archive(path: Path, members) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            tar.addfile(info, content)
    return path


def aflow_like_archive(path: Path, originals: dict[str, bytes]) -> Path:
    """As a real archive might be: the files nested in folders, beside files nobody asked for."""
    members = [regular("data/README.md", b"AFlow data\n"), regular("data/results/gsm8k/round_1/log.json", b"{}")]
    members += [regular(f"data/datasets/{name}", content) for name, content in originals.items()]
    return build_archive(path, members)


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def tree(root: Path, skip: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip not in (p, *p.parents)}


@pytest.fixture
def web(tmp_path):
    """A real HTTP server (http.server in a thread) serving tmp_path/www: (directory, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# ---- fetch -----------------------------------------------------------------------------

def test_fetch_over_http_gives_the_original_files_and_status_is_complete(tmp_path, originals, web):
    www, base = web
    aflow_like_archive(www / ARCHIVE_NAME, originals)
    out = tmp_path / "new" / "data"  # created by fetch
    result = aflow_data(tmp_path, "fetch", "--url", f"{base}/{ARCHIVE_NAME}", "--data-dir", str(out))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert files_in(out) == set(REQUIRED)  # flat, only the expected files, no temporary left over
    for name, content in originals.items():
        assert (out / name).read_bytes() == content, name
    assert "13 of 13 required files present" in result.stdout
    assert "differ" not in result.stdout

    status = aflow_data(tmp_path, "status", "--data-dir", str(out))
    assert status.returncode == 0, (status.stdout, status.stderr)
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("  ")}
    for name in REQUIRED:
        assert "present" in lines[name] and "differs" not in lines[name], lines[name]
    assert "present (1055 rows)" in lines["gsm8k_test.jsonl"]


def test_fetch_from_a_local_archive_needs_no_network_and_defaults_to_xdg_data_home(tmp_path, originals):
    archive = aflow_like_archive(tmp_path / "carried" / ARCHIVE_NAME, originals)
    dead = f"http://127.0.0.1:{closed_port()}"  # any network access would fail
    result = aflow_data(tmp_path, "fetch", "--archive", str(archive), http_proxy=dead, https_proxy=dead)
    assert result.returncode == 0, (result.stdout, result.stderr)
    default = tmp_path / "xdg-data" / "aflow" / "data"
    assert f"using {default}" in result.stdout
    assert f"export AFLOW_DATA_DIR={default}" in result.stdout
    for name, content in originals.items():
        assert (default / name).read_bytes() == content, name


def test_an_unreachable_url_is_one_line_with_the_offline_recipe(tmp_path, originals):
    url = f"http://127.0.0.1:{closed_port()}/{ARCHIVE_NAME}"
    out = tmp_path / "data"
    line = one_line_error(aflow_data(tmp_path, "fetch", "--url", url, "--data-dir", str(out)),
                          f"download {url} on a machine with internet",
                          f"`aflow data fetch --archive {ARCHIVE_NAME} --data-dir {out}`",
                          f"copy the files {', '.join(REQUIRED)} into {out}")
    assert "cannot reach" in line
    assert files_in(out) == set()


def test_an_html_page_instead_of_the_archive_is_one_line(tmp_path, originals, web):
    www, base = web
    (www / "uc.html").write_text('<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>'
                                 '</head><body><form action="https://drive.usercontent.google.com/download">'
                                 '</form></body></html>\n')
    out = tmp_path / "data"
    line = one_line_error(aflow_data(tmp_path, "fetch", "--url", f"{base}/uc.html", "--data-dir", str(out)),
                          "HTML page", "not the gzip archive", f"--archive {ARCHIVE_NAME} --data-dir {out}")
    assert f"download {base}/uc.html on a machine with internet" in line
    assert files_in(out) == set()


def test_a_hostile_archive_writes_nothing_outside_the_directory_and_no_link(tmp_path, originals):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "a" / "b" / "data"
    out.parent.mkdir(parents=True)
    archive = build_archive(tmp_path / "hostile" / ARCHIVE_NAME, [
        regular("../../evil.jsonl", b"evil\n"),
        regular("../../gsm8k_validate.jsonl", originals["gsm8k_validate.jsonl"]),
        regular(str(outside / "abs_evil.jsonl"), b"evil\n"),
        regular(str(outside / "math_test.jsonl"), originals["math_test.jsonl"]),
        special("data/gsm8k_test.jsonl", tarfile.SYMTYPE, "/etc/passwd"),
        special("data/drop_test.jsonl", tarfile.LNKTYPE, "/etc/passwd"),
        special("data/humaneval_test.jsonl", tarfile.FIFOTYPE),
        special("data/humaneval_validate.jsonl", tarfile.CHRTYPE),
        special("data/mbpp_validate.jsonl", tarfile.DIRTYPE),
        special("data/link", tarfile.SYMTYPE, str(outside)),
        regular("data/link/mbpp_test.jsonl", originals["mbpp_test.jsonl"]),
        regular("data/link/evil2.jsonl", b"evil\n"),
    ])
    with tarfile.open(archive) as tar:  # the hostile names really are in the archive
        assert {"../../evil.jsonl", str(outside / "abs_evil.jsonl")} <= set(tar.getnames())
    before = tree(tmp_path, out)
    result = aflow_data(tmp_path, "fetch", "--archive", str(archive), "--data-dir", str(out))
    assert result.returncode == 1, (result.stdout, result.stderr)  # runs, but most files are missing
    assert "Traceback" not in result.stderr
    assert tree(tmp_path, out) == before  # nothing created outside the data directory
    assert not list(tmp_path.rglob("*evil*"))
    assert files_in(out) == {"gsm8k_validate.jsonl", "math_test.jsonl", "mbpp_test.jsonl"}
    assert not [p for p in out.rglob("*") if p.is_symlink() or not p.is_file()]
    for name in files_in(out):
        assert (out / name).read_bytes() == originals[name], name
    assert "ignored 'data/gsm8k_test.jsonl'" in result.stderr


@pytest.mark.parametrize("bomb", ["gsm8k_test.jsonl", "data/other/huge.bin"])
def test_a_member_over_the_size_cap_is_refused_and_nothing_is_written(tmp_path, originals, bomb):
    archive = build_archive(tmp_path / "bomb" / ARCHIVE_NAME, [
        regular("data/gsm8k_validate.jsonl", originals["gsm8k_validate.jsonl"]),  # fine, before the bomb
        regular(bomb, b"\0" * (3 << 20)),  # 3 MB of zeros: a few KB compressed
        regular("data/math_test.jsonl", originals["math_test.jsonl"]),
    ])
    assert archive.stat().st_size < (1 << 20)
    out = tmp_path / "data"
    one_line_error(aflow_data(tmp_path, "fetch", "--archive", str(archive), "--data-dir", str(out), "--max-mb", "1"),
                   "larger than the size cap of 1 MB", "nothing written")
    assert files_in(out) == set()  # not even the member read before the cap was hit, nor a temporary
    # the same archive under the default cap is accepted: the refusal was the cap, not the archive
    if bomb != "gsm8k_test.jsonl":
        assert aflow_data(tmp_path, "fetch", "--archive", str(archive), "--data-dir", str(out)).returncode == 1
        assert files_in(out) == {"gsm8k_validate.jsonl", "math_test.jsonl"}


def test_existing_files_are_kept_without_overwrite_and_replaced_with_it(tmp_path, originals):
    archive = aflow_like_archive(tmp_path / "carried" / ARCHIVE_NAME, originals)
    out = tmp_path / "data"
    out.mkdir()
    (out / "gsm8k_test.jsonl").write_bytes(b'{"question": "mine", "answer": 1}\n')
    result = aflow_data(tmp_path, "fetch", "--archive", str(archive), "--data-dir", str(out))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert (out / "gsm8k_test.jsonl").read_bytes() == b'{"question": "mine", "answer": 1}\n'
    kept = [line for line in result.stdout.splitlines() if line.startswith("  gsm8k_test.jsonl")]
    assert kept and " kept " in kept[0] and "differs" in kept[0], result.stdout
    assert "kept 1 files already in" in result.stdout and "--overwrite" in result.stdout
    assert (out / "gsm8k_validate.jsonl").read_bytes() == originals["gsm8k_validate.jsonl"]

    result = aflow_data(tmp_path, "fetch", "--archive", str(archive), "--data-dir", str(out), "--overwrite")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert (out / "gsm8k_test.jsonl").read_bytes() == originals["gsm8k_test.jsonl"]
    assert not [line for line in result.stdout.splitlines() if " kept " in line], result.stdout
    assert "kept 1 files" not in result.stdout
    assert files_in(out) == set(REQUIRED)


# ---- status ----------------------------------------------------------------------------

def test_status_reports_a_modified_file_as_differing_and_a_missing_one_as_missing(tmp_path, originals):
    out = tmp_path / "data"
    out.mkdir()
    for name, content in originals.items():
        (out / name).write_bytes(content)
    assert aflow_data(tmp_path, "status", "--data-dir", str(out)).returncode == 0
    with open(out / "math_test.jsonl", "ab") as f:
        f.write(b'{"problem": "1+1", "solution": "\\\\boxed{2}"}\n')
    (out / "drop_test.jsonl").unlink()
    result = aflow_data(tmp_path, "status", "--data-dir", str(out))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert set(lines) >= set(REQUIRED)
    assert "differs from the split this project was checked against" in lines["math_test.jsonl"]
    assert "487 rows" in lines["math_test.jsonl"] and PINNED_SHA256["math_test.jsonl"][:12] in lines["math_test.jsonl"]
    assert lines["drop_test.jsonl"].split(None, 1)[1] == "missing"
    for name in set(REQUIRED) - {"math_test.jsonl", "drop_test.jsonl"}:
        assert "present" in lines[name] and "differs" not in lines[name], lines[name]
    assert "missing: drop_test.jsonl" in result.stdout.splitlines()[-1]
    # a differing file alone is a warning: exit 0
    (out / "drop_test.jsonl").write_bytes(originals["drop_test.jsonl"])
    result = aflow_data(tmp_path, "status", "--data-dir", str(out))
    assert result.returncode == 0 and "warning: math_test.jsonl differs" in result.stdout


def test_status_without_a_data_directory_is_one_line_saying_how_to_set_one(tmp_path):
    one_line_error(aflow_data(tmp_path, "status"), "no data directory", "--data-dir DIR", "AFLOW_DATA_DIR",
                   str(tmp_path / "xdg-data" / "aflow" / "data"))
