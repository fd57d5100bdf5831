"""What a result was made with, recorded beside it so that someone else can make it again: package
versions, the source revision, digests of the files read."""

from __future__ import annotations

import functools
import hashlib
import inspect
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

CORE_PACKAGES = ("darkminer", "torch", "diffusers", "transformers", "peft", "safetensors")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def package_versions(*extra: str) -> dict[str, str]:
    """The installed versions of the core packages and of ``extra`` ones, and darkminer's source revision
    where it runs from a git checkout."""
    versions = {name: package_version(name) for name in (*CORE_PACKAGES, *extra)}
    if revision := source_revision():
        versions["darkminer_revision"] = revision
    return versions


@functools.lru_cache(maxsize=1)
def source_revision() -> str | None:
    """The git commit darkminer runs from when it is a checkout (an editable install: its version number
    does not change between commits), with "+modified" if tracked files differ from it; None otherwise."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # darkminer's own checkout, not a repo it sits inside
        commit = git("rev-parse", "HEAD")
        modified = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+modified" if modified else "")


def file_digest(path: str | Path) -> str:
    """Short sha256 of a file (e.g. which trained judge graded a result)."""
    return sha256(path)[:16]


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """A file read as input: its absolute path, size and sha256 (a prompt CSV edited later is told apart)."""
    path = Path(path).expanduser().resolve()
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256(path)}


def code_record(cls: type) -> dict[str, Any] | None:
    """The file that defines a class of one's own (a plugin's eraser or attack), by contents: what tells a
    result made before the plugin changed apart. None for darkminer's own classes (its version and revision are
    recorded with every result) and for a class with no file (defined in a notebook)."""
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # a built-in class; one defined where there is no file (python -c, a notebook)
        return None
    if path is None or not Path(path).is_file() or Path(path).resolve().is_relative_to(Path(__file__).resolve().parent):
        return None
    return file_record(path)


def code_identity(record: dict[str, Any] | None) -> dict[str, str] | None:
    """What a run's claim keeps of a ``code_record``: the contents only (a moved plugin file is the same)."""
    return None if record is None else {"sha256": record["sha256"]}


def same_code(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether a result's ``code_record`` and the class's now name the same contents (a moved file is the same)."""
    return (recorded or {}).get("sha256") == (current or {}).get("sha256")
