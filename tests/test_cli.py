"""The command line: help, generate, and one clear error line with a non-zero exit on bad input."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from darkminer.cli import main
from darkminer.config import load_config_file
from darkminer.errors import ConfigError, DarkMinerError, DarkMinerWarning
from darkminer.io import load_state, save_state, work_directory
from darkminer.models import adapters
from darkminer.prompts import read_prompt_csv


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("darkminer: error: ")
    return err[0]


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["erase", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: darkminer" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--prompt", "a cat", "--seed", "abc", "--out", "x.png"], "argument --seed: invalid int value: 'abc' "
                                                                            "(see `darkminer generate --help`)"),
    (["erase", "--method", "uce"], "the following arguments are required: --concept, --out"),
    (["testbed", "check"], "required: --out (see `darkminer testbed check --help`)"),
    # a bare retrain once wrote into the package, over the shipped weights every command loads
    (["testbed", "train", "--only", "judge"], "required: --out (see `darkminer testbed train --help`)"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["--threads", "0", "testbed", "concepts"], "--threads must be >= 1, got 0"),
    (["testbed", "concepts", "--plugin", "m.py"], "unrecognized arguments: --plugin m.py (--threads and --plugin go "
                                                  "before the command: darkminer --threads 1 erase ...)"),
    (["testbed", "concepts", "--bogus"], "unrecognized arguments: --bogus (see `darkminer testbed concepts --help`)"),
    (["testbed", "--bogus", "concepts"], "unrecognized arguments: --bogus (see `darkminer testbed --help`)"),
    (["--bogus", "testbed", "concepts"], "unrecognized arguments: --bogus (see `darkminer --help`)"),
    (["testbed", "concepts", "testbed"], "unrecognized arguments: testbed (see `darkminer testbed concepts --help`)"),
    (["testbed", "concepts", "concepts"], "unrecognized arguments: concepts (see `darkminer testbed concepts --help`)"),
    # the command's own help, where its options are (attack's prompts are --n-prompts)
    (["attack", "--attack", "plain", "-n", "2", "--out", "a"], "unrecognized arguments: -n 2 (see `darkminer attack --help`)"),
])
def test_usage_errors_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in _error_line(capsys)


def test_a_reader_gone_away_stops_the_command_quietly():
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # as `darkminer testbed concepts | head -1` once head has exited
    code = "import sys; from darkminer.cli import main; sys.exit(main(['testbed', 'concepts']))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's usual, buffered stdout
    done = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                          env=env)
    os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "Broken pipe" not in done.stderr


@pytest.mark.parametrize("asked", [None, "info"])
def test_the_command_quiets_the_libraries_without_importing_them_first(asked):
    """Importing diffusers and transformers only to quiet them made every refused argument wait seconds; their
    logs are quieted through the variables they read at import, unless the user asked for a verbosity."""
    import subprocess
    import sys

    code = ("import sys; from darkminer import cli; cli._quiet_libraries(); "
            "assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules; "
            "from diffusers.utils import logging as d; from transformers.utils import logging as t; "
            "print(d.get_verbosity(), t.get_verbosity())")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    if asked:
        env["TRANSFORMERS_VERBOSITY"] = asked
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["40", "20" if asked else "40"]  # logging.ERROR, logging.INFO


def test_the_command_keeps_a_verbosity_the_user_set_when_the_libraries_are_imported(monkeypatch):
    from transformers.utils import logging as transformers_logging

    from darkminer import cli

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    saved = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_info()
    try:
        cli._quiet_libraries()
        assert transformers_logging.get_verbosity() == transformers_logging.INFO  # the user's, kept
    finally:
        transformers_logging.set_verbosity(saved)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("buffered", [True, False])
def test_a_full_stdout_is_one_line_not_a_traceback(buffered):
    import subprocess
    import sys

    code = "import sys; from darkminer.cli import main; sys.exit(main(['testbed', 'concepts']))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", code], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120, env=env)
    assert done.returncode == 1
    assert done.stderr == "darkminer: error: No space left on device\n"  # no traceback, no exit-time report


def test_threads_sets_torchs_cpu_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "testbed", "concepts"]) == 0
        assert torch.get_num_threads() == 1 and "blood inappropriate" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_under_a_launcher_only_the_main_process_reports_and_every_process_its_errors(tmp_path, capsys, monkeypatch):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\na cat\na dog\n")
    monkeypatch.setenv("RANK", "1")  # alone, not a launch: it reports
    assert main(["prompts", "info", str(csv)]) == 0 and "2 rows" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them for the second process
    assert main(["prompts", "info", str(csv)]) == 0 and capsys.readouterr() == ("", "")
    assert main(["prompts", "info", str(tmp_path / "missing.csv")]) == 2
    assert _error_line(capsys).startswith("darkminer: error:")
    monkeypatch.setenv("RANK", "0")
    assert main(["prompts", "info", str(csv)]) == 0 and "2 rows" in capsys.readouterr().out


def test_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", "tiny-random-sd", "--prompt", "a cat", "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image

    image = Image.open(out)
    assert image.size[0] > 2 * 32  # two tiles side by side, enlarged
    assert "wrote" in capsys.readouterr().out
    # The grid is the model's images at seeds 0 and 1, tile for tile.
    from darkminer.imaging import make_grid
    from darkminer.models import load_model

    model = load_model("tiny-random-sd")
    expected = model.sample(model.encode(["a cat"]).expand(2, -1, -1), seeds=[0, 1], steps=2)
    import darkminer

    torch.testing.assert_close(darkminer.generate("a cat", model="tiny-random-sd", n=2, steps=2), expected, atol=0, rtol=0)
    assert not torch.equal(expected[0], expected[1])
    assert np.array_equal(np.asarray(image), np.asarray(make_grid(expected, scale=256 // expected.shape[-1])))


def test_speed_flags_name_only_what_they_change():
    from darkminer.commands.common import add_model_args, speed_options

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert speed_options(parser.parse_args([])) is None  # the model's own defaults
    assert speed_options(parser.parse_args(["--attention", "sdpa", "--no-channels-last"])) == {"attention": "sdpa", "channels_last": False}
    assert speed_options(parser.parse_args(["--gradient-checkpointing", "--channels-last"])) == {"channels_last": True, "gradient_checkpointing": True}
    assert speed_options(parser.parse_args(["--compile", "reduce-overhead"])) == {"compile": "reduce-overhead"}
    with pytest.raises(ConfigError, match="attention"):
        speed_options(parser.parse_args(["--attention", "xformers"]))


def test_speed_flags_reach_the_model(tmp_path, monkeypatch):
    import darkminer.api
    import darkminer.models
    from darkminer.parallel.speed import attention_processors, autocast_dtype

    loaded, real = [], darkminer.models.load_model
    for module in (darkminer.models, darkminer.api):  # the API's own reference too: generate loads through it
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    argv = ["generate", "--model", "tiny-random-sd", "--prompt", "a cat", "-n", "2", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "a.png"), "--precision", "bf16", "--attention", "classic",
                 "--gradient-checkpointing", "--channels-last"]) == 0
    model = loaded[-1]
    assert autocast_dtype(model) == torch.bfloat16 and attention_processors(model) == {"AttnProcessor"}
    assert model.unet.is_gradient_checkpointing
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert main([*argv, "--out", str(tmp_path / "b.png")]) == 0  # no flags: the plain model
    assert autocast_dtype(loaded[-1]) is None and attention_processors(loaded[-1]) == {"AttnProcessor2_0"}

    # erase records the options in the erased model's info (and in its run claim, so a resume cannot mix them).
    out = tmp_path / "uce"
    assert main(["erase", "--method", "uce", "--concept", "nudity", "--model", "tiny-random-sd", "--precision", "bf16",
                 "--out", str(out)]) == 0
    assert json.loads((out / "darkminer.json").read_text())["extra"]["speed"]["precision"] == "bf16"


def test_generate_draws_at_guidance_0_only_when_asked(tmp_path):
    command = ["generate", "--model", "tiny-random-sd", "--prompt", "a cat", "-n", "1", "--steps", "1", "--guidance", "0",
               "--out", str(tmp_path / "x.png")]
    assert main(command) == 2 and not (tmp_path / "x.png").exists()
    assert main([*command, "--allow-empty"]) == 0 and (tmp_path / "x.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-random-sd", "--precision", "fp8"], "precision must be one of"),
        (["--model", "tiny-random-sd", "--compile", "fast"], "compile must be one of"),
        (["--model", "/no/such/folder"], "does not exist"),
        (["--model", "someone/not-cached-model"], "the Hugging Face cache first (`hf download someone/not-cached-model`)"),
        (["--model", "tiny-random-sd", "--prompt", " "], "the prompt is empty"),
        (["--model", "tiny-random-sd", "-n", "0"], "n (-n) must be >= 1"),
        (["--model", "tiny-random-sd", "--erased", "/no/such/erased"], "does not exist"),
        (["--model", "tiny-random-sd", "--erased", "/proc"], "/proc is not an erased model (it has no darkminer.json)"),
        (["--model", "tiny-random-sd", "--device", "foo"], "unknown device 'foo'"),
        (["--model", "tiny-random-sd", "--device", "cuda:63"], "not available here"),
        (["--model", "tiny-random-sd", "--steps", "-3"], "(--steps) must be 1 .. 1000 (DDIM takes a subset of the model's 1000 training timesteps), got -3"),
        (["--model", "tiny-random-sd", "--steps", "0"], "(--steps) must be 1 .. 1000 (DDIM takes a subset of the model's 1000 training timesteps), got 0"),
        (["--model", "tiny-random-sd", "--guidance", "nan"], "guidance_scale (--guidance) must be a finite number or null, got nan"),
        (["--model", "tiny-random-sd", "--guidance", "0"], "at 0 the images ignore the prompt"),
    ],
)
def test_generate_bad_input_fails_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = {"--prompt": "a cat", "--out": str(out)}
    for key, value in zip(argv[::2], argv[1::2], strict=True):
        base[key] = value
    args = ["generate", *[item for pair in base.items() for item in pair]]
    assert main(args) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_folder_without_model_index_and_pickled_weights_are_refused(tiny_sd_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "no model_index.json" in _error_line(capsys)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({"x": torch.zeros(1)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert main(["generate", "--model", str(pickled), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "safetensors only" in _error_line(capsys)
    # The same UNet folder as another tool's erased model: said as such, not "not an erased model"
    generate = ["generate", "--model", str(tiny_sd_dir), "--prompt", "a", "--out", str(tmp_path / "x.png"), "--erased"]
    assert main([*generate, str(pickled / "unet")]) == 2
    line = _error_line(capsys)
    assert "another tool's diffusers UNet folder it holds only pickled weights (diffusion_pytorch_model.bin)" in line
    assert "safetensors only" in line
    (pickled / "unet" / "diffusion_pytorch_model.bin").unlink()
    assert main([*generate, str(pickled / "unet")]) == 2
    assert "it holds no diffusion_pytorch_model.safetensors" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([*generate, str(tmp_path / "empty")]) == 2  # neither: what each kind of folder holds
    assert "give a folder `darkminer erase` wrote, or another tool's diffusers UNet folder" in _error_line(capsys)


def test_corrupt_erased_directory_is_refused(tmp_path, capsys):
    erased = tmp_path / "erased"
    erased.mkdir()
    (erased / "darkminer.json").write_text("{not json")
    assert main(["generate", "--model", "tiny-random-sd", "--erased", str(erased), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "not valid JSON" in _error_line(capsys)

    (erased / "darkminer.json").write_text(json.dumps({"method": "esd-x", "concept": "c", "base_model": "tiny-random-sd", "kind": "lora"}))
    (erased / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    assert main(["generate", "--model", "tiny-random-sd", "--erased", str(erased), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    _error_line(capsys)


def test_unknown_method_is_one_line(capsys, tmp_path):
    assert main(["erase", "--method", "nope", "--concept", "x", "--model", "tiny-random-sd", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_configs_are_validated_at_the_boundary(tmp_path):
    with pytest.raises(ConfigError, match="rank must be > 0"):
        adapters.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="unknown option"):
        adapters.LoraConfig.from_dict({"rnak": 4})
    from darkminer.erasers.darkminer import DarkMinerConfig

    for wrong, message in [({"lora": 5}, "lora must be a mapping of LoraConfig options"),
                           ({"tau": "high"}, "tau must be a finite number"), ({"tau": "nan"}, "tau must be a finite number"),
                           ({"circumvent_lr": float("inf")}, "circumvent_lr must be a finite number"),
                           ({"rounds": 2.5}, "rounds must be a whole number"), ({"rounds": "8"}, "rounds must be a whole number"),
                           ({"verify": "yes"}, "verify must be true or false"), ({"guidance_scale": [1]}, "a finite number or null")]:
        with pytest.raises(ConfigError, match=message):  # caught before any work, not deep in the loop
            DarkMinerConfig.from_dict(wrong)
        with pytest.raises(ConfigError, match=message):  # built directly, or changed, the same checks
            DarkMinerConfig(**wrong)
        with pytest.raises(ConfigError, match=message):
            DarkMinerConfig().replace(**wrong)
    with pytest.raises(ConfigError, match="must be a mapping of option: value, got list"):
        DarkMinerConfig.from_dict([1, 2])
    from pathlib import Path

    import numpy as np

    built = DarkMinerConfig(rounds=np.int64(3), tau=torch.tensor(0.5), image_encoder=Path("/clip"))  # in code
    assert (built.rounds, built.tau, built.image_encoder) == (3, 0.5, "/clip") and type(built.rounds) is int
    with pytest.raises(ConfigError, match="rounds must be a whole number"):
        DarkMinerConfig(rounds=np.float32(2.5))
    read = DarkMinerConfig.from_dict({"mining_lr": "1e-3", "lora": {"rank": 2}, "guidance_scale": None})
    assert read.mining_lr == 1e-3 and read.lora.rank == 2  # YAML reads 1e-3 as text; it is the number
    bad = tmp_path / "c.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(bad)
    for name, text in [("broken.yaml", "methods: [darkminer\nconcepts: [blood]\n"), ("broken.json", '{"a": 1,}')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=r"line \d+ column \d+") as error:
            load_config_file(tmp_path / name)
        assert "\n" not in str(error.value)


def test_our_warnings_are_one_line_and_python_shows_them_as_before_after_main(tmp_path, capsys):
    show_warning = warnings.showwarning
    long = "an icon of a red star " * 5  # 30 words: more than the testbed's 24 tokens
    assert main(["--threads", "1", "generate", "--prompt", long, "-n", "1", "--steps", "1",
                 "--out", str(tmp_path / "star.png")]) == 0
    err = capsys.readouterr().err
    assert "darkminer: warning: a prompt is longer than the text encoder's 24 tokens" in err
    assert "UserWarning" not in err and warnings.showwarning is show_warning


def test_our_warning_is_said_once_a_run_wherever_it_comes_from(monkeypatch, capsys):
    # e.g. a prompt CSV with an empty row, read for the target and again for the evaluation's prompts
    def handler(args):
        for _ in range(2):
            warnings.warn("p.csv: skipped 1 row(s) with an empty prompt", DarkMinerWarning, stacklevel=1)
        warnings.warn("p.csv: skipped 1 row(s) with an empty prompt", DarkMinerWarning, stacklevel=1)
        warnings.warn("another warning", DarkMinerWarning, stacklevel=1)

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=handler, threads=None, plugin=[])
    monkeypatch.setattr("darkminer.cli.build_parser", lambda: parser)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # Python's own filter would hide a repeat from the same line
        assert main([]) == 0
    err = capsys.readouterr().err
    assert err.count("darkminer: warning: p.csv: skipped 1 row(s)") == 1 and "darkminer: warning: another warning" in err


def test_a_warning_raised_through_torchs_no_grad_is_ours_too(tmp_path, capsys):
    # SLD's warning comes from inside a no_grad-decorated sampler, so Python attributes it to torch's file
    assert main(["--threads", "1", "erase", "--method", "sld", "--concept", "blood", "--out", str(tmp_path / "sld")]) == 0
    assert main(["--threads", "1", "generate", "--erased", str(tmp_path / "sld"), "--prompt", "a red star", "-n", "1",
                 "--steps", "2", "--out", str(tmp_path / "star.png")]) == 0
    err = capsys.readouterr().err
    assert "darkminer: warning: SLD steers only under classifier-free guidance" in err
    assert "UserWarning" not in err and "_contextlib" not in err


def test_every_warning_darkminer_raises_is_a_darkminer_warning():
    """The CLI prints a warning as ours by its category: one raised without it would show as a library's."""
    import ast

    import darkminer

    calls = []
    for path in Path(darkminer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                category = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "category"), None)
                calls.append((path.name, node.lineno, category is not None and ast.unparse(category)))
    assert len(calls) >= 5 and all(category == "DarkMinerWarning" for *_, category in calls), calls


