"""Bad input gives one line on stderr and exit status 2: never a traceback, and nothing written or lost.

``test_error_paths`` is the table of bad inputs: a row is the command line and a fragment of the one error
line. ``{name}`` in a command line is an input made in the test's tmp dir: ``{tmp}`` the dir itself,
``{npz}`` a small labelled .npz, or any of INPUTS (add a maker there for a new kind of input).
"""

import argparse
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# "fedrad: error: ..." (the command's own errors) or "fedrad simulate: error: ..." (its options').
ERROR_LINE = re.compile(r"^fedrad( [a-z]+)*: error: ")
# Options that name a file or folder the command writes: a failing command never creates them.
OUTPUT_OPTIONS = ("--out", "--json", "--heatmap")


def fedrad(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", *args], capture_output=True, text=True, timeout=timeout)


def _study(tmp: Path) -> Path:
    """A run directory that already holds a study."""
    (tmp / "study").mkdir()
    (tmp / "study" / "config.json").write_text("{}")
    return tmp / "study"


def _text(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("not a model\n")
    return tmp / "notes.txt"


def _torch_file(tmp: Path) -> Path:
    """A file torch.save wrote that is not a model.pt."""
    import torch

    torch.save({"weights": torch.zeros(3)}, tmp / "other.pt")
    return tmp / "other.pt"


def _model(tmp: Path) -> Path:
    """A fedrad model.pt (an untrained small CNN)."""
    import torch

    from common.models import build_model

    torch.save({"format": "fedrad-model/1", "state_dict": build_model("cnn", 1, 2).state_dict(), "architecture": "cnn",
                "input_size": 32, "channels": 1, "class_names": ["normal", "pneumonia"]}, tmp / "model.pt")
    return tmp / "model.pt"


def _unreadable(tmp: Path) -> Path:
    """A folder of two image files that no reader can decode."""
    folder = tmp / "unreadable"
    folder.mkdir()
    (folder / "a.png").write_text("not a PNG")
    (folder / "b.dcm").write_bytes(b"\0" * 64)
    return folder


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _upper_labels(tmp: Path) -> Path:
    """Three PNGs labelled NORMAL, PNEUMONIA and Normal in labels.csv (the study's classes are lower case)."""
    folder = tmp / "upper"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text("path,label\n0.png,NORMAL\n1.png,PNEUMONIA\n2.png,Normal\n")
    return folder


def _bad_policy(tmp: Path) -> Path:
    """A hospital policy with a misspelt key (max_epsilon for max-epsilon): never silently ignored."""
    (tmp / "policy.toml").write_text("[privacy]\nmax_epsilon = 3\n")
    return tmp / "policy.toml"


def _saved_run(tmp: Path, finished: bool) -> Path:
    """A run dir of a 3-round study on {npz}-like data that stopped after round 1 (or finished: model.pt)."""
    from common.config import StudyConfig
    from server.rundir import RunDirectory

    run = RunDirectory(tmp / ("finished" if finished else "stopped"))
    data = tmp / "data.npz"
    if not data.exists():
        np.savez(data, train_images=np.zeros((40, 8, 8), np.uint8), train_labels=np.arange(40) % 2)
    run.write_config(StudyConfig(num_rounds=3, data=str(data), out=str(run.path), num_sites=2).to_flat())
    if finished:
        run.model_path.write_bytes(b"a model")
    return run.path


INPUTS = {"bad_policy": _bad_policy, "finished": lambda tmp: _saved_run(tmp, True),
          "stopped": lambda tmp: _saved_run(tmp, False),
          "study": _study, "text": _text, "torch_file": _torch_file, "model": _model, "unreadable": _unreadable,
          "empty": _empty, "upper_labels": _upper_labels}


@pytest.mark.parametrize(
    "args, message",
    [
        # simulate: bad values fail before anything is written or trained; an option is named as typed
        (["simulate", "--data", "/nonexistent/data", "--out", "{tmp}/run"], "data path not found"),
        (["simulate", "--data", "{npz}", "--partition", "skewed", "--out", "{tmp}/run"], "--partition 'skewed'"),
        (["simulate", "--data", "{npz}", "--sites", "50", "--out", "{tmp}/run"], "too few for 50 sites"),
        (["simulate", "--data", "{npz}", "--sites", "10", "--out", "{tmp}/run"],  # 12 images a site
         "--sites 10: site-1 would validate on 3 of its 12 images; measuring a site takes at least 5"),
        (["simulate", "--data", "{npz}", "--augment", "nonsense", "--out", "{tmp}/run"], "augment preset 'nonsense'"),
        (["simulate", "--sites", "0", "--out", "{tmp}/run"], "argument --sites: must be at least 1 (got 0)"),
        (["simulate", "--data", "{npz}", "--sites", "2", "--min-nodes", "5", "--out", "{tmp}/run"],
         "--min-nodes must be at most the number of sites, 2 (got 5)"),
        (["simulate", "--data", "{npz}", "--model", "scatternet", "--rounds", "0", "--out", "{tmp}/run"],
         "--rounds must be at least 1 (got 0)"),  # the default model passes the parser
        (["simulate", "--data", "{npz}", "--epsilon", "0", "--out", "{tmp}/run"],
         "--epsilon must be > 0 under DP (got 0)"),
        (["simulate", "--rounds", "many"], "fedrad simulate: error: argument --rounds: invalid int value: 'many' "
         "(see fedrad simulate --help)"),
        (["simulate", "--resume", "{tmp}/never-ran"], "cannot resume"),
        # --resume: a finished run, options that disagree with the saved study (tests/test_resume.py has the
        # cases that need a real run: mixed digests, torn checkpoints and metrics)
        (["simulate", "--resume", "{finished}"], "already finished"),
        (["simulate", "--resume", "{stopped}", "--epsilon", "3"],
         "cannot resume with --epsilon 3 (saved: epsilon=8)"),
        (["simulate", "--resume", "{stopped}", "--no-secure-aggregation"],
         "cannot resume with --no-secure-aggregation (saved: secure-aggregation=True)"),
        (["simulate", "--data", "{npz}", "--sites", "1", "--secure-aggregation", "--out", "{tmp}/run"],
         "secure aggregation needs at least 2 sites"),
        (["simulate", "--data", "{npz}", "--out", "{study}"], "already holds a study"),
        # evaluate, predict: a model.pt that is not one, files that cannot be read
        (["evaluate", "--model", "{tmp}/model.pt", "--data", "{npz}"], "model not found"),
        (["evaluate", "--model", "{npz}", "--data", "{npz}"], "not a fedrad model.pt"),
        (["evaluate", "--model", "{text}", "--data", "{npz}", "--json", "{tmp}/metrics.json"],
         "is not a fedrad model.pt (PyTorch cannot load it as saved tensors)"),
        (["evaluate", "--model", "{torch_file}", "--data", "{npz}"],
         "is not a fedrad model.pt (it has no state_dict, architecture, input_size, channels, class_names)"),
        (["predict", "--model", "{text}", "{unreadable}"], "is not a fedrad model.pt"),
        (["predict", "--model", "{model}", "{unreadable}", "--json", "{tmp}/p.json", "--heatmap", "{tmp}/maps"],
         "none of the 2 files could be read"),
        # data, augment, privacy
        (["data", "preview", "{upper_labels}", "--out", "{tmp}/sheet.png", "--max", "0"],
         "argument --max: must be at least 1 (got 0)"),
        (["data", "prepare", "{empty}"], "no files to prepare"),
        (["data", "check", "{upper_labels}", "--class-names", "normal,pneumonia"],
         "only 3 labelled, decodable images"),  # NORMAL is class normal, as training reads it
        (["augment", "preview", "--data", "{npz}", "--out", "{tmp}/aug.png", "--images", "0"],
         "argument --images: must be at least 1 (got 0)"),
        (["privacy", "--state-dir", "{tmp}"], "no privacy ledger"),
        # a hospital's policy: a typo stops the node before it starts, never a default in its place
        (["policy", "show", "--policy", "{bad_policy}"], "unknown key 'max_epsilon' in [privacy]"),
        (["policy", "show", "--policy", "{tmp}/none.toml"], "policy file not found"),
        (["client", "start", "--insecure", "--server", "127.0.0.1:1", "--site", "a", "--data", "{npz}",
          "--state", "{tmp}/state", "--policy", "{bad_policy}"], "unknown key 'max_epsilon' in [privacy]"),
        # a hospital's node: checked before Flower starts (fedrad/preflight.py), nothing written
        (["client", "start", "--insecure", "--server", "fl.example.org", "--site", "a", "--data", "{npz}",
          "--state", "{tmp}/state"], "--server 'fl.example.org': expected HOST:PORT"),
        (["client", "start", "--server", "127.0.0.1:1", "--ca", "{tmp}/ca.crt", "--key", "{text}", "--site", "a",
          "--data", "{npz}", "--state", "{tmp}/state"], "study CA certificate not found"),
        (["client", "start", "--server", "127.0.0.1:1", "--ca", "{text}", "--key", "{text}", "--site", "a",
          "--data", "{npz}", "--state", "{tmp}/state"], "is not a hospital private key (make one with 'fedrad certs"),
        (["client", "start", "--insecure", "--server", "127.0.0.1:1", "--site", "a", "--data", "{empty}",
          "--state", "{tmp}/state"], "no labels.csv and no class subfolders"),
    ],
)
def test_error_paths(args, message, tmp_path, small_npz):
    args = _with_inputs(args, tmp_path, small_npz)
    targets = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in OUTPUT_OPTIONS]
    targets = [t for t in targets if not t.exists()]
    before = _files(tmp_path)
    result = fedrad(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]) and message in lines[0], result.stderr
    assert _files(tmp_path) == before, "a failing command wrote, changed or removed files"
    assert not [t for t in targets if t.exists()]


