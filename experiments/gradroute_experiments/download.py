"""Checksummed files for the experiments' data modules: digests and a mirror-by-mirror download.

Nothing here runs at import time. A data module calls :func:`fetch` from ``prepare_data`` when its files are
missing and the machine may be online; a file is only put in place once its checksum matches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["fetch", "file_digest", "sha256_of"]


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``algorithm`` is any :func:`hashlib.new` name: ``"sha256"``, ``"md5"``)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    return file_digest(path, "sha256")


def fetch(
    urls: Sequence[str], dest: str | os.PathLike, digest: str, algorithm: str = "sha256", timeout: float = 30.0
) -> None:
    """Download ``dest`` from the first of ``urls`` that serves a file with the expected ``digest``.

    The bytes go to ``<dest>.part`` and are renamed to ``dest`` only after the checksum matched, so an
    interrupted or wrong download never leaves a file that looks complete.

    Raises:
        OSError: no URL delivered the file (offline, or wrong bytes served); the message lists each URL's error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as err:
            errors.append(f"{url}: {err}")
            part.unlink(missing_ok=True)
            continue
        if file_digest(part, algorithm) != digest:
            errors.append(f"{url}: checksum mismatch")
            part.unlink()
            continue
        os.replace(part, dest)
        return
    raise OSError(f"could not download {dest.name} ({'; '.join(errors)})")
