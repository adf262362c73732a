"""Write datasets as WebDataset tar shards plus ``manifest.json``; read shards back safely.

Shards are plain POSIX tars with deterministic headers (mtime 0, fixed owner), so the same bags give
the same bytes and the same sha256. Each shard is written atomically (see :mod:`aem_dist.storage`)
and the manifest is written last, only after every shard is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator

from .. import __version__, storage
from ..storage import StorageOptions
from .limits import MAX_TAR_HEADER_BYTES
from .manifest import FORMAT, MANIFEST, BagEntry, Manifest, ShardEntry, SplitEntry, class_counts
from .schema import MEMBERS, UNLABELLED, Bag, BadSampleError, decode_bag, encode_bag

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


class _HashingWriter(io.RawIOBase):
    """Write-through file wrapper that hashes and counts the bytes."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        b = bytes(b)
        self._f.write(b)
        self.sha256.update(b)
        self.nbytes += len(b)
        return len(b)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass
class _OpenShard:
    name: str
    ctx: Any
    raw: _HashingWriter
    tar: tarfile.TarFile
    bags: list[BagEntry] = field(default_factory=list)


class DatasetExists(storage.StorageError):
    """The output location already holds a dataset (or the shards of an unfinished one) and ``overwrite`` is off."""


_SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.tar$")


def check_output(root: str, options: StorageOptions | None = None, overwrite: bool = False) -> bool:
    """Whether ``root`` holds a dataset's manifest; raises DatasetExists when it holds a manifest or
    shards of ours (``train-000000.tar`` …) and ``overwrite`` is off. Other files are written beside."""
    storage.probe(root, options)  # wrong endpoint/key/bucket: a one-line StorageError, not a listing traceback
    fs, path = storage.open_fs(root, options)
    has_manifest = fs.exists(f"{path}/{MANIFEST}")
    shards = sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if _SHARD_FILE.match(n)) if fs.isdir(path) else []
    if not overwrite and (has_manifest or shards):
        what = "a dataset (manifest.json)" if has_manifest else f"shards without a manifest ({', '.join(shards[:2])}…: an unfinished write?)"
        raise DatasetExists(f"{storage.redact(root, options)} already holds {what}; pass --overwrite to replace it")
    return has_manifest


