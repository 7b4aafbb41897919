"""santacli.files: reading refuses what it should, and ``--in-place`` never loses or misplaces
data (concurrent edits, symlinks, owner and mode, write protection, line endings, BOM, a
SIGKILL at any moment)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from santacli.errors import InputError
from santacli.files import (
    MAX_FILE_BYTES,
    check_replaceable,
    read_for_completion,
    read_text_file,
    replace_text,
    write_atomically,
)

# -- reading ----------------------------------------------------------------------------------


def test_refuses_what_is_not_an_ordinary_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, words in ((Path("/dev/zero"), "not a regular file"), (fifo, "not a regular file"),
                        (tmp_path, "is a directory"), (tmp_path / "nope", "no such file")):
        with pytest.raises(InputError, match=words):
            read_text_file(path)  # a FIFO would block forever if it were opened
    big = tmp_path / "big.py"
    with open(big, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(InputError, match="too large"):
        read_for_completion(big)


def test_line_endings_and_bom_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "crlf.py"
    path.write_bytes("\ufeffdef f():\r\n    pass\r\n".encode())
    file = read_for_completion(path)
    assert file.text == "def f():\n    pass\n" and file.bom and file.newline == "\r\n"
    replace_text(file, "def f():\n    return 1\n    pass\n")
    assert path.read_bytes() == "\ufeffdef f():\r\n    return 1\r\n    pass\r\n".encode()
    mixed = tmp_path / "mixed.py"
    mixed.write_bytes(b"a\r\nb\nc")
    file = read_for_completion(mixed)
    assert file.newline == "\n" and file.text == "a\r\nb\nc"  # mixed: left exactly as it is


# -- replacing --------------------------------------------------------------------------------


def test_an_edit_made_meanwhile_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text("x = 1\n")
    file = read_for_completion(path)
    path.write_text("x = 2  # saved by the editor meanwhile\n")
    with pytest.raises(InputError, match="changed on disk"):
        replace_text(file, "x = 1\ny = 2\n")
    assert path.read_text() == "x = 2  # saved by the editor meanwhile\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.py"]  # no temp file left behind


def test_same_size_same_mtime_edit_is_caught_by_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text("aaaa\n")
    file = read_for_completion(path)
    stat = path.stat()
    path.write_text("bbbb\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(InputError, match="changed on disk"):
        replace_text(file, "aaaa\nc\n")


def test_symlink_is_written_through_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "real.py"
    target.write_text("a = 1\n")
    link = tmp_path / "link.py"
    link.symlink_to(target)
    replace_text(read_for_completion(link), "a = 1\nb = 2\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "a = 1\nb = 2\n"


def test_mode_owner_and_group_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text("a\n")
    path.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)
    before = path.stat()
    replace_text(read_for_completion(path), "a\nb\n")
    after = path.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    write_atomically(path, "c\n")
    again = path.stat()
    assert (again.st_mode, again.st_uid, again.st_gid) == (before.st_mode, before.st_uid, before.st_gid)


def test_refusals_come_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.py"
    path.write_text("a\n")
    path.chmod(0o444)
    with pytest.raises(InputError, match="write-protected"):
        check_replaceable(path)
    path.chmod(0o644)
    check_replaceable(path)
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)  # someone else, not root
    with pytest.raises(InputError, match="owned by another user"):
        check_replaceable(path)


_LINES = st.lists(st.text(alphabet="ab \t:(){}\u00e9", max_size=12), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_LINES, newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(), cursor=st.integers(0, 10_000),
       completion=st.text(alphabet="xy \n\t", max_size=20), edited=st.booleans())
def test_in_place_is_old_text_or_old_text_with_the_completion(tmp_path: Path, lines: list[str], newline: str,
                                                               bom: bool, cursor: int, completion: str,
                                                               edited: bool) -> None:
    path = tmp_path / "f.py"
    original = ("\ufeff" if bom else "") + newline.join(lines) + newline
    path.write_bytes(original.encode())
    file = read_for_completion(path)
    at = cursor % (len(file.text) + 1)
    if edited:
        path.write_bytes(original.encode() + b"# edit\n")
        with pytest.raises(InputError):
            replace_text(file, file.text[:at] + completion + file.text[at:])
        assert path.read_bytes() == original.encode() + b"# edit\n"
        return
    replace_text(file, file.text[:at] + completion + file.text[at:])
    written = path.read_bytes().decode()
    if newline == "\r\n" and "\r" not in "".join(lines):
        expected = file.encode(file.text[:at] + completion + file.text[at:]).decode()
        assert written == expected and "\r\n".join(written.split("\r\n")).count("\n") == written.count("\r\n")
    else:
        assert written == ("\ufeff" if bom else "") + file.text[:at] + completion + file.text[at:]


# -- a crash at any moment ----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from santacli.files import read_for_completion, replace_text
    path, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    print("ready", flush=True)
    while True:
        file = read_for_completion(path)
        replace_text(file, new if file.text == old else old)
""")


def test_sigkill_while_writing_leaves_old_or_new(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    old, new = "def f():\n    return 1\n" * 200, "def f():\n    return 2\n" * 300
    path.write_text(old)
    rng = random.Random(0)
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), old, new], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.05))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert path.read_text() in (old, new)
