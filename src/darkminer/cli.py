"""The ``darkminer`` command: one entry point; each command lives in ``darkminer.commands``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from safetensors import SafetensorError

from darkminer.commands import COMMAND_MODULES
from darkminer.errors import DarkMinerError, DarkMinerWarning
from darkminer.registry import load_plugin


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (argparse prints its usage block first); the
    subcommands' parsers are of this class too."""

    def error(self, message: str, prog: str | None = None) -> NoReturn:
        if message.startswith("unrecognized arguments") and any(f" {o}" in message for o in GLOBAL_OPTIONS):
            message += f" ({' and '.join(GLOBAL_OPTIONS)} go before the command: darkminer --threads 1 erase ...)"
        self.exit(2, f"darkminer: error: {message} (see `{prog or self.prog} --help`)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse's, but an unknown option points at the --help of the (sub)command it was given to: the
        command words ("testbed concepts"; a subcommand is in COMMAND_command) that come before it."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            argv = list(sys.argv[1:] if args is None else args)
            command = getattr(parsed, "command", None)
            at: list[int] = []  # where the command words stand, in order
            for word in (command, getattr(parsed, f"{command}_command", None)):
                if word is None or word not in argv[at[-1] + 1 if at else 0:]:
                    break
                at.append(argv.index(word, at[-1] + 1 if at else 0))
            where = next((i for i, a in enumerate(argv) if a == extras[0] and i not in at), len(argv))
            words = [self.prog, *(argv[i] for i in at if i < where)]
            self.error(f"unrecognized arguments: {' '.join(extras)}", " ".join(words))
        return parsed


GLOBAL_OPTIONS = ("--threads", "--plugin")  # the main parser's own options, before the command


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="darkminer",
        description="Erase a concept from a text-to-image diffusion model so that no prompt brings it back.",
    )
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's, one per core; on a CPU shared with other "
                             "jobs, 1 per job avoids threads stalling each other), as OMP_NUM_THREADS")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import a module (a name on the Python path, or a .py file) that registers erasers or "
                             "attacks of your own (register_eraser, register_attack), so that --method and --attack "
                             "can name them; repeatable")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecations, optional-backend notices) hides our own one-line messages. Their loading
    bars are hidden where models load (``bars_hidden``)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    # huggingface_hub's notice about an argument diffusers still passes, printed before our "not cached" error
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    for library in ("diffusers", "transformers"):
        variable, logging = f"{library.upper()}_VERBOSITY", sys.modules.get(f"{library}.utils.logging")
        if variable in os.environ:  # the user's choice (or ours, from an earlier call), read at import
            continue
        if logging is not None:  # imported already (main called from Python): set it
            logging.set_verbosity_error()
        else:  # read at its import; importing it here would cost seconds before a bad argument is refused
            os.environ[variable] = "error"


# Arguments that name files or folders: "~" is expanded in them as a shell would, also where the shell did not
# (a quoted argument, a script's list).
PATH_ARGUMENTS = ("model", "erased", "out", "config", "prompts", "paraphrase_prompts", "preserve_prompts",
                  "fid_reference", "replay", "clip_model", "judge", "init_from", "unet_config", "work_dir",
                  "evaluations")


def expand_home(args: argparse.Namespace) -> argparse.Namespace:
    """The path arguments with ``~`` expanded; an empty one is refused ("" is the current folder to some
    checks and no file to others: --erased "" was read as an overlap with --out, --prompts "" ignored)."""
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, list) and any(isinstance(one, str) and not one.strip() for one in value):
            raise DarkMinerError(f"an empty path among the {name}: name each folder")  # a positional's paths
        if isinstance(value, str) and not value.strip():
            what = "the output" if name == "out" else "a path, or leave the option out"
            raise DarkMinerError(f"--{name.replace('_', '-')} is empty: name {what}")
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(one) if isinstance(one, str) else one for one in value])
    return args