def test_a_system_error_is_one_line_with_its_files_and_exit_1(monkeypatch, capsys):
    import errno

    from safetensors import SafetensorError

    import darkminer.commands.testbed as testbed_command

    for error, line in (
        (PermissionError(errno.EACCES, "Permission denied", "/x/a.json", None, "/x/b.json"),
         "darkminer: error: Permission denied: /x/a.json -> /x/b.json"),
        (SafetensorError("Error while serializing: I/O error:\n No space left on device (os error 28)"),
         "darkminer: error: Error while serializing: I/O error: No space left on device (os error 28)"),
    ):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(testbed_command, "_concepts", fail)
        assert main(["testbed", "concepts"]) == 1
        assert capsys.readouterr().err == line + "\n"


def test_a_world_size_that_is_no_number_is_one_line(monkeypatch):
    from darkminer.parallel import distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    for value in ("two", " "):
        monkeypatch.setenv("WORLD_SIZE", value)
        with pytest.raises(DarkMinerError, match="is not a number of processes; unset it"):
            distributed.init_processes()


def test_prompt_csv_reading(tmp_path):
    good = tmp_path / "p.csv"
    good.write_text("prompt,evaluation_seed,evaluation_guidance\na cat,42,7.5\n,1,1\na dog,,\na cow,3,7\n")
    with pytest.warns(DarkMinerWarning, match="skipped 1 row"):
        rows = read_prompt_csv(good, default_seed=100)
    assert [(r.text, r.seed, r.guidance) for r in rows] == [("a cat", 42, 7.5), ("a dog", 102, None), ("a cow", 3, 7.0)]
    assert isinstance(rows[2].guidance, float)
    # Seeds as pandas writes them, and above 2**53 (where a float would round): exact.
    seeds = tmp_path / "s.csv"
    seeds.write_text("prompt,evaluation_seed\na,42.0\nb,18446744073709551615\nc,4202650276\n")
    assert [r.seed for r in read_prompt_csv(seeds)] == [42, 2**64 - 1, 4202650276]
    for cell, message in (("seed 4.9", "not a whole number"), ("seed 1e20", r"outside 0 \.\. 2\*\*64"),
                          ("seed 18446744073709551616", "outside"),
                          ("seed -1", "outside"), ("guidance nan", "guidance 'nan' is not a number"),
                          # Python reads "7_5" as 75; the filters (prompts filter) read no number there, nor do we
                          ("guidance 7_5", "guidance '7_5' is not a number"), ("seed 1_000", "seed '1_000' is not a number"),
                          ("guidance " + "9" * 400, "is not a finite number"),
                          ("guidance inf", "not a finite number"), ("guidance 0", "'0' is not above 0"),
                          ("guidance -3", "'-3' is not above 0"), ("seed x", "seed 'x' is not a number"),
                          ("guidance high", "guidance 'high' is not a number")):
        column, value = cell.split()
        bad = tmp_path / "bad.csv"
        bad.write_text(f"prompt,evaluation_{column}\na cat,{value}\n")
        with pytest.raises(DarkMinerError, match=f"row 2: .*{message}.*correct that cell"):
            read_prompt_csv(bad)
    unclosed = tmp_path / "q.csv"
    unclosed.write_text('prompt\n"a cat\na dog\n')  # it read as one prompt holding every row after it
    with pytest.raises(DarkMinerError, match="not readable as CSV \\(unexpected end of data\\)"):
        read_prompt_csv(unclosed)
    wrong = tmp_path / "w.csv"
    wrong.write_text("text\na cat\n")
    with pytest.raises(DarkMinerError, match="no `prompt` column"):
        read_prompt_csv(wrong)
    empty = tmp_path / "e.csv"
    empty.write_text("prompt\n")
    with pytest.raises(DarkMinerError, match="holds no prompts"):
        read_prompt_csv(empty)
    empty.write_text("")
    with pytest.raises(DarkMinerError, match="is empty; a prompt CSV starts with a header row"):
        read_prompt_csv(empty)


