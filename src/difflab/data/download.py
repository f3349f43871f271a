"""Where dataset files live on disk, and a checksummed, atomic downloader for the ones that are missing.

The cache is ``$DIFFLAB_CACHE`` when set, else ``~/.cache/difflab``; each dataset keeps its files in a
subfolder named after it. A download streams into a temporary file beside its destination, checks the
published MD5 while it streams, and only then renames the file into place, so a half-written or
corrupt file is never left where a later run would trust it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from difflab.errors import DifflabError

CHUNK = 1 << 20  # bytes read per step while streaming a download
TIMEOUT_S = 30  # socket timeout for one download request


def cache_dir() -> Path:
    """The folder difflab keeps downloaded files in: ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``."""
    env = os.environ.get("DIFFLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difflab"


def save_cache_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors cache file atomically (a temporary file beside it, then a rename), so a run
    reading the cache never sees half a file. Raises OSError when the cache cannot be written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def download_file(url: str, dest: str | os.PathLike, *, md5: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` and verify its MD5; return ``dest``.

    The bytes go to a temporary file in ``dest``'s folder and are renamed onto ``dest`` only after the
    checksum matched. Network failures and checksum mismatches raise :class:`DifflabError`; either way
    nothing is left at ``dest`` or beside it.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DifflabError(f"cannot write to {dest.parent} ({e.strerror}); "
                           "set DIFFLAB_CACHE to a writable folder") from e
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=dest.name, disable=not progress, leave=False) as bar:
                        while chunk := response.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: malformed URL
                reason = getattr(e, "reason", None) or e
                raise DifflabError(f"could not download {url}: {reason}") from e
        if digest.hexdigest() != md5:
            raise DifflabError(
                f"checksum mismatch for {url}: got md5 {digest.hexdigest()}, expected {md5}; "
                f"the download is corrupt or the file changed upstream, try again or place the file "
                f"at {dest} yourself"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_first(urls: list[str], dest: Path, *, md5: str, progress: bool) -> Path:
    """Try each mirror in turn (network failure or bad checksum -> next); raise the last error."""
    error: DifflabError | None = None
    for url in urls:
        try:
            return download_file(url, dest, md5=md5, progress=progress)
        except DifflabError as e:
            error = e
    assert error is not None, "download_first needs at least one URL"
    raise error