@contextlib.contextmanager
def _reports_from_main_process_only() -> Iterator[None]:
    """Under a launcher (torchrun and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE``) only the main
    process prints what a command reports and its progress bars; N copies would bury them. Errors leave this
    block and are printed by every process."""
    try:
        other = int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("RANK") or 0) != 0
    except ValueError:  # not a launcher's values: print, and let the process group's opening say what is wrong
        other = False
    if not other:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and launchers send), raised like Ctrl-C so that cleanups run."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None, *, show_others: Callable[..., None], shown: set[str]) -> None:
    """Our own warnings as one line, as our errors are, each once a run (a prompt CSV read for the target and
    again for the evaluation warns from two places); a library's as Python shows them (it names the file)."""
    if issubclass(category, DarkMinerWarning):
        if str(message) not in shown:
            shown.add(str(message))
            print(f"darkminer: warning: {message}", file=file or sys.stderr)
    else:
        show_others(message, category, filename, lineno, file, line)


def _drop_stdout() -> None:
    """Send what stdout still holds to the null device, else Python's exit flush reports the failure again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _system_error_line(exc: OSError | SafetensorError) -> str:
    """The system's words for a failed read or write (safetensors reports a full disk as its own error)."""
    if isinstance(exc, OSError) and exc.strerror:
        files = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
        text = exc.strerror + (f": {' -> '.join(files)}" if files else "")
    else:
        text = str(exc)
    return " ".join(text.split())  # a library's message may span lines


def _how_to_go_on(args: argparse.Namespace | None) -> str:
    """What an interrupted command tells its user: how to continue from what it kept."""
    out = getattr(args, "out", None)
    if not isinstance(out, str) or not out:
        return ""
    if args.command in ("benchmark", "demo"):  # fills --out in place: a rerun goes on from the finished cells
        return f"; rerun the same command to go on from what is finished in {out}" if os.path.isdir(out) else ""
    # Never imported here: a stop while torch imports would import it again, half done (a crash). A run that
    # kept a checkpoint has imported darkminer.io whole; one stopped inside that import has nothing to resume.
    io = sys.modules.get("darkminer.io")
    try:
        if hasattr(args, "resume") and io is not None and io.has_checkpoint(work := io.work_directory(out)):
            return f"; its progress is kept in {work}: rerun the same command with --resume to go on"
    except Exception:  # a module stopped mid-import (no such function yet): the plain line
        pass
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # we never download; fail fast instead of retrying
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    show_warning = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, show_others=show_warning, shown=set())
    args = None
    try:
        parser = build_parser()
        args = expand_home(parser.parse_args(argv))
        if args.threads is not None:
            if args.threads < 1:
                parser.error(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        _quiet_libraries()
        with _reports_from_main_process_only():
            for plugin in args.plugin:  # what a plugin prints as it loads, once, not once per process
                load_plugin(os.path.expanduser(plugin))
            args.handler(args)
            sys.stdout.flush()  # a pipe's buffer is written here, where a reader gone away is caught, not at exit
    except DarkMinerError as exc:
        print(f"darkminer: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"darkminer: terminated{_how_to_go_on(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # also while the libraries import, the first seconds
        print(f"darkminer: interrupted{_how_to_go_on(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`darkminer testbed concepts | head -1`): stop quietly
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a reader gone
    except (OSError, SafetensorError) as exc:  # a full disk, a permission, a full stdout: one line, not a traceback
        print(f"darkminer: error: {_system_error_line(exc)}", file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:  # stdout itself failed
            _drop_stdout()
        return 1
    except Exception:  # a bug, ours or a plugin's: its traceback to report or fix, then what the run kept
        if os.environ.get("DARKMINER_DEBUG", "0") != "0":  # for a debugger's post-mortem
            raise
        traceback.print_exc()
        print(f"darkminer: error: the run failed with the error above{_how_to_go_on(args)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show_warning
        if in_main_thread and previous is not None:  # None: a handler installed outside Python, kept
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
