"""README.md and docs/*.md: the marked commands work when pasted, and every relative link points at a file.

A fenced ``bash`` block whose opening fence comes right after a line ``<!-- runnable -->`` is run as it
stands: the blocks of one page in order, in one fresh temporary folder (so a later block may use what an
earlier one wrote), with this environment's ``fedrad`` first on PATH, each block under ``bash -e -o
pipefail`` and a time limit; every one must exit 0. The folder holds ``runs/demo/demo-data/`` as
``make demo`` leaves it (three hospitals of synthetic DICOM, fewer images), so a page can show the
commands on the demo's data. Mark only cheap commands: ones that start a server, train, or need a
machine's own paths stay unmarked (they are still checked for links).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.phantoms import write_demo_sites

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
BLOCK_SECONDS = 300  # one block; the slowest (an augmentation preview) imports torch, on a busy 2-core machine
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
BENCH_BLOCK = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", re.S)


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of each marked block of ``path``; a marker before anything but a bash fence fails."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        assert fence == "```bash", f"{path.name}:{i + 1}: {MARKER} must come right before a ```bash fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append((i + 3, "\n".join(lines[i + 2:end])))
    return blocks


def prose(text: str) -> str:
    """``text`` without fenced code blocks (whose '# comment' lines are not headings, whose text is not links)."""
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            kept.append(line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*?|_", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if re.match(r"#{1,6} ", line)}


MARKED = [(page, runnable_blocks(page)) for page in PAGES]


def test_there_are_docs_and_runnable_commands_in_the_readme():
    names = {p.name for p in PAGES}
    assert {"README.md", "privacy.md", "deploy.md", "data.md", "benchmarks.md"} <= names
    assert runnable_blocks(ROOT / "README.md"), "the README's try-it block lost its runnable marker"
    assert sum(len(blocks) for _, blocks in MARKED) >= 5


def test_the_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}: move detail to docs/)"


def test_no_run_diary_outside_benchmarks_notes():
    """Dates and clock times of runs belong in benchmarks/NOTES.md; generated tables may carry their own."""
    for page in PAGES:
        text = BENCH_BLOCK.sub("", page.read_text())
        found = re.findall(r"\b20\d\d-\d\d-\d\d\b|\b\d\d:\d\d(?:-\d\d:\d\d)? UTC\b", text)
        assert not found, f"{page.name}: dated run diary {found[:3]} (it belongs in benchmarks/NOTES.md)"


@pytest.mark.parametrize("page", [p for p in PAGES + [ROOT / "benchmarks" / "NOTES.md", ROOT / "deploy" / "README.md"]],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file(page):
    broken = []
    for target in LINK.findall(re.sub(r"`[^`\n]*`", "", prose(page.read_text()))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        dest = (page.parent / name).resolve() if name else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def defined_tests(path: Path) -> dict[str, bool]:
    """Test function name -> whether it is marked xfail, for one test file."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            found[node.name] = any("xfail" in ast.unparse(d) for d in node.decorator_list)
    return found


def test_the_privacy_page_names_real_tests_and_every_known_gap():
    """Each test docs/privacy.md points at exists; its "Known gaps" lists exactly the adversarial tests marked
    xfail (a leak found and not yet fixed), and its table names none of them."""
    text = (ROOT / "docs" / "privacy.md").read_text()
    tests = {}
    for name in ("test_adversarial", "test_policy", "test_client_app", "test_ledger_lock", "test_dp_randomness",
                 "test_approved_code"):
        tests.update(defined_tests(ROOT / "tests" / f"{name}.py"))
    named = set(re.findall(r"\btest_\w+", text)) - {"test_adversarial", "test_policy", "test_client_app",
                                                     "test_ledger_lock", "test_dp_randomness", "test_docs",
                                                     "test_approved_code"}
    assert named <= set(tests), f"docs/privacy.md names tests that do not exist: {sorted(named - set(tests))}"
    gaps_section = text.split("### Known gaps", 1)[1]
    listed = set(re.findall(r"\btest_adversarial_\w+", gaps_section))
    xfail = {name for name, marked in defined_tests(ROOT / "tests" / "test_adversarial.py").items() if marked}
    assert listed == xfail, f"Known gaps lists {sorted(listed)}; xfail in test_adversarial.py: {sorted(xfail)}"
    assert not (xfail & set(re.findall(r"\btest_\w+", text.split("### Known gaps", 1)[0])))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/demo/demo-data as `make demo` writes it (the same hospitals, 24 images each instead of 300)."""
    folder = tmp_path_factory.mktemp("docs-demo") / "demo-data"
    write_demo_sites(folder, num_sites=3, per_site=24, size=64, seed=0)
    return folder


@pytest.mark.parametrize("page", [p for p, blocks in MARKED if blocks], ids=lambda p: p.name)
def test_runnable_commands_work_when_pasted(page, demo_data, tmp_path):
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "fedrad").exists(), f"no fedrad next to {sys.executable}: run the tests from the venv"
    shutil.copytree(demo_data, tmp_path / "runs" / "demo" / "demo-data")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
           "FLWR_HOME": str(tmp_path / ".flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    for line, code in runnable_blocks(page):
        try:
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=BLOCK_SECONDS, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{page.name}:{line}: still running after {BLOCK_SECONDS} s:\n{code}")
        assert done.returncode == 0, (f"{page.name}:{line}: exit {done.returncode}\n{code}\n--- stdout\n"
                                      f"{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-2000:]}")
