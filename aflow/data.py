"""`aflow data`: put AFlow's benchmark split files on a user's machine, and say where they go.

No benchmark data is committed to this project, so a newcomer needs the JSONL files AFlow
distributes (a tar.gz on Google Drive, fetched by AFlow's data/download_data.py). `fetch`
downloads that archive (or reads a copy brought over by hand) and takes out only the files
the benchmarks read; `status` says, file by file, what a data directory holds.

The archive comes from outside, so it is treated as hostile: only regular files whose base
name is an expected name are taken, written flat into the data directory under that name
(a member's path is never used, so nothing lands outside it and no link is created), and
everything read is bounded by a size cap, so a tar bomb stops with an error. Files are
written to temporary names and renamed only once the whole archive has been read, so an
interrupted or refused fetch leaves the directory as it was.

Each file is checked against the sha256 of the split this project was checked against
(PINNED_SHA256). AFlow may republish its archive, so a differing file is reported, not refused.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import lzma
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from aflow.benchmarks import BENCHMARKS

# AFlow's data/download_data.py: the datasets archive, extracted there to data/datasets.
ARCHIVE_URL = "https://drive.google.com/uc?export=download&id=1DNoegtZiUhWtvkd2xoIuElmIi4ah7k8e"
ARCHIVE_NAME = "aflow_data.tar.gz"

# sha256 of AFlow's split files as this project was checked against them (the copy committed
# to the MetaGPT repository, examples/aflow/data, commit 2d1d7ca2).
PINNED_SHA256: dict[str, str] = {
    "gsm8k_validate.jsonl": "0502dcec3263f5172e450141ff79da1f84401ed0c7e5d51016b3f773fb7ee869",
    "gsm8k_test.jsonl": "2b8372f7b81d842fea01efb66193152b42506e2b23c890c3d90d2aef228dd788",
    "math_validate.jsonl": "0ade63e8c9fe01fb8964fa22f73423be5e1c78addc9942808de464cabab188c0",
    "math_test.jsonl": "343361223de598f1a8ca101edd5d4a063b8152a3ae80f845855b0d8cfb858e5c",
    "humaneval_validate.jsonl": "7c09e2424572a0e82b14d2dc145bf86feb2aeef9828b8b37c7e87dfe88d902f7",
    "humaneval_test.jsonl": "5f7417d249b5a1153d1313c944fafe61f5bcb19717b8d952eb45e6ea5aaa23d9",
    "humaneval_public_test.jsonl": "ad5e3bdddfa5d0a48ad75d027d293858b2cab4526ca645a54f117c4f0b596edc",
    "mbpp_validate.jsonl": "04c54e076bb2cb1a583d8e57110e3a644ae3125699b3309104d3b8cf95436216",
    "mbpp_test.jsonl": "0e9485dee21c836087453255557f92457b145dce7dad22b980e007c0500a12b0",
    "mbpp_public_test.jsonl": "a3a15f074b278432b5a01227fac049670f30c0ebf8a193013bb956c1f6f04e82",
    "hotpotqa_validate.jsonl": "a2fcafe6cb44c705b48e404ab4e9a2726874cfdecffed5ddfef06e46b6c78639",
    "drop_validate.jsonl": "fa761d3f46c3c995278532ee9354fe78fd03fa6567774ea359e149dea5cf2362",
    "drop_test.jsonl": "a0ae6fac687d2bb393c9c6a43d966edf9ed24d0d157cfb7f7a4747cc8b3d9742",
}
# The code benchmarks' public tests (read by the Test operator; see benchmarks.public_tests).
PUBLIC_TEST_BENCHMARKS = ("humaneval", "mbpp")

DEFAULT_MAX_MB = 1024  # bounds the download and everything unpacked from the archive
TIMEOUT_S = 60.0  # per network operation (connect, each read)
CHUNK = 1 << 16


class FetchError(RuntimeError):
    """The data cannot be fetched or unpacked (a set-up error: one line, exit 2)."""


def _declared_names() -> list[str]:
    names = [BENCHMARKS[b].file(Path(), split).name for b in BENCHMARKS for split in BENCHMARKS[b].splits]
    names += [f"{b}_public_test.jsonl" for b in PUBLIC_TEST_BENCHMARKS]
    return names


# Every file a benchmark can read. REQUIRED: those of the checked splits (a directory without
# one is incomplete). OPTIONAL: declared but absent from the checked data (HotpotQA's test file
# could not be obtained): taken from an archive that has it, but never required.
EXPECTED: tuple[str, ...] = tuple(_declared_names())
REQUIRED: tuple[str, ...] = tuple(n for n in EXPECTED if n in PINNED_SHA256)
OPTIONAL: tuple[str, ...] = tuple(n for n in EXPECTED if n not in PINNED_SHA256)


def default_data_dir() -> Path:
    """Where `fetch` puts the files when no directory is given: $XDG_DATA_HOME/aflow/data."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(root) / "aflow" / "data"


