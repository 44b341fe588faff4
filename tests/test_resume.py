"""Interrupts and resume that are safe: one Ctrl-C (or SIGTERM) ends a simulation within seconds with its run
directory consistent, and ``--resume`` continues only a run directory that holds one unfinished study.

The simulations are real ``python -m fedrad simulate`` processes on two small synthetic hospitals (32 px,
the inline backend). One finished 3-round study is made once per module; each test works on a copy, cut
back to where a study stopped after round 1 (what a kill after round 1's checkpoint leaves) where needed.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _procs import wait_for

from common.config import StudyConfig
from server.rundir import ResumeError, RunDirectory, study_digest


def fedrad(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", *args], capture_output=True, text=True, timeout=timeout)


def simulate_args(data: Path, out: Path, rounds: int) -> list[str]:
    return ["simulate", "--data", str(data), "--rounds", str(rounds), "--image-size", "32", "--batch-size", "16",
            "--backend", "inline", "--out", str(out)]


@pytest.fixture(scope="module")
def finished(demo_sites, tmp_path_factory) -> Path:
    """A real 3-round study, finished (model.pt written)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = fedrad(*simulate_args(demo_sites[0].parent, out, 3), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def copy_of(run: Path, dest: Path, stopped_after: int | None = None) -> Path:
    """A copy of ``run``; with ``stopped_after``, as a study stopped after that round leaves it: no model.pt,
    no later checkpoint or metrics row."""
    shutil.copytree(run, dest)
    if stopped_after is not None:
        (dest / "model.pt").unlink()
        (dest / "cross_site.json").unlink(missing_ok=True)
        for path in (dest / "checkpoints").iterdir():
            if int(path.stem.split("-")[1]) > stopped_after:
                path.unlink()
        lines = (dest / "metrics.jsonl").read_text().splitlines(keepends=True)
        (dest / "metrics.jsonl").write_text("".join(lines[:stopped_after]))
    return dest


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def rounds_in(run: Path) -> tuple[list[int], list[int]]:
    """The rounds of the checkpoint files and of the metrics rows."""
    checkpoints = sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("round-*.pt"))
    rows = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return checkpoints, rows


def restamp_checkpoint(path: Path, digest: str | None) -> None:
    """Give a checkpoint another study digest (None: none, as an older fedrad wrote it)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload.pop("study_digest")
    torch.save({**payload, **({"study_digest": digest} if digest else {})}, path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_signal_ends_a_simulation_within_seconds_with_its_run_dir_consistent(signum, demo_sites, tmp_path,
                                                                                 procs):
    """Before, Ctrl-C stopped Flower's engine but its ServerApp thread went on waiting for replies (up to the
    round timeout), and Python for it: the command hung until a second Ctrl-C, which ended in a traceback."""
    out, log = tmp_path / "run", tmp_path / "simulate.log"
    proc = procs.start([sys.executable, "-m", "fedrad", *simulate_args(demo_sites[0].parent, out, 50)], log)
    assert wait_for(log, "round 1/", 240, interval=0.2), log.read_text()
    proc.send_signal(signum)
    sent = time.time()
    try:
        status = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 20 s after {signum.name}:\n{log.read_text()}")
    text = log.read_text()
    assert status == 128 + signum, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    said = [line for line in text.splitlines() if line.startswith("fedrad: interrupted")]
    checkpoints, rows = rounds_in(out)
    last = checkpoints[-1]
    assert said == [f"fedrad: interrupted after round {last}; resume with: fedrad simulate --resume {out}"], text
    assert checkpoints == rows == list(range(1, last + 1)) and last < 50, text
    config = json.loads((out / "config.json").read_text())
    assert config["study-digest"] == study_digest(config)
    assert not (out / "model.pt").exists()
    assert not [p.name for p in out.rglob(".*")]  # no temporary file left behind
    print(f"\n{signum.name}: exited {time.time() - sent:.1f} s after the signal, after round {last}")


def test_resume_falls_back_past_a_truncated_checkpoint_and_a_torn_metrics_line(finished, tmp_path):
    """Stopped after round 2, whose checkpoint is truncated, with the torn start of a row at the end of
    metrics.jsonl: the study resumes from round 1's checkpoint, says so, and finishes consistent."""
    run = copy_of(finished, tmp_path / "run", stopped_after=2)
    checkpoint = run / "checkpoints" / "round-002.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "sites": [{"site": "hosp')
    result = fedrad("simulate", "--resume", str(run), "--backend", "inline", "--rounds", "3")  # as saved: fine
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert "checkpoint round-002.pt is unreadable (truncated?): resuming from round-001.pt" in lines
    assert "metrics.jsonl line 3 is not a complete round (torn write?): skipped" in lines
    assert "metrics.jsonl round 2 came after the last checkpoint: run again" in lines
    assert f"resuming {run} at round 2/3" in lines
    assert rounds_in(run) == ([1, 2, 3], [1, 2, 3])
    digest = json.loads((run / "config.json").read_text())["study-digest"]
    rows = RunDirectory(run).rounds()
    assert all(r["study_digest"] == digest for r in rows)
    assert RunDirectory(run).latest_checkpoint()["study_digest"] == digest
    assert (run / "model.pt").exists()


