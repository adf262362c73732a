"""Filesystems from URLs, atomic writes, and credential redaction.

Every location in aem-dist is an fsspec URL: a plain path, ``file://...`` or ``s3://bucket/prefix``
on any S3-compatible endpoint. Endpoint and credentials come from the ``storage`` config section or
the standard AWS environment variables, and never leave this module in printable form: use
:func:`redact` on anything that might carry them.

Atomicity: on a local filesystem a file is written under a temporary name in the same folder and
renamed into place (``os.replace`` is atomic on POSIX). On S3 an object becomes visible only when its
upload completes (single PUT or multipart completion), so the upload itself is the commit; an
interrupted upload leaves nothing visible under the final key.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Iterator
from urllib.parse import urlparse

import fsspec

_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


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
    retries: int = 5

    @classmethod
    def from_config(cls, section: Any = None, retries: int | None = None) -> "StorageOptions":
        """From a ``StorageSection`` (or None), falling back to the standard AWS variables."""
        env = os.environ

        def secret_of(value: Any) -> str | None:
            return value.get_secret_value() if value is not None else None

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
                "retries": {"max_attempts": max(1, self.retries), "mode": "standard"},
            },
            "client_kwargs": {},
            # A fresh instance per options set: fsspec's instance cache would otherwise hand one
            # process's filesystem (with its event loop) to a forked DataLoader worker.
            "skip_instance_cache": True,
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
        import s3fs

        return s3fs.S3FileSystem(**options.s3_kwargs()), strip_scheme(url)
    if is_remote(url):
        fs, path = fsspec.core.url_to_fs(url)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(strip_scheme(url))


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
    secrets += [os.environ[k] for k in _ENV_KEYS if os.environ.get(k)]
    for s in sorted(set(secrets), key=len, reverse=True):
        if len(s) >= 3:
            text = text.replace(s, "***")
    return re.sub(r"(://)[^/@\s:]+:[^/@\s]+@", r"\1***:***@", text)


def exists(url: str, options: StorageOptions | None = None) -> bool:
    fs, path = open_fs(url, options)
    return fs.exists(path)


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    fs, path = open_fs(url, options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as err:  # network, auth: say where, never with credentials
        raise StorageError(redact(f"cannot read {url}: {type(err).__name__}: {err}", options)) from None


def makedirs(url: str, options: StorageOptions | None = None) -> None:
    fs, path = open_fs(url, options)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_open(url: str, options: StorageOptions | None = None) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears under its name only if the block succeeds."""
    fs, path = open_fs(url, options)
    if is_remote(url):
        # The object becomes visible only when the upload completes; on error s3fs aborts the upload.
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts a multipart upload; nothing becomes visible
            raise
        else:
            f.close()
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


def ray_storage_filesystem(url: str, options: StorageOptions | None = None) -> tuple[Any, str]:
    """What Ray's ``RunConfig(storage_path=..., storage_filesystem=...)`` needs for ``url``
    (placeholder: local paths only until the object-storage work lands)."""
    if is_remote(url):
        raise StorageError("remote storage for Ray checkpoints is not available yet")
    return None, os.path.abspath(strip_scheme(url))
