"""Issue 25, hospitals run only approved code (client/approval.py, client/runtime.py).

The digest, unit by unit; then real processes on 127.0.0.1: a SuperLink, a hospital's node started by
``fedrad client start`` from a fedrad release, and two studies submitted by ``fedrad server run``: the
release itself (it trains) and a copy with one line changed in client/ (refused before any of it is
imported: its change would leave a marker file; the audit log says why, with both digests).

Every wait is bounded; every process started (and its descendants) is killed at the end.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _procs import BIN, QUIET, free_port, jsonl, wait_for, wait_until
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from client.approval import MANIFEST, checkout_files, digest_of, fab_digest
from client.policy import HospitalPolicy, PolicyError
from common.errors import FedradError

ROOT = Path(__file__).resolve().parents[1]


def _bundle(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, content in files.items():
            bundle.writestr(name, content)
    return buffer.getvalue()


def test_the_digest_counts_code_and_not_prose():
    app = {"pyproject.toml": b"[project]\n", "client/app.py": b"app = 1\n", "README.md": b"# hi\n",
           "benchmarks/results/x.json": b"{}", MANIFEST: b"pyproject.toml,00,0"}
    digest = fab_digest(_bundle(app))
    assert fab_digest(_bundle({**app, "README.md": b"# other\n", "benchmarks/results/x.json": b"[1]"})) == digest
    assert fab_digest(_bundle({**app, MANIFEST: b"other"})) == digest  # derived from the files
    for changed in ({**app, "client/app.py": b"app = 2\n"},  # one changed line
                    {**app, "pyproject.toml": b"[project]\nname = 'x'\n"},  # which ClientApp loads
                    {**app, "client/__pycache__/app.cpython-311.pyc": b"\0"},  # never packed by flwr build
                    {**app, "client/app.cpython-311-x86_64-linux-gnu.so": b"\0"},
                    {k: v for k, v in app.items() if k != "client/app.py"}):
        assert fab_digest(_bundle(changed)) != digest
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as bundle:  # a second entry of the same name (the last one is extracted)
        for name, content in app.items():
            bundle.writestr(name, content)
        with pytest.warns(UserWarning, match="Duplicate name"):
            bundle.writestr("client/app.py", b"app = 2\n")
    assert fab_digest(twice.getvalue()) != digest
    with pytest.raises(FedradError, match="not a readable app bundle"):
        fab_digest(b"PK\x03\x04 not a zip")


def test_a_checkouts_digest_is_of_the_bundle_flower_builds(tmp_path):
    """checkout_files skips the venv and caches, and Flower's build of it is byte for byte `flwr build`'s."""
    app = _release(tmp_path / "fedrad")
    for junk in (".venv/lib/site.py", "client/__pycache__/app.cpython-311.pyc", "build/lib/x.py"):
        (app / junk).parent.mkdir(parents=True, exist_ok=True)
        (app / junk).write_text("x = 1\n")
    assert build_fab_from_files(checkout_files(app))[0] == build_fab_from_disk(app)
    assert digest_of(app) == fab_digest(build_fab_from_disk(app))
    (app / "README.md").write_text("changed prose\n")
    assert digest_of(app) == fab_digest(build_fab_from_disk(app))
    with pytest.raises(FedradError, match="not found"):
        digest_of(tmp_path / "none")


def test_the_client_image_installs_the_checkouts_code(tmp_path):
    """deploy/Dockerfile.client copies only part of a checkout (no docs, tests or benchmarks) and installs that:
    its code digest must be the checkout's (what a coordinator submits), or such a node refuses every study."""
    image = _release(tmp_path / "opt-fedrad")
    assert (image / "client" / "app.py").is_file() and not (image / "tests").exists()
    assert digest_of(image) == digest_of(ROOT)


def test_the_policy_lists_further_approved_digests(tmp_path):
    digest = "ab" * 32
    (tmp_path / "p.toml").write_text(f'[code]\napproved = ["{digest}"]\n')
    policy = HospitalPolicy.load(tmp_path / "p.toml")
    assert policy.approved_code == (digest,)
    assert "1 more release(s)" in policy.describe()[-1]
    (tmp_path / "p.toml").write_text('[code]\napproved = ["fb97"]\n')
    with pytest.raises(PolicyError, match="64 lowercase hex"):
        HospitalPolicy.load(tmp_path / "p.toml")