def _with_inputs(args: list[str], tmp: Path, npz: Path) -> list[str]:
    """``args`` with each {name} replaced by that input's path, made on first use."""
    made: dict[str, Path] = {"tmp": tmp, "npz": npz}
    for arg in args:
        for _, name, _, _ in string.Formatter().parse(arg):
            if name and name not in made:
                made[name] = INPUTS[name](tmp)
    return [a.format(**made) for a in args]


def _files(root: Path) -> dict[str, tuple[int, int] | str]:
    """Every path under ``root`` with its size and mtime (files) or 'dir'."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


def test_data_prepare_shows_progress_on_stderr(demo_sites, tmp_path):
    site = tmp_path / "site"  # a folder of its own: the cache is cold
    shutil.copytree(demo_sites[0], site)
    n = sum(1 for f in site.rglob("*") if f.is_file() and f.name != "labels.csv")
    result = fedrad("data", "prepare", str(site), "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"decoding {n} files of site into the cache ..."
    assert re.fullmatch(rf"decoded {n}/{n} files in \d+\.\d s \(\d+/s\)", lines[-1]), result.stderr
    assert result.stdout.splitlines()[0] == "from the data: 1 channel (grey)"  # as simulate takes it
    assert result.stdout.splitlines()[1].startswith(f"{n} files: {n} decoded")
    again = fedrad("data", "prepare", str(site))  # nothing to decode: nothing to report
    assert again.returncode == 0 and again.stderr == "" and f"0 decoded, {n} unchanged" in again.stdout


def test_data_preview_and_prepare_take_the_channels_from_the_data(tmp_path):
    """Colour images are previewed and cached in colour without --channels, as simulate would train on them."""
    for cls, colour in (("a", (200, 40, 90)), ("b", (40, 160, 200))):
        (tmp_path / "site" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((24, 24, 3), colour, np.uint8)).save(tmp_path / "site" / cls / f"{i}.png")
    preview = fedrad("data", "preview", str(tmp_path / "site"), "--out", str(tmp_path / "sheet.png"))
    assert preview.returncode == 0, preview.stderr
    assert preview.stdout.startswith("from the data: 3 channels (colour)\n")
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"), dtype=int)
    assert (sheet[:160, :160] == (200, 40, 90)).all(axis=-1).mean() > 0.9  # the tile in colour, not its luminance
    prepared = fedrad("data", "prepare", str(tmp_path / "site"), "--workers", "1", "--image-size", "16")
    assert prepared.returncode == 0 and "from the data: 3 channels (colour)" in prepared.stdout
    cache = Path(prepared.stdout.split(" -> ")[-1].strip())
    assert (cache / "images.f16").stat().st_size == 6 * 3 * 16 * 16 * 2  # 6 images of 3 x 16 x 16 float16
    given = fedrad("data", "preview", str(tmp_path / "site"), "--out", str(tmp_path / "grey.png"), "--channels", "1")
    assert given.returncode == 0 and "from the data" not in given.stdout


def test_simulate_help_shows_each_default():
    from fedrad.cli import build_parser

    result = fedrad("simulate", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    simulate = build_parser()._subparsers._group_actions[0].choices["simulate"]
    shown = [a for a in simulate._actions if a.option_strings and a.default is not None and a.default is not False
             and a.default not in ("", argparse.SUPPRESS)]
    assert len(shown) >= 15  # the check below covers each of them
    for action in shown:
        assert f"(default: {action.default})" in text, action.option_strings
    assert "--model {scatternet,cnn,resnet18}" in text and "(default: scatternet)" in text
    assert "(default " not in text  # said once, by the formatter
