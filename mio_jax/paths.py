"""One path layer for every file a run or a command reads or writes.

Paths are strings: a local path or a URL that ``etils.epath`` (the path library Orbax
uses) understands, such as ``gs://bucket/run`` (fsspec + gcsfs, installed with the
``gcs`` extra), ``s3://`` or ``az://``. Local paths never import a cloud library.

Object stores have no rename and no append, so:
  * ``write_text`` / ``write_bytes`` are atomic everywhere: a local file is written beside
    its target and renamed over it; a remote object is uploaded in one request (an object
    store makes an upload visible whole or not at all).
  * ``AppendFile`` appends to a local file; for a remote path it keeps a local mirror and
    uploads the whole file on ``sync()`` (at most every ``upload_every`` seconds) and on
    ``close()``.
  * ``local_copy`` stages a remote file or folder on local disk (for readers that need a
    real file: memory maps, tokenizers, GGUF), reusing a staged copy whose sizes and
    modification times match.

Tests point these at a local GCS emulator (``STORAGE_EMULATOR_HOST``;
``TENSORSTORE_GCS_HTTP_URL`` for Orbax's array I/O).
"""

import builtins
import glob as stdlib_glob
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator

from etils import epath

STAGING_ENV = "MIO_JAX_STAGING"  # where remote inputs are staged (default ~/.cache/mio_jax)
_WILDCARDS = "*?["

if os.environ.get("STORAGE_EMULATOR_HOST"):
    # Against a GCS emulator (tests) there are no credentials, and gcsfs warns that it
    # cannot tell the bucket type on every operation; real buckets keep its warnings.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
# fsspec logs a line at INFO for every remote file it opens.
logging.getLogger("fsspec").setLevel(logging.WARNING)


def is_remote(path) -> bool:
    """True for a URL (``scheme://...``) other than ``file://``."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def resolve(path) -> str:
    """A path in the form every process and restart agrees on: local paths absolute (``~``
    expanded), URLs unchanged but for a trailing slash."""
    s = os.fspath(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if is_remote(s):
        return s.rstrip("/") if not s.endswith("://") else s
    return os.path.abspath(os.path.expanduser(s))


def as_path(path) -> epath.Path:
    return epath.Path(resolve(path))


def join(base, *parts) -> str:
    """``base/part/...`` for a local path or a URL."""
    s = os.fspath(base)
    if is_remote(s):
        return "/".join([s.rstrip("/"), *(os.fspath(p).strip("/") for p in parts)])
    return os.path.join(s, *map(os.fspath, parts))


def basename(path) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path) -> str:
    s = os.fspath(path).rstrip("/")
    if is_remote(s):
        head = s.rsplit("/", 1)[0]
        return head if "://" in head else s
    return os.path.dirname(s)


def exists(path) -> bool:
    return as_path(path).exists()


def isdir(path) -> bool:
    return as_path(path).is_dir()


def isfile(path) -> bool:
    return as_path(path).is_file()


def makedirs(path) -> None:
    """Creates a folder and its parents. In an object store the bucket must exist: a
    mistyped bucket is an error, never a new bucket."""
    p = as_path(path)
    if is_remote(p):
        scheme, rest = os.fspath(p).split("://", 1)
        bucket = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
        if not bucket.exists():
            raise FileNotFoundError(f"{bucket} does not exist (create the bucket first, or "
                                    f"check the path {p})")
    p.mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    """Names of the entries of a folder, sorted."""
    return sorted(p.name for p in as_path(path).iterdir())


def size(path) -> int:
    return int(as_path(path).stat().length)


def stat_fingerprint(path) -> dict:
    """``{"path", "size", "mtime"}`` of a file: what cache keys record of an input file."""
    s = resolve(path)
    if not is_remote(s):  # nanoseconds: a rewrite within the same second still differs
        st = os.stat(s)
        return {"path": s, "size": int(st.st_size), "mtime": int(st.st_mtime_ns)}
    st = epath.Path(s).stat()
    return {"path": s, "size": int(st.length), "mtime": int(st.mtime or 0)}


def has_wildcard(path) -> bool:
    return any(ch in os.fspath(path) for ch in _WILDCARDS)


def glob(pattern) -> list[str]:
    """Sorted matches of a glob pattern, local (as written) or remote (wildcards after
    the bucket)."""
    if not is_remote(pattern):
        return sorted(stdlib_glob.glob(os.path.expanduser(os.fspath(pattern))))
    s = resolve(pattern)
    parts = s.split("/")
    first = next(i for i, part in enumerate(parts) if has_wildcard(part))
    base = "/".join(parts[:first]) or "/"
    rest = "/".join(parts[first:])
    if not epath.Path(base).is_dir():
        return []
    return sorted(resolve(p) for p in epath.Path(base).glob(rest))


def open(path, mode: str = "r", **kwargs):  # noqa: A001 - the module's open, like io.open
    return as_path(path).open(mode, **kwargs)


def read_bytes(path) -> bytes:
    return as_path(path).read_bytes()


def read_text(path) -> str:
    return as_path(path).read_text(encoding="utf-8")


def read_json(path):
    return json.loads(read_text(path))


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file atomically (see the module docstring), creating its folder."""
    s = resolve(path)
    if is_remote(s):
        epath.Path(s).write_bytes(data)
        return
    os.makedirs(os.path.dirname(s), exist_ok=True)
    tmp = f"{s}.tmp-{uuid.uuid4().hex[:8]}"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, s)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, **kwargs) -> None:
    write_text(path, json.dumps(obj, **kwargs))


