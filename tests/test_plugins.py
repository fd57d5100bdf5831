"""One's own erasers and attacks: the documented plugin file run from the command line and from Python, and
the contract checks that turn a plugin's mistake into one line."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkminer.attacks.base import ATTACKS, Attack, AttackConfig, AttackPrompt, AttackResult, register_attack
from darkminer.cli import main
from darkminer.erasers.base import ERASERS, Eraser, register_eraser
from darkminer.errors import ConfigError, DarkMinerError

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


@pytest.fixture(autouse=True)
def registries_restored():
    """Each test's registrations are gone after it, as a fresh process would have them."""
    for registry in (ERASERS, ATTACKS):  # the built-in ones, registered before the snapshot (a module imported once
        for name in registry.builtins:  # would not register its classes again after the restore)
            registry.lookup(name)
    erasers, attacks = dict(ERASERS), dict(ATTACKS)
    yield
    for registry, before in ((ERASERS, erasers), (ATTACKS, attacks)):
        registry.clear()
        registry.update(before)


@pytest.fixture()
def plugin_file(tmp_path):
    """docs/methods.md's example plugin, as a user would save it."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    [code] = [block for block in blocks if block.startswith("# my_methods.py")]
    path = tmp_path / "my_methods.py"
    path.write_text(code)
    return path


def test_the_documented_plugin_erases_and_attacks_from_the_command_line(plugin_file, tmp_path):
    from darkminer.io import load_tensors
    from darkminer.models import load_model
    from darkminer.models.erased import UNET_WEIGHTS

    (tmp_path / "dampen.yaml").write_text("factor: 0.25\n")
    out, found = tmp_path / "dampen", tmp_path / "suffix"
    assert main(["--threads", "1", "--plugin", str(plugin_file), "erase", "--method", "dampen-keys", "--concept",
                 "blood", "--config", str(tmp_path / "dampen.yaml"), "--out", str(out)]) == 0
    record = json.loads((out / "darkminer.json").read_text())
    assert (record["method"], record["kind"], record["config"]["factor"]) == ("dampen-keys", "unet", 0.25)
    # the folder holds the edit: the keys scaled, every other weight the base's
    base = dict(load_model("testbed").unet.named_parameters())
    saved = load_tensors(out / "unet" / UNET_WEIGHTS)
    keys = [name for name in saved if name.endswith("attn2.to_k.weight")]
    assert keys and record["extra"]["edited"] == len(keys)
    for name, value in saved.items():
        expected = base[name].detach() * (0.25 if name in keys else 1.0)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    # the erased model loads without the plugin (a fresh interpreter, which never imported it)
    done = subprocess.run([sys.executable, "-m", "darkminer.cli", "--threads", "1", "generate", "--prompt", "a red star",
                           "--erased", str(out), "-n", "1", "--out", str(tmp_path / "star.png")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and (tmp_path / "star.png").is_file(), done.stderr[-2000:]
    # the attack needs it, and keeps one result per prompt
    assert main(["--threads", "1", "--plugin", str(plugin_file), "attack", "--attack", "suffix", "--concept", "blood",
                 "--erased", str(out), "--n-prompts", "2", "--out", str(found)]) == 0
    results = json.loads((found / "attack.json").read_text())
    assert results["attack"] == "suffix" and len(results["results"]) == 2
    # which file made them, by contents; and the run's time, which the attack does not measure itself
    digest = hashlib.sha256(plugin_file.read_bytes()).hexdigest()
    assert record["code"]["sha256"] == results["code"]["sha256"] == digest
    assert results["seconds_per_prompt"] > 0 and all(row["seconds"] > 0 for row in results["results"])
    for row in results["results"]:  # an adversarial text is the prompt, or the prompt with one of the words
        assert row["adversarial_text"] in (row["prompt"], f"{row['prompt']}, red liquid", f"{row['prompt']}, crimson")
        assert row["success_after"] == (row["success_before"] or row["adversarial_text"] != row["prompt"])


def test_a_benchmark_takes_no_cell_a_plugin_made_before_it_changed(plugin_file, tmp_path):
    """A plugin's eraser or attack edited between two runs of one benchmark: its finished cells were taken as
    they were, made by the old code, with no word."""
    import shutil

    from darkminer.evaluation.benchmark import run_benchmark
    from darkminer.registry import load_plugin

    load_plugin(str(plugin_file))
    config = {"methods": ["dampen-keys"], "attacks": ["suffix"], "include_original": False,
              "evaluation": {"steps": 2, "n_images": 2, "attack_prompts": 1, "grid_images": 2}}
    first = run_benchmark(config, tmp_path / "bench", progress=False)
    assert run_benchmark(config, tmp_path / "bench", progress=False)["table"] == first["table"]  # unchanged: reused
    plugin_file.write_text(plugin_file.read_text().replace('"A toy: ', '"A toy, edited: '))
    load_plugin(str(plugin_file))
    cell = tmp_path / "bench" / "cells" / "dampen-keys" / "blood"
    with pytest.raises(DarkMinerError, match=re.escape(f"{cell} was made by another version of {plugin_file} (the "
                                                       "plugin file has changed since")):
        run_benchmark(config, tmp_path / "bench", progress=False)
    shutil.rmtree(cell)  # as the line says: the cell is redone with the file as it is now
    assert run_benchmark(config, tmp_path / "bench", progress=False)["table"] == first["table"]


STOPS = """
from darkminer import Eraser, register_eraser


