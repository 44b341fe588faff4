"""Progress lines: only where the process asked for them, only for long work, on stderr."""

import re

import pytest

from common import progress
from common.progress import Progress, report_progress


@pytest.fixture(autouse=True)
def restore_settings():
    saved = dict(progress._settings)
    yield
    progress._settings.update(saved)


def run(total: int) -> None:
    with Progress(total, f"decoding {total} files of site-1") as p:
        for _ in range(total):
            p.advance()


def test_silent_unless_the_process_asked(capsys):
    run(5)
    assert capsys.readouterr() == ("", "")


def test_short_work_says_nothing(capsys):
    report_progress(after=60)
    run(5)
    assert capsys.readouterr() == ("", "")


def test_long_work_says_what_it_does_then_counts_then_a_final_line(capsys):
    report_progress(after=0, every=0)
    run(3)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[0] == "decoding 3 files of site-1 ..."
    assert [re.sub(r" \(.*", "", line) for line in lines[1:4]] == [f"decoded {i}/3 files" for i in (1, 2, 3)]
    assert re.fullmatch(r"decoded 3/3 files in \d+\.\d s \(\d+/s\)", lines[-1])


def test_counts_at_most_every_interval(capsys):
    report_progress(after=0, every=3600)
    run(100)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("decoded 100/100 files in ")


def test_no_final_line_when_the_work_fails(capsys):
    report_progress(after=0, every=3600)
    with pytest.raises(KeyError), Progress(2, "decoding 2 files of x") as p:
        p.advance()
        raise KeyError
    assert capsys.readouterr().err.splitlines() == ["decoding 2 files of x ..."]
