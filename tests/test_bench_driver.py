"""``python -m bench``'s driver: every program's goals in one shape, the figures and the
README section drawn from a results.json alone.

The benchmarks themselves are programs, not tests (they measure time; tests never do).
These tests feed the driver a results file shaped as each program writes it and check
what comes out. Only ``bench/`` goes on sys.path (not the checkout: gpuvars is imported
from where it is installed).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.skipif(not (BENCH / "__main__.py").exists(), reason="bench/ is not beside tests/")


def _driver() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_driver", BENCH / "__main__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _results() -> dict[str, Any]:
    growth = [{"system": s, "workload": f"bytes-{m}", "phase": p, "median_s": m / 1024 / g, "gib_s": g,
               "n_tensors": 16, "data_bytes": m << 20, "extra_rss_mib": 0.1}
              for s, g in (("gpuvars", 1.0), ("raw", 1.1)) for m in (64, 256) for p in ("save", "restore")]
    growth += [{"system": "gpuvars", "workload": f"count-{n}", "phase": p, "median_s": 1e-5 * n, "gib_s": 0.5,
                "n_tensors": n, "data_bytes": 64 << 20, "extra_rss_mib": 0.1}
               for n in (1000, 10000) for p in ("save", "restore")]
    return {
        "machine": {"cpu": "test CPU", "cores": 2, "ram_gib": 1.0, "kernel": "6", "commit": "abc"},
        "mode": "quick", "started": "now", "seconds": 1.0,
        "scenarios": {
            "ops": {"status": 0, "payload": {
                "goals": [{"goal": "16-element numpy scatter_update / raw fancy-index assignment", "measured": 4.0,
                           "limit": 3.0, "unit": "x", "met": False}, {"not": "a goal"}, "junk"],
                "rows": [{"backend": "numpy", "size": n, "op": "assign", "gpuvars_ns": 300.0 * n ** 0.1,
                          "raw_ns": 200.0 * n ** 0.1, "jit_ns": None} for n in (16, 1024, 1 << 20)]}},
            "growth": {"status": 0, "payload": {"cells": growth, "goals": [], "fits": {
                "gpuvars save": {"fixed_ms": 1.0, "per_tensor_us": 5.0, "per_gib_s": 0.9}}}},
            "distribute": {"status": 0, "payload": {"goals": [
                {"goal": "strategy.run of an empty step, 4 replicas (worst backend)", "measured": 45.0, "limit": 100.0,
                 "unit": "us", "met": True}]}},
            "optim": {"status": 1, "payload": None, "output_tail": ["Traceback ...", "RuntimeError: broken"]},
        },
        "goals": [],
    }


def test_every_programs_goals_come_out_in_one_shape() -> None:
    driver = _driver()
    results = _results()
    goals = [g for name, rec in results["scenarios"].items() for g in driver.goals_of(name, rec["payload"])]
    assert goals == [
        {"scenario": "ops", "goal": "16-element numpy scatter_update / raw fancy-index assignment", "measured": 4.0,
         "limit": 3.0, "unit": "x", "met": False},
        {"scenario": "distribute", "goal": "strategy.run of an empty step, 4 replicas (worst backend)", "measured": 45.0,
         "limit": 100.0, "unit": "us", "met": True},
    ]
    assert driver.goals_of("optim", None) == []
    assert driver.goals_of("optim", {"goals": "not a list"}) == []


def test_unknown_scenarios_are_refused_with_the_known_ones(tmp_path: pathlib.Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--scenarios", "ops,nope", "--out", str(tmp_path)],
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown scenario(s) ['nope']" in done.stderr and "'checkpoint'" in done.stderr


def test_figures_and_the_readme_section_are_drawn_from_the_json_alone(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (the bench extra)")
    results = _results()
    driver = _driver()
    results["goals"] = [g for name, rec in results["scenarios"].items() for g in driver.goals_of(name, rec["payload"])]
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    plot = subprocess.run([sys.executable, "-m", "bench", "plot", str(path)], cwd=BENCH.parent, capture_output=True,
                          text=True, timeout=120, check=False)
    assert plot.returncode == 0, plot.stderr
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert pngs == ["checkpoint_bytes.png", "checkpoint_count.png", "ops_numpy.png"]
    assert all((path.parent / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n")
    done = subprocess.run([sys.executable, "-m", "bench", "readme", str(path), "--readme", str(readme)],
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("\nafter\n")
    assert "test CPU, 2 cores" in text
    assert "| ops | 16-element numpy scatter_update / raw fancy-index assignment | 4 x | 3 | **no** |" in text
    assert "| distribute | strategy.run of an empty step, 4 replicas (worst backend) | 45 us | 100 | yes |" in text
    assert "Scenario optim failed (status 1): `RuntimeError: broken`" in text
    assert "![ops_numpy](out/ops_numpy.png)" in text


# --- the harness every program runs on --------------------------------------------------------------


def _harness() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        import harness

        return harness
    finally:
        sys.path.remove(str(BENCH))


_CHILD = '''
import sys, time
sys.path.insert(0, {bench!r})
import harness

def run_cell(cell):
    if cell["do"] == "skip":
        raise harness.Skip("libfoo is not installed")
    if cell["do"] == "crash":
        raise RuntimeError("the cell broke")
    if cell["do"] == "hang":
        time.sleep(60)
    print("noise on stdout")
    return {{**cell, "value": 42}}

if not harness.cell_main(run_cell, sys.argv[1:]):
    sys.exit("not a cell")
'''


@pytest.mark.parametrize("do", ["ok", "skip", "crash", "hang"])
def test_a_cell_in_a_fresh_process_always_comes_back_as_a_record(tmp_path: pathlib.Path, do: str) -> None:
    harness = _harness()
    program = tmp_path / "child.py"
    program.write_text(_CHILD.format(bench=str(BENCH)))
    record = harness.spawn(str(program), {"do": do}, timeout=2 if do == "hang" else 60)
    if do == "ok":
        assert record["value"] == 42 and record["do"] == "ok"
    elif do == "skip":
        assert record == {"do": "skip", "skip": "libfoo is not installed"}
    elif do == "crash":
        assert record["error"] == "RuntimeError: the cell broke" and record["do"] == "crash"
    else:
        assert record == {"do": "hang", "error": "timed out after 2 s"}


def test_the_harness_rules() -> None:
    harness = _harness()
    assert harness.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert [harness.rotated("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    calls: list[str] = []
    times = harness.time_steps(lambda: calls.append("step"), 3, warmup=2, before=lambda: calls.append("before"))
    assert len(times) == 3 and calls == ["before", "step"] * 5
    timed = harness.time_calls(lambda n: [None for _ in range(n)], batches=3, batch_ms=1.0, warmup_s=0.05)
    assert timed["warmup_calls"] >= harness.WARMUP_CALLS and timed["min_ns"] <= timed["ns"] <= timed["max_ns"]
    assert harness.goal("g", 2.0, 1.5) == {"goal": "g", "measured": 2.0, "limit": 1.5, "unit": "x", "met": False}
    assert harness.goal("g", 2.0, None)["met"] is None

    class Missing(harness.System):
        name = "missing"
        requires = ("numpy", "no_such_module_here")

    class Present(harness.System):
        name = "present"
        requires = ("numpy",)

    ok, skipped = harness.available([Missing, Present])
    assert ok == [Present] and skipped == {"missing": "no_such_module_here is not installed"}
    with pytest.raises(harness.Skip, match="missing: no_such_module_here is not installed"):
        Missing.require()


def test_every_scenario_program_runs_on_the_one_harness() -> None:
    """No program keeps its own copy of what the harness owns (they once had two warm-up
    rules, three machine records, two result tags and two Skip classes)."""
    programs = sorted({program for program, *_ in _driver().SCENARIOS.values()})
    assert len(programs) == 6
    for program in programs:
        src = (BENCH / program).read_text()
        assert "import harness" in src, program
        for own_copy in ("RESULT_TAG =", "class Skip", "def machine_record", "def warm_free_pages", "def _time_op",
                         '"--cell", json.dumps'):
            assert own_copy not in src, f"{program} defines its own {own_copy!r}: use bench/harness.py"


def _run_program(tmp_path: pathlib.Path, program: str, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{program}.json"
    done = subprocess.run([sys.executable, str(BENCH / program), *args, "--json", str(out)], cwd=BENCH.parent,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    payload: dict[str, Any] = json.loads(out.read_text())
    assert payload["machine"]["cores"] and isinstance(payload["cells"], list)
    assert all(set(g) == {"goal", "measured", "limit", "unit", "met"} for g in payload["goals"])
    return payload


@pytest.mark.slow
def test_a_checkpoint_run_end_to_end_writes_what_the_figures_read(tmp_path: pathlib.Path) -> None:
    """A real (tiny) run: fresh processes, real files, the cells plot.py draws from."""
    payload = _run_program(tmp_path, "bench_checkpoint.py", "--workloads", "count-40,count-400,bytes-1", "--systems",
                           "raw2,gpuvars", "--phases", "save,restore,verify", "--repeats", "1",
                           "--dir", str(tmp_path / "files"))
    cells = {(c["system"], c["workload"], c["phase"]): c for c in payload["cells"]}
    workloads = ("count-40", "count-400", "bytes-1")
    assert set(cells) == {(s, w, p) for s in ("raw2", "gpuvars") for w in workloads
                          for p in ("save", "restore")} | {("gpuvars", w, "verify") for w in workloads}
    for cell in cells.values():
        assert cell["ok"] and cell["median_s"] > 0 and cell["gib_s"] > 0, cell
        assert cell["n_tensors"] in (4, 40, 400) and cell["data_bytes"] > 0
        assert len(cell["times_s"]) == 1 and len(cell["warmup_extra_rss_kib"]) == 1  # the harness's one warm-up
    assert {"gpuvars save", "raw2 restore"} <= set(payload["fits"])  # 3 growth cells each: fitted
    assert not list((tmp_path / "files").iterdir())  # every cell cleaned up after itself


@pytest.mark.slow
def test_an_ops_run_end_to_end_has_rows_for_both_systems(tmp_path: pathlib.Path) -> None:
    payload = _run_program(tmp_path, "bench_ops.py", "--backends", "numpy", "--sizes", "16", "--rounds", "1",
                           "--batches", "2", "--batch-ms", "2", "--warmup-s", "0")
    rows = payload["rows"]
    assert sorted(r["op"] for r in rows) == ["assign", "assign_add", "scatter_add", "scatter_update"]
    for row in rows:
        assert row["gpuvars_ns"] > 0 and row["raw_ns"] > 0 and row["ratio"] == pytest.approx(
            row["gpuvars_ns"] / row["raw_ns"])
    assert {c["system"] for c in payload["cells"]} == {"gpuvars", "raw"}
