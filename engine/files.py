"""Writing files atomically: a final artifact (image, ``learned_embeds.bin``, IP-Adapter weights, checkpoint) is
written to a temporary file in the same folder and renamed into place, so an interrupted run never leaves a
truncated file where a complete one is expected, and a reader never sees half a file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)  # reading the umask means setting it: once, at import (not per write, racing threads)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path`` (``os.replace``,
    atomic on POSIX and Windows), when it fails the temporary file is removed and ``path`` is untouched. The file
    gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s
    private ``0o600``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class MissingFileError(FileNotFoundError, ValueError):
    """A file the user named does not exist. A ``FileNotFoundError``, and a ``ValueError`` like every other bad
    input (callers that map ``ValueError`` to "bad request" keep doing so)."""


def not_a_file(path: str | Path, what: str = "file") -> str | None:
    """Why ``path`` is not a readable regular file, as the end of a message (``"file 'x' does not exist"``,
    ``"'x' is a directory, not a file"``, ``"'x' is not a regular file (a FIFO, socket or device)"``), or None
    when it is one (symlinks followed). A FIFO or device is refused by name: reading one blocks or never ends."""
    shown = repr(str(path))
    try:
        st = os.stat(Path(path).expanduser())
    except (FileNotFoundError, NotADirectoryError):
        return f"{what} {shown} does not exist"
    except OSError as e:  # too long a name, a symlink loop, no permission to look...
        return f"cannot access {shown} ({e.strerror or errno.errorcode.get(e.errno, type(e).__name__)})"
    except ValueError:  # an embedded NUL
        return f"{shown} is not a valid path"
    if stat.S_ISDIR(st.st_mode):
        return f"{shown} is a directory, not a {what}"
    if not stat.S_ISREG(st.st_mode):
        return f"{shown} is not a regular file (a FIFO, socket or device)"
    return None


def check_file(path: str | Path, field: str, what: str = "file") -> Path:
    """``path`` (``~`` expanded) when it is an existing regular file; else :class:`MissingFileError` (it does not
    exist) or ``ValueError`` (a directory, a FIFO, ...), the message starting with ``field``."""
    problem = not_a_file(path, what)
    if problem is not None:
        error = MissingFileError if problem.endswith("does not exist") else ValueError
        raise error(f"{field}: {problem}")
    return Path(path).expanduser()


def torch_save_atomic(obj, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))
    return Path(path)


def safetensors_save_atomic(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_image_atomic(image, path: str | Path, **save_kwargs) -> Path:
    """``PIL.Image.save`` through :func:`atomic_path` (format from ``path``'s suffix)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower())
    save_kwargs = {k: v for k, v in save_kwargs.items() if v is not None}
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)
    return path


def torch_load_weights(path: str | Path, field: str):
    """``torch.load(path, weights_only=True)`` on CPU for a user-named weights file, with one-line errors naming
    ``field``. A pickle that needs more than tensors and containers (i.e. code execution) is refused, never
    retried unsafely; torch's own advice to pass ``weights_only=False`` is not repeated to the user."""
    import pickle
    import warnings

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing on garbage
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{field}: {str(path)!r} is not a weights file dreamfuse can read safely (corrupt, or a "
                         "pickle holding more than tensors; dreamfuse never executes code from a file)") from None
    except Exception as e:  # garbage raises anything from zipfile, struct, the unpickler's internals...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{field}: cannot read {str(path)!r} ({type(e).__name__}: {first})") from None


def safetensors_load(path: str | Path, field: str) -> dict:
    """``safetensors.torch.load_file`` with one-line errors naming ``field``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (not an OSError), OSError, ...: a corrupt or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{field}: cannot read {str(path)!r} ({type(e).__name__}: {first})") from None


def loads_json(data: bytes | str, field: str, *, name: str | None = None, what: str = "JSON",
               max_bytes: int | None = None, max_depth: int | None = None):
    """JSON text (or bytes) from a user -> its value, refusing what no such input is: more than ``max_bytes``,
    not UTF-8 (a BOM is fine), invalid JSON, an object with a key twice (JSON keeps the last one silently),
    nesting deeper than ``max_depth`` (checked before parsing) or deep enough to exhaust the parser.
    ``ValueError`` naming ``field`` (and ``name``, e.g. the file's path, when given)."""
    import json
    import sys

    subject = f"{field}: {name!r}" if name else f"{field}: the JSON"
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{subject} is {len(data)} bytes, more than the {max_bytes} {what} may have")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{subject} is not UTF-8 text ({e})") from None

    def unique(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{subject} lists {key!r} twice (a JSON object's keys must be unique)")
            out[key] = value
        return out

    if max_depth is not None:
        depth = deepest = 0
        for ch in data:  # cheap pre-scan: the parser recurses per level
            if ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch in "]}":
                depth -= 1
        if deepest > max_depth:
            raise ValueError(f"{subject} is nested {deepest} levels deep (at most {max_depth})")
    try:
        return json.loads(data, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ValueError(f"{subject} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{subject} is nested too deeply to be {what}") from None
    except ValueError as e:
        if str(e).startswith(subject):  # unique()'s own message
            raise
        if "Exceeds the limit" in str(e):  # Python reads no integer of more than sys.get_int_max_str_digits()
            raise ValueError(f"{subject} holds a number too long to read ({sys.get_int_max_str_digits()} digits at "
                             "most)") from None
        raise ValueError(f"{subject} is not valid JSON ({(str(e).splitlines() or ['?'])[0][:200]})") from None


def read_json(path: str | Path, field: str, what: str, max_bytes: int):
    """A user-named JSON file (SEGMENTS.json, text.json) -> its value, refusing what :func:`loads_json` refuses;
    the size is checked before reading. ``what`` names the kind of file in the messages ("a segments file")."""
    path = check_file(path, field)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{field}: {str(path)!r} is {size} bytes, more than the {max_bytes} {what} may have")
    return loads_json(path.read_bytes(), field, name=str(path), what=what)
