"""Safe file handling: atomic writes, safetensors only, JSON with a schema version."""

from __future__ import annotations

import functools
import glob
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows: outputs are not locked
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from darkminer.errors import ConfigError, DamagedStateError, DarkMinerError, ModelLoadError


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import, before any thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _as_if_created(path: Path, mode: int) -> Path:
    """tempfile makes its files and folders owner-only; give ``path`` the mode that a plain open/mkdir
    would (``mode`` under the umask), so that outputs are as readable as the user's other files. Best
    effort: some filesystems (vfat) refuse modes, and owner-only is still a working output."""
    with suppress(OSError):
        os.chmod(path, mode & ~_UMASK)
    return path


def _fsync(path: Path) -> None:
    """``path`` (a file, or a folder's list of names) on disk: a rename onto it is durable only then."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems (and Windows) cannot open or sync a folder; the rename still holds
        if not path.is_dir():
            raise


def _finish_tree(folder: Path) -> None:
    """Everything under ``folder`` made as a plain open/mkdir would and synced to disk, before the folder is
    renamed into place. Libraries that write into it (safetensors, diffusers' ``save_pretrained``) leave weight
    files owner-only and unsynced. A hard link (a stacked erasure's copy of the one below) is another folder's
    file too, whose mode is not ours to change."""
    for path in [*folder.rglob("*"), folder]:
        if path.is_symlink():
            continue
        if path.is_dir() or path.stat().st_nlink == 1:
            _as_if_created(path, 0o777 if path.is_dir() else 0o666)
        _fsync(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = _as_if_created(Path(tmp), 0o666)
    try:
        yield tmp_path
        _as_if_created(tmp_path, 0o666)  # again: a writer that recreates the file (safetensors) makes it owner-only
        _fsync(tmp_path)  # on disk before the rename: a crash must not leave an empty file
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# What ``atomic_path`` names its temporary file: tempfile's 8 random characters between ``.NAME.`` and ``.tmp``.
_TEMPORARY_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def is_temporary_file(path: Path) -> bool:
    """Whether ``path`` is an ``atomic_path`` temporary: a write in progress, or one a killed run left."""
    return _TEMPORARY_FILE.fullmatch(path.name) is not None


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files that writes killed mid-way left in ``folder`` and below (a checkpoint's
    can be gigabytes on Stable Diffusion); returns how many. Only for a run that holds ``output_lock`` on
    the output that ``folder`` belongs to: another run's write in progress would lose its file."""
    stale = [p for p in Path(folder).rglob("*.tmp") if p.is_file() and is_temporary_file(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# The records that make a folder an erased model or an exported pipeline (models.erased), with the keys that
# tell them from another file of that name: outputs replaced whole by a rerun, so nothing else may be written
# inside them.
ERASED_MODEL_RECORD, EXPORT_RECORD = "darkminer.json", "darkminer_export.json"
WHOLE_OUTPUTS = {ERASED_MODEL_RECORD: ("an erased model", ("method", "concept", "base_model", "kind")),
                 EXPORT_RECORD: ("an exported pipeline", ("erased", "erasure"))}


def check_output_directory(
    out: str | Path, marker: str, what: str, replaced: bool = True, prepared: tuple[str, ...] = (),
    apart_from: str | Path | None = None, flag: str = "--out", marker_keys: tuple[str, ...] = (),
) -> Path:
    """``out`` (absolute) if a command may write its output folder there: absent, an empty folder, an
    earlier ``what`` (a folder holding ``marker``), or one holding nothing but ``prepared`` entries (parts
    of an output put there before its first run). Anything else (a user's folder, a file) is refused,
    before any work is done. No output may lie inside an erased model or an export (``WHOLE_OUTPUTS``).
    ``replaced``: the output is renamed onto ``out`` when complete, so ``out`` may not be a link or hold the
    current folder; False: it is filled in place (a resumable benchmark). ``apart_from``: the erased model the
    command reads, which ``out`` may neither lie in nor hold. ``flag``: the option that names ``out``, for
    the errors. ``marker_keys``: what the marker holds where its name is not ours alone (another tool's
    folder may well have a metrics.json or config.json), so that such a folder is not taken for an output."""
    given = Path(_as_path(out, flag))
    if marker in WHOLE_OUTPUTS and not marker_keys:  # a user's darkminer.json is no erased model to replace
        marker_keys = WHOLE_OUTPUTS[marker][1]
    # Its folder with links resolved, as the writes and output_lock resolve it ("link/../x" is x beside the
    # link's target, not beside the link), its own name kept (a link there is refused below).
    out = Path(os.path.realpath(given)) if given.name in ("", "..") else Path(os.path.realpath(given.parent)) / given.name
    _check_parents(out, flag)
    _check_apart(out, apart_from)
    if out.exists() and not (out.is_dir() and (_holds_record(out / marker, marker_keys)
                                               or all(p.name in prepared for p in out.iterdir()))):
        raise DarkMinerError(f"{flag} {out} exists and is not {what}; choose another {flag}")
    # A rerun into an erased model or an export (what evaluations, attacks and benchmarks are made from) replaces
    # it whole, with what lies inside; so does one into an earlier evaluation or attack output, but a metrics.json
    # or attack.json in a parent folder may well be another tool's.
    for parent in out.parents:
        for name, (kind, keys) in WHOLE_OUTPUTS.items():
            if _holds_record(parent / name, keys):
                raise DarkMinerError(f"{flag} {out} lies inside {parent}, {kind}, and a rerun into that folder "
                                     f"would delete it; choose another {flag}")
    if replaced and out.is_symlink():
        raise DarkMinerError(f"{flag} {out} is a link; give the folder itself (the output replaces it)")
    if replaced and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise DarkMinerError(f"{flag} {out} holds the current folder; name a new folder for the output")
    return out


def _holds_record(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether ``path`` is a file holding a JSON object with ``keys`` (any file where there are none)."""
    return path.is_file() and (not keys or read_record(path, keys) is not None)


def read_record(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The JSON object in ``path`` if it is one holding ``keys`` (darkminer's record, not another tool's file of
    that name), else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(key in data for key in keys) else None


def check_output_file(path: str | Path, apart_from: str | Path | None = None) -> Path:
    """``path`` if a command may write its output file there (not a folder, in a folder we may write, not
    inside the erased model ``apart_from`` the command reads)."""
    path = Path(_as_path(path))
    _check_parents(path)
    _check_apart(path, apart_from)
    parent = Path(os.path.abspath(path)).parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise DarkMinerError(f"--out {path}: cannot write in {parent}; choose another --out")
    if path.is_dir():
        raise DarkMinerError(f"--out {path} is a folder; name a file")
    return path


def _as_path(value: object, what: str = "--out") -> str | os.PathLike:
    if not isinstance(value, str | os.PathLike):
        raise DarkMinerError(f"{what} must be a path (a string or pathlib.Path), got {type(value).__name__} {value!r}")
    return value


def _check_apart(out: Path, erased: str | Path | None) -> None:
    """An output inside the erased model it was made from would be deleted with it by the next erase into
    that folder; one that holds it would replace it."""
    if erased is None or not isinstance(erased, str | os.PathLike):  # a wrong type is the loader's to name
        return
    if overlap(out, erased):
        raise DarkMinerError(f"--out {out} and --erased {erased} overlap; write the output outside the erased "
                             "model's folder")


def overlap(one: str | Path, other: str | Path) -> bool:
    """Whether two folders are one, or one lies in the other (links resolved)."""
    a, b = Path(os.path.realpath(one)), Path(os.path.realpath(other))
    return a.is_relative_to(b) or b.is_relative_to(a)


def _check_parents(path: Path, flag: str = "--out") -> None:
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise DarkMinerError(f"{flag} {path}: {parent} is a file, not a folder")
            return


_LOCKED: set[Path] = set()  # the outputs this process holds output_lock on (resolved paths)
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def output_directory(out: str | Path, marker: str, what: str, marker_keys: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into, renamed onto ``out`` (replacing an earlier
    ``what``) when the block succeeds: a folder ``out`` holding its ``marker`` file is whole."""
    out = check_output_directory(out, marker, what, marker_keys=marker_keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    if Path(os.path.realpath(out)) in _LOCKED:  # this run holds --out: a temporary folder beside it is a dead run's
        for stale in out.parent.glob(f".{glob.escape(out.name)}.*"):
            if stale.is_dir() and re.fullmatch(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}(\.replaced)?", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    tmp = _as_if_created(Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)), 0o777)
    replaced = out.parent / f"{tmp.name}.replaced"
    try:
        yield tmp
        _finish_tree(tmp)
        # The earlier output is moved aside, not deleted, until the new one is in place: a run killed in
        # between leaves both whole (hidden beside ``out``), never half of one where ``out`` was.
        if out.exists():
            out.rename(replaced)
        tmp.rename(out)
        _fsync(out.parent)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        if replaced.exists() and not out.exists():  # stopped between the two renames: the old one goes back
            replaced.rename(out)
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Held while a run writes ``out``: a second darkminer run on the same ``out`` (which would interleave
    checkpoints and outputs with this one) is refused in one line. The lock is a hidden file beside
    ``out``, removed when the run ends; a run killed with -9 leaves it, unlocked, to be reused."""
    out = Path(os.path.realpath(_as_path(out)))  # one lock however the folder is named (a link, its target)
    if fcntl is None or out in _LOCKED:
        yield
        return
    _check_parents(out)
    lock = out.parent / f".{out.name}.lock"
    created = [parent for parent in out.parents if not parent.exists()]  # removed again if no output is made
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise DarkMinerError(f"cannot write beside --out {out} ({exc.strerror}); choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DarkMinerError(f"another darkminer run is writing {out} (it holds {lock}); wait for it to end, "
                                 "or choose another --out") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the run that held it ended and removed the file meanwhile: lock the new one
    _LOCKED.add(out)
    try:
        yield
    finally:
        _LOCKED.discard(out)
        lock.unlink(missing_ok=True)
        os.close(fd)
        for parent in created:  # innermost first: a refused or failed run leaves no new empty folders
            if out.exists() or any(parent.iterdir()):
                break
            parent.rmdir()


@contextmanager
def main_process_lock(out: str | Path | None) -> Iterator[None]:
    """``output_lock(out)``, held by the main process of a launched run (the others write nothing); when it
    is refused, every process stops with the same line, not only the main one. Nothing without an ``out``."""
    from darkminer.parallel import init_processes

    if out is None:
        yield
        return
    with ExitStack() as held:
        init_processes().on_main(lambda: held.enter_context(output_lock(out)))
        yield


def exclusive_output(parameter: str = "out") -> Callable[[F], F]:
    """Decorate a command that writes its ``parameter`` folder: ``main_process_lock`` for the whole call."""

    def wrap(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with main_process_lock(signature.bind_partial(*args, **kwargs).arguments.get(parameter)):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """``text`` as UTF-8 at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_text(path: str | Path, what: str = "file", newline: str | None = None) -> str:
    """The text of a UTF-8 file (a byte-order mark, as spreadsheet programs write, is dropped); a file in
    another encoding is refused with what to do. ``newline`` as in ``open`` ("": line endings untouched)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError:
        raise DarkMinerError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path, "JSON file"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    except (IsADirectoryError, NotADirectoryError):
        raise ModelLoadError(f"{path} is not a file where one was expected: a folder is in its place, or one of "
                             "its parents is a file") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): a run that wrote it was "
                             "cut short, or it was edited; repair it, or remove what holds it and rerun") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; any other format is refused (we never unpickle foreign files)."""
    path = _safetensors_file(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); re-create it") from None


def load_tensors_and_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and string metadata, in one open: a file replaced in between two
    opens (a checkpoint another process rewrites) could pair one version's tensors with another's."""
    path = _safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); re-create it") from None


def _safetensors_file(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: only .safetensors weight files are accepted (pickled .bin/.pt/.ckpt are refused)")
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    return path


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """A nested training state (dicts and lists of tensors and JSON values: the ``state_dict`` of a model,
    an optimiser, a scheduler) as one safetensors file, written atomically: the tensors under numbered
    keys, the structure as JSON in the metadata. ``load_state`` reads it back without unpickling."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            tensors[key := str(len(tensors))] = value.detach().clone()  # clones: no two keys share memory
            return {"tensor": key}
        if isinstance(value, dict):  # as pairs: an optimiser's state is keyed by int
            return {"dict": [[k, encode(v)] for k, v in value.items()]}
        if isinstance(value, list | tuple):
            return {"list": [encode(v) for v in value]}
        return {"value": value}  # json.dumps refuses anything that is not JSON

    save_tensors(path, tensors, metadata={"state": json.dumps(encode(state))})


def load_state(path: str | Path) -> dict[str, Any]:
    """What ``save_state`` wrote (lists come back as lists, where a tuple was saved)."""
    tensors, metadata = load_tensors_and_metadata(path)
    try:
        state = json.loads(metadata["state"]) if "state" in metadata else None
    except json.JSONDecodeError as exc:
        raise DamagedStateError(path, f"its structure is not JSON: {exc.msg}") from None
    if not isinstance(state, dict) or not state.keys() & {"tensor", "dict", "list", "value"}:
        raise ModelLoadError(f"{path} holds no saved state; it was not written by darkminer's save_state")

    def decode(node: dict[str, Any]) -> Any:
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {key: decode(value) for key, value in node["dict"]}
        if "list" in node:
            return [decode(value) for value in node["list"]]
        return node["value"]

    try:
        return decode(state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a lost tensor, a node of another shape
        raise DamagedStateError(path, repr(exc)) from None


def claim_record(path: str | Path, record: dict[str, Any]) -> list[str]:
    """Write ``record`` to ``path`` if it is new; otherwise the keys where the stored one differs
    (``changed_keys``; empty: the same run, safe to resume)."""
    path = Path(path)
    record = json.loads(json.dumps(record, default=str))  # as it reads back: tuples are lists, paths text
    if not path.is_file():
        write_json(path, record)
        return []
    return changed_keys(read_json(path), record)


def what_differs(changed: list[str]) -> str:
    """``changed`` keys in an error: "its config.steps differs", "its config.steps, target differ". Many keys
    are named by their first two parts: another --erased changes dozens of fields of inputs.erased."""
    if len(changed) > 4:
        changed = list(dict.fromkeys(".".join(key.split(".")[:2]) for key in changed))
    return f"its {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'}"


def changed_keys(stored: dict[str, Any], record: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The keys where ``stored`` differs from ``record``, followed into mappings both hold ("config.steps"); a
    key ``stored`` lacks counts as its value in ``defaults``."""
    stored = {**(defaults or {}), **stored}
    changed = []
    for key in sorted(record.keys() | stored.keys()):
        have, want = stored.get(key), record.get(key)
        if isinstance(have, dict) and isinstance(want, dict):
            changed += [f"{key}.{inner}" for inner in changed_keys(have, want)]
        elif have != want:
            changed.append(key)
    return changed


def link_tree(source: Path, destination: Path) -> None:
    """``source``'s files under ``destination``, hard-linked where the file system allows (an output made of
    a work directory's images: thousands of PNGs, not copied), else copied."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, destination, copy_function=link_or_copy, dirs_exist_ok=True)


# -------------------------------------------------------------------------- work directories (resume)
WORK_RECORD = "run.json"  # what a work directory's run is: a resume must be the same run


def work_directory(out: str | Path) -> Path:
    """Where a run into ``out`` keeps its checkpoints until its output is whole: a hidden folder beside
    ``out``, which ``resume`` continues from and the finished run removes."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def has_checkpoint(work_dir: Path) -> bool:
    """Whether a run got as far as writing something besides its claim into ``work_dir`` (a killed write's
    temporary file is not a checkpoint)."""
    return work_dir.is_dir() and any(p.name != WORK_RECORD and not is_temporary_file(p) for p in work_dir.iterdir())


def check_no_unfinished_run(work_dir: Path) -> None:
    """A run that is not resumed would start over: refuse to discard another's checkpoint unasked."""
    if has_checkpoint(work_dir):
        raise DarkMinerError(f"{work_dir} holds the checkpoint of an unfinished run into the same --out: add "
                             "--resume (resume=True in Python) to continue it, or delete that folder to start over")


def claim_work_directory(work_dir: Path, record: dict[str, Any], resume: bool) -> None:
    """Make ``work_dir`` this run's, recording what the run is. A run not resumed starts it afresh; a resumed
    one must be the run that wrote it, or its checkpoints would silently be reused for another concept,
    config or model. Only for a run that holds ``output_lock`` on the output the folder belongs to."""
    if not resume and work_dir.exists():
        check_no_unfinished_run(work_dir)
        shutil.rmtree(work_dir)  # the claim of a run that never checkpointed
    _remove_finished(work_dir)  # what a run killed while removing its own left
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work_dir)
    changed = claim_record(work_dir / WORK_RECORD, record)
    if changed:
        raise ConfigError(f"--resume: the checkpoint in {work_dir} is from another run ({what_differs(changed)}); "
                          "delete that folder to start over")


@contextmanager
def released_if_unused(work_dir: Path | None) -> Iterator[None]:
    """A run that fails inside the block before its first checkpoint removes its claim on ``work_dir``: a
    refusal from inside the work (a half-precision model for a full-weight trainer) then leaves no hidden
    folder holding only the run record. The main process removes it; ``None``: nothing claimed."""
    from darkminer.parallel import init_processes

    removes = work_dir is not None and init_processes().is_main  # asked before: a failing group may not answer
    try:
        yield
    except BaseException:
        if removes and not has_checkpoint(work_dir):
            with suppress(OSError):  # the run's own error is the one to report
                remove_work_directory(work_dir)
        raise


def remove_work_directory(work_dir: Path) -> None:
    """Delete a finished run's work directory (its output is whole). It is renamed away first, in one step:
    a run killed while its thousands of files are deleted leaves no half of it where a resume would look."""
    if work_dir.exists():
        _remove_finished(work_dir)
        work_dir.rename(_finished(work_dir))
    _remove_finished(work_dir)


def _finished(work_dir: Path) -> Path:
    return work_dir.with_name(f"{work_dir.name}.finished")


def _remove_finished(work_dir: Path) -> None:
    if _finished(work_dir).exists():
        shutil.rmtree(_finished(work_dir), ignore_errors=True)
