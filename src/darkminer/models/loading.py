"""Checks on what diffusers and transformers load, shared by the Stable Diffusion and CLIP loaders.

Both libraries fill weights missing from a checkpoint with random values and drop unexpected ones with a
log line (which the CLI silences), and a tokenizer folder without its files loads as a near-empty one.
Each of these gives a model that runs and draws garbage, so it is refused here, in one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkminer.errors import ModelLoadError, logs_silenced

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# A CLIP BPE tokenizer merges common words into one token; without its merges it spells them out.
_PROBE_WORD = "photo"
_MIN_VOCAB = 100
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_PICKLED = ("convert them once in an environment you trust (load, then save_pretrained(..., "
                   "safe_serialization=True))")


@contextmanager
def bars_hidden(*libraries: str) -> Iterator[None]:
    """Within the block the libraries ("diffusers", "transformers") draw no progress bar of their own: their
    loading bars ("Loading weights", "Loading pipeline components...") would sit among darkminer's, in the CLI
    and the Python API alike. Each library's setting is put back after."""
    modules = [importlib.import_module(f"{library}.utils.logging") for library in libraries]
    shown = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_shown in zip(modules, shown, strict=True):
            if was_shown:
                module.enable_progress_bar()


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library's error as one line, cut at a word boundary, so that what is kept still reads."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def checked_weights(loaded: tuple[Any, dict], what: str) -> Any:
    """The model from a ``from_pretrained(..., output_loading_info=True)`` call, if every weight it needs
    came from the checkpoint and every checkpoint weight found a place."""
    model, info = loaded
    for key, problem in (("missing_keys", "lacks"), ("unexpected_keys", "has weights the config does not use:")):
        names = sorted(info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelLoadError(
                f"{what} {problem} {shown}; its weights do not match its config.json (a truncated download, "
                "or weights from another architecture): fetch or convert it again"
            )
    return model


def check_tokenizer(tokenizer: Any, what: str) -> None:
    """Refuse a tokenizer that loaded without its vocabulary or merges."""
    if len(tokenizer) < _MIN_VOCAB:
        raise ModelLoadError(
            f"{what}: the tokenizer has only {len(tokenizer)} tokens, so it did not load; check that the folder "
            "(or the hub cache) holds the tokenizer's vocab.json and merges.txt"
        )
    if len(tokenizer.tokenize(_PROBE_WORD)) > 1:
        raise ModelLoadError(
            f"{what}: the tokenizer splits {_PROBE_WORD!r} into {tokenizer.tokenize(_PROBE_WORD)}, so its merges did "
            "not load; check the tokenizer's merges.txt"
        )


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of hub id ``repo_id`` in the Hugging Face cache; None if it is not there (or is
    not a hub id). Never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True)).resolve()
    except Exception:  # not a hub id, or not in the cache: either way not here
        return None


def fp16_variant_only(folder: Path) -> bool:
    """Whether a component folder holds its weights only as diffusers' fp16 variant (``*.fp16.safetensors``),
    as some hub snapshots do; such a folder loads with ``variant="fp16"``."""
    files = list(folder.glob("*.safetensors"))
    return bool(files) and all(f.name.endswith(".fp16.safetensors") for f in files)


def pipeline_class() -> type[StableDiffusionPipeline]:
    """diffusers' ``StableDiffusionPipeline``. Its import makes transformers warn that torchvision is missing
    and to install it; darkminer leaves torchvision out on purpose (an unpinned install pulls a CUDA build)
    and PIL serves the image processors, so the notice is silenced. Imported on first use: the pipeline
    module pulls in transformers' image processors, which the testbed needs only to save a LoRA."""
    with logs_silenced("transformers"):
        from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline


def only_pickled_weights(folder: Path) -> str | None:
    """The name of a pickled weight file in ``folder`` when it holds no safetensors (darkminer never unpickles a
    foreign file), else None."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return None
    return next((f.name for f in sorted(folder.iterdir()) if f.suffix in PICKLED_SUFFIXES), None)


def names_a_folder(name: str) -> bool:
    """Whether a model name is written as a path (absolute, relative with ./ or ../, or ~): a folder that
    is missing is then an error, not a hub id to look up."""
    return name.startswith(("/", ".", "~"))