def offline_recipe(url: str, data_dir: Path) -> str:
    """The exact steps for a machine without internet, in one line."""
    return (f"download {url} on a machine with internet, then `aflow data fetch --archive {ARCHIVE_NAME} "
            f"--data-dir {data_dir}`, or copy the files {', '.join(REQUIRED)} into {data_dir}")


# ---- status ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileState:
    name: str
    state: str  # "present", "differs", "missing"
    rows: int = 0
    sha256: str = ""

    @property
    def required(self) -> bool:
        return self.name in PINNED_SHA256

    def describe(self) -> str:
        if self.state == "missing":
            return "missing" if self.required else "missing (optional: not in the split this project was checked against)"
        rows = f"{self.rows} rows"
        if self.state == "differs":
            return (f"present ({rows}) but differs from the split this project was checked against "
                    f"(sha256 {self.sha256[:12]}…, expected {PINNED_SHA256[self.name][:12]}…)")
        return f"present ({rows})" if self.required else f"present ({rows}; no pinned checksum)"


def _digest(path: Path) -> tuple[str, int]:
    """(sha256, non-empty lines) of a file."""
    digest, rows, last = hashlib.sha256(), 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            rows += sum(1 for line in (last + chunk).split(b"\n")[:-1] if line.strip())
            last = (last + chunk).rsplit(b"\n", 1)[-1]
    return digest.hexdigest(), rows + (1 if last.strip() else 0)


def file_state(data_dir: Path, name: str) -> FileState:
    path = data_dir / name
    if not path.is_file():
        return FileState(name, "missing")
    sha, rows = _digest(path)
    pinned = PINNED_SHA256.get(name)
    return FileState(name, "differs" if pinned and sha != pinned else "present", rows, sha)


def status(data_dir: Path) -> list[FileState]:
    return [file_state(data_dir, name) for name in EXPECTED]


# ---- fetch -----------------------------------------------------------------------------

class _Capped:
    """A read-only stream that refuses to yield more than `cap` bytes: bounds a download and
    the decompressed archive alike (a gzip of zeros can unpack to anything)."""

    def __init__(self, raw: BinaryIO, cap: int, what: str):
        self.raw, self.cap, self.what, self.count = raw, cap, what, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else self.cap + 1 - self.count)
        self.count += len(data)
        if self.count > self.cap:
            raise FetchError(f"{self.what} is larger than the size cap of {self.cap // (1 << 20)} MB: refused, "
                             "nothing written (raise it with --max-mb if the archive is genuine)")
        return data


def _looks_like_html(head: bytes) -> bool:
    text = head[:2048].lstrip().lower()
    return text.startswith(b"<") or b"<html" in text or b"<!doctype" in text


def _decompressed(f: BinaryIO, source: str, url: str, data_dir: Path) -> BinaryIO:
    """The tar stream inside `f` (gzip as AFlow ships it; bz2, xz or a plain tar also work).
    An HTML page (Google Drive's confirmation or quota page) or anything else is refused."""
    head = f.read(512 + 265)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(f)
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f)
    if head[257:262] == b"ustar":
        return f
    if _looks_like_html(head):
        raise FetchError(f"{source} is an HTML page, not the gzip archive {ARCHIVE_NAME} (Google Drive answers "
                         f"with a confirmation or quota page when it will not serve the file directly): "
                         + offline_recipe(url, data_dir))
    raise FetchError(f"{source} is not a gzip archive ({ARCHIVE_NAME} is a tar.gz): " + offline_recipe(url, data_dir))


def download(url: str, into: BinaryIO, cap: int, data_dir: Path) -> int:
    """Copy `url` into the open file `into` (at most `cap` bytes); progress on a terminal."""
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (http(s) or file: the user's choice)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url} answered HTTP {exc.code} {exc.reason}: " + offline_recipe(url, data_dir)) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"cannot reach {url} ({' '.join(str(reason).split())}): "
                         + offline_recipe(url, data_dir)) from exc
    total = int(response.headers.get("Content-Length") or 0)
    show = sys.stderr.isatty()
    done, last = 0, 0.0
    try:
        with response:
            stream = _Capped(response, cap, f"the download from {url}")
            while chunk := stream.read(CHUNK):
                into.write(chunk)
                done += len(chunk)
                if show and time.monotonic() - last > 0.2:
                    last = time.monotonic()
                    of = f" of {total / 1e6:.1f}" if total else ""
                    print(f"\raflow: downloading {ARCHIVE_NAME}: {done / 1e6:.1f}{of} MB", end="", file=sys.stderr,
                          flush=True)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"the download from {url} broke off after {done} bytes ({exc}): "
                         + offline_recipe(url, data_dir)) from exc
    finally:
        if show:
            print(file=sys.stderr, flush=True)
    return done


