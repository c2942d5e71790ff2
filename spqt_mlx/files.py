"""Files written so that a failure or a kill loses nothing: atomic directories and files, hashes.

Every directory the project writes (converted checkpoints, imported GGUF models, the cached
default model) goes through ``atomic_directory``; small outputs (JSON summaries) through
``atomic_write_text``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target, *, overwrite: bool = False):
    """Yield a temporary directory beside ``target`` that becomes ``target`` on success.

    If the body raises (or is interrupted) the temporary directory is removed and ``target`` is
    untouched. An existing ``target`` is replaced only with ``overwrite=True``, and only once the
    new directory is complete. What a killed writer left behind is cleaned up by the next one.
    """
    target = Path(target)
    _recover(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The writer's host and pid are in the name, so that a later writer can tell a dead one's
    # leftovers from a live one's (also on a filesystem that several machines share).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_writer()}-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: all of it or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path, *, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (with a byte progress bar if ``progress``)."""
    h = hashlib.sha256()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=Path(path).stat().st_size, unit="B", unit_scale=True, desc=f"checking {Path(path).name}", leave=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def moved_aside(target) -> list[Path]:
    """Previous versions of ``target`` that a replacement moved aside, newest first."""
    target = Path(target)

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    return sorted(target.parent.glob(f".{target.name}.old-*"), key=mtime, reverse=True)


def _writer() -> str:
    """This process as a writer: ``host-pid``, the host reduced to letters and digits."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _dead_writer(entry: Path, kind: str, target: Path) -> bool:
    """Whether the writer that made ``entry`` (``.NAME.<kind>-HOST-PID-...``) is a process of this
    host that no longer runs. Entries of other hosts, or of live writers, are left alone."""
    match = re.match(rf"^\.{re.escape(target.name)}\.{kind}-([A-Za-z0-9]+)-(\d+)-", entry.name)
    if not match:
        return False
    host, pid = match.groups()
    return host == _writer().split("-")[0] and not _alive(int(pid))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _recover(target: Path) -> None:
    """Finish what a writer killed midway left behind.

    A replacement killed between its two renames: with ``target`` missing, its previous version
    (moved aside, complete) goes back; versions moved aside from a ``target`` that is in place are
    dropped. A writer killed before its rename: its temporary directory is removed. Only what
    writers of this host that no longer run left behind is touched.
    """
    for old in moved_aside(target):
        if not _dead_writer(old, "old", target):
            continue  # a live writer is between its renames (or another host's entry)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(old, target)
            except OSError:
                if not target.exists():
                    raise
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        if tmp.is_dir() and _dead_writer(tmp, "tmp", target):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path, overwrite: bool) -> None:
    # os.replace cannot replace a non-empty directory: move the old one aside first, and put it
    # back if the new one cannot be moved in.
    if not target.exists():
        try:
            os.replace(tmp, target)
            return
        except OSError:
            if not target.exists():
                raise
    if not overwrite:  # another process finished first
        raise FileExistsError(f"{target} appeared while it was being written; not replacing it.")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_writer()}-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