def test_prompt_and_config_files_must_be_utf8_and_may_start_with_a_byte_order_mark(tmp_path, capsys):
    excel = tmp_path / "excel.csv"
    excel.write_bytes("prompt,evaluation_seed\na café,3\n".encode("utf-8-sig"))  # what a spreadsheet saves
    assert [(r.text, r.seed) for r in read_prompt_csv(excel)] == [("a café", 3)]
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("prompt\na cat\n".encode("utf-16"))
    with pytest.raises(DarkMinerError, match="prompt file .* is not UTF-8 text; save it as UTF-8"):
        read_prompt_csv(utf16)
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    assert main(["erase", "--method", "darkminer", "--concept", "nudity", "--model", "tiny-random-sd", "--config",
                 str(binary), "--out", str(tmp_path / "o")]) == 2
    assert "config file" in _error_line(capsys)


def test_outputs_replace_only_their_own_kind_and_refuse_anything_else_before_working(tmp_path, capsys, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na photo of nudity\n")
    commands = [
        ["erase", "--method", "sld", "--concept", "nudity", "--model", "tiny-random-sd"],
        ["attack", "--attack", "plain", "--concept", "nudity", "--model", "tiny-random-sd", "--prompts", str(prompts)],
        ["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "-n", "2"],
        ["benchmark", "--config", "quick"],
    ]
    for command in commands:
        for out, message in ((precious, "exists and is not a"), (a_file, "exists and is not a"),
                             (a_file / "sub", "is a file, not a folder")):
            assert main([*command, "--out", str(out)]) == 2, command
            assert message in _error_line(capsys)
    # Another tool's folder that holds a file of a marker's name: a training run's metrics.json, a model's
    # config.json, another program's attack.json (a folder was overwritten or deleted for this).
    for marker, command in (("attack.json", commands[1]), ("metrics.json", commands[2]), ("config.json", commands[3])):
        theirs = tmp_path / f"theirs-{marker}"
        theirs.mkdir()
        (theirs / marker).write_text('{"loss": 0.1, "_class_name": "UNet2DConditionModel"}')
        (theirs / "model.ckpt").write_text("precious")
        assert main([*command, "--out", str(theirs)]) == 2, marker
        assert "exists and is not a" in _error_line(capsys)
        assert sorted(p.name for p in theirs.iterdir()) == [marker, "model.ckpt"]
    # A refused run leaves no folders it made for its --out; "link/../x" is x beside the link's target, where
    # the writes go, for the checks and the lock too (the lock was taken on one path and the output checked on another).
    assert main(["evaluate", "--concept", "nosuch", "--out", str(tmp_path / "new" / "deep" / "o")]) == 2
    assert "unknown testbed concept" in _error_line(capsys) and not (tmp_path / "new").exists()
    (tmp_path / "target" / "sub").mkdir(parents=True)
    (tmp_path / "pointer").symlink_to(tmp_path / "target" / "sub", target_is_directory=True)
    from darkminer.io import check_output_directory
    assert check_output_directory(tmp_path / "pointer" / ".." / "x", "metrics.json", "an evaluation output") == \
        tmp_path.resolve() / "target" / "x"
    assert main(["generate", "--prompt", "a cat", "--model", "tiny-random-sd", "--out", str(a_file / "x.png")]) == 2
    assert "is a file, not a folder" in _error_line(capsys)
    assert main(["testbed", "check", "-n", "1", "--out", str(precious)]) == 2
    assert "is a folder; name a file" in _error_line(capsys)
    # The output is renamed onto --out when complete: not through a link, nor onto the folder we stand in.
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    assert main([*commands[0], "--out", str(tmp_path / "link")]) == 2
    assert "is a link; give the folder itself" in _error_line(capsys)
    monkeypatch.chdir(tmp_path / "empty")
    assert main([*commands[0], "--out", "."]) == 2
    assert "holds the current folder" in _error_line(capsys)
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing half-written
    assert (precious / "thesis.txt").read_text() == "important" and a_file.read_text() == "x"

    # An earlier output of the same kind is replaced; a --resume with nothing to resume says so.
    erased = tmp_path / "erased"
    for _ in range(2):
        assert main([*commands[0], "--resume", "--out", str(erased)]) == 0
        assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert (erased / "darkminer.json").is_file() and (erased / "guidance.json").is_file()
    # Nor inside an earlier output of its kind, which a rerun into that folder would delete with it.
    assert main([*commands[0], "--out", str(erased / "deeper" / "inner")]) == 2
    assert "lies inside" in _error_line(capsys) and not (erased / "deeper" / "inner").exists()
    # Outputs are as readable as any file the user makes (tempfile alone would make them owner-only).
    old_mask = os.umask(0o022)
    try:
        assert main([*commands[0], "--out", str(erased)]) == 0
        assert main(["generate", "--prompt", "a cat", "--model", "tiny-random-sd", "--steps", "1",
                     "--out", str(tmp_path / "g.png")]) == 0
        # Weight files too, which safetensors and diffusers' save_pretrained create owner-only.
        assert main(["erase", "--method", "uce", "--concept", "nudity", "--model", "tiny-random-sd",
                     "--out", str(tmp_path / "uce")]) == 0
        assert main(["export", "--erased", str(tmp_path / "uce"), "--out", str(tmp_path / "pipe")]) == 0
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(erased.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in [*erased.iterdir(), tmp_path / "g.png"]} == {0o644}
    written = [p for p in [*(tmp_path / "uce").rglob("*"), *(tmp_path / "pipe").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written) and len(written) > 10
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}
    folders = [tmp_path / "pipe", *(p for p in (tmp_path / "pipe").rglob("*") if p.is_dir())]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o755}


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from darkminer.io import atomic_path

    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("the run stopped")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads which file a descriptor is from /proc")
def test_outputs_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    # Power lost after a rename of unsynced data can leave an empty file where the old whole one was.
    from darkminer import io

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, Path.rename
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                    real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append(("rename", str(a))), real_replace(a, b))[1])
    monkeypatch.setattr(Path, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    io.write_text(tmp_path / "a.txt", "x")
    [(_, temporary)] = [e for e in events if e[0] == "rename"]
    assert events == [("sync", temporary), ("rename", temporary), ("sync", str(tmp_path))]
    events.clear()
    with io.output_directory(tmp_path / "out", "marker.json", "output") as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"w")  # as a library writes it: not synced
        (folder / "marker.json").write_text("{}")
    renamed = events.index(("rename", str(folder)))
    synced = {path for kind, path in events[:renamed] if kind == "sync"}
    assert {str(folder / "sub" / "weights.bin"), str(folder / "marker.json"), str(folder / "sub"), str(folder)} <= synced
    assert events[renamed + 1:] == [("sync", str(tmp_path))] and (tmp_path / "out" / "sub" / "weights.bin").is_file()


