"""A bounded, node-local, content-addressed shard cache.

Shards on object storage are copied once into ``<cache>/shards/<ab>/<sha256>.tar`` and read from there
with random access. The name is the shard's sha256 from the manifest, so every process on the node
(DataLoader workers, ranks, other trials, later runs) shares one copy of the same bytes, whatever URL
they came from. A fill

- takes a per-shard file lock, so one process downloads while the others wait for its result;
- downloads in ranged chunks into a temporary file, hashing as it goes; a transient failure (server
  restarting, connection reset) resumes from the last byte after a backoff, at most ``retries`` times;
- compares size and sha256 with the manifest and only then renames the file into place, so a cache
  entry is always a verified shard (a mismatch raises ``BadSampleError('sha256_mismatch')`` and caches
  nothing);
- evicts least-recently-used shards until the cache is under ``max_bytes`` (entries are touched on
  every use; readers that already opened an evicted file keep reading it, as POSIX allows).

Durability without fsync: a verified entry gets a marker ``<sha256>.ok`` holding the kernel's boot id.
Only an operating-system crash can lose written-but-unflushed pages, and that means a new boot; an
entry whose marker names another boot is hashed again before it is trusted. So fills skip the
``fsync`` that would halve their speed, and a crash can never make a damaged entry look verified.

Local datasets are not copied: a shard on a local path is hashed once and a small marker
``<cache>/verified/<sha256>`` remembers (path, size, mtime) so later epochs skip the re-hash.

Shared nodes: the markers are what makes an entry trusted, so nobody else may write them. The cache
folder is created private (0700) and refused — with an error saying what to do — if it is owned by
another user or writable by group or others (the default folder is per user:
``$TMPDIR/aem-dist-cache-<uid>``). Entries and markers are used only when they are regular files (not
symlinks) owned by this user; eviction lists the folder without following symlinks and deletes only
regular files inside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import uuid
from pathlib import Path
from typing import IO, Iterator

from .. import storage
from ..storage import StorageError, StorageOptions
from .schema import BadSampleError

log = logging.getLogger(__name__)

CHUNK = 8 << 20


def default_cache_dir() -> str:
    """Per user: another user's cache folder in a shared /tmp is never ours to use."""
    return os.path.join(tempfile.gettempdir(), f"aem-dist-cache-{os.getuid()}")


def private_dir(root: Path) -> None:
    """Create ``root`` as 0700 if missing; raise StorageError unless it is a folder owned by this user
    and not writable by group or others (else anyone could plant entries that a run would train on)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    uid = os.getuid()
    link, st = os.lstat(root), os.stat(root)
    fix = "set data.cache_dir to a folder of your own (it is created 0700), or chmod 700 this one"
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"shard cache {root} is not a folder; {fix}")
    if link.st_uid != uid or st.st_uid != uid:
        raise StorageError(f"shard cache {root} is owned by uid {st.st_uid if st.st_uid != uid else link.st_uid}, not by you (uid {uid}): refusing to trust "
            f"its entries; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StorageError(f"shard cache {root} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): refusing to trust its entries; {fix}")


def _own_regular_file(path: Path) -> bool:
    """A regular file (a symlink is not followed) owned by this user and not writable by others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


BOOT_ID = _boot_id()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _mismatch(name: str, got_bytes: int, got_sha: str, nbytes: int, sha256: str) -> BadSampleError:
    return BadSampleError(
        "sha256_mismatch",
        f"shard content does not match the manifest: {got_bytes} bytes, sha256 {got_sha[:16]}… (manifest: {nbytes} bytes, {sha256[:16]}…)",
        shard=name,
    )