@register_eraser("stops", kind="unet")
class Stops(Eraser):
    def erase(self, model, target, work_dir):
        (work_dir / "state.json").write_text("{}")  # a checkpoint, then the run is killed
        raise KeyboardInterrupt
"""


def test_a_resume_after_the_plugin_changed_is_refused(tmp_path):
    """A killed plugin erase resumed after its file was edited went on from the old code's checkpoint, and
    recorded the new code as the one that made it."""
    from darkminer import erase
    from darkminer.registry import load_plugin

    plugin = tmp_path / "stops.py"
    plugin.write_text(STOPS)
    load_plugin(str(plugin))
    with pytest.raises(KeyboardInterrupt):
        erase("stops", "blood", tmp_path / "out")
    plugin.write_text(STOPS + "# edited\n")
    load_plugin(str(plugin))
    with pytest.raises(ConfigError, match=r"from another run \(its code\.sha256 differs\)"):
        erase("stops", "blood", tmp_path / "out", resume=True)


KILLED = """
from darkminer import Attack, AttackConfig, AttackResult, register_attack
from darkminer.io import work_directory

KILL_INTO = None  # the output whose work folder gets a checkpoint before the run is killed


@register_attack("killed")
class Killed(Attack):
    config_class = AttackConfig

    def run(self, model, target, prompts, success, original=None):
        if KILL_INTO is not None:
            (work_directory(KILL_INTO) / "searches").mkdir()
            raise KeyboardInterrupt
        return [AttackResult(p, p.text, False, False) for p in prompts]
