"""The user's files, as every front end reads and writes them.

Reading: UTF-8 text from ordinary files only (a FIFO, a device or /dev/zero is refused before
it is opened) up to a size cap, refused with a clear :class:`~santacli.errors.InputError` when
missing, a directory, unreadable, binary or not UTF-8.

Writing (``santa complete --in-place``, the REPL's ``:write``) never loses data: the new text
goes to a temp file beside the real file (through symlinks, which stay links), is fsynced and
given the file's mode, owner and group, and renamed over it only if the file still holds what
was read (an editor may have saved meanwhile); then the folder is fsynced. A file keeps its
line endings (CRLF throughout stays CRLF) and its byte-order mark.

Ground floor: imports only :mod:`santacli.errors` (no torch, no typer, no rich).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from santacli.errors import InputError

MAX_FILE_BYTES = 32 * 2**20  # far beyond what a completion can use; the prompt takes a window
BOM = "\ufeff"


@dataclass(frozen=True)
class Stamp:
    """What a file held when it was read: compared again just before it is replaced."""

    mtime_ns: int
    size: int
    sha256: str


@dataclass(frozen=True)
class TextFile:
    """A text file as read for completion.

    ``text`` is what the model sees: the byte-order mark dropped, and CRLF line ends as LF when
    the file uses CRLF throughout. :meth:`encode` turns such text back into the file's own style.
    """

    path: Path  # as the user named it
    target: Path  # symlinks resolved: the file that is actually replaced
    text: str
    bom: bool
    newline: str  # "\n", or "\r\n" for a CRLF file
    stamp: Stamp

    def encode(self, text: str) -> bytes:
        if self.newline != "\n":
            text = text.replace("\n", self.newline)
        return ((BOM if self.bom else "") + text).encode("utf-8")


def _read_bytes(path: Path) -> tuple[bytes, os.stat_result]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket); santa reads ordinary files")
    if info.st_size > MAX_FILE_BYTES:
        raise InputError(f"{path}: too large ({info.st_size / 2**20:.0f} MB; santa reads files up to "
                         f"{MAX_FILE_BYTES // 2**20} MB)")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
            info = os.fstat(handle.fileno())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{path}: too large (it grew past {MAX_FILE_BYTES // 2**20} MB while being read)")
    return data, info


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, exactly as stored (newlines untouched).

    Raises:
        InputError: missing, a directory, not a regular file, too large, unreadable, binary (NUL
            bytes) or not UTF-8.
    """
    return decode_text(_read_bytes(path)[0], str(path))


def read_for_completion(path: Path) -> TextFile:
    """``path`` as :class:`TextFile`, with the stamp that :func:`replace_text` checks.

    Raises:
        InputError: as :func:`read_text_file`.
    """
    data, info = _read_bytes(path)
    text = decode_text(data, str(path))
    bom = text.startswith(BOM)
    if bom:
        text = text[1:]
    crlf = "\r\n" in text and text.count("\n") == text.count("\r\n")
    return TextFile(path=path, target=Path(os.path.realpath(path)), text=text.replace("\r\n", "\n") if crlf else text,
                    bom=bom, newline="\r\n" if crlf else "\n", stamp=_stamp(data, info))


def _stamp(data: bytes, info: os.stat_result) -> Stamp:
    return Stamp(info.st_mtime_ns, info.st_size, hashlib.sha256(data).hexdigest())


def check_replaceable(path: Path) -> None:
    """Refuse early (before a model loads) what :func:`replace_text` would refuse late: a file
    that is write-protected, in a folder santa cannot write, or owned by another user whose
    ownership santa could not keep.

    Raises:
        InputError: with what to do about it.
    """
    target = Path(os.path.realpath(path))
    try:
        info = target.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not os.access(target, os.W_OK) or not info.st_mode & 0o222:
        raise InputError(f"{path}: the file is write-protected; santa does not change read-only files "
                         "(make it writable first, or print the completion without --in-place)")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InputError(f"{target.parent}: cannot write in this folder, so {path} cannot be replaced safely")
    if info.st_uid != os.geteuid() and os.geteuid() != 0:
        raise InputError(f"{path}: owned by another user; replacing it would make it yours, so santa leaves it")


def replace_text(file: TextFile, text: str) -> None:
    """Write ``text`` (as :attr:`TextFile.text` is: LF, no BOM) into ``file`` in its own style,
    atomically, keeping mode, owner and group, unless the file changed since it was read.

    Raises:
        InputError: the file changed on disk meanwhile (nothing is written), or it cannot be
            written (the original is then untouched and no temp file is left behind).
    """
    info = _check_unchanged(file)
    try:
        _write_beside(file.target, file.encode(text), info, before_rename=lambda: _check_unchanged(file))
    except OSError as exc:
        raise InputError(f"{file.path}: cannot write it ({exc.strerror or exc}); the file is unchanged") from None


def _check_unchanged(file: TextFile) -> os.stat_result:
    info: os.stat_result | None
    try:
        data, info = _read_bytes(file.target)
    except InputError:
        data, info = b"", None
    if info is None or _stamp(data, info) != file.stamp:
        raise InputError(f"{file.path}: the file changed on disk while santa was completing; nothing was "
                         "written (run santa again on the new text)")
    return info


def write_atomically(path: Path, text: str) -> None:
    """Replace (or create) ``path`` with ``text`` as UTF-8, atomically, through symlinks,
    keeping an existing file's mode, owner and group.

    Raises:
        OSError: the folder is not writable, the disk is full...; the original is then
            untouched and no temp file is left behind.
    """
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        info: os.stat_result | None = target.stat()
    except FileNotFoundError:
        info = None
    _write_beside(target, text.encode("utf-8"), info)


def _write_beside(target: Path, data: bytes, info: os.stat_result | None,
                  before_rename: Callable[[], object] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".santa-tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if info is None:
                os.fchmod(handle.fileno(), _new_file_mode())
            else:
                os.fchmod(handle.fileno(), info.st_mode & 0o7777)
                if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                    _keep_owner(handle.fileno(), info, target)
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(target.parent)


def _keep_owner(fd: int, info: os.stat_result, target: Path) -> None:
    try:
        os.fchown(fd, info.st_uid, info.st_gid)
    except PermissionError:
        # Not root: the group may still be kept if we belong to it; the owner cannot.
        raise InputError(f"{target}: santa cannot keep its owner and group, so it is left unchanged") from None
    os.fchmod(fd, info.st_mode & 0o7777)  # chown clears set-user-id bits


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: a crash right after santa says "done" loses nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


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