def _release(dest: Path) -> Path:
    """This fedrad as a hospital installs it: what deploy/Dockerfile.client copies of the checkout."""
    dest.mkdir(parents=True)
    for line in (ROOT / "deploy" / "Dockerfile.client").read_text().splitlines():
        if line.startswith("COPY "):
            for source in [word for word in line.split()[1:-1] if not word.startswith("--")]:
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, dest / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, dest / source)
    return dest


def _fedrad(release: Path, home: Path) -> dict[str, str]:
    """The environment of a fedrad process installed from ``release`` (-P: the working directory is no
    import path), with its own FLWR_HOME, as on its own machine."""
    home.mkdir(parents=True, exist_ok=True)
    return {**QUIET, "PYTHONPATH": str(release), "FLWR_HOME": str(home),
            "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", "")}


@pytest.mark.e2e
def test_a_node_runs_its_approved_release_and_refuses_a_modified_one(tmp_path, small_npz, procs):
    approved = _release(tmp_path / "approved" / "fedrad")
    modified = _release(tmp_path / "modified" / "fedrad")
    marker = tmp_path / "modified-code-ran"
    app = modified / "client" / "app.py"
    app.write_text(app.read_text() + f"open({str(marker)!r}, 'w').close()\n")  # one line more, in client/
    good, bad = digest_of(approved), digest_of(modified)
    assert good != bad

    port = free_port()
    link_log = tmp_path / "superlink.log"
    procs.start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                 "--database", str(tmp_path / "superlink.db"), "--disable-runtime-dependency-installation"],
                link_log, env=_fedrad(approved, tmp_path / "link-home"))
    assert wait_for(link_log, "Application startup complete", 60), link_log.read_text()

    state, node_home = tmp_path / "st-mary", tmp_path / "node-home"
    node_log = tmp_path / "st-mary.log"
    procs.start([sys.executable, "-P", "-m", "fedrad", "client", "start", "--insecure", "--server",
                 f"127.0.0.1:{port}", "--site", "st-mary", "--data", str(small_npz), "--state", str(state),
                 "--port", str(free_port())], node_log, env=_fedrad(approved, node_home))
    assert wait_for(node_log, "SuperNode ID", 90), node_log.read_text()
    assert f"{good}  the installed fedrad ({approved})" in node_log.read_text()  # the start-up print

    study = tmp_path / "study.toml"
    study.write_text("num-rounds = 1\nmin-nodes = 1\nsecure-aggregation = false\nimage-size = 32\n"
                     "batch-size = 16\nround-timeout = 240.0\n")

    def submit(release: Path, out: Path) -> None:
        result = subprocess.run([sys.executable, "-P", "-m", "fedrad", "server", "run", "--insecure", "--server",
                                 f"127.0.0.1:{port}", "--config", str(study), "--out", str(out)],
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, **_fedrad(release, tmp_path / "coordinator-home")})
        assert wait_until(lambda: jsonl(out / "metrics.jsonl"), 10), \
            result.stdout[-3000:] + result.stderr[-3000:] + node_log.read_text()[-3000:]

    # The modified release: refused, and not one line of it ran here.
    submit(modified, tmp_path / "run-modified")
    refused = [a for a in jsonl(state / "audit.jsonl") if a["event"] == "refused app"]
    assert refused, node_log.read_text()[-3000:]
    assert all(a["digest"] == bad and a["approved"] == [good] and a["site"] == "st-mary" for a in refused)
    assert bad in refused[0]["reason"] and good in refused[0]["reason"]
    assert not marker.exists()
    assert not [p for p in (node_home / "apps").glob("*") if refused[0]["fab_hash"][:8] in p.name]  # not installed
    site = jsonl(tmp_path / "run-modified" / "metrics.jsonl")[0]["sites"][0]
    assert not site["trained"] and "runs only approved code" in site["declined"]  # the coordinator is told

    # The approved release: it trains, and its update leaves as the audit log records.
    submit(approved, tmp_path / "run-approved")
    rows = jsonl(tmp_path / "run-approved" / "metrics.jsonl")
    assert rows[0]["sites"][0]["trained"], json.dumps(rows[0])
    events = [a["event"] for a in jsonl(state / "audit.jsonl")]
    assert "sent model update" in events and events.count("refused app") == len(refused)
    assert not marker.exists()
