"""Check a dataset against its manifest: counts, bytes, sha256 and decodability of every bag.

Each shard is read once, front to back: the bytes are hashed as the tar is parsed and every sample
is decoded with the same safe decoder the loaders use (nothing is unpickled). A report lists every
problem by split, shard and key; ``aem-dist verify`` prints it and exits non-zero when any is found.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from .. import storage
from ..storage import StorageOptions
from .manifest import ManifestError, class_counts, load_manifest
from .schema import BadSampleError, human_bytes
from .shards import _HashingReader, check_shard_file, decode_shard, iter_tar_samples


@dataclass
class ShardReport:
    split: str
    name: str
    bags: int = 0  # bags that decoded and matched the manifest
    expected_bags: int = 0
    bytes: int = 0
    sha256_ok: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    root: str
    summary: str = ""
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # dataset-level (manifest) problems
    readable: bool = True  # False: the manifest could not be read (``verify`` exits 2, not 1)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def n_bags(self) -> int:
        return sum(s.bags for s in self.shards)

    def text(self, limit: int | None = 20) -> str:
        """The printed report; at most ``limit`` problems per shard (None: every problem)."""
        lines = [f"dataset {self.root}" + (f"  ({self.summary})" if self.summary else "")]
        lines += [f"  problem: {p}" for p in self.problems]
        for s in self.shards:
            status = "OK  " if s.ok else "FAIL"
            lines.append(f"  {status} {s.name:<20} {s.bags:>5}/{s.expected_bags:<5} bags  {human_bytes(s.bytes):>10}  sha256 "
                f"{'ok' if s.sha256_ok else 'MISMATCH'}")
            shown = s.problems if limit is None else s.problems[:limit]
            lines += [f"         - {p}" for p in shown]
            if len(s.problems) > len(shown):
                lines.append(f"         … and {len(s.problems) - len(shown)} more (--all shows every one)")
        bad = sum(not s.ok for s in self.shards)
        verdict = "OK" if self.ok else "PROBLEMS FOUND"
        lines.append(f"{verdict}: {len(self.shards)} shards ({bad} with problems), {self.n_bags} bags verified")
        return "\n".join(lines)


def verify_shard(root: str, split: str, entry, dim: int, n_classes: int, options: StorageOptions | None) -> ShardReport:
    report = ShardReport(split, entry.name, expected_bags=entry.n_bags)
    url = storage.join(root, entry.name)
    expected = {b.key: b for b in entry.bags}
    found: dict[str, int] = {}

    def on_bad(err: BadSampleError) -> None:
        report.problems.append(f"{'key ' + repr(err.key) + ': ' if err.key else ''}{err.message} [{err.reason}]")

    fs, path = storage.open_fs(url, options)
    try:
        size = check_shard_file(fs, path, entry.name, entry.bytes)
        f = fs.open(path, "rb")
    except FileNotFoundError:
        report.problems.append("shard is missing [missing_shard]")
        return report
    except BadSampleError as err:  # not a regular file, or not the manifest's size: not read at all
        report.problems.append(f"{err.message} [{err.reason}]")
        return report
    except Exception as err:
        report.problems.append(storage.describe_error(err, url, options))
        return report
    with f:
        reader = _HashingReader(f)
        try:
            samples = iter_tar_samples(io.BufferedReader(reader, 1 << 20), entry.name, size)
            for bag in decode_shard(samples, entry.name, dim=dim, n_classes=n_classes, on_bad=on_bad):
                want = expected.get(bag.key)
                found[bag.key] = found.get(bag.key, 0) + 1
                if want is None:
                    on_bad(BadSampleError("not_in_manifest", "bag is not listed in the manifest", key=bag.key))
                elif (want.label, want.n) != (bag.label, bag.n):
                    on_bad(BadSampleError("manifest_mismatch", f"(label, n) = ({bag.label}, {bag.n}) but manifest says ({want.label}, {want.n})", key=bag.key))
                else:
                    report.bags += 1
            reader.drain()
        except Exception as err:  # network trouble mid-shard
            report.problems.append(storage.describe_error(err, url, options))
            return report
    report.bytes = reader.nbytes
    got = reader.sha256.hexdigest()
    report.sha256_ok = got == entry.sha256 and reader.nbytes == entry.bytes
    if reader.nbytes != entry.bytes:
        report.problems.append(f"size {reader.nbytes} bytes != manifest {entry.bytes} [sha256_mismatch]")
    if got != entry.sha256:
        report.problems.append(f"sha256 {got} != manifest {entry.sha256} [sha256_mismatch]")
    missing = [k for k in expected if k not in found]
    if missing:
        report.problems.append(f"{len(missing)} bag(s) listed in the manifest are not in the shard: {missing[:5]} [not_in_shard]")
    return report


def verify_dataset(root: str, options: StorageOptions | None = None, *, progress: bool = True) -> VerifyReport:
    """Verify every shard of the dataset at ``root``; never raises for data problems (they are reported)."""
    report = VerifyReport(storage.redact(root, options))
    try:
        manifest = load_manifest(root, options)
    except ManifestError as err:
        report.problems.append(str(err))
        report.readable = False
        return report
    report.summary = f"{manifest.format}, dim {manifest.dim}, classes {', '.join(manifest.class_names)}"
    shards = [(split, s) for split, e in manifest.splits.items() for s in e.shards]
    from ..progress import progress as progress_bar

    with progress_bar(len(shards), "verify", "shard", disable=not progress) as bar:
        for split, entry in shards:
            report.shards.append(verify_shard(root, split, entry, manifest.dim, manifest.n_classes, options))
            bar.update(1)
    for split, e in manifest.splits.items():
        counts = class_counts((b.label for b in e.bags()), manifest.n_classes)
        if counts != e.class_counts:
            report.problems.append(f"splits.{split}.class_counts {e.class_counts} != counted from bags {counts}")
        if e.n_bags != sum(s.n_bags for s in e.shards) or e.n_instances != sum(s.n_instances for s in e.shards):
            report.problems.append(f"splits.{split}: n_bags/n_instances do not add up over its shards")
    return report
