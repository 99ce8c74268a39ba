"""One vocabulary across the commands (issue 16): every parser of every tool and training
script is walked; an option has one canonical name, old names only as declared deprecated
aliases that say so, the shared options come from vitok_fast/cli.py's builders, every option
has a help text, no help shows its default twice, and ``--help`` imports no heavy module."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _scripts import ROOT, load_script
from vitok_fast import cli
from vitok_fast.__main__ import COMMANDS

# canonical name -> the old names kept for one release (each prints a deprecation line)
ALIASES = {"--ckpt": {"--vitok", "--init"}, "--out": {"--out-dir", "--json"}}
# Names that mean the same as a canonical one: a new option under one of them is a synonym.
# (The deprecated aliases above are the only place they may appear.)
SYNONYMS = {
    "--ckpt": {"--vitok", "--init", "--checkpoint", "--model-dir", "--weights", "--load",
               "--pretrained", "--vae", "--tokenizer"},
    "--out": {"--out-dir", "--json", "--output", "--output-dir", "--outdir", "--save-dir",
              "--dest", "--results"},
    "--lpips-vgg": {"--vgg", "--lpips", "--vgg16", "--lpips-weights", "--lpips-path"},
    "--inception": {"--inception-weights", "--fid-weights", "--fid-inception"},
    "--num-workers": {"--workers", "--loader-workers"},
    "--batch-size": {"--bs", "--batch"},
    "--device": {"--gpu", "--cuda"},
    "--no-kernels": {"--use-kernels", "--kernels", "--reference"},
    "--max-samples": {"--limit", "--num-samples", "--max-images", "--max-items"},
}
# Options that must come from cli.add_<name> wherever they appear: one help text, one set of values.
SHARED = {"--lpips-vgg": "lpips-vgg", "--inception": "inception", "--device": "device",
          "--no-kernels": "no-kernels"}
# --help must not import these: heavy, and not needed to print options (torch alone costs
# about 2 s of start-up; the commands import it after parsing).
HEAVY = ("torch", "triton", "lpips", "torchvision", "matplotlib", "diffusers", "av", "scipy",
         "torch._dynamo", "torch_fidelity", "sklearn", "skimage")


def _script(module: str) -> str | None:
    """``vitok_fast.train.stage1`` -> ``train/stage1.py`` (the training scripts live in train/)."""
    return f"train/{module.rsplit('.', 1)[1]}.py" if module.startswith("vitok_fast.train.") else None


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _parser(module: str) -> argparse.ArgumentParser:
    """The parser a command builds: its ``main([])`` runs up to ``parse_args``, caught there."""
    script = _script(module)
    mod = load_script(script) if script else importlib.import_module(module)

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    original = cli.ArgumentParser.parse_args
    cli.ArgumentParser.parse_args = capture
    try:
        mod.main([])
    except _Captured as got:
        return got.parser
    finally:
        cli.ArgumentParser.parse_args = original
    raise AssertionError(f"{module}.main([]) never called cli.ArgumentParser.parse_args")


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    """command (``plots grid`` for a subcommand) -> parser."""
    found = {}
    for name, (module, _) in COMMANDS.items():
        parser = _parser(module)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for sub in subs:
            found.update({f"{name} {s}": p for s, p in sub.choices.items()})
        if not subs:
            found[name] = parser
    return found


def _options(parser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction,
                                                             argparse._SubParsersAction))]


def test_the_walk_covers_every_command_module_and_training_script():
    commands = {m for m, _ in COMMANDS.values()}
    tools = {f"vitok_fast.{p.stem}" for p in (ROOT / "vitok_fast").glob("*.py")
             if p.stem != "__main__" and 'if __name__ == "__main__":' in p.read_text()}
    scripts = {f"vitok_fast.train.{p.stem}" for p in (ROOT / "train").glob("*.py")
               if p.stem != "__init__"}
    assert tools | scripts == commands, (tools | scripts) ^ commands
    assert len(commands) == 12


def test_every_option_has_one_canonical_name_and_no_synonym(parsers):
    synonym_of = {old: new for new, olds in SYNONYMS.items() for old in olds}
    problems = []
    for command, parser in parsers.items():
        for action in _options(parser):
            flags = [f for f in action.option_strings if f.startswith("--")]
            if not flags:
                continue
            canonical, extra = flags[0], set(flags[1:])
            if extra and (extra - ALIASES.get(canonical, set())
                          or extra != set(getattr(action, "deprecated", ()))):
                problems.append(f"{command}: {flags} (only {ALIASES} as deprecated aliases)")
            if canonical in synonym_of:
                problems.append(f"{command}: {canonical} means {synonym_of[canonical]}; use that")
            if canonical in SHARED and getattr(action, "shared", None) != SHARED[canonical]:
                problems.append(f"{command}: {canonical} is not built by "
                                f"cli.add_{canonical[2:].replace('-', '_')}")
    assert not problems, "\n".join(problems)


def test_every_input_checkpoint_is_ckpt_and_every_output_is_out(parsers):
    """The things of item 6 by name: the ViTok checkpoint of each command and its output."""
    for command in ("encode", "decode", "evaluate", "reconstruct", "latent-stats", "sample",
                    "plots grid", "train-stage2", "train-dit"):
        flags = {f for a in _options(parsers[command]) for f in a.option_strings}
        assert "--ckpt" in flags, command
    for command, parser in parsers.items():  # every command writes something
        assert "--out" in {f for a in _options(parser) for f in a.option_strings}, command


def test_deprecated_aliases_still_parse_and_say_so_once_each(parsers, tmp_path, capsys):
    args = parsers["train-dit"].parse_args(["--vitok", str(tmp_path), "--out-dir", "runs/x"])
    assert (args.vitok, args.out_dir) == (str(tmp_path), "runs/x")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "--vitok is deprecated" in lines[0] and "use --ckpt" in lines[0]
    assert "--out-dir is deprecated" in lines[1] and "use --out" in lines[1]
    args = parsers["selftest"].parse_args(["--json", "r.json"])
    assert args.json == Path("r.json")
    assert capsys.readouterr().err.count("deprecated") == 1
    args = parsers["train-dit"].parse_args(["--ckpt", str(tmp_path), "--out", "runs/y"])
    assert (args.vitok, args.out_dir) == (str(tmp_path), "runs/y")
    assert capsys.readouterr().err == ""  # the canonical names say nothing


def test_lpips_random_is_accepted_wherever_lpips_is(parsers, tmp_path):
    with_lpips = [c for c, p in parsers.items()
                  if any("--lpips-vgg" in a.option_strings for a in _options(p))]
    assert {"evaluate", "train-stage1", "train-stage2"} <= set(with_lpips)
    from vitok_fast import ViTok, evaluate

    ViTok.from_name("T-T/8", use_kernels=False).save_pretrained(tmp_path / "ckpt")
    results = evaluate.main(["--ckpt", str(tmp_path / "ckpt"), "--data", "embedded:val",
                             "--resolution", "32", "--metrics", "lpips", "--lpips-vgg", "random",
                             "--no-kernels", "--num-workers", "0", "--device", "cpu",
                             "--out", str(tmp_path / "eval.json")])
    assert results["lpips"] > 0 and "RANDOM" in results["protocol"]["lpips"]  # and says so


def test_every_option_has_a_help_text(parsers):
    missing = [f"{c}: {a.option_strings or a.dest}" for c, p in parsers.items()
               for a in _options(p) if not (a.help or "").strip()]
    assert not missing, missing


def _entries(help_text: str) -> list[str]:
    """One string per option in ``--help`` output (an option line and its indented
    continuation lines)."""
    entries = []
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    return entries


# One subprocess runs every command's --help in turn (torch loads once) and reports, per command,
# its output and which heavy modules were imported by then.
_HELP_PROBE = r"""
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
heavy, runs, out = json.loads(sys.argv[2]), json.loads(sys.argv[3]), {}
for name, kind, target, argv in runs:
    text, sys.argv = io.StringIO(), [name, *argv]
    with contextlib.redirect_stdout(text):
        try:
            (runpy.run_path if kind == "path" else runpy.run_module)(target, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    out[name] = {"code": code, "help": text.getvalue(),
                 "heavy": [m for m in heavy if m in sys.modules], "torch": "torch" in sys.modules}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    runs = [["vitok", "module", "vitok_fast", ["--help"]]]
    for name, (module, _) in COMMANDS.items():
        script = _script(module)
        subcommands = ["grid", "sweep", "curves"] if name == "plots" else [None]
        for sub in subcommands:
            runs.append([f"{name} {sub}" if sub else name, "path" if script else "module",
                         str(ROOT / script) if script else module,
                         [sub, "--help"] if sub else ["--help"]])
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE, str(ROOT / "tests"),
                           json.dumps(HEAVY), json.dumps(runs)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_no_heavy_module(helps):
    # The listing of `vitok --help` imports nothing of the commands, not even torch.
    assert helps["vitok"]["code"] == 0 and not helps["vitok"]["torch"]
    assert all(name in helps["vitok"]["help"] for name in COMMANDS)
    for name, result in helps.items():  # in run order: the first to import one is named
        assert result["code"] == 0, (name, result["help"][-500:])
        assert "--help" in result["help"] or name == "vitok"
        assert result["heavy"] == [], f"{name} --help imported {result['heavy']}"


def test_help_never_shows_a_default_twice(helps):
    doubled = [(name, entry) for name, result in helps.items()
               for entry in _entries(result["help"]) if entry.count("(default:") > 1]
    assert not doubled, doubled
    shown = [e for r in helps.values() for e in _entries(r["help"]) if "(default:" in e]
    assert len(shown) > 50  # defaults are shown, once each


# runpy warns when the module ran here before (the parsers fixture imported it); a fresh `vitok` does not
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_vitok_runs_each_command_as_its_module(capsys):
    from vitok_fast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["train-stage1", "--help"])
    assert e.value.code == 0 and "--kl-weight" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["latent_stats", "--help"])  # the module's spelling works too
    assert e.value.code == 0 and "--ckpt" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["encodes"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expected a command") and "encode" in err