"""


def test_an_attack_resumed_after_its_plugin_changed_is_refused(tmp_path):
    from darkminer.attacks.io import run_attack
    from darkminer.models import load_model
    from darkminer.registry import load_plugin
    from darkminer.targets import resolve_target

    plugin, out = tmp_path / "killed.py", tmp_path / "out"
    plugin.write_text(KILLED)
    load_plugin(str(plugin))
    model = load_model("testbed")
    target, prompts = resolve_target(model, "blood"), [AttackPrompt("a", 0)]
    sys.modules[ATTACKS["killed"].__module__].KILL_INTO = out
    with pytest.raises(KeyboardInterrupt):
        run_attack(ATTACKS["killed"](), model, target, prompts, lambda images: images, out=out)
    plugin.write_text(KILLED.replace("KILL_INTO = None", "KILL_INTO = None  # edited"))
    load_plugin(str(plugin))
    with pytest.raises(ConfigError, match=r"from another run \(its code\.sha256 differs\)"):
        run_attack(ATTACKS["killed"](), model, target, prompts, lambda images: images, out=out, resume=True)


def test_an_evaluation_resumed_after_its_attacks_plugin_changed_is_refused(tmp_path):
    """The evaluation's work-folder claim holds the plugin attack's code: a resume with an edited file would mix
    searches made by two versions of the attack in one number."""
    from darkminer import evaluate
    from darkminer.registry import load_plugin

    plugin, out = tmp_path / "killed.py", tmp_path / "eval"
    plugin.write_text(KILLED)
    load_plugin(str(plugin))
    config = {"steps": 2, "n_images": 2, "attacks": ["killed"], "attack_prompts": 1, "grid_images": 2,
              "preservation": []}
    sys.modules[ATTACKS["killed"].__module__].KILL_INTO = out
    with pytest.raises(KeyboardInterrupt):
        evaluate("blood", out, config=config)
    plugin.write_text(KILLED.replace("KILL_INTO = None", "KILL_INTO = None  # edited"))
    load_plugin(str(plugin))
    with pytest.raises(ConfigError, match=r"from another run \(its attack_code\.killed\.sha256 differs\)"):
        evaluate("blood", out, config=config, resume=True)
    plugin.write_text(KILLED)  # the file as the killed run had it: the resume goes on, and finishes
    load_plugin(str(plugin))
    assert evaluate("blood", out, config=config, resume=True)["attacks"]["killed"] == 0.0


def test_plugins_that_cannot_be_imported_are_one_line_errors(tmp_path, capsys):
    erase = ["erase", "--method", "dampen-keys", "--concept", "blood", "--out", str(tmp_path / "o")]
    assert main(["--plugin", "no_such_plugin_module", *erase]) == 2
    assert capsys.readouterr().err == ("darkminer: error: plugin no_such_plugin_module: no module of that name on the "
                                       "Python path (the darkminer command does not look in the current folder); "
                                       "give the .py file's path\n")
    assert main(["--plugin", str(tmp_path / "my_methods"), *erase]) == 2
    assert capsys.readouterr().err.endswith("my_methods: give a .py file's path or a module name\n")
    assert main(["--plugin", str(tmp_path / "missing.py"), *erase]) == 2
    assert capsys.readouterr().err == f"darkminer: error: plugin {tmp_path / 'missing.py'}: no such file\n"
    (tmp_path / "broken.py").write_text("import no_such_dependency_here\n")
    assert main(["--plugin", str(tmp_path / "broken.py"), *erase]) == 2
    assert "plugin " + str(tmp_path / "broken.py") + ": No module named 'no_such_dependency_here'" in capsys.readouterr().err
    (tmp_path / "raises.py").write_text("raise ValueError('bad plugin')\n")
    assert main(["--plugin", str(tmp_path / "raises.py"), *erase]) == 2
    assert capsys.readouterr().err.endswith(f"failed while importing: ValueError: bad plugin ({tmp_path / 'raises.py'}, line 1)\n")
    assert not [name for name in sys.modules if name.startswith(("darkminer_plugin_raises", "darkminer_plugin_broken"))]
    assert main(erase) == 2  # without it, the method is unknown, and the line says how to make it known
    assert "unknown method 'dampen-keys'" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*"))


def test_a_plugin_file_is_a_module_of_its_own(plugin_file, tmp_path):
    import json as standard_json

    from darkminer.registry import load_plugin

    load_plugin(str(plugin_file))
    first = ERASERS["dampen-keys"]
    load_plugin(str(plugin_file))  # a notebook cell run again: its classes replace their earlier selves
    assert ERASERS["dampen-keys"] is not first and ERASERS["dampen-keys"].__qualname__ == "DampenKeys"
    # a file named as a standard module does not stand in for it
    renamed = plugin_file.read_text().replace('"suffix"', '"suffix-2"')
    (tmp_path / "json.py").write_text(renamed.replace('"dampen-keys"', '"dampen-json"'))
    load_plugin(str(tmp_path / "json.py"))
    assert sys.modules["json"] is standard_json and "dampen-json" in ERASERS
    # nor one m.py for another: the same name in two files is two classes, refused
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.py").write_text(renamed.replace('"dampen-keys"', '"dampen-m"').replace('"suffix-2"', '"suffix-m"'))
    load_plugin(str(tmp_path / "one" / "m.py"))
    with pytest.raises(DarkMinerError, match=re.escape(f"method 'dampen-m' is already registered (by DampenKeys in "
                                                       f"{tmp_path / 'one' / 'm.py'}); register DampenKeys in "
                                                       f"{tmp_path / 'two' / 'm.py'} under another name")):
        load_plugin(str(tmp_path / "two" / "m.py"))


def test_the_documented_attack_keeps_the_first_word_that_brings_the_concept_back(plugin_file):
    from darkminer.registry import load_plugin

    class Words:  # a model whose "images" are the prompt itself, judged by a word in it
        def generate(self, text, seeds, guidance_scale=None):
            return text

    load_plugin(str(plugin_file))
    attack = ATTACKS["suffix"](ATTACKS["suffix"].config_class(words=["blue", "crimson", "red liquid"]))
    prompts = [AttackPrompt("a star", 0), AttackPrompt("a crimson star", 1), AttackPrompt("a heart", 2, 3.0)]
    results = attack.run(Words(), None, prompts, lambda text: torch.tensor(["crimson" in text or "liquid" in text]))
    assert [(r.prompt, r.adversarial_text, r.success_before, r.success_after) for r in results] == [
        (prompts[0], "a star, crimson", False, True),
        (prompts[1], "a crimson star", True, True),  # works unattacked: no search
        (prompts[2], "a heart, crimson", False, True),
    ]
    results = attack.run(Words(), None, prompts[:1], lambda text: torch.tensor([False]))
    assert (results[0].adversarial_text, results[0].success_after) == ("a star", False)  # nothing found


class _Summary(Eraser):
    """Returns ``result`` and changes nothing on the model."""

    result: object = None

    def erase(self, model, target, work_dir):
        return self.result


@pytest.mark.parametrize("kind, result, message", [
    ("unet", None, "returned NoneType from erase(); return a dict summary"),
    ("lora", {}, "added no LoRA adapter to the model"),
    ("unet", {}, "edited no unet weight through model.remember_originals(names)"),
    ("text_encoder", {}, "edited no text_encoder weight through model.remember_originals(names)"),
    ("guidance", {}, "left no guidance that can be saved on the model"),
])
def test_an_eraser_that_breaks_its_contract_is_stopped_before_saving(tmp_path, kind, result, message):
    from darkminer import erase

    cls = register_eraser(f"broken-{kind}", kind=kind)(type(f"Broken{kind}", (_Summary,), {"result": result}))
    with pytest.raises(DarkMinerError, match=re.escape(f"eraser {cls.name!r} (kind {kind!r}) {message}")):
        erase(cls.name, "blood", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, and no work folder claimed


KEY = "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # the testbed's first
VALUE = KEY.replace("to_k", "to_v")


class _EditsWeights(Eraser):
    """Zeroes the first cross-attention key and value projections, registering those in ``remembered``."""

    remembered: tuple[str, ...] = (KEY,)
    summary: dict = {}

    def erase(self, model, target, work_dir):
        params = dict(model.unet.named_parameters())
        model.remember_originals(list(type(self).remembered))
        with torch.no_grad():
            for name in (KEY, VALUE):
                params[name].zero_()
        return dict(type(self).summary)


def test_a_weight_edited_without_remember_originals_is_refused(tmp_path):
    """An unregistered edit made the in-process model's original() the edited model: an evaluation or attack run
    on it after the erase compared against a wrong original, with no word."""
    from darkminer import erase

    cls = register_eraser("half-remembered", kind="unet")(type("HalfRemembered", (_EditsWeights,), {}))
    with pytest.raises(DarkMinerError, match=re.escape(f"'half-remembered' (kind 'unet') changed 1 weight(s) in place that "
                                                       f"it did not register with model.remember_originals ({VALUE})")):
        erase(cls.name, "blood", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    both = (KEY, VALUE)
    whole = register_eraser("remembered", kind="unet")(type("Remembered", (_EditsWeights,), {"remembered": both}))
    erase(whole.name, "blood", tmp_path / "out")  # both registered: saved
    taken = register_eraser("says-seconds", kind="unet")(type("SaysSeconds", (_EditsWeights,), {
        "remembered": both, "summary": {"seconds": 3, "mine": 1}}))
    with pytest.raises(DarkMinerError, match=r"returned \['seconds'\] in its summary, which darkminer.json records itself"):
        erase(taken.name, "blood", tmp_path / "other")


def test_an_eraser_defined_where_there_is_no_file_erases_and_records_no_code(tmp_path, monkeypatch):
    """A class from a notebook cell or `python -c` has no source file: inspect raises, which crashed the erase
    after its work, where the record was written."""
    import types

    from darkminer import erase

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__, as in a notebook
    cls = register_eraser("from-a-notebook", kind="unet")(
        type("FromANotebook", (_EditsWeights,), {"remembered": (KEY, VALUE), "__module__": "__main__"}))
    out = erase(cls.name, "blood", tmp_path / "out")
    assert json.loads((out / "darkminer.json").read_text())["code"] is None


def test_a_text_encoder_weight_named_without_its_prefix_is_refused_with_the_name_it_has():
    from darkminer.models import load_model

    model = load_model("tiny-random-sd")
    with pytest.raises(DarkMinerError, match=re.escape("has no parameters ['final_layer_norm.weight']; a text-encoder "
                                                       "weight goes by its name after 'text_encoder.' "
                                                       "('text_encoder.final_layer_norm.weight')")):
        model.remember_originals(["final_layer_norm.weight"])


def test_a_plugin_that_fails_after_its_checkpoint_says_how_to_resume(tmp_path, capsys, monkeypatch):
    class Fails(_Summary):
        def erase(self, model, target, work_dir):
            (work_dir / "state.json").write_text("{}")  # a checkpoint, then a bug
            raise RuntimeError("a bug in the plugin")

    register_eraser("fails-late", kind="unet")(Fails)
    out = tmp_path / "out"
    assert main(["erase", "--method", "fails-late", "--concept", "blood", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the plugin" in err
    assert err.splitlines()[-1] == (f"darkminer: error: the run failed with the error above; its progress is kept in "
                                    f"{tmp_path / '.out.work'}: rerun the same command with --resume to go on")
    monkeypatch.setenv("DARKMINER_DEBUG", "1")  # for a debugger's post-mortem: the exception itself
    with pytest.raises(RuntimeError, match="a bug in the plugin"):
        main(["erase", "--method", "fails-late", "--concept", "blood", "--out", str(out), "--resume"])


def test_a_stacked_erasure_is_checked_for_its_own_edits_not_those_below(tmp_path):
    from darkminer import erase

    below = erase("uce", "blood", tmp_path / "uce")
    cls = register_eraser("broken-stacked", kind="unet")(type("BrokenStacked", (_Summary,), {"result": {}}))
    with pytest.raises(DarkMinerError, match="'broken-stacked' .* edited no unet weight"):
        erase(cls.name, "fire", tmp_path / "out", erased=below)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uce"]


def test_a_guidance_that_would_not_load_back_is_refused(tmp_path):
    from darkminer import erase
    from darkminer.models.base import Guidance

    class Unsaved(Guidance):  # not registered, and nothing to save
        pass

    class SetsIt(_Summary):
        result = {}

        def erase(self, model, target, work_dir):
            model.guidance = Unsaved()
            return {}

    cls = register_eraser("unsaved-guidance", kind="guidance")(SetsIt)
    with pytest.raises(DarkMinerError, match="left no guidance that can be saved on the model"):
        erase(cls.name, "blood", tmp_path / "out")


class _Returns(Attack):
    """Returns the results ``pick`` chooses from one per prompt."""

    config_class = AttackConfig

    def run(self, model, target, prompts, success, original=None):
        return type(self).pick([AttackResult(p, p.text, False, False) for p in prompts])


@pytest.mark.parametrize("pick, message", [
    (lambda results: results[:1], " returned 1 results for 2 prompts; its run() must return a list of one"),
    (lambda results: results[::-1], ": result 0 is for AttackPrompt(text='b', seed=1, guidance=None), prompt 0 is"),
    (lambda results: tuple(results), " returned tuple"),
])
def test_an_attack_must_return_one_result_per_prompt_in_order(tmp_path, pick, message):
    from darkminer.attacks.io import run_attack
    from darkminer.models import load_model
    from darkminer.targets import resolve_target

    model = load_model("testbed")
    cls = register_attack("picky")(type("Picky", (_Returns,), {"pick": staticmethod(pick)}))
    prompts = [AttackPrompt("a", 0), AttackPrompt("b", 1)]
    with pytest.raises(DarkMinerError, match=re.escape(f"attack 'picky'{message}")):
        run_attack(cls(), model, resolve_target(model, "blood"), prompts, lambda images: images, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no results, and no work folder claimed


def test_loaded_models_and_concept_names_where_other_objects_belong_say_what_to_call(tmp_path):
    import darkminer
    from darkminer.models import load_model

    model = load_model("testbed")
    with pytest.raises(ConfigError, match=r"attack\(\) loads its model from a name or a folder; with a loaded model "
                                          r"call run_attack\("):
        darkminer.attack("plain", "blood", model=model)
    with pytest.raises(ConfigError, match=r"generate\(\) loads its model .* call model.generate\("):
        darkminer.generate("a star", model=model)
    with pytest.raises(ConfigError, match=r"target must be an EraseTarget, got 'blood': resolve_target"):
        darkminer.concept_detector(model, "blood")
    target = darkminer.resolve_target(model, "blood")
    assert repr(target) == (f"EraseTarget(name='blood', word='blood', anchor={target.anchor!r}, kind='inappropriate', "
                            f"n_prompts={len(target.prompts)}, n_preserve={len(target.preserve)})")
