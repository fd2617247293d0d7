"""Small helpers shared by the core modules and the stages: atomic writes, the files a command reads."""

from __future__ import annotations

import os
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], None]) -> None:
    """Write a file so readers see the old file or the whole new one, never a part.
    `data` is the content, or a function that writes to the temporary path it is given."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library `.py` sources, sorted: a corpus that is there offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


STDLIB = "stdlib"  # an input that names the standard library's sources, beside paths


def list_files(inputs: Sequence[str | os.PathLike], suffixes: Sequence[str] = ()) -> list[Path]:
    """Every file the inputs name, each once, directories walked in sorted order (hidden entries skipped); the
    input "stdlib" names `stdlib_files()`. `suffixes`, if given, limits the files found in directories; files
    named directly are always read."""
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if str(given) == STDLIB and not path.exists():
            files.extend(stdlib_files())
        elif path.is_file():
            files.append(path)
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and (not suffixes or name.endswith(tuple(suffixes))):
                        files.append(Path(root) / name)
        else:
            raise ValueError(f"input {given} does not exist; check the path given to --input.")
    seen: set[Path] = set()
    return [p for p in files if not (p.resolve() in seen or seen.add(p.resolve()))]
