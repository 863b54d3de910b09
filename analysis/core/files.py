"""Atomic files: the one writer of every file sharpscape writes (results, surfaces, figures).

:func:`atomic_write` writes a file through a unique temporary file in the target's own folder
(``tempfile.mkstemp``), flushes and fsyncs it, moves it into place with ``os.replace`` and then
fsyncs the folder. A process killed at any moment leaves the target either as it was (the old
complete file, or no file) or as the new complete file, never truncated. A temporary left by a
killed process is named ``.NAME.XXXXXXXX.tmp`` (hidden, never the target's name), so nothing
reads it as a result; :func:`remove_temporaries` deletes those of a folder.

The target's own folder entry is replaced, never written through: a symbolic link at the target's
path is replaced by a regular file (``os.replace`` renames onto the link itself) and the file it
pointed to is left untouched. Folders on the way to the target are followed, symbolic links
included (the file is written into the folder a link points to).

A new file gets the permissions of any newly created file (``0o666`` less the umask), not
``mkstemp``'s ``0o600``. :func:`read_regular` is the matching reader: the bytes of a regular file,
refusing a symbolic link or anything that is not a regular file, and :func:`file_sha256` its
checksum (to record next to a file and verify later).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .validation import ArgumentTypeError

TEMP_SUFFIX = ".tmp"
_NAME_LIMIT = 200   # of the target's name in its temporary's name (file names are <= 255 bytes)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process's umask, read from /proc where possible (setting it to read it is racy)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_folder(folder: str) -> None:
    """Sync ``folder`` so that the rename itself survives a crash (where the platform allows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    with contextlib.suppress(OSError):
        fd = os.open(folder, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_prefix(path: str | os.PathLike) -> str:
    """The prefix of the temporary files of ``path``: ``.NAME.`` (NAME cut to 200 characters).

    Args:
        path: The target file.

    Returns:
        The prefix passed to ``tempfile.mkstemp``.
    """
    return f".{os.path.basename(os.fspath(path))[:_NAME_LIMIT]}."


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write the file ``path`` atomically: ``write(fh)`` fills a temporary file, then it is moved.

    The temporary is created with ``tempfile.mkstemp`` in the folder of ``path`` (a unique name:
    concurrent writers never share one), made readable as a new file would be (``0o666`` less the
    umask), filled by ``write``, flushed and fsynced, and renamed onto ``path`` with
    ``os.replace``; the folder is then fsynced. A symbolic link at ``path`` is replaced by the
    new regular file, its target untouched. If ``write`` or the rename fails, the temporary is
    removed and ``path`` is left as it was.

    Args:
        path: The file to write; its folder must exist.
        write: Called once with the temporary file opened for binary writing.

    Raises:
        FileNotFoundError: The folder of ``path`` does not exist.
        OSError: The folder is not writable, or ``path`` is a directory (from the OS, naming the
            path); any exception of ``write`` is raised unchanged.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(folder)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`).

    Args:
        path: The file to write.
        data: Its new content.
    """
    atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (:func:`atomic_write`).

    Args:
        path: The file to write.
        text: Its new content.
    """
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None,
               default: Callable[[Any], Any] | None = None, sort_keys: bool = False) -> None:
    """Write ``obj`` as a JSON document to ``path`` atomically (:func:`atomic_write`).

    The document is serialised completely before the file is touched, so an object that cannot
    be written raises without creating anything.

    Args:
        path: The file to write.
        obj: The JSON-representable value.
        indent: As for ``json.dumps``.
        default: As for ``json.dumps`` (a function for values JSON cannot represent).
        sort_keys: As for ``json.dumps``.

    Raises:
        TypeError: ``obj`` holds a value JSON cannot represent (and ``default`` does not help).
        ValueError: ``obj`` holds a circular reference.
    """
    write_text(path, json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys))


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Write ``arrays`` (name -> array-like) as an uncompressed ``.npz`` to ``path`` atomically.

    Args:
        path: The file to write (its name is kept as given; no ``.npz`` is appended).
        arrays: The arrays by name, as for ``numpy.savez``.
    """
    contents = {k: np.asarray(v) for k, v in arrays.items()}
    atomic_write(path, lambda fh: np.savez(fh, **contents))


def write_figure(fig: Any, path: str | os.PathLike, *, dpi: float | None = None,
                 bbox_inches: str | None = "tight") -> None:
    """Save the matplotlib figure ``fig`` to ``path`` atomically, in the format of its suffix.

    Args:
        fig: A ``matplotlib.figure.Figure``.
        path: The file to write, e.g. ``out/figure.png`` (the suffix picks the format).
        dpi: Resolution; None keeps matplotlib's ``savefig.dpi``.
        bbox_inches: "tight" (default) grows or shrinks the saved area to the drawn artists, so
            no axis label or title is clipped; None saves the figure's own size.

    Raises:
        ValueError: ``path`` has no suffix naming a format matplotlib writes.
    """
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if not fmt:
        raise ValueError(f"path {os.fspath(path)!r} has no suffix naming the figure's format "
                         "(e.g. .png, .pdf)")
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi, bbox_inches=bbox_inches))


def save_figure(fig: Any, path: str | os.PathLike, formats: Sequence[str] | None = None, *,
                dpi: float | None = None) -> list[str]:
    """Save ``fig`` as ``path``: the one convention of every sharpscape figure.

    Used by the landscape plots (given a path) and ``Tracker.plot``. Each file is written by
    :func:`write_figure`: atomically, with ``bbox_inches="tight"`` (no clipped labels).

    * ``formats=None``: a ``path`` ending in a format matplotlib writes (``plane.png``,
      ``plane.pdf``) is written in that format only; any other name gets ``.png`` and ``.pdf``
      appended to the whole name (``run_lr0.1`` gives ``run_lr0.1.png`` and ``run_lr0.1.pdf``).
    * ``formats=("png", "pdf")``: one file per extension; a name already ending in one of them
      has that ending replaced, any other name keeps its whole name.

    Args:
        fig: The figure (``ax.figure``).
        path: The file name, with or without an extension; its folder is created.
        formats: The file extensions, or None (above).
        dpi: Resolution; None keeps matplotlib's ``savefig.dpi``.

    Returns:
        The names of the files written.

    Raises:
        ArgumentTypeError: ``formats`` is neither None nor a non-empty sequence of
            alphanumeric extensions.
    """
    if formats is not None and (isinstance(formats, str) or not formats or not all(
            isinstance(f, str) and f.isalnum() for f in formats)):
        raise ArgumentTypeError(f"formats must be None or a sequence of file extensions such as "
                                f"('png', 'pdf'), got {formats!r}")
    name = os.fspath(path)
    stem, ext = os.path.splitext(name)
    if formats is None:
        known = ext[1:].lower() in fig.canvas.get_supported_filetypes()
        formats = (ext[1:],) if known else ("png", "pdf")
    if ext[1:].lower() not in {f.lower() for f in formats}:
        stem = name
    os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
    out = [f"{stem}.{f}" for f in formats]
    for file in out:
        write_figure(fig, file, dpi=dpi)
    return out


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path``, never read through a symbolic link.

    Args:
        path: The file to read.

    Returns:
        Its content.

    Raises:
        FileNotFoundError: There is no ``path``.
        OSError: ``path`` is a symbolic link or not a regular file (the message names it), or
            it cannot be read.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        if os.path.islink(path):
            raise OSError(errno.ELOOP, "a symbolic link, not read through", path) from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the regular file ``path`` (read with :func:`read_regular`).

    Record it next to a file to tell later whether the file is still the one written.

    Args:
        path: The file.

    Returns:
        64 hexadecimal digits.

    Raises:
        FileNotFoundError: There is no ``path``.
        OSError: ``path`` is a symbolic link, not a regular file, or unreadable.
    """
    return hashlib.sha256(read_regular(path)).hexdigest()


def temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[str]:
    """The temporary files :func:`atomic_write` left in ``folder`` (paths, sorted).

    Args:
        folder: The folder to look in.
        names: Only the temporaries of these target names; None: of any target.

    Returns:
        The paths of the matching regular files (never a link or a folder).
    """
    folder = os.fspath(folder)
    wanted = None if names is None else {n[:_NAME_LIMIT] for n in names}
    found = []
    with os.scandir(folder) as entries:
        for e in entries:
            match = _TEMPORARY.match(e.name)
            if (match and (wanted is None or match["name"] in wanted)
                    and e.is_file(follow_symlinks=False)):
                found.append(e.path)
    return sorted(found)


def remove_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None
                       ) -> list[str]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder``.

    Only call this where no other process is writing the same files (a live writer's temporary
    would be deleted under it).

    Args:
        folder: The folder to clean.
        names: Only the temporaries of these target names; None: of any target.

    Returns:
        The paths removed.
    """
    removed = []
    for path in temporaries(folder, names):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed
