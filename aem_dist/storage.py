"""Filesystems from URLs, atomic writes, and credential redaction.

Every location in aem-dist is an fsspec URL: a plain path, ``file://...`` or ``s3://bucket/prefix``
on any S3-compatible endpoint. Endpoint and credentials come from the ``storage`` config section or
the standard AWS environment variables, and never leave this module in printable form: use
:func:`redact` on anything that might carry them.

Failures: every S3 request has a connect and read timeout and a small number of botocore attempts
(``attempts_per_request``), so an unreachable endpoint or a wrong key fails in seconds with a
:class:`StorageError` that says what is wrong and where to fix it (redacted). Longer, bounded retries
with exponential backoff (:func:`with_retries`, ``retries``) are for reads in the middle of a run, where
a failure is more likely a restarting server than a misconfiguration.

Atomicity: on a local filesystem a file is written under a temporary name in the same folder and
renamed into place (``os.replace`` is atomic on POSIX). On S3 an object becomes visible only when its
upload completes (single PUT or multipart completion), so the upload itself is the commit; an
interrupted upload leaves nothing visible under the final key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Credentials this process has seen in a config, so that log lines (botocore's DEBUG output carries the
# key id in every Authorization header) can be redacted even when they never were in the environment.
_SEEN_SECRETS: set[str] = set()
_TRANSIENT_ERRNOS = {None, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.EPIPE}


class StorageError(RuntimeError):
    """A storage location could not be reached or read; the message is already redacted."""


@dataclass(frozen=True)
class StorageOptions:
    """Resolved connection options for object storage (secrets kept out of repr)."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    region: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retries: int = 5  # app-level retries with backoff for reads during a run (see with_retries)
    attempts_per_request: int = 2  # botocore attempts per request: small, so misconfiguration fails fast

    @classmethod
    def from_config(cls, section: Any = None, retries: int | None = None) -> "StorageOptions":
        """From a ``StorageSection`` (or None), falling back to the standard AWS variables."""
        env = os.environ

        def secret_of(value: Any) -> str | None:
            return value.get_secret_value() if value is not None else None

        for value in (getattr(section, "key", None), getattr(section, "secret", None)):
            if value is not None and value.get_secret_value():
                _SEEN_SECRETS.add(value.get_secret_value())
        return cls(
            endpoint_url=(getattr(section, "endpoint_url", None) or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")),
            key=secret_of(getattr(section, "key", None)) or env.get("AWS_ACCESS_KEY_ID"),
            secret=secret_of(getattr(section, "secret", None)) or env.get("AWS_SECRET_ACCESS_KEY"),
            token=env.get("AWS_SESSION_TOKEN"),
            region=getattr(section, "region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            connect_timeout_s=getattr(section, "connect_timeout_s", 5.0),
            read_timeout_s=getattr(section, "read_timeout_s", 60.0),
            retries=5 if retries is None else retries,
        )

    def secrets(self) -> list[str]:
        return [s for s in (self.key, self.secret, self.token) if s]

    def s3_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "config_kwargs": {
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
                "retries": {"max_attempts": max(1, self.attempts_per_request), "mode": "standard"},
            },
            "client_kwargs": {},
            # Not fsspec's instance cache: it would hand one process's filesystem (with its event
            # loop) to a forked DataLoader worker; open_fs keeps its own per-process cache instead.
            "skip_instance_cache": True,
            # Listings written by other processes (Ray workers, other trials) must never look stale.
            "use_listings_cache": False,
        }
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            kwargs["client_kwargs"]["region_name"] = self.region
        if self.key:
            kwargs["key"] = self.key
        if self.secret:
            kwargs["secret"] = self.secret
        if self.token:
            kwargs["token"] = self.token
        return kwargs


def is_remote(url: str) -> bool:
    scheme = urlparse(str(url)).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # 'C:' drive letters are not schemes


def strip_scheme(url: str) -> str:
    """Path part for fsspec calls: 's3://b/p' → 'b/p', 'file:///x' → '/x', '/x' → '/x'."""
    url = str(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    if is_remote(url):
        return url.split("://", 1)[1]
    return url


def open_fs(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path for ``url``."""
    options = options or StorageOptions.from_config()
    scheme = urlparse(str(url)).scheme
    if scheme in ("s3", "s3a"):
        return _s3_filesystem(options), strip_scheme(url)
    if is_remote(url):
        fs, path = fsspec.core.url_to_fs(url)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(strip_scheme(url))


_S3_CLIENTS: dict[tuple[int, StorageOptions], Any] = {}
_S3_LOCK = threading.Lock()


def _s3_filesystem(options: StorageOptions) -> Any:
    """One s3fs filesystem per (process, options): building a client costs ~0.15 s (service model,
    session), which adds up over hundreds of shards. Keyed by pid so a forked DataLoader worker never
    reuses its parent's client and event loop."""
    import s3fs

    key = (os.getpid(), options)
    with _S3_LOCK:
        fs = _S3_CLIENTS.get(key)
        if fs is None:
            if len(_S3_CLIENTS) > 32:
                _S3_CLIENTS.clear()
            fs = _S3_CLIENTS[key] = s3fs.S3FileSystem(**options.s3_kwargs())
        return fs


def absolute(url: str) -> str:
    """``url`` with a local path made absolute (Ray workers run in other working directories)."""
    return str(url) if is_remote(url) else os.path.abspath(strip_scheme(url))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or path without mangling the scheme."""
    url = str(url).rstrip("/")
    for part in parts:
        url = f"{url}/{part.strip('/')}"
    return url


def redact(text: Any, options: StorageOptions | None = None) -> str:
    """Remove credentials from text: known secret values, the AWS variables, and user:pass@ in URLs."""
    text = str(text)
    secrets = list(options.secrets()) if options else []
    secrets += [os.environ[k] for k in _ENV_KEYS if os.environ.get(k)] + list(_SEEN_SECRETS)
    for s in sorted(set(secrets), key=len, reverse=True):
        if len(s) >= 3:
            text = text.replace(s, "***")
    return re.sub(r"(://)[^/@\s:]+:[^/@\s]+@", r"\1***:***@", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts every record (any logger, any level, tracebacks included) with
    :func:`redact`: what a log shows never carries a credential, whatever library wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def exists(url: str, options: StorageOptions | None = None) -> bool:
    fs, path = open_fs(url, options)
    return fs.exists(path)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_connect_error(err: BaseException) -> bool:
    for e in _chain(err):
        name = type(e).__name__
        if isinstance(e, ConnectionError) or name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
            "ConnectionClosedError", "ProxyConnectionError"):
            return True
    return False


def _is_timeout(err: BaseException) -> bool:
    return any(isinstance(e, TimeoutError) or type(e).__name__ in ("ReadTimeoutError", "FSTimeoutError", "ConnectTimeoutError") for e in _chain(err))


def is_transient(err: BaseException) -> bool:
    """Worth retrying: connection refused/reset, timeouts, 5xx, cut responses. Not: auth, missing keys."""
    if isinstance(err, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    if _is_connect_error(err) or _is_timeout(err):
        return True
    names = {type(e).__name__ for e in _chain(err)}
    if names & {"IncompleteRead", "ClientPayloadError", "ResponseParserError", "HTTPClientError", "ReadTimeoutError"}:
        return True
    # s3fs maps 500/503 (InternalError, SlowDown, ServiceUnavailable) to a plain OSError with EREMOTEIO/EBUSY,
    # and unknown server errors to EIO; EINVAL (bad range, bad bucket name) and the like are not transient.
    return type(err) is OSError and err.errno in _TRANSIENT_ERRNOS


def describe_error(err: BaseException, url: str, options: StorageOptions | None = None, action: str = "read") -> str:
    """A one-line, redacted explanation of a storage failure that says what to check."""
    where = redact(url, options)
    endpoint = (options.endpoint_url if options else None) or "the default AWS endpoint"
    if isinstance(err, PermissionError):
        hint = "check the access key and secret (storage.key/storage.secret or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket policy"
        text = f"access denied to {action} {where} at {endpoint}: {err}; {hint}"
    elif _is_connect_error(err):
        text = (f"cannot connect to object storage at {endpoint} to {action} {where}: {type(err).__name__}: {err}; "
                "check storage.endpoint_url / AWS_ENDPOINT_URL_S3 and that the server is up")
    elif _is_timeout(err):
        text = f"object storage at {endpoint} timed out while trying to {action} {where}: {type(err).__name__}: {err}"
    elif isinstance(err, FileNotFoundError):
        text = f"{where} not found (or its bucket does not exist): {err}"
    else:
        text = f"cannot {action} {where}: {type(err).__name__}: {err}"
    return redact(text, options)


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    retries: int,
    backoff_s: float = 0.5,
    max_backoff_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    options: StorageOptions | None = None,
) -> T:
    """Call ``fn``; on a transient error (see :func:`is_transient`) wait 0.5, 1, 2, 4, 8, 8 … s and try
    again, at most ``retries`` more times. Other errors, and the last transient one, propagate."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:
            if attempt >= retries or not is_transient(err):
                raise
            delay = min(max_backoff_s, backoff_s * 2**attempt)
            attempt += 1
            log.warning("%s failed (%s); retry %d/%d in %.1f s", redact(what, options), redact(f"{type(err).__name__}: {err}", options), attempt, retries,
                delay)
            sleep(delay)


MAX_SMALL_FILE_BYTES = 64 << 20  # run records, search state, summaries, labels: kilobytes in practice


class NotRegularFile(StorageError):
    """A path meant to hold a file resolves to a folder, fifo, device or socket (a read could block or never end)."""


class FileTooLarge(StorageError):
    """A small file (manifest, record, checkpoint …) is larger than the stated cap for its kind."""


def file_kind(mode: int) -> str:
    """'folder', 'fifo', 'character device' … for an ``st_mode`` that is not a regular file's."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def open_regular(path: str) -> IO[bytes]:
    """A local file opened for binary reading only if it is a regular file (a symlink is followed to
    its target). Opened non-blocking first, so a fifo is refused at once instead of waiting for a
    writer, and checked on the open descriptor, so it cannot be swapped between check and read.
    Raises FileNotFoundError, or NotRegularFile naming what the path is."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path} is not a regular file (it is a {file_kind(st.st_mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_size(size: int, cap: int, where: str, what: str) -> None:
    if size > cap:
        raise FileTooLarge(f"{where}: {size:,} bytes, more than a {what} can be ({cap:,} bytes); is it the right file?")


def read_bytes(url: str, options: StorageOptions | None = None, retries: int = 0, *, cap: int = MAX_SMALL_FILE_BYTES, what: str = "record file") -> bytes:
    """The whole (small) file at ``url``: the one reader for manifests, labels, run records, checkpoints.

    It must be a regular file (a local fifo, device or folder, or an ``s3://`` prefix, is refused before
    any read) of at most ``cap`` bytes (``what`` names the kind in the message); at most ``cap`` bytes
    are ever read, even from a file that grows meanwhile. Raises FileNotFoundError, NotRegularFile,
    FileTooLarge, or StorageError (network, auth: redacted, with a hint)."""
    where = redact(url, options)
    if not is_remote(url):
        path = os.path.abspath(strip_scheme(url))
        with open_regular(path) as f:
            _refuse_size(os.fstat(f.fileno()).st_size, cap, where, what)
            data = f.read(cap + 1)
        _refuse_size(len(data), cap, where, what)
        return data
    fs, path = open_fs(url, options)

    def read() -> bytes:
        info = fs.info(path)
        if info.get("type") != "file":
            raise NotRegularFile(f"{where} is not a file (it is a {info.get('type')})")
        _refuse_size(int(info.get("size") or 0), cap, where, what)
        with fs.open(path, "rb") as f:
            return f.read(cap + 1)

    try:
        data = with_retries(read, what=f"reading {url}", retries=retries, options=options)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as err:  # network, auth: say where, never with credentials
        raise StorageError(describe_error(err, url, options)) from None
    _refuse_size(len(data), cap, where, what)
    return data


def read_json(url: str, options: StorageOptions | None = None, *, cap: int = MAX_SMALL_FILE_BYTES, what: str = "record file") -> Any:
    """:func:`read_bytes` parsed as JSON. Raises FileNotFoundError, or StorageError naming the file
    when it is refused or does not parse (one line, never a traceback of the parser)."""
    data = read_bytes(url, options, cap=cap, what=what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise StorageError(f"{redact(url, options)}: not a valid {what} (not JSON: {str(err)[:120]})") from None


def read_record(url: str, options: StorageOptions | None = None, what: str = "record file") -> dict[str, Any] | None:
    """A JSON object file (run.json, results.json …) read with :func:`read_json`: None when there is
    none, StorageError naming the file when it is refused, not JSON or not a JSON object (one line,
    never a traceback of the reader that would have used it)."""
    try:
        data = read_json(url, options, what=what)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise StorageError(f"{redact(url, options)}: not a valid {what} (a JSON {type(data).__name__}, not an object)")
    return data


def probe(url: str, options: StorageOptions | None = None, write: bool = False) -> None:
    """Fail fast (seconds) when ``url``'s endpoint is unreachable, the credentials are wrong or the bucket
    is missing, before any long job starts. ``write`` also checks that an object can be created there."""
    if not is_remote(url):
        return
    fs, path = open_fs(url, options)
    bucket = path.split("/", 1)[0]
    try:
        if hasattr(fs, "call_s3"):  # s3fs: HEAD the bucket (its exists() swallows auth and network errors)
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise FileNotFoundError(f"bucket {bucket!r} does not exist") from None
        elif not fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")
        if write:
            probe_key = f"{path.rstrip('/')}/.aem-dist-probe-{uuid.uuid4().hex}"
            fs.pipe_file(probe_key, b"")
            fs.rm_file(probe_key)
    except Exception as err:
        raise StorageError(describe_error(err, url, options, "write to" if write else "read")) from None


def makedirs(url: str, options: StorageOptions | None = None) -> None:
    fs, path = open_fs(url, options)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


def _discard(f: Any) -> None:
    """Abort an unfinished upload: nothing becomes visible, and the file object never retries it."""
    with contextlib.suppress(Exception):
        f.discard()  # aborts a multipart upload
    f.closed = True  # else its finaliser would try to upload the discarded buffer


@contextlib.contextmanager
def atomic_open(url: str, options: StorageOptions | None = None) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears under its name only if the block succeeds."""
    fs, path = open_fs(url, options)
    if is_remote(url):
        # The object becomes visible only when the upload completes; on error s3fs aborts the upload.
        try:
            f = fs.open(path, "wb")
        except Exception as err:
            raise StorageError(describe_error(err, url, options, "write")) from None
        try:
            yield f
        except BaseException:
            _discard(f)
            raise
        try:
            f.close()
        except Exception as err:
            _discard(f)
            raise StorageError(describe_error(err, url, options, "write")) from None
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(url: str, data: bytes, options: StorageOptions | None = None) -> None:
    with atomic_open(url, options) as f:
        f.write(data)


def atomic_write_text(url: str, text: str, options: StorageOptions | None = None) -> None:
    atomic_write_bytes(url, text.encode("utf-8"), options)


def ray_storage_filesystem(url: str, options: StorageOptions | None = None) -> tuple["pyarrow.fs.FileSystem | None", str]:  # noqa: F821
    """What Ray's ``RunConfig(storage_path=..., storage_filesystem=...)`` needs for ``url``.

    - a plain path or ``file://`` URL → ``(None, absolute path)``: Ray's own local handling;
    - ``s3://bucket/prefix`` → ``(pyarrow.fs.S3FileSystem(endpoint_override=..., timeouts, retries), "bucket/prefix")``,
      with the endpoint and region of ``options``, so checkpoints go to any S3-compatible server (MinIO,
      SeaweedFS, Ceph) and not only to AWS. Credentials are *not* part of the object: it finds them where
      it is used (the provider chain: AWS_* variables, the credentials file that
      ``orchestrate.ray_env.credentials_to_file`` writes for a Ray session, web identity, instance profile);
    - any other fsspec URL (``gs://``, ``memory://`` …) → ``(PyFileSystem(FSSpecHandler(fs)), path)``.

    Ray pickles the returned filesystem to ship it to workers and Tune pickles it into ``tuner.pkl`` on
    storage, so it must never carry a secret (tested by scanning everything a sweep writes).
    """
    import pyarrow.fs as pafs

    options = options or StorageOptions.from_config()
    url = str(url)
    if not is_remote(url):
        return None, os.path.abspath(strip_scheme(url))
    scheme = urlparse(url).scheme
    path = strip_scheme(url).rstrip("/")
    if scheme in ("s3", "s3a"):
        kwargs: dict[str, Any] = {
            "connect_timeout": options.connect_timeout_s,
            "request_timeout": options.read_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, options.retries)),
        }
        if options.endpoint_url:
            kwargs["endpoint_override"] = options.endpoint_url
            if urlparse(options.endpoint_url).scheme == "http":
                kwargs["scheme"] = "http"
        # A custom endpoint has no region discovery; S3-compatible servers accept the default one.
        region = options.region or ("us-east-1" if options.endpoint_url else None)
        if region:
            kwargs["region"] = region
        # No access_key/secret_key here: pyarrow pickles explicit credentials (Ray and Tune pickle this
        # object into their state on storage); without them it resolves the AWS_* variables (or any
        # other credentials provider) in each process that uses it; ray_env writes them to a 0600 credentials file.
        return pafs.S3FileSystem(**kwargs), path
    fs, fs_path = open_fs(url, options)  # gs://, memory:// …: fsspec's own credential discovery
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs_path
