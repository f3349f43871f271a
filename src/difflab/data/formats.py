"""The two archive formats the classic datasets ship in: IDX (MNIST, Fashion-MNIST) and the pickled
batches of CIFAR-10's python archive.

Both are parsed here from bytes with numpy; nothing is extracted to disk. CIFAR's pickles go through a
restricted unpickler that can build numpy arrays, dicts and lists and nothing else, because unpickling
an arbitrary file can run arbitrary code.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from difflab.errors import DifflabError

# ---------------------------------------------------------------------------------------------------
# IDX (LeCun et al., http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): a 4-byte magic
# 0x00 0x00 <type> <ndim>, then ndim big-endian uint32 sizes, then the data in C order, big-endian.

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected from its first bytes), into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DifflabError(f"cannot read IDX file {path}: {e}; delete it and fetch it again") from e
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DifflabError(f"{source} is not an IDX file (bad magic number {raw[:4].hex()}); "
                           "point data_dir at the original MNIST-style files")
    dtype, ndim = np.dtype(IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DifflabError(f"IDX file {source} is truncated inside its header; fetch it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DifflabError(f"IDX file {source} holds {len(raw)} bytes but its header {shape} "
                           f"implies {expected}; the file is truncated or corrupt, fetch it again")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 python archive (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):
# cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, each a pickled dict. A data batch
# holds "data" (10000, 3072) uint8, row-major channel planes R, G, B of a 32x32 image, and "labels".

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_META = "batches.meta"


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array needs, under the module names numpy 1.x and 2.x use."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes under pickle protocol 2 (Python 3)
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocol <= 4
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data files: numpy arrays, dicts, lists, strings and numbers, nothing else.

    Any other global (``os.system``, ``builtins.eval``, a class of some library, ...) is refused with
    :class:`DifflabError` before it can be called.
    """

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DifflabError(f"refusing to unpickle {module}.{name}: data files may only hold arrays, "
                               "dicts and lists; this file is not a CIFAR batch or was tampered with") from None


def restricted_loads(raw: bytes, *, source: str) -> object:
    """Unpickle ``raw`` with :class:`RestrictedUnpickler`. Python 2 strings decode as latin-1."""
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except DifflabError as e:
        raise DifflabError(f"{source}: {e}") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, ValueError, ...
        raise DifflabError(f"{source} is not a readable pickle ({type(e).__name__}: {e}); "
                           "fetch the CIFAR-10 archive again") from e


def _str_keys(obj: object, source: str) -> dict[str, object]:
    """The real archive's keys are Python 2 strings, a Python 3 re-pickle has bytes: accept both."""
    if not isinstance(obj, dict):
        raise DifflabError(f"{source} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_member_bytes(source: Path, names: list[str]) -> dict[str, bytes]:
    """Read the named files from the archive (one pass over the tar) or from the extracted folder."""
    found: dict[str, bytes] = {}
    if source.is_dir():
        for name in names:
            if (source / name).is_file():
                found[name] = (source / name).read_bytes()
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in names and base not in found:
                        found[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DifflabError(f"cannot read CIFAR-10 archive {source}: {e}; delete it and fetch it again") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise DifflabError(f"{source} lacks {', '.join(missing)}; point data_dir at cifar-10-python.tar.gz "
                           f"or its extracted {CIFAR_FOLDER} folder")
    return found


def read_cifar10(source: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one split of CIFAR-10 from ``cifar-10-python.tar.gz`` or the extracted ``cifar-10-batches-py``.

    Returns images uint8 (N, 3, 32, 32), labels int64 (N,) and the class names from ``batches.meta``.
    """
    source = Path(source)
    batches = CIFAR_SPLITS[split]
    raw = _cifar_member_bytes(source, batches + [CIFAR_META])
    images, labels = [], []
    for name in batches:
        where = f"{source}:{name}"
        batch = _str_keys(restricted_loads(raw[name], source=where), where)
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DifflabError(f"{where} has no (N, 3072) uint8 'data' array; is this CIFAR-10's python archive?")
        batch_labels = np.asarray(batch.get("labels", []), dtype=np.int64)
        if batch_labels.shape != (data.shape[0],):
            raise DifflabError(f"{where} has {batch_labels.size} labels for {data.shape[0]} images")
        images.append(data.reshape(-1, 3, 32, 32))  # row-major: (R plane, G plane, B plane), each 32x32
        labels.append(batch_labels)
    where = f"{source}:{CIFAR_META}"
    meta = _str_keys(restricted_loads(raw[CIFAR_META], source=where), where)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    all_labels = np.concatenate(labels)
    if not names or ((all_labels < 0) | (all_labels >= len(names))).any():
        raise DifflabError(f"{where} lists {len(names)} class names, too few for the labels of the batches; "
                           "is this CIFAR-10's python archive?")
    return np.concatenate(images), all_labels, names
