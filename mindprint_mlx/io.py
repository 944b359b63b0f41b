"""Atomic file writes, safe path components and content hashes.

Every file a run writes goes through here: write to a temporary name in the same
directory, fsync, then rename over the target, so a run killed at any moment leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import MindprintError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)   # elsewhere: the usual set-and-restore
    os.umask(old)
    return old


def file_mode(umask: int | None = None) -> int:
    """What open() would give a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~(current_umask() if umask is None else umask)


def dir_mode(umask: int | None = None) -> int:
    """What mkdir() would give a new directory: 0o777 less the umask (0o755 under 022)."""
    return 0o777 & ~(current_umask() if umask is None else umask)


def _write_error(path: Path, e: BaseException) -> MindprintError:
    """One line naming the file being written (a full disk, a read-only directory)."""
    if isinstance(e, OSError):
        why = e.strerror or str(e)
    else:   # mlx raises RuntimeError("[write] Unable to write N bytes to file.")
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        why = lines[0] if lines else type(e).__name__
    hint = " (is the disk full?)" if not isinstance(e, OSError) or e.errno in (28, 27, 122) else ""
    return MindprintError(f"cannot write {path}: {why}{hint}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` (ending in `suffix`); on success fsync it and
    rename it over `path`. An OSError is a one-line MindprintError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())   # mkstemp makes it 0600
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e) from None
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one line; a line is written with one write() so a kill leaves whole lines
    (a torn last line is skipped by `read_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
    except OSError as e:
        raise _write_error(path, e) from None


def _json_default(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a metrics file, skipping a torn final line left by a killed run."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def atomic_save_safetensors(path: str | os.PathLike, arrays: Mapping[str, Any],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """mx.save_safetensors through a temporary file (named *.tmp.safetensors: mlx appends
    the suffix itself to any other name)."""
    import mlx.core as mx

    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        try:
            mx.save_safetensors(str(tmp), dict(arrays), metadata=dict(metadata or {}))
        except RuntimeError as e:   # mlx's "[write] Unable to write N bytes to file."
            raise _write_error(Path(path), e) from None
    return Path(path)


def _normal_modes(root: Path) -> None:
    """Give every file and directory under `root` the mode open()/mkdir() would under the
    umask (mlx's writer uses 0644 whatever the umask; mkstemp/mkdtemp use 0600/0700)."""
    fmode, dmode = file_mode(), dir_mode()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, fmode)
        for n in dirnames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, dmode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into place.

    The old directory (if any) is moved aside and removed only after the new one is in
    place, so at every moment `path` is either the complete old or complete new tree.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, dir_mode())   # mkdtemp makes it 0700
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as e:
            # a file written straight into tmp (mx.save_safetensors, shutil.copyfile) failed
            if isinstance(e, RuntimeError) and "write" not in str(e).lower():
                raise
            name = getattr(e, "filename", None)
            where = path
            if name and Path(name).is_relative_to(tmp):   # name the final file, not tmp's
                where = path / Path(name).relative_to(tmp)
            raise _write_error(where, e) from None
        _normal_modes(tmp)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _old_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` over `dst`. The old `dst` is first renamed to `.dst.old` and
    removed only after `src` is in place; a kill between the two renames leaves `dst`
    missing and `.dst.old` complete, which `repair_tree` (run on resume) renames back."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = _old_name(dst)
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_orphan(name: str) -> bool:
    """A temporary name this module writes (`.x.abc123.tmp`, `.x.abc123.tmp.safetensors`)
    or an old directory moved aside by `replace_dir` (`.x.old`)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".tmp.safetensors")
                                     or name.endswith(".old"))


def repair_tree(root: str | os.PathLike) -> list[str]:
    """After a killed run, under `root`: put back each `.x.old` whose `x` is missing (a kill
    inside `replace_dir`), then remove the temporary files and directories a killed writer
    left. Only for a directory no live process writes to (hold the run lock). Returns
    what was done, one line per path (relative to `root`)."""
    root = Path(root)
    done: list[str] = []
    if not root.is_dir():
        return done
    found = sorted((p for p in root.rglob(".*") if is_orphan(p.name)),
                   key=lambda p: len(p.parts))
    for p in found:
        if not os.path.lexists(p):
            continue                        # inside an orphan already removed
        if p.name.endswith(".old") and p.is_dir():
            dst = p.with_name(p.name[1:-len(".old")])
            if not dst.exists():
                os.replace(p, dst)
                done.append(f"restored {dst.relative_to(root)} (a replace was cut short)")
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p.relative_to(root)}")
    if found:
        _fsync_dir(root)
    return done


def trim_jsonl(path: str | os.PathLike, last_step: int | None) -> None:
    """On resume, keep a metrics file's lines up to `last_step` (the checkpoint's step), so
    the replayed steps are not logged twice; None (a fresh start) removes the file."""
    path = Path(path)
    if last_step is None:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if not isinstance(r.get("step"), (int, float))
            or r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n"
                                    for r in kept))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, what: str = "name") -> str:
    """A string safe as one path component: no separators, no '..', not absolute.

    Unicode is folded to ASCII where possible; anything else becomes '-'.
    """
    if not isinstance(name, str):
        raise MindprintError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    s = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    s = _UNSAFE.sub("-", s).strip("-.")
    s = re.sub(r"\.{2,}", ".", s)
    if not s:
        raise MindprintError(f"{what} {name!r} has no characters usable in a directory name")
    return s[:120]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files (names and contents), order-independent."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def topic_slug(rel_dir: str, key: str) -> str:
    """A topic's metric/plot file stem: its path with '__' for '/', plus a short hash of
    the topic key, so `a/b__c/t` and `a__b/c/t` (the same slug) get different files."""
    return f"{safe_name(rel_dir.replace('/', '__'))}-{sha256_bytes(key.encode('utf-8'))[:8]}"


class DuplicateKeyError(ValueError):
    """A JSON object holds the same key twice (json.loads would keep only the last)."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"duplicate key {key!r}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


def json_loads_strict(text: str | bytes) -> Any:
    """json.loads that raises DuplicateKeyError on a repeated key in any object."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold one object: unreadable, invalid, duplicate-keyed or
    non-object JSON is a MindprintError naming the file."""
    try:
        data = json_loads_strict(Path(path).read_text(encoding="utf-8"))
    except DuplicateKeyError as e:
        raise MindprintError(f"{path}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MindprintError(f"{path}: not valid JSON ({e})") from None
    except (OSError, RecursionError, ValueError) as e:
        raise MindprintError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise MindprintError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_header(f: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes, and
    "__metadata__"), read without loading any weights; {} if it is unreadable."""
    import struct

    f = Path(f)
    try:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > min(100 << 20, f.stat().st_size - 8):
                return {}
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return {}
    return header if isinstance(header, dict) else {}


def load_safetensors(path: str | os.PathLike) -> dict:
    """mx.load of a .safetensors file; a missing, empty, truncated or corrupt file (bad
    header length, bad offsets) is a MindprintError naming the file."""
    import mlx.core as mx

    path = Path(path)
    if not path.is_file():
        raise MindprintError(f"{path}: file not found")
    try:
        return mx.load(str(path))
    except (ValueError, RuntimeError, OSError, MemoryError) as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        why = lines[0] if lines else type(e).__name__
        if path.stat().st_size < 8:
            why = f"{path.stat().st_size} bytes, not a safetensors file"
        raise MindprintError(f"{path}: cannot read safetensors ({why})") from None
