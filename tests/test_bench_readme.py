"""benchmarks/readme.py: the README's benchmark tables are generated from benchmarks/results/."""

import json

from _benchmarks import load_benchmark


def readme_tool():
    return load_benchmark("readme")


def test_committed_readme_tables_match_committed_results(capsys):
    """Every table block in the README is what its committed results file gives (none skipped)."""
    assert readme_tool().main(["--check"]) == 0, capsys.readouterr().err
    assert "skipped" not in capsys.readouterr().err


def test_blocks_are_rebuilt_from_results_and_the_prose_is_kept(tmp_path):
    run = {"wall_s": 220.0, "auc": 0.99, "epsilon": [7.996, 8.0], "runs_wall_s": [230.0, 220.0],
           "round_median_s": 11.0, "rest_s": 29.0, "overhead_x": 1.0989, "pair_ratios": [1.15, 1.05]}
    alone = {**run, "wall_s": 200.0, "runs_wall_s": [200.0, 210.0], "round_median_s": 10.0, "rest_s": 20.0}
    (tmp_path / "federation.json").write_text(json.dumps({"flower": run, "in_process": alone}))
    readme = tmp_path / "README.md"
    readme.write_text("Intro by hand.\n<!-- bench:federation -->\nstale table\n<!-- /bench:federation -->\n"
                      "Prose by hand.\n<!-- bench:dp_speed -->\nkept: no results\n<!-- /bench:dp_speed -->\n")
    tool = readme_tool()
    assert tool.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 1
    assert tool.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("Intro by hand.\n") and "Prose by hand." in text
    assert ("| **overhead** | **1.10x** (fastest runs 1.10x) | 1.10x | +9.0 s | (pairs: 1.15x, 1.05x; the overhead is "
            "their geometric mean) |") in text
    assert "| 220.0 s | 11.0 s | 29.0 s | 230.0, 220.0 s |" in text
    assert "| 7.996, 8.000 |" in text
    assert "kept: no results" in text  # dp_speed.json is missing: that block is left alone
    assert tool.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 0


def test_federation_table_names_the_backend_and_what_ray_costs_beside_it(tmp_path):
    """Where the default study ran inline, the Ray run measured beside it gets its own row and overhead."""
    alone = {"wall_s": 200.0, "auc": 0.99, "epsilon": [8.0], "runs_wall_s": [200.0, 210.0], "round_median_s": 10.0,
             "rest_s": 20.0}
    inline = {**alone, "wall_s": 204.0, "runs_wall_s": [204.0, 214.2], "rest_s": 24.0, "backend": "inline",
              "overhead_x": 1.02, "pair_ratios": [1.02, 1.02]}
    ray = {**alone, "wall_s": 230.0, "runs_wall_s": [240.0, 230.0], "round_median_s": 11.0, "rest_s": 29.0,
           "overhead_x": 1.149, "pair_ratios": [1.2, 1.1]}
    (tmp_path / "federation.json").write_text(json.dumps({"flower": inline, "in_process": alone, "flower_ray": ray}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:federation -->\nstale\n<!-- /bench:federation -->\n")
    assert readme_tool().main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    lines = readme.read_text().splitlines()
    assert lines[3].startswith("| `fedrad simulate` (inline backend, the default here) | 204.0 s |")
    assert lines[4].startswith("| `fedrad simulate --backend ray` | 230.0 s | 11.0 s | 29.0 s |")
    assert lines[5].startswith("| one process, no Flower | 200.0 s |")
    assert lines[6] == ("| **overhead** | **1.02x** (fastest runs 1.02x) | 1.00x | +4.0 s | (pairs: 1.02x, 1.02x; "
                        "the overhead is their geometric mean) | | |")
    assert lines[7] == ("| overhead with `--backend ray` | **1.15x** (fastest runs 1.15x) | 1.10x | +9.0 s "
                        "| (pairs: 1.20x, 1.10x; the overhead is their geometric mean) | | |")