class DatasetWriter:
    """Write bags split by split into shards under ``root``; :meth:`close` writes the manifest.

    Use as a context manager: if the block raises, no manifest is written (shards already committed
    stay, but without a manifest the folder is not a dataset).

    A ``root`` that already holds a dataset (a manifest, or shards of an unfinished write) is refused
    when ``overwrite`` is False (the CLI's default: ``synth``/``ingest`` without ``--overwrite``; the
    library default replaces). When it is replaced, the old manifest is removed *before* the first new shard is written,
    so an interrupted rewrite is visibly no dataset rather than an old manifest over new shards, and
    after the new manifest the old manifest's shards that the new one does not list are removed (only
    those: nothing else in ``root`` is touched).
    """

    def __init__(
        self,
        root: str,
        dim: int,
        class_names: list[str],
        *,
        options: StorageOptions | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        source: dict[str, Any] | None = None,
        overwrite: bool = True,
    ):
        self.root = str(root)
        self.dim = int(dim)
        self.class_names = list(class_names)
        self.options = options
        self.shard_bytes = int(shard_bytes)
        self.source = dict(source or {})
        self._open: dict[str, _OpenShard] = {}
        self._done: dict[str, list[ShardEntry]] = defaultdict(list)
        self._keys: dict[str, str] = {}
        self.manifest: Manifest | None = None
        storage.probe(self.root, options, write=True)  # wrong endpoint/key/bucket: fail before any work
        self._old_shards = self._claim(overwrite)
        storage.makedirs(self.root, options)

    def _claim(self, overwrite: bool) -> set[str]:
        """Refuse an existing dataset without ``overwrite``; with it, invalidate its manifest first.
        Returns the shard names the old manifest listed (removed after the new manifest is written)."""
        has_manifest = check_output(self.root, self.options, overwrite)
        fs, path = storage.open_fs(self.root, self.options)
        url = storage.join(self.root, MANIFEST)
        old: set[str] = set()
        if has_manifest:
            try:
                from .manifest import parse_manifest

                old = {s.name for e in parse_manifest(storage.read_bytes(url, self.options, cap=256 << 20, what="manifest")).splits.values() for s in e.shards}
            except (ValueError, storage.StorageError):
                old = set()  # an unreadable old manifest: its shards are left where they are
            fs.rm_file(f"{path}/{MANIFEST}")  # first: from now on the folder is visibly no dataset
        return {n for n in old if _SHARD_FILE.match(n)}

    def add(self, split: str, bag: Bag) -> None:
        if bag.dim != self.dim:
            raise ValueError(f"bag {bag.slide_id!r}: feature dim {bag.dim} != dataset dim {self.dim}")
        if not (0 <= bag.label < len(self.class_names) or bag.label == UNLABELLED):
            raise ValueError(f"bag {bag.slide_id!r}: label {bag.label} outside classes {self.class_names}")
        if bag.n == 0:
            raise ValueError(f"bag {bag.slide_id!r}: has 0 instances")
        key = bag.key
        if key in self._keys:
            raise ValueError(f"duplicate bag key {key!r} (slide ids {self._keys[key]!r} and {bag.slide_id!r})")
        self._keys[key] = bag.slide_id
        shard = self._open.get(split) or self._start(split)
        for ext, data in encode_bag(bag).items():
            _add_member(shard.tar, f"{key}.{ext}", data)
        shard.bags.append(BagEntry(key=key, label=bag.label, n=bag.n))
        if shard.raw.nbytes >= self.shard_bytes:
            self._finish(split)

    def _start(self, split: str) -> _OpenShard:
        name = f"{split}-{len(self._done[split]):06d}.tar"
        ctx = storage.atomic_open(storage.join(self.root, name), self.options)
        f = ctx.__enter__()
        raw = _HashingWriter(f)
        tar = tarfile.open(fileobj=raw, mode="w|", format=tarfile.USTAR_FORMAT)
        self._open[split] = shard = _OpenShard(name, ctx, raw, tar)
        return shard

    def _finish(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.tar.close()
        shard.ctx.__exit__(None, None, None)
        self._done[split].append(
            ShardEntry(
                name=shard.name,
                n_bags=len(shard.bags),
                n_instances=sum(b.n for b in shard.bags),
                bytes=shard.raw.nbytes,
                sha256=shard.raw.sha256.hexdigest(),
                bags=shard.bags,
            )
        )

    def abort(self) -> None:
        for split in list(self._open):
            shard = self._open.pop(split)
            # The tar stream is abandoned, not closed: closing would write its end blocks into an
            # upload that is being discarded (and its finaliser would try again later).
            shard.tar.closed = True
            shard.tar.fileobj.closed = True
            err = RuntimeError("dataset writing aborted")
            try:
                shard.ctx.__exit__(type(err), err, None)
            except RuntimeError:
                pass

    def close(self) -> Manifest:
        for split in list(self._open):
            self._finish(split)
        splits = {}
        for split, shards in self._done.items():
            counts = class_counts((b.label for s in shards for b in s.bags), len(self.class_names))
            splits[split] = SplitEntry(
                n_bags=sum(s.n_bags for s in shards),
                n_instances=sum(s.n_instances for s in shards),
                class_counts=counts,
                shards=shards,
            )
        manifest = Manifest(
            format=FORMAT,
            dim=self.dim,
            class_names=self.class_names,
            splits=splits,
            source=self.source,
            created_by=f"aem-dist {__version__}",
        )
        storage.atomic_write_text(storage.join(self.root, MANIFEST), manifest.to_json(), self.options)
        self.manifest = manifest
        stale = self._old_shards - {s.name for shards in self._done.values() for s in shards}
        if stale:  # the replaced dataset's own shards that the new one does not reuse
            fs, path = storage.open_fs(self.root, self.options)
            for name in sorted(stale):
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(f"{path}/{name}")
        return manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if self.manifest is None:
                self.close()
        else:
            self.abort()


def write_dataset(
    root: str,
    bags: Iterable[tuple[str, Bag]],
    dim: int,
    class_names: list[str],
    *,
    options: StorageOptions | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    source: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Manifest:
    """Write ``(split, bag)`` pairs as a dataset; returns the manifest (written last). See
    :class:`DatasetWriter` for ``overwrite``."""
    with DatasetWriter(root, dim, class_names, options=options, shard_bytes=shard_bytes, source=source, overwrite=overwrite) as w:
        for split, bag in bags:
            w.add(split, bag)
    assert w.manifest is not None
    return w.manifest


# --- reading ---------------------------------------------------------------------------------


_EXTENSION_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's header parser, refusing what would make it read or expand more than the shard holds.

    * Sparse members (old GNU 'S' type and the pax GNU.sparse formats): their declared size is filled
      in from a map, so a 3 KB shard can read back as gigabytes of zeros. Shards we write are plain
      ustar; only regular members are read.
    * pax / GNU long-name extension headers above MAX_TAR_HEADER_BYTES: tarfile reads them whole.

    Raises BadSampleError from inside tarfile's iteration (it passes non-header errors through).
    """

    def _proc_member(self, tarfile_: tarfile.TarFile):  # type: ignore[override]
        if self.type in _EXTENSION_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise BadSampleError("tar_header_size", f"tar extension header before offset {self.offset} declares {self.size:,} bytes (limit "
                f"{MAX_TAR_HEADER_BYTES:,})")
        return super()._proc_member(tarfile_)

    def _refuse_sparse(self, *_: Any) -> Any:
        raise BadSampleError("sparse_member", f"tar member {self.name!r} is a sparse file (its size is expanded from a map, not stored): only regular members "
            f"are read")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def check_shard_file(fs: Any, path: str, name: str, expected_bytes: int | None) -> int | None:
    """Before reading a shard: it must be a regular file (not a device, fifo or folder a name resolves
    to) of the size the manifest says, so a read is bounded by the manifest. Returns its size in bytes
    (None when the filesystem does not say). Raises BadSampleError."""
    info = fs.info(path)
    if info.get("type") != "file":
        raise BadSampleError("not_regular_file", f"shard is not a regular file (it is a {info.get('type')})", shard=name)
    size = info.get("size")
    if expected_bytes is not None and size is not None and int(size) != expected_bytes:
        raise BadSampleError("sha256_mismatch", f"shard holds {int(size):,} bytes but the manifest says {expected_bytes:,}", shard=name)
    return None if size is None else int(size)


def check_member_extent(info: tarfile.TarInfo, shard_bytes: int | None, shard: str) -> None:
    """A member's declared size must fit in the bytes left in the shard. Checked before the member is
    read or skipped: tarfile skips a member in a stream by reading block after block up to its declared
    end (a base-256 size field can say 2^60 in a 12 KB shard), so an unchecked size is an unbounded loop.
    Raises BadSampleError('truncated_tar'): the shard is cut inside the member, or its size is forged."""
    if shard_bytes is not None and info.offset_data + info.size > shard_bytes:
        base = info.name.rsplit("/", 1)[-1]
        raise BadSampleError("truncated_tar", f"tar member {base!r} declares {info.size:,} bytes but only {max(0, shard_bytes - info.offset_data):,} "
            f"remain in the shard (cut, or a forged size)", shard=shard, key=base.partition(".")[0])


@dataclass
class RawSample:
    """One sample's expected members (extension → bytes) and the names of members left unread."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    duplicate: bool = False  # a member name occurred twice: the sample is ambiguous


def iter_tar_samples(f: IO[bytes], shard: str, size: int | None = None) -> Iterator[RawSample]:
    """Group a tar stream's members into samples.

    Only the members named in :data:`MEMBERS` are read into memory; anything else (a ``.pyd``
    pickle, a ``.pth``) is recorded by name and never read. ``size`` is the shard's length in bytes:
    a member declaring more than remains is refused before it is read or skipped (see
    :func:`check_member_extent`). Raises BadSampleError('truncated_tar') on a cut or corrupt stream.
    """
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=f, mode="r|", tarinfo=_CheckedTarInfo) as tar:
            for info in tar:
                if not info.isfile():
                    check_member_extent(info, size, shard)
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = RawSample(key)
                check_member_extent(info, size, shard)  # after the previous sample: it is complete and good
                if ext not in MEMBERS:
                    current.unexpected.append(base)
                    continue
                if ext in current.members:
                    current.duplicate = True  # rejected by the decoder; the stream goes on
                    continue
                data = tar.extractfile(info)
                current.members[ext] = data.read() if data is not None else b""
            if current is not None:
                yield current
    except BadSampleError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        key = current.key if current is not None else None
        raise BadSampleError("truncated_tar", f"tar stream is cut or corrupt: {err}", shard=shard, key=key) from None


OnBad = Callable[[BadSampleError], None]


def raise_bad(err: BadSampleError) -> None:
    raise err


def decode_shard(
    samples: Iterable[RawSample],
    shard: str,
    *,
    dim: int | None,
    n_classes: int | None,
    on_bad: OnBad = raise_bad,
) -> Iterator[Bag]:
    """Decode samples of one shard into bags (see :func:`decode_sample`), sending every problem to ``on_bad``."""
    seen: set[str] = set()
    it = iter(samples)
    while True:
        try:
            sample = next(it)
        except StopIteration:
            return
        except BadSampleError as err:
            on_bad(err.located(shard=shard))
            return  # the rest of a cut tar cannot be read
        key = sample.key
        if key in seen:
            on_bad(BadSampleError("duplicate_key", "key appears twice in the shard", shard=shard, key=key))
            continue
        seen.add(key)
        try:
            yield decode_sample(sample, shard, dim=dim, n_classes=n_classes)
        except BadSampleError as err:
            on_bad(err)


def decode_sample(sample: RawSample, shard: str, *, dim: int | None, n_classes: int | None) -> Bag:
    """Validate and decode one sample of ``shard``; raises BadSampleError naming shard and key.

    A sample carrying members other than feats/coords/json (a pickle, a torch file) is rejected
    whole as ``unexpected_member``: we never read those members, and a writer that put them there
    is not one we trust for the rest of the sample either.
    """
    key = sample.key
    if sample.duplicate:
        raise BadSampleError("duplicate_key", "a member of this key appears more than once in the shard", shard=shard, key=key)
    if sample.unexpected:
        raise BadSampleError("unexpected_member", f"unexpected members {sample.unexpected} (never decoded)", shard=shard, key=key)
    try:
        bag = decode_bag(sample.members, dim=dim, n_classes=n_classes)
    except BadSampleError as err:
        raise err.located(shard=shard, key=key) from None
    if bag.key != key:
        raise BadSampleError("key_mismatch", f"key does not match slide_id {bag.slide_id!r}", shard=shard, key=key)
    return bag


class _HashingReader(io.RawIOBase):
    """Read-through wrapper that hashes and counts what is read."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha256.update(data)
        self.nbytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_shard(
    url: str,
    *,
    dim: int | None,
    n_classes: int | None,
    options: StorageOptions | None = None,
    on_bad: OnBad = raise_bad,
    expect: tuple[int, str] | None = None,
) -> Iterator[Bag]:
    """Stream one shard from storage and yield its validated bags.

    With ``expect=(bytes, sha256)`` the shard is hashed while it is read and, after the last bag,
    BadSampleError('sha256_mismatch') is raised if it differs (callers keep the bags only then).
    """
    fs, path = storage.open_fs(url, options)
    name = url.rsplit("/", 1)[-1]
    size = check_shard_file(fs, path, name, expect[0] if expect is not None else None)
    with fs.open(path, "rb") as f:
        reader = _HashingReader(f)
        yield from decode_shard(iter_tar_samples(io.BufferedReader(reader, 1 << 20), name, size), name, dim=dim, n_classes=n_classes, on_bad=on_bad)
        if expect is not None:
            reader.drain()
            got = reader.sha256.hexdigest()
            if (reader.nbytes, got) != (expect[0], expect[1]):
                raise BadSampleError(
                    "sha256_mismatch",
                    f"shard content does not match the manifest: {reader.nbytes} bytes, sha256 {got[:16]}… "
                    f"(manifest: {expect[0]} bytes, {expect[1][:16]}…)",
                    shard=name,
                )


def sha256_of(url: str, options: StorageOptions | None = None, chunk: int = 8 << 20) -> tuple[str, int]:
    fs, path = storage.open_fs(url, options)
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


# --- random access (the streaming loader reads verified local copies) ---------------------------


@dataclass
class TarIndex:
    """Where each sample's members lie in a seekable tar; built from headers alone (no member data read).

    ``cut`` is set when the archive is truncated or corrupt: samples at or after the cut are absent.
    """

    shard: str
    members: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # key → ext → (offset, size)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    duplicates: set[str] = field(default_factory=set)
    cut: BadSampleError | None = None

    def read(self, f: IO[bytes], key: str) -> RawSample:
        """The expected members of ``key`` (nothing else is read). Raises BadSampleError."""
        if key in self.duplicates:
            raise BadSampleError("duplicate_key", "key appears more than once in the shard", shard=self.shard, key=key)
        if key not in self.members and key not in self.unexpected:
            if self.cut is not None:  # lost to the cut
                raise BadSampleError(self.cut.reason, self.cut.message, shard=self.shard, key=key)
            raise BadSampleError("not_in_shard", "the manifest lists this bag but the shard does not hold it", shard=self.shard, key=key)
        sample = RawSample(key, unexpected=list(self.unexpected.get(key, [])))
        for ext, (offset, size) in self.members.get(key, {}).items():
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise BadSampleError("truncated_tar", f"member {key}.{ext} is cut short", shard=self.shard, key=key)
            sample.members[ext] = data
        return sample


def index_tar(f: IO[bytes], shard: str) -> TarIndex:
    """Index a seekable tar by reading its headers only; detects cut and corrupt archives."""
    index = TarIndex(shard)
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    seen_keys: list[str] = []
    key: str | None = None
    try:
        tar = tarfile.open(fileobj=f, mode="r:", tarinfo=_CheckedTarInfo)
        for info in tar:
            if not info.isfile():
                check_member_extent(info, size, shard)  # a regular member past the end is a cut, below
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if info.offset_data + info.size > size:
                index.cut = BadSampleError("truncated_tar", f"tar is cut inside member {base!r}", shard=shard, key=key)
                index.members.pop(key, None)  # an incomplete sample is not a sample
                index.unexpected.pop(key, None)
                break
            if not seen_keys or seen_keys[-1] != key:
                if key in index.members or key in index.unexpected:
                    index.duplicates.add(key)  # the same key in two places
                seen_keys.append(key)
            if ext not in MEMBERS:
                index.unexpected.setdefault(key, []).append(base)
                continue
            slot = index.members.setdefault(key, {})
            if ext in slot:
                index.duplicates.add(key)
            slot[ext] = (info.offset_data, info.size)
        else:
            # tarfile stops quietly at a header it cannot parse; a well-formed archive ends in zero blocks.
            f.seek(tar.offset)
            tail = f.read(512)
            if len(tail) < 512 or tail.strip(b"\0"):
                index.cut = BadSampleError("truncated_tar", f"tar is cut or corrupt after byte {tar.offset} (no end-of-archive marker)", shard=shard, key=key)
                # The last sample may have lost members to the cut: it cannot be trusted.
                if key is not None:
                    index.members.pop(key, None)
                    index.unexpected.pop(key, None)
    except BadSampleError as err:  # a refused header: nothing at or after it is read
        index.cut = err.located(shard=shard, key=key)
        if key is not None:
            index.members.pop(key, None)
    except (tarfile.TarError, EOFError, OSError) as err:
        index.cut = BadSampleError("truncated_tar", f"tar is cut or corrupt: {err}", shard=shard, key=key)
        if key is not None:
            index.members.pop(key, None)
    return index