def test_stale_temporaries_of_killed_writes_are_swept_but_nothing_else(tmp_path):
    from darkminer.io import atomic_path, is_temporary_file, remove_stale_temporaries

    stale = [tmp_path / ".checkpoint.safetensors.k3x_9q2a.tmp", tmp_path / "cells" / "a" / ".metrics.json.0abc_def.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".x.tmp", tmp_path / ".metrics.json.short.tmp",
            tmp_path / ".metrics.json.ABCDEFGH.tmp", tmp_path / "metrics.json"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / ".folder.k3x_9q2a.tmp").mkdir()  # a folder is never an atomic write's temporary
    with atomic_path(tmp_path / "results.json") as tmp:  # the name atomic_path really gives
        assert is_temporary_file(tmp)
        tmp.unlink()
        assert remove_stale_temporaries(tmp_path) == 2
        tmp.write_text("{}")
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert (tmp_path / ".folder.k3x_9q2a.tmp").is_dir() and (tmp_path / "results.json").read_text() == "{}"


def test_erase_says_which_earlier_erasure_it_replaced(tmp_path, capsys):
    out = tmp_path / "erased"
    command = ["erase", "--concept", "nudity", "--model", "tiny-random-sd", "--out", str(out), "--method"]
    assert main([*command, "sld"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote erased model {out}"
    assert main([*command, "uce"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote erased model {out}, replacing the one that was there (sld on nudity)"
    stack = ["erase", "--model", "tiny-random-sd", "--out", str(tmp_path / "stack"), "--method", "uce", "--concept"]
    assert main([*stack, "violence", "--erased", str(out)]) == 0  # violence over the nudity erasure in out
    capsys.readouterr()
    assert main([*stack, "blood"]) == 0
    assert capsys.readouterr().out.strip().endswith("replacing the one that was there (uce on violence, over uce on nudity)")
    (out / "darkminer.json").write_text('{"method": 3, "concept": "nudity", "base_model": "tiny-random-sd", "kind": "unet"}')
    assert main([*command, "sld"]) == 0
    assert "(an erased model whose record could not be read)" in capsys.readouterr().out
    (out / "darkminer.json").write_text("[]")  # no erased model's record: maybe the user's file, never replaced
    assert main([*command, "sld"]) == 2 and "exists and is not an erased model" in _error_line(capsys)


def test_an_output_being_replaced_is_whole_at_every_moment(tmp_path, monkeypatch):
    """A run killed while the earlier output is removed leaves the new output whole where --out was."""
    from darkminer import io

    out = tmp_path / "erased"
    command = ["erase", "--method", "sld", "--concept", "nudity", "--model", "tiny-random-sd", "--out", str(out)]
    assert main(command) == 0
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # removes one file of the folder, then the run is killed
        (Path(path) / "darkminer.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(io.shutil, "rmtree", killed_midway)
    assert main([*command[:4], "violence", *command[5:]]) == 130  # "darkminer: interrupted"
    monkeypatch.setattr(io.shutil, "rmtree", real_rmtree)
    assert json.loads((out / "darkminer.json").read_text())["concept"] == "violence"
    assert (out / "guidance.json").is_file()

    real_rename, stops = Path.rename, []

    def stopped_between_the_renames(self, target):  # the old output is aside, the new one not yet in
        if Path(target) == out and not stops:
            stops.append(self)
            raise KeyboardInterrupt
        return real_rename(self, target)

    before = sorted(p.name for p in tmp_path.iterdir())  # the first kill left its half-deleted old output
    monkeypatch.setattr(Path, "rename", stopped_between_the_renames)
    assert main([*command[:4], "fire", *command[5:]]) == 130
    monkeypatch.setattr(Path, "rename", real_rename)
    assert stops and json.loads((out / "darkminer.json").read_text())["concept"] == "violence"  # put back
    # nothing left beside it: the run, holding the lock, swept what the first kill had set aside (the old
    # output, and the work folder whose removal the patched rmtree also cut short)
    assert {n for n in before if n != "erased"} and {p.name for p in tmp_path.iterdir()} == {"erased"}


@pytest.mark.parametrize("stop, rc, line", [("sigterm", 143, "darkminer: terminated"),
                                             ("ctrl-c", 130, "darkminer: interrupted")])
def test_a_run_stopped_while_the_libraries_import_says_so_in_one_line(stop, rc, line, monkeypatch, capsys):
    import signal

    from darkminer import cli

    def stopped() -> None:
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_quiet_libraries", stopped)
    assert main(["generate", "--prompt", "a", "--model", "tiny-random-sd", "--out", "x.png"]) == rc
    assert capsys.readouterr().err == line + "\n"
    assert signal.getsignal(signal.SIGTERM) == previous  # the caller's handler is back


def test_the_interrupt_line_never_imports_what_the_interrupt_may_have_cut_short(tmp_path, monkeypatch):
    """Stopped while torch imports, a second import of it (through darkminer.io) crashed the interpreter."""
    import sys
    import types

    from darkminer import cli

    out = tmp_path / "e"
    (tmp_path / ".e.work").mkdir()
    (tmp_path / ".e.work" / "sets").mkdir()  # a checkpoint of a run before this one
    args = argparse.Namespace(command="evaluate", out=str(out), resume=False)
    monkeypatch.delitem(sys.modules, "darkminer.io")
    assert cli._how_to_go_on(args) == "" and "darkminer.io" not in sys.modules
    monkeypatch.setitem(sys.modules, "darkminer.io", types.ModuleType("darkminer.io"))  # stopped inside its import
    assert cli._how_to_go_on(args) == ""


def test_an_interrupted_benchmark_says_a_rerun_goes_on(tmp_path, monkeypatch, capsys):
    from darkminer import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_quiet_libraries", interrupted)
    command = ["benchmark", "--config", "c.yaml", "--out", str(tmp_path / "b")]
    assert main(command) == 130 and capsys.readouterr().err == "darkminer: interrupted\n"  # nothing written yet
    (tmp_path / "b").mkdir()
    assert main(command) == 130
    assert capsys.readouterr().err == f"darkminer: interrupted; rerun the same command to go on from what is finished in {tmp_path / 'b'}\n"


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, capsys):
    import fcntl

    out = tmp_path / "erased"
    command = ["erase", "--method", "sld", "--concept", "nudity", "--model", "tiny-random-sd", "--out", str(out)]
    with open(tmp_path / ".erased.lock", "w") as other_run:  # what a running erase into --out holds
        fcntl.flock(other_run, fcntl.LOCK_EX)
        assert main(command) == 2
        assert "another darkminer run is writing" in _error_line(capsys)
        for other in (["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "-n", "1", "--preservation", ""],
                      ["attack", "--attack", "plain", "--concept", "nudity", "--model", "tiny-random-sd"]):
            assert main([*other, "--out", str(out)]) == 2
            assert "another darkminer run is writing" in _error_line(capsys)
        # the pieces the API offers hold it too (run_attack, which the attack command calls inside its own)
        from darkminer import AttackPrompt, build_attack, load_model, resolve_target, run_attack

        model = load_model("tiny-random-sd")
        with pytest.raises(DarkMinerError, match="another darkminer run is writing"):
            run_attack(build_attack("plain"), model, resolve_target(model, "nudity"), [AttackPrompt("a", 0)],
                       lambda images: images, out=out)
    for stale in (".erased.k3x_9q2a", ".erased.k3x_9q2a.replaced"):  # what killed runs leave beside --out
        (tmp_path / stale / "unet").mkdir(parents=True)
    assert main(command) == 0  # the other run ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erased"]  # its lock went with it, and the stale folders


def test_a_killed_write_alone_is_no_unfinished_erase(tmp_path):
    work = tmp_path / ".erased.work"  # a run killed while writing its first checkpoint
    work.mkdir()
    (work / ".checkpoint.safetensors.k3x_9q2a.tmp").write_bytes(b"half")
    assert main(["erase", "--method", "sld", "--concept", "nudity", "--model", "tiny-random-sd",
                 "--out", str(tmp_path / "erased")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erased"]
    (work / "artifacts").mkdir(parents=True)  # anything else is a checkpoint, never discarded unasked
    assert main(["erase", "--method", "sld", "--concept", "nudity", "--model", "tiny-random-sd",
                 "--out", str(tmp_path / "erased")]) == 2


def test_erased_is_explained_for_what_each_command_does_with_it(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    assert "to erase on top of (several concepts" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "an erased-model directory written by `darkminer erase`" in " ".join(capsys.readouterr().out.split())


def test_attack_takes_the_graders_options_as_evaluate_does(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed\na painting of a dog,3\n")
    command = ["attack", "--attack", "plain", "--concept", "dog", "--model", "tiny-random-sd", "--prompts", str(prompts),
               "--n-prompts", "1"]
    assert main([*command, "--threshold", "7", "--out", str(tmp_path / "a")]) == 2
    assert "(--threshold) must be in (0, 1]" in _error_line(capsys)
    # A CLIP of the user's choosing grades (before, only a cached openai/clip-vit-large-patch14 could).
    assert main([*command, "--detector", "clip", "--clip-model", "tiny-random-clip", "--out", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "attack.json").read_text())
    assert saved["results"][0]["prompt"] == "a painting of a dog"
    assert saved["detector"]["name"] == "clip-zero-shot" and "tiny-random-clip" in json.dumps(saved["detector"])


def test_more_bad_inputs_say_what_to_do(tmp_path, capsys):
    image = tmp_path / "g.png"
    image.write_bytes(b"x")
    assert main(["generate", "--model", "tiny-random-sd", "--erased", str(image), "--prompt", "a", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "is a file; give the folder `darkminer erase` wrote" in _error_line(capsys)
    assert main(["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "--threshold", "7", "--out",
                 str(tmp_path / "e")]) == 2
    assert "(--threshold) must be in (0, 1]" in _error_line(capsys)
    assert main(["testbed", "train", "--unet-config", "nope", "--out", str(tmp_path / "w")]) == 2
    assert "neither a shipped recipe (unet-stage1, unet-stage2) nor a config file" in _error_line(capsys)
    assert not (tmp_path / "w").exists()


def test_a_home_relative_path_is_expanded_where_the_shell_did_not(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["generate", "--prompt", "a cat", "--model", "tiny-random-sd", "--steps", "1", "--out", "~/g.png"]) == 0
    assert (tmp_path / "home" / "g.png").is_file() and not (tmp_path / "work" / "~").exists()


def test_the_built_in_tables_name_each_method_and_attack_where_it_is_registered():
    """The tables (--help lists them; an unknown name is refused with them before anything heavy loads) match
    what the modules register: each name in its module, and no built-in one missing from them."""
    import importlib
    import pkgutil

    import darkminer.attacks
    import darkminer.erasers
    from darkminer.attacks.base import ATTACKS
    from darkminer.commands.attack import ATTACK_NAMES
    from darkminer.commands.erase import METHOD_NAMES
    from darkminer.erasers.base import ERASERS

    for package, registry, table, names in ((darkminer.erasers, ERASERS, darkminer.erasers.BUILTIN_ERASERS, METHOD_NAMES),
                                            (darkminer.attacks, ATTACKS, darkminer.attacks.BUILTIN_ATTACKS, ATTACK_NAMES)):
        assert names.split(", ") == list(table)
        for name, module in table.items():
            assert registry.lookup(name).__module__.startswith(module)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(info.name)  # every module, registering whatever it registers
        built_in = {name for name, cls in registry.items() if cls.__module__.startswith(f"{package.__name__}.")}
        assert built_in == set(table)


def test_an_unknown_method_is_refused_before_torch_and_diffusers_load(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom darkminer.cli import main\ncode = main(['erase', '--method', 'esd-q', '--concept', "
            "'blod', '--out', 'o'])\nprint(code, 'diffusers' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"]
    assert "unknown method 'esd-q'; choose one of advunlearn, ca, darkminer, esd-u" in done.stderr
    code = code.replace("'esd-q'", "'esd-x'")  # then a testbed concept mistyped: refused before the model loads
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"]
    assert "unknown testbed concept 'blod'; choose one of blood" in done.stderr
    # FMN's attention recorder wraps diffusers' processor without subclassing it: its config is refused before
    (tmp_path / "fmn.yaml").write_text("image_steps: 0\n")
    code = code.replace("'esd-x'", "'fmn'").replace("'blod'", f"'blood', '--config', {str(tmp_path / 'fmn.yaml')!r}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"]
    assert "FmnConfig.image_steps" in done.stderr
    done = subprocess.run([sys.executable, "-m", "darkminer", "erase", "--method", "esd-q", "--concept", "blood",
                           "--out", "o"], capture_output=True, text=True, timeout=120)  # python -m darkminer too
    assert done.returncode == 2 and "unknown method 'esd-q'" in done.stderr


def test_a_plugin_cannot_take_a_built_in_name_it_has_not_looked_up_yet():
    from darkminer.registry import Registry

    registry = Registry("thing", {"x": "darkminer.nowhere"})
    with pytest.raises(DarkMinerError, match=r"thing 'x' is a built-in one \(darkminer.nowhere\); register \S*test_cli.A "
                                             "under another name"):
        registry.register("x")(type("A", (), {}))
    assert registry.names() == ["x"] and "x" not in registry


def test_every_benchmark_script_imports(monkeypatch):
    """The scripts under benchmarks/ are not run by the suite; a renamed function they import must still fail it."""
    import importlib.util
    import sys

    scripts = Path(__file__).parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(scripts))  # as when run from there: some import their siblings
    for path in sorted(scripts.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)  # their main() runs only as __main__


def test_the_source_revision_is_darkminers_own_checkout_never_a_repo_it_sits_in(tmp_path):
    import importlib.util
    import shutil as sh
    import subprocess

    from darkminer import provenance

    if sh.which("git") is None:
        pytest.skip("no git")
    # darkminer installed inside another project's repository (a venv in it), untracked there
    package = tmp_path / "project" / ".venv" / "darkminer"
    package.mkdir(parents=True)
    sh.copy(provenance.__file__, package / "provenance.py")
    (package / "__init__.py").write_text("")
    subprocess.run(["git", "init", "-q", str(tmp_path / "project")], check=True)
    subprocess.run(["git", "-C", str(tmp_path / "project"), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "theirs"], check=True)
    spec = importlib.util.spec_from_file_location("copied_provenance", package / "provenance.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    assert copied.source_revision() is None


def test_a_registry_refuses_a_second_class_under_one_name_but_takes_the_same_one_redefined():
    from darkminer.registry import Registry

    registry = Registry("thing", {})
    registry.register("x")(type("A", (), {}))
    with pytest.raises(DarkMinerError, match=r"thing 'x' is already registered \(by \S*test_cli.A\); register "
                                             r"\S*test_cli.B under another name"):
        registry.register("x")(type("B", (), {}))
    again = registry.register("x")(type("A", (), {}))  # a reloaded module, a notebook cell run twice
    assert registry["x"] is again
    with pytest.raises(DarkMinerError, match="unknown thing 'y'; choose one of x"):
        registry.lookup("y")
    with pytest.raises(DarkMinerError, match="registered under a name"):
        registry.register("")(type("C", (), {}))


def test_an_eraser_of_an_unknown_kind_is_refused_when_it_is_registered():
    from darkminer.erasers.base import ERASERS, register_eraser

    with pytest.raises(DarkMinerError, match="kind 'weights' is not one of lora, unet, text_encoder, guidance"):
        register_eraser("weights-kind", kind="weights")
    assert "weights-kind" not in ERASERS
    for reserved in ("original", "external"):  # results' labels: the benchmark's reference row, another tool's UNet
        with pytest.raises(DarkMinerError, match=f"eraser name '{reserved}' is reserved"):
            register_eraser(reserved, kind="unet")
        assert reserved not in ERASERS


def test_config_files_are_read_from_a_path_object_too(tmp_path):
    from darkminer.evaluation import EvaluationConfig

    (tmp_path / "c.yaml").write_text("steps: 3\n")
    assert EvaluationConfig.coerce(tmp_path / "c.yaml") == EvaluationConfig.coerce(str(tmp_path / "c.yaml"))
    assert EvaluationConfig.coerce(tmp_path / "c.yaml").steps == 3


def test_evaluate_and_attack_resume_from_the_command_line(tmp_path, capsys, monkeypatch):
    import importlib

    evaluation = importlib.import_module("darkminer.evaluation.evaluate")
    out = tmp_path / "e"
    command = ["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "-n", "2", "--steps", "2",
               "--guidance", "3.5", "--attacks", "plain", "--attack-prompts", "2", "--preservation", "", "--out", str(out)]
    real, calls = evaluation.Painter.conditions, []

    def killed_at_the_second_set(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation.Painter, "conditions", killed_at_the_second_set)
    assert main(command) == 130  # interrupted: the plain set is done and kept, the attack's replay cut short
    assert (f"darkminer: interrupted; its progress is kept in {work_directory(out)}: rerun the same command with "
            "--resume to go on\n") in capsys.readouterr().err
    assert main(command) == 2 and "add --resume" in _error_line(capsys)  # never discarded unasked
    [kept] = work_directory(out).rglob("sets/*.safetensors")
    whole = kept.read_bytes()
    state = load_state(kept)
    for edited in ({**state, "rows": "2"}, {k: v for k, v in state.items() if k != "scores"}):  # rows to count, scores
        save_state(kept, edited)
        assert main([*command, "--resume"]) == 2 and f"{kept} is damaged" in _error_line(capsys)
    kept.write_bytes(whole)
    assert main([*command, "--kind", "bogus"]) == 2 and "unknown kind 'bogus'" in _error_line(capsys)  # named first
    other_guidance = [("4" if arg == "3.5" else arg) for arg in command]
    assert main([*other_guidance, "--resume"]) == 2 and "its config.guidance_scale differs" in _error_line(capsys)
    assert main([*command, "--resume"]) == 0 and len(calls) == 3  # only the replay is drawn again
    metrics = json.loads((out / "metrics.json").read_text())
    line = capsys.readouterr().out
    assert "metrics.json" in line and metrics["resumed"]
    for group, name in (("erasure", "plain"), ("attacks", "plain")):  # each rate with the count it is of
        count = metrics["counts"][group][name]
        assert f"{'ASR ' if group == 'attacks' else ''}plain {100 * metrics[group][name]:.1f}% ({count['hits']}/2)" in line
    assert (metrics["sampling"]["steps"], metrics["sampling"]["guidance_scale"]) == (2, 3.5)
    assert main([*command[:-1], str(tmp_path / "fresh"), "--resume"]) == 0
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(command) == 0  # a finished evaluation is replaced, and the line says which
    assert capsys.readouterr().out.endswith(" s), replacing the one that was there (original on nudity)\n")
    attack = ["attack", "--concept", "nudity", "--model", "tiny-random-sd", "--out", str(tmp_path / "a")]
    for replaced in ("", ", replacing the one that was there (plain on nudity)"):
        assert main([*attack, "--attack", "plain", "--n-prompts", "1", "--steps", "1"]) == 0
        found = json.loads((tmp_path / "a" / "attack.json").read_text())
        assert capsys.readouterr().out == (f"ASR {100 * found['attack_success_rate']:.1f}% "
                                           f"({round(found['attack_success_rate'])}/1 prompts broken); wrote "
                                           f"{tmp_path / 'a'}{replaced}\n")
    assert main([*attack, "--replay", str(tmp_path / "x"), "--resume"]) == 2
    assert "--resume would change nothing" in _error_line(capsys)


def test_concept_may_be_left_out_beside_an_erased_model_or_a_replay(tmp_path, capsys):
    erased, quick = tmp_path / "erased", ["--model", "tiny-random-sd", "--steps", "1"]
    assert main(["erase", "--method", "uce", "--concept", "Van Gogh", "--kind", "style", "--model", "tiny-random-sd",
                 "--out", str(erased)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--erased", str(erased), *quick, "-n", "1", "--preservation", "", "--detector", "nudenet",
                 "--out", str(tmp_path / "e")]) == 0
    assert f"--concept 'Van Gogh' --kind style: what {erased} was made to erase" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["concept"] == "Van Gogh" and metrics["inputs"]["kind"] == "style"
    assert main(["attack", "--attack", "plain", "--erased", str(erased), *quick, "--n-prompts", "1", "--detector",
                 "nudenet", "--out", str(tmp_path / "a")]) == 0
    assert main(["attack", "--replay", str(tmp_path / "a"), *quick, "--detector", "nudenet", "--out",
                 str(tmp_path / "r")]) == 0  # no --erased: the replayed attack's concept
    replayed = json.loads((tmp_path / "r" / "attack.json").read_text())["target"]
    assert (replayed["name"], replayed["kind"]) == ("Van Gogh", "style")  # graded as the attack graded
    capsys.readouterr()
    found = (tmp_path / "a" / "attack.json").read_text()
    for out in (tmp_path / "a", tmp_path / "a" / "inside"):  # the replay would replace the attack it replays
        assert main(["attack", "--replay", str(tmp_path / "a"), *quick, "--out", str(out)]) == 2
        assert f"and --replay {tmp_path / 'a'} overlap; write the replay's results to another folder" in capsys.readouterr().err
    assert (tmp_path / "a" / "attack.json").read_text() == found
    assert main(["evaluate", *quick, "--out", str(tmp_path / "x")]) == 2
    assert "--concept is required (it may be left out beside --erased" in _error_line(capsys)
    stacked = tmp_path / "stacked"
    assert main(["erase", "--method", "uce", "--concept", "nudity", "--erased", str(erased), "--out", str(stacked)]) == 0
    assert main(["evaluate", "--erased", str(stacked), *quick, "--out", str(tmp_path / "y")]) == 2
    assert f"{stacked} erased 'nudity', 'Van Gogh': name the concept to grade with --concept" in _error_line(capsys)


def test_a_run_killed_while_it_removes_its_work_folder_leaves_none_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "e"
    command = ["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "-n", "2", "--steps", "2",
               "--preservation", "", "--save-images", "--out", str(out)]
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file of the finished work folder, then is killed
        if Path(path).name.startswith(".e.work") and Path(path).exists():
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    assert main(command) == 130
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    capsys.readouterr()
    assert (out / "metrics.json").is_file() and not (tmp_path / ".e.work").exists()  # the output is whole
    assert main(command) == 0  # not refused as an unfinished run; the leftover is swept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_resume_says_when_a_work_folder_holds_only_its_claim(tmp_path, capsys):
    """A run killed before its first checkpoint leaves its claim (run.json): --resume starts over, and says so."""
    from darkminer.commands.common import note_resume
    from darkminer.io import WORK_RECORD

    args = argparse.Namespace(resume=True, out=str(tmp_path / "out"))
    work = work_directory(tmp_path / "out")
    work.mkdir()
    (work / WORK_RECORD).write_text("{}")
    note_resume(args)
    assert capsys.readouterr().err == f"--resume: no checkpoint in {work}; starting from the beginning\n"
    (work / "state.safetensors").write_bytes(b"x")
    note_resume(args)
    assert capsys.readouterr().err == ""


# Command options (mutation testing, session 45).
def test_attack_n_prompts_0_is_refused_not_read_as_the_default(tmp_path, capsys):
    """`--n-prompts 0` must be refused as the API refuses n_prompts=0; read as
    "unset" it attacks the default 16 prompts, a run (and a rate) the user did not ask for."""
    from darkminer.cli import main

    out = tmp_path / "a"
    assert main(["attack", "--attack", "plain", "--concept", "nudity", "--model", "tiny-random-sd", "--steps", "1",
                 "--n-prompts", "0", "--out", str(out)]) == 2
    assert "n_prompts" in _error_line(capsys)
    assert not out.exists()


def _erased_record(folder: Path, concept: str, kind: str, base_model: str = "tiny-random-sd") -> Path:
    from dataclasses import asdict

    from darkminer.io import write_json
    from darkminer.models.erased import INFO_NAME, ErasedModelInfo

    info = ErasedModelInfo(method="uce", concept=concept, base_model=base_model, kind="unet",
                           extra={"target": {"name": concept, "kind": kind}})
    write_json(folder / INFO_NAME, asdict(info))
    return folder


def test_a_kind_given_beside_an_erased_model_wins_over_the_kind_it_records(tmp_path, capsys):
    """--concept left out beside --erased takes the record's concept, and its kind
    only where --kind is not given; dropping `args.kind is None` grades a style as the record says though the
    user asked for another kind."""
    import argparse

    from darkminer.commands.common import concept_of_erased

    erased = _erased_record(tmp_path / "erased", "Van Gogh", "style")
    given = argparse.Namespace(concept=None, erased=str(erased), kind="object")
    concept_of_erased(given)
    assert (given.concept, given.kind) == ("Van Gogh", "object")
    assert f"--concept 'Van Gogh' --kind object: what {erased} was made to erase" in capsys.readouterr().err
    unset = argparse.Namespace(concept=None, erased=str(erased), kind=None)
    concept_of_erased(unset)
    assert (unset.concept, unset.kind) == ("Van Gogh", "style")


def test_evaluate_keeps_a_config_files_save_images_unless_the_flag_is_given(tmp_path, monkeypatch):
    """an unset --save-images must leave the config file's `save_images: true`
    alone; passed as False it overrides the file and the per-image PNGs the user asked for are not written."""
    import darkminer.evaluation
    from darkminer.cli import build_parser
    from darkminer.commands import evaluate as command

    seen = []

    class Stop(Exception):
        pass

    def fake_evaluate(concept, out, *, config, **kwargs):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(darkminer.evaluation, "evaluate", fake_evaluate)
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"save_images": True, "n_images": 3}))
    base = ["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "--out", str(tmp_path / "e")]
    for argv in ([*base, "--config", str(config)], [*base, "--save-images"], base):
        with pytest.raises(Stop):
            command.run(build_parser().parse_args(argv))
    assert [(c.save_images, c.n_images) for c in seen] == [(True, 3), (True, None), (False, None)]


def test_generate_says_the_seeds_it_drew(tmp_path, capsys):
    """image i uses seed+i, so -n 3 --seed 5 draws seeds 5..7; a line saying
    5..8 sends a user who reproduces image by image to a seed that drew nothing."""
    from darkminer.cli import main

    out = tmp_path / "grid.png"
    assert main(["generate", "--model", "tiny-random-sd", "--prompt", "a cat", "-n", "3", "--seed", "5",
                 "--steps", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (3 images, seeds 5..7)"