def nothing(run: Path) -> None:
    pass


def other_study_checkpoint(run: Path) -> None:
    restamp_checkpoint(run / "checkpoints" / "round-001.pt", "0123456789abcdef")


def unreadable_checkpoints(run: Path) -> None:
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(("stopped", "setup", "options", "message"), [
    (False, nothing, [], "already finished after 3 rounds (model.pt is there); use --out for a new study"),
    (True, nothing, ["--epsilon", "3", "--rounds", "3", "--model", "cnn"],
     "cannot resume with --model cnn (saved: model=scatternet), --epsilon 3 (saved: epsilon=8): options given "
     "with --resume must agree with the study saved in"),  # --rounds 3 is the saved value: fine
    (True, other_study_checkpoint, [], "checkpoint round-001.pt belongs to another study (study digest "
     "0123456789abcdef"),
    (True, unreadable_checkpoints, [], "checkpoints can be read (round-001.pt: truncated?); use --out"),
], ids=["finished", "options-differ", "checkpoint-of-another-study", "no-readable-checkpoint"])
def test_a_refused_resume_says_why_on_one_line_and_changes_nothing(finished, tmp_path, stopped, setup, options,
                                                                   message):
    run = copy_of(finished, tmp_path / "run", stopped_after=1 if stopped else None)
    setup(run)
    before = snapshot(run)
    result = fedrad("simulate", "--resume", str(run), "--backend", "inline", *options)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("fedrad: error: cannot resume") and message in lines[0], lines
    assert snapshot(run) == before


def test_the_server_side_resume_refuses_a_finished_study_before_submitting_it(finished, tmp_path):
    """``fedrad server run --resume`` checks the run dir as the server would (the SuperLink address is never
    contacted: nothing listens on port 1)."""
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    result = fedrad("server", "run", "--server", "127.0.0.1:1", "--insecure", "--resume", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "already finished after 3 rounds" in result.stderr
    assert snapshot(run) == before


def resumable(finished: Path, dest: Path) -> tuple[RunDirectory, StudyConfig]:
    run = RunDirectory(copy_of(finished, dest, stopped_after=1))
    return run, run.saved_study().replace(resume=True, out=str(run.path))


def test_a_config_or_metrics_row_that_does_not_belong_is_refused(finished, tmp_path):
    run, study = resumable(finished, tmp_path / "edited")
    flat = run.read_config()
    run.config_path.write_text(json.dumps({**flat, "epsilon": 3.0}))
    with pytest.raises(ResumeError, match="config.json was changed after the study started"):
        run.resume_point(study)

    run, study = resumable(finished, tmp_path / "rows")
    row = json.loads(run.metrics_path.read_text())
    run.metrics_path.write_text(json.dumps({**row, "study_digest": "0123456789abcdef"}) + "\n")
    with pytest.raises(ResumeError, match="metrics.jsonl round 1 is from another study"):
        run.resume_point(study)

    run, study = resumable(finished, tmp_path / "sites")  # e.g. the data now gives another number of sites
    with pytest.raises(ResumeError, match=r"differs from the study saved .* in num-sites 3 \(saved 2\)"):
        run.resume_point(study.replace(num_sites=3))


def test_a_run_dir_from_before_study_digests_resumes_with_a_note(finished, tmp_path):
    """Nothing of an older fedrad's run dir can be checked against a digest, so nothing is refused for it."""
    run, study = resumable(finished, tmp_path / "old")
    flat = run.read_config()
    del flat["study-digest"]
    run.config_path.write_text(json.dumps(flat))
    restamp_checkpoint(run.checkpoint_path(1), None)
    point = run.resume_point(study)
    assert point.next_round == 2
    assert any("has no study digest (run dir of an older fedrad)" in note for note in point.notes)


def test_all_rounds_done_without_model_pt_writes_the_final_model(finished, tmp_path):
    """A crash between the last checkpoint and model.pt: a resume runs no round and writes model.pt."""
    run = RunDirectory(copy_of(finished, tmp_path / "run"))
    run.model_path.unlink()
    point = run.resume_point(run.saved_study().replace(resume=True, out=str(run.path)))
    assert point.next_round == 4
    assert point.notes == ["all 3 rounds are done (checkpoint round 3): writing the final model"]
