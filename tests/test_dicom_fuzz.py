"""Issue 27: the DICOM fuzz run (tests/dicom_fuzz.py) as CI runs it: 2,000 mutants, fixed seed, two processes.

Zero exceptions out of the reader, no mutant slower than a bound, peak memory bounded. The run is a
subprocess with its own time limit, so a hang fails this test instead of holding up the suite.
"""

import json
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).with_name("dicom_fuzz.py")
MUTANTS = 2000
SLOWEST_S = 10.0  # a mutant's read; the slowest seen is under 1 s (a 2140 x 1760 JPEG-LS file)
PEAK_RSS_MB = 1536  # per reading process; seen about 230 MB


def test_no_mutant_makes_the_reader_raise_hang_or_balloon(tmp_path):
    out = tmp_path / "fuzz.json"
    result = subprocess.run([sys.executable, str(FUZZ), "--count", str(MUTANTS), "--seed", "0", "--jobs", "2",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert out.exists(), result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["mutants"] == MUTANTS
    assert summary["errors"] == [], summary["errors"][:5]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert summary["slowest"]["seconds"] < SLOWEST_S, summary["slowest"]
    assert summary["peak_rss_mb"] < PEAK_RSS_MB
    assert set(summary["mutators"]) == {"flip-header", "flip-pixels", "truncate", "drop-tag", "empty-tag",
                                        "bad-lut", "wrong-vr", "absurd-value"}
    assert summary["images"] > 0 and summary["skips"] > 0  # the mutants reach both outcomes