@dataclass
class Taken:
    name: str
    temp: Path
    sha256: str
    rows: int


@dataclass
class FetchReport:
    data_dir: Path
    written: list[FileState]
    kept: list[str]  # present already, not replaced (no --overwrite)
    absent: list[str]  # expected names the archive does not hold
    notes: list[str]  # members with an expected name that were ignored, duplicates


def _take(tar_member: BinaryIO, data_dir: Path) -> tuple[Path, str, int]:
    """Copy one member into a new temporary file in `data_dir`: (path, sha256, rows)."""
    fd, temp = tempfile.mkstemp(prefix=".aflow-fetch-", suffix=".part", dir=data_dir)
    digest, rows, last = hashlib.sha256(), 0, b""
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := tar_member.read(CHUNK):
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise FetchError(f"cannot write in {data_dir}: {exc.strerror or exc}") from exc
                digest.update(chunk)
                lines = (last + chunk).split(b"\n")
                rows += sum(1 for line in lines[:-1] if line.strip())
                last = lines[-1]
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise FetchError(f"cannot write in {data_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        os.unlink(temp)
        raise
    return Path(temp), digest.hexdigest(), rows + (1 if last.strip() else 0)


def extract(archive: BinaryIO, source: str, url: str, data_dir: Path, overwrite: bool, cap: int) -> FetchReport:
    """Take the expected files out of `archive` into `data_dir` (see the module docstring)."""
    taken: dict[str, Taken] = {}
    kept: set[str] = set()
    notes: list[str] = []
    try:
        stream = _Capped(_decompressed(archive, source, url, data_dir), cap, f"{source} unpacked")
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    name = PurePosixPath(member.name.replace("\\", "/")).name
                    if name not in EXPECTED:
                        continue
                    if not member.isreg():
                        notes.append(f"ignored {member.name!r} in the archive (not a regular file)")
                        continue
                    if not overwrite and os.path.lexists(data_dir / name):
                        kept.add(name)
                        continue
                    if name in taken and taken[name].sha256 == PINNED_SHA256.get(name):
                        notes.append(f"ignored a second {name} ({member.name!r}): the first matches the checksum")
                        continue
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    temp, sha, rows = _take(f, data_dir)
                    if name in taken:
                        if sha == PINNED_SHA256.get(name):  # the checked copy wins over an earlier one
                            notes.append(f"the archive holds {name} more than once: took {member.name!r}")
                            taken[name].temp.unlink()
                        else:
                            notes.append(f"the archive holds {name} more than once: took the first")
                            temp.unlink()
                            continue
                    taken[name] = Taken(name, temp, sha, rows)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError) as exc:
            raise FetchError(f"{source} is not a readable tar archive ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())}): nothing written; " + offline_recipe(url, data_dir)) from exc
        for item in taken.values():  # the whole archive was read: now publish, each by one rename
            try:
                os.replace(item.temp, data_dir / item.name)
            except OSError as exc:
                raise FetchError(f"cannot write {data_dir / item.name}: {exc.strerror or exc}") from exc
    finally:
        for item in taken.values():
            if item.temp.exists():
                item.temp.unlink()
    written = []
    for name in EXPECTED:
        if name in taken:
            pinned = PINNED_SHA256.get(name)
            state = "differs" if pinned and taken[name].sha256 != pinned else "present"
            written.append(FileState(name, state, taken[name].rows, taken[name].sha256))
    absent = [n for n in EXPECTED if n not in taken and n not in kept]
    return FetchReport(data_dir, written, sorted(kept, key=EXPECTED.index), absent, notes)


def fetch(data_dir: Path, url: str | None = None, archive: Path | None = None, overwrite: bool = False,
          max_mb: int = DEFAULT_MAX_MB) -> FetchReport:
    """Download `url` (default: AFlow's archive) or read `archive`, and extract into `data_dir`."""
    url = url or ARCHIVE_URL
    cap = max_mb << 20
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the data directory {data_dir}: {exc.strerror or exc}") from exc
    if not data_dir.is_dir():
        raise FetchError(f"the data directory {data_dir} is not a directory")
    if archive is not None:
        try:
            f = open(archive, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise FetchError(f"cannot read the archive {archive}: {exc.strerror or exc}") from exc
        with f:
            return extract(f, f"the archive {archive}", url, data_dir, overwrite, cap)
    with tempfile.TemporaryFile(dir=data_dir) as f:  # anonymous: gone however the fetch ends
        size = download(url, f, cap, data_dir)
        f.seek(0)
        source = f"the download from {url}"
        _decompressed(f, source, url, data_dir)  # an HTML page instead of the archive: one line, nothing else
        print(f"aflow: downloaded {size:,} bytes from {url}", file=sys.stderr, flush=True)
        return extract(f, source, url, data_dir, overwrite, cap)