class ShardCache:
    """Verified local copies of shards (see module docstring).

    Args:
        root: cache folder (node-local disk); default ``$TMPDIR/aem-dist-cache``.
        max_bytes: eviction bound; a single shard larger than it is still fetched (and logged).
        options: storage options for remote reads.
        retries: transient-failure retries per shard fill (exponential backoff 0.5 s … 8 s).
    """

    def __init__(self, root: str | None, max_bytes: int, options: StorageOptions | None = None, retries: int = 5):
        self.root = Path(root or default_cache_dir())
        self.max_bytes = int(max_bytes)
        self.options = options
        self.retries = int(retries)
        private_dir(self.root)
        self.fills = 0  # shards this object downloaded (bench and test hook)
        self.hits = 0

    def entry_path(self, sha256: str) -> Path:
        return self.root / "shards" / sha256[:2] / f"{sha256}.tar"

    # -- public ---------------------------------------------------------------------------------
    def open(self, url: str, name: str, sha256: str, nbytes: int) -> IO[bytes]:
        """An open, seekable binary file holding the verified bytes of shard ``name`` at ``url``.

        Raises BadSampleError ('missing_shard', 'sha256_mismatch') or StorageError (after retries).
        """
        if not storage.is_remote(url):
            return self._open_local(url, name, sha256, nbytes)
        for _ in range(3):  # an entry evicted between fill and open is simply fetched again
            path = self._ensure(url, name, sha256, nbytes)
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            with contextlib.suppress(OSError):
                os.utime(path)  # LRU: most recently used
            return f
        raise StorageError(f"shard {name}: cache entry keeps disappearing under {self.root} (cache too small?)")

    def usage(self) -> int:
        return sum(p.stat().st_size for p in self._entries())

    # -- remote shards --------------------------------------------------------------------------
    def _trusted(self, final: Path, sha256: str, nbytes: int) -> bool:
        """Is ``final`` a complete, verified entry (re-hashing it once if it predates this boot)?"""
        if not _own_regular_file(final):
            if os.path.lexists(final):  # a symlink or someone else's file: never read, replaced
                log.warning("cache entry %s is not a regular file of yours; fetching it again", final.name)
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
            return False
        if final.stat().st_size != nbytes:
            return False
        marker = final.with_suffix(".ok")
        with contextlib.suppress(OSError):
            if BOOT_ID is not None and _own_regular_file(marker) and marker.read_text() == BOOT_ID:
                return True
        got, n = _hash_file(final)
        if (got, n) != (sha256, nbytes):
            log.warning("cache entry %s is damaged (written before a crash?); fetching it again", final.name)
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
            return False
        self._mark(final)
        return True

    def _mark(self, final: Path) -> None:
        if BOOT_ID is None:
            return
        marker = final.with_suffix(".ok")
        tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(BOOT_ID)
        os.replace(tmp, marker)

    def _ensure(self, url: str, name: str, sha256: str, nbytes: int) -> Path:
        final = self.entry_path(sha256)
        if self._trusted(final, sha256, nbytes):
            self.hits += 1
            return final
        with _locked(self.root / "locks" / f"{sha256}.lock"):
            if self._trusted(final, sha256, nbytes):  # another process filled it while we waited
                self.hits += 1
                return final
            self._fill(url, name, sha256, nbytes, final)
        self._evict(keep=final)
        return final

    def _fill(self, url: str, name: str, sha256: str, nbytes: int, final: Path) -> None:
        fs, path = storage.open_fs(url, self.options)
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        h = hashlib.sha256()
        state: dict = {"done": 0, "size": None}
        try:
            with open(tmp, "wb") as out:

                def copy_rest() -> None:
                    # Resumes at state['done'] after a transient failure: no byte is hashed twice.
                    if state["size"] is None:
                        state["size"] = int(fs.size(path))
                        if state["size"] != nbytes:  # don't download what cannot verify
                            raise _mismatch(name, state["size"], "(not read)", nbytes, sha256)
                    while state["done"] < nbytes:
                        block = fs.cat_file(path, start=state["done"], end=min(state["done"] + CHUNK, nbytes))
                        if not block:
                            break  # shorter than its size said: caught by the check below
                        out.write(block)
                        h.update(block)
                        state["done"] += len(block)

                try:
                    storage.with_retries(copy_rest, what=f"reading shard {url}", retries=self.retries, options=self.options)
                except FileNotFoundError:
                    raise BadSampleError("missing_shard", f"shard listed in the manifest is missing at "
                        f"{storage.redact(url, self.options)}", shard=name) from None
                except BadSampleError:
                    raise
                except Exception as err:
                    raise StorageError(storage.describe_error(err, url, self.options) + f" (after {self.retries} retries)") from None
                if BOOT_ID is None:  # no boot id to detect a crash by: make the bytes durable instead
                    out.flush()
                    os.fsync(out.fileno())
            got = h.hexdigest()
            if state["done"] != nbytes or got != sha256:
                raise _mismatch(name, state["done"], got, nbytes, sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            self._mark(final)
            self.fills += 1
            log.debug("cached shard %s (%d bytes) as %s", name, nbytes, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _entries(self) -> list[Path]:
        """Regular ``shards/<ab>/<sha>.tar`` files; symlinked folders and files are not followed."""
        found: list[Path] = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(self.root / "shards") as level1:
                for sub in level1:
                    if not sub.is_dir(follow_symlinks=False):
                        continue
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(sub.path) as level2:
                        found += [Path(e.path) for e in level2 if e.name.endswith(".tar") and e.is_file(follow_symlinks=False)]
        return found

    def _evict(self, keep: Path) -> None:
        with _locked(self.root / "locks" / "evict.lock"):
            entries = []
            for p in self._entries():
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(p)
                    entries.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    p.with_suffix(".ok").unlink(missing_ok=True)
                    p.unlink()
                    total -= size
                    log.debug("evicted %s from the shard cache", p.name)
            if total > self.max_bytes:
                log.warning("shard cache %s holds %d bytes, over its %d-byte bound (a shard is larger than the bound)", self.root, total, self.max_bytes)

    # -- local shards ---------------------------------------------------------------------------
    def _open_local(self, url: str, name: str, sha256: str, nbytes: int) -> IO[bytes]:
        """A local shard, opened only if it is a regular file of the manifest's size (a name resolving
        to /dev/zero, a fifo or a folder is refused at once, as the memory loader refuses it) and
        hashed unless a marker says this very file was verified. The marker's stamp holds the inode
        and ctime besides size and mtime: a shard changed in place with its size and mtime put back
        still changes its ctime, so it is hashed again."""
        path = os.path.abspath(storage.strip_scheme(url))
        try:
            f = storage.open_regular(path)
        except FileNotFoundError:
            raise BadSampleError("missing_shard", f"shard listed in the manifest is missing at {path}", shard=name) from None
        except (storage.NotRegularFile, OSError) as err:
            raise BadSampleError("not_regular_file", f"shard cannot be read as a file: {err}", shard=name) from None
        st = os.fstat(f.fileno())
        if st.st_size != nbytes:
            f.close()
            raise BadSampleError("sha256_mismatch", f"shard holds {st.st_size:,} bytes but the manifest says {nbytes:,}", shard=name)
        stamp = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "dev": st.st_dev}
        marker = self.root / "verified" / sha256
        try:
            if _own_regular_file(marker) and json.loads(marker.read_text()) == stamp:
                return f
        except (OSError, ValueError):
            pass
        h = hashlib.sha256()
        size = 0
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
        got = h.hexdigest()
        if size != nbytes or got != sha256:
            f.close()
            raise _mismatch(name, size, got, nbytes, sha256)
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, marker)
        f.seek(0)
        return f