def upload(local: str, path) -> None:
    """Copies a local file to ``path`` (local or remote), atomically."""
    s = resolve(path)
    if not is_remote(s):
        if os.path.abspath(local) != s:
            with builtins.open(local, "rb") as f:
                write_bytes(s, f.read())
        return
    epath.Path(s).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(local).copy(epath.Path(s), overwrite=True)


def staging_dir() -> str:
    return os.environ.get(STAGING_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "mio_jax", "staged")


def _walk(root: epath.Path) -> Iterator[epath.Path]:
    for p in sorted(root.iterdir()):
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def local_copy(path) -> str:
    """A local path with the contents of ``path``: the path itself when local, else a
    staged copy of the remote file or folder (downloaded once; reused while the remote
    sizes and modification times match). Each file lands atomically, so concurrent
    processes may stage alike."""
    s = resolve(path)
    if not is_remote(s):
        return s
    src = epath.Path(s)
    key = hashlib.sha1(s.encode()).hexdigest()[:16]
    dst_root = os.path.join(staging_dir(), key, basename(s))
    files = [(src, dst_root)] if src.is_file() else [
        (p, os.path.join(dst_root, os.path.relpath(os.fspath(p), s)))
        for p in _walk(src)]
    if not files and not src.exists():
        raise FileNotFoundError(f"{s} does not exist")
    for remote, local in files:
        st = remote.stat()
        length, mtime = int(st.length), int(st.mtime or 0)
        # A staged file carries its object's modification time: an object replaced by one
        # of the same size (new weights of the same shapes) is staged again.
        if (os.path.isfile(local) and os.path.getsize(local) == length and mtime
                and int(os.path.getmtime(local)) == mtime):
            continue
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        remote.copy(epath.Path(tmp), overwrite=True)
        if mtime:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, local)
    if not files:
        os.makedirs(dst_root, exist_ok=True)
    if os.path.isdir(dst_root):  # files staged before that the folder no longer holds
        wanted = {local for _, local in files}
        for folder, _, names in os.walk(dst_root):
            for name in names:
                local = os.path.join(folder, name)
                if local not in wanted and ".tmp-" not in name:
                    try:
                        os.remove(local)
                    except FileNotFoundError:  # another process staging the same folder
                        pass
    return dst_root


class AppendFile:
    """A text file that only grows, on local disk or in an object store.

    Args:
      path: the file (local or remote).
      initial: text the file starts with (replacing what it held).
      upload_every: a remote file is uploaded whole at most this often (seconds) by
        ``sync()``, and always by ``close()``.
    """

    def __init__(self, path, initial: str | None = None, upload_every: float = 30.0):
        self.path = resolve(path)
        self._remote = is_remote(self.path)
        self._every, self._last = upload_every, 0.0
        if self._remote:
            fd, self._local = tempfile.mkstemp(prefix="mio_append_", suffix=".txt")
            os.close(fd)
            if initial is None and exists(self.path):
                initial = read_text(self.path)
        else:
            self._local = self.path
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if initial is not None:
            write_text(self._local, initial)
        self._f = builtins.open(self._local, "a", encoding="utf-8")
        if self._remote and initial is not None:
            self.sync(force=True)

    def write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()

    def sync(self, force: bool = False) -> None:
        """Uploads the whole file (remote paths; local files are flushed on every write)."""
        if self._remote and (force or time.monotonic() - self._last >= self._every):
            self._f.flush()
            upload(self._local, self.path)
            self._last = time.monotonic()

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._remote:
            upload(self._local, self.path)
            os.remove(self._local)  # our own mirror, not the user's file
