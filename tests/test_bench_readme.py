"""benchmarks/readme.py: the benchmark tables of README.md and docs/benchmarks.md are generated from
benchmarks/results/."""

import json

from _benchmarks import load_benchmark


def readme_tool():
    return load_benchmark("readme")


def test_committed_readme_tables_match_committed_results(capsys):
    """Every table block in the README and docs/benchmarks.md is what its committed results file gives, each
    page holds the blocks it should (none skipped), and both pages were checked."""
    assert readme_tool().main(["--check"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert "skipped" not in err, err
    assert "README.md: 1 benchmark tables match" in out and "benchmarks.md: 6 benchmark tables match" in out, out


def test_each_page_holds_its_blocks():
    """The README has the headline table only; docs/benchmarks.md every full table (no table in two places)."""
    tool, root = readme_tool(), readme_tool().ROOT
    for page, names in ((root / "README.md", tool.EXPECTED["readme"]),
                        (root / "docs" / "benchmarks.md", tool.EXPECTED["docs"])):
        found = tuple(n for n in tool.BLOCKS if f"<!-- bench:{n} -->" in page.read_text())
        assert found == names, (page.name, found)


def test_headline_is_the_default_study_against_its_references(tmp_path):
    """The headline table: pooled, each site alone (without and with DP), the default study in bold, other
    budgets; the sentences under it come from the DP speed and federation results where they exist."""
    _goal_results(tmp_path)
    text = readme_tool().headline(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "| study | privacy | val AUC, all sites / worst site | wall time (2 CPU cores) |"
    assert lines[2] == "| pooled: all images in one place | none | 0.999 / 0.998 | 150 s |"
    assert lines[4] == "| **fedrad's default study: federated (fedavg)** | DP ε=8 | **0.985 / 0.970** | 150 s |"
    assert "beats each site training alone at 4/4 sites" in text
    assert "DP step speed: 0.610 of the non-private step's throughput (ScatterNet, 64 px, batch 64" in text
    assert "takes 1.20x the time of the same training in one process" in text
    (tmp_path / "federation.json").unlink()
    assert "Federation overhead" not in readme_tool().headline(tmp_path)


def test_both_pages_are_checked_and_only_the_pages_named_are_touched(tmp_path, capsys):
    _goal_results(tmp_path)
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text("Front door.\n<!-- bench:headline -->\n<!-- /bench:headline -->\nLinks.\n")
    docs.write_text("<!-- bench:goals -->\nold\n<!-- /bench:goals -->\n")
    tool = readme_tool()
    args = ["--results", str(tmp_path), "--readme", str(readme), "--docs", str(docs)]
    assert tool.main([*args, "--check"]) == 1
    assert tool.main(args) == 0
    assert "fedrad's default study" in readme.read_text() and readme.read_text().endswith("\nLinks.\n")
    assert docs.read_text().startswith("<!-- bench:goals -->\n| goal | target | measured | met |")
    assert tool.main([*args, "--check"]) == 0
    err = capsys.readouterr().err  # the docs page lacks the other full tables: reported, not fatal
    assert "skipped accuracy: no <!-- bench:accuracy --> block in" in err
    before = docs.read_text()
    readme.write_text("<!-- bench:headline -->\nstale\n<!-- /bench:headline -->\n")
    assert tool.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    assert docs.read_text() == before and "stale" not in readme.read_text()
    assert tool.main(["--results", str(tmp_path), "--docs", str(tmp_path / "missing.md"), "--check"]) == 1


def test_blocks_are_rebuilt_from_results_and_the_prose_is_kept(tmp_path):
    run = {"wall_s": 220.0, "auc": 0.99, "epsilon": [7.996, 8.0], "runs_wall_s": [230.0, 220.0],
           "round_median_s": 11.0, "rest_s": 29.0, "overhead_x": 1.0989, "pair_ratios": [1.15, 1.05]}
    alone = {**run, "wall_s": 200.0, "runs_wall_s": [200.0, 210.0], "round_median_s": 10.0, "rest_s": 20.0}
    (tmp_path / "federation.json").write_text(json.dumps({"flower": run, "in_process": alone}))
    readme = tmp_path / "benchmarks.md"
    readme.write_text("Intro by hand.\n<!-- bench:federation -->\nstale table\n<!-- /bench:federation -->\n"
                      "Prose by hand.\n<!-- bench:dp_speed -->\nkept: no results\n<!-- /bench:dp_speed -->\n")
    tool = readme_tool()
    assert tool.main(["--results", str(tmp_path), "--docs", str(readme), "--check"]) == 1
    assert tool.main(["--results", str(tmp_path), "--docs", str(readme)]) == 0
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("Intro by hand.\n") and "Prose by hand." in text
    assert ("| **overhead** | **1.10x** (fastest runs 1.10x) | 1.10x | +9.0 s | (pairs: 1.15x, 1.05x; the overhead is "
            "their geometric mean) |") in text
    assert "| 220.0 s | 11.0 s | 29.0 s | 230.0, 220.0 s |" in text
    assert "| 7.996, 8.000 |" in text
    assert "kept: no results" in text  # dp_speed.json is missing: that block is left alone
    assert tool.main(["--results", str(tmp_path), "--docs", str(readme), "--check"]) == 0


def test_federation_table_names_the_backend_and_what_ray_costs_beside_it(tmp_path):
    """Where the default study ran inline, the Ray run measured beside it gets its own row and overhead."""
    alone = {"wall_s": 200.0, "auc": 0.99, "epsilon": [8.0], "runs_wall_s": [200.0, 210.0], "round_median_s": 10.0,
             "rest_s": 20.0}
    inline = {**alone, "wall_s": 204.0, "runs_wall_s": [204.0, 214.2], "rest_s": 24.0, "backend": "inline",
              "overhead_x": 1.02, "pair_ratios": [1.02, 1.02]}
    ray = {**alone, "wall_s": 230.0, "runs_wall_s": [240.0, 230.0], "round_median_s": 11.0, "rest_s": 29.0,
           "overhead_x": 1.149, "pair_ratios": [1.2, 1.1]}
    (tmp_path / "federation.json").write_text(json.dumps({"flower": inline, "in_process": alone, "flower_ray": ray}))
    readme = tmp_path / "benchmarks.md"
    readme.write_text("<!-- bench:federation -->\nstale\n<!-- /bench:federation -->\n")
    assert readme_tool().main(["--results", str(tmp_path), "--docs", str(readme)]) == 0
    lines = readme.read_text().splitlines()
    assert lines[3].startswith("| `fedrad simulate` (inline backend, the default here) | 204.0 s |")
    assert lines[4].startswith("| `fedrad simulate --backend ray` | 230.0 s | 11.0 s | 29.0 s |")
    assert lines[5].startswith("| one process, no Flower | 200.0 s |")
    assert lines[6] == ("| **overhead** | **1.02x** (fastest runs 1.02x) | 1.00x | +4.0 s | (pairs: 1.02x, 1.02x; "
                        "the overhead is their geometric mean) | | |")
    assert lines[7] == ("| overhead with `--backend ray` | **1.15x** (fastest runs 1.15x) | 1.10x | +9.0 s "
                        "| (pairs: 1.20x, 1.10x; the overhead is their geometric mean) | | |")


def _goal_results(tmp_path, *, resnet_ratio=0.55, settings_lr=0.5):
    """Results files as the three benchmarks write them, cut to what the goals block reads."""
    def row(id_, auc, worst, **more):
        mode = id_ if id_ in ("pooled", "local") else "federated"
        dp = id_.startswith("dp")
        return {"id": id_, "status": "ok", "aggregate": {"auc": auc}, "worst": {"auc": worst}, "wall_s": 150.0,
                "mode": mode, "dp": dp, "epsilon_target": 8.0 if dp else None,
                "strategy": "fedavg" if mode == "federated" else "", **more}
    accuracy = {"dp_strategy": "fedavg",
                "settings": {"model": "scatternet", "image_size": 64, "rounds": 20, "local_epochs": 3,
                             "batch_size": 64, "lr": settings_lr},
                "rows": [row("pooled", 0.999, 0.998), row("fedavg", 0.998, 0.997, beats_local="3/4 (1 tied)"),
                         row("dp8-fedavg", 0.985, 0.97, beats_local="0/4", beats_local_dp="4/4"),
                         row("local", 0.99, 0.5)]}
    speed = [{"model": "scatternet", "input": 64, "batch": 64, "ratio_fedrad": 0.61, "ratio_opacus": 0.4},
             {"model": "cnn", "input": 64, "batch": 64, "ratio_fedrad": 0.3},
             {"model": "resnet18", "input": 64, "batch": 32, "ratio_fedrad": resnet_ratio}]
    federation = {"flower": {"backend": "inline", "overhead_x": 1.2, "runs_wall_s": [150.0, 1900.0]}}
    for name, data in (("accuracy", accuracy), ("dp_speed", speed), ("federation", federation)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))


def test_goals_block_says_which_goal_is_met_from_the_results(tmp_path):
    _goal_results(tmp_path)
    lines = readme_tool().goals(tmp_path).splitlines()
    assert lines[0] == "| goal | target | measured | met |"
    by_goal = {line.split(" | ")[0]: line for line in lines[2:]}
    assert len(by_goal) == 9
    gap = by_goal["| the default study (federated, DP at ε=8) vs pooled training without DP: aggregate val AUC"]
    assert gap.endswith("| 0.985 vs 0.999 (0.014 below) | yes |")
    assert by_goal["| the default study beats each site alone under the same ε, on the site's own val split"] \
        .endswith("| every site | 4/4 | yes |")
    assert by_goal["| fedavg without DP beats each site alone without DP"] \
        .endswith("| 3/4 (1 tied) | no site does better alone (1 tied) |")
    assert by_goal["| worst-site val AUC of the default study"].endswith("| 0.970 (aggregate 0.985) | — |")
    assert by_goal["| the code's defaults (`StudyConfig`) are what the table recommends and ran"].endswith("| yes |")
    # The CNN has no goal of its own; ResNet-18 at 0.55 meets 0.5.
    assert not any("CNN" in line for line in lines)
    assert by_goal["| DP step / non-private step throughput, ResNet-18-GN (64 px, batch 32)"] \
        .endswith("| at least 0.5 | 0.550 | yes |")
    # 1.2x overhead and a 1900 s (31.7 min) study miss their goals, and say so.
    assert by_goal["| federation overhead of the default study (`fedrad simulate`, inline backend, against one "
                   "process without Flower)"].endswith("| at most 1.15x | 1.20x | **no** |")
    assert by_goal["| a full default study on 2 CPU cores"].endswith(
        "| slowest of the federation benchmark's 2 runs 31.7 min; the accuracy table's run 2.5 min | **no** |")


def test_goals_block_flags_a_missed_ratio_and_a_default_the_table_did_not_run(tmp_path):
    _goal_results(tmp_path, resnet_ratio=0.45, settings_lr=1.0)
    text = readme_tool().goals(tmp_path)
    assert "| at least 0.5 | 0.450 | **no** |" in text
    assert "| table: fedavg, scatternet, 64, 20, 3, 64, 1; code: fedavg, scatternet, 64, 20, 3, 64, 0.5 | **no** |" \
        in text
    (tmp_path / "accuracy.json").unlink()  # the other benchmarks' goals are still shown
    lines = readme_tool().goals(tmp_path).splitlines()
    assert len(lines) == 2 + 4 and "ScatterNet" in lines[2]
