"""The user's files, as every front end reads and writes them: UTF-8 text exactly as stored
(newlines untouched), refused with a clear :class:`~santacli.errors.InputError` when it is
missing, a directory, unreadable, binary or not UTF-8; and replaced atomically, so that a
failure or Ctrl-C halfway never leaves a file half written.

Ground floor: imports only :mod:`santacli.errors` (no torch, no typer, no rich).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from santacli.errors import InputError


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, exactly as stored (newlines untouched).

    Raises:
        InputError: no such file, a directory, unreadable, binary (NUL bytes) or not UTF-8.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_text(data, str(path))


def decode_text(data: bytes, name: str) -> str:
    """``data`` as UTF-8 text; ``name`` (a path, or ``stdin``) goes in the error message.

    Raises:
        InputError: ``data`` holds NUL bytes (a binary file) or is not valid UTF-8.
    """
    if b"\x00" in data:
        raise InputError(f"{name}: looks like a binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not valid UTF-8 (byte {exc.start})") from None


def _new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8): write a temp file beside it, fsync it,
    keep the file's mode, then rename it over the original. A symlink is written through (its
    target is replaced, the link stays); a missing file is created with the usual mode.

    Raises:
        OSError: the directory is not writable, the disk is full, the rename failed...; the
            original is then untouched and no temp file is left behind.
    """
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".santa-tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
