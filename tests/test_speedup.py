"""Latency targets of the structured methods (--speedup, --latency-budget-ms), latency-aware allocation by default
where only structure pays, and the cached cost table that keeps the same command's allocation the same."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tinyprune.cli import app
from tinyprune.config import L1GradSpec, PruneSpec, StructuredSpec, load_profile
from tinyprune.errors import InputError
from tinyprune.model.structure import find_groups
from tinyprune.prune.structured import run as structured_run
from tinyprune.prune.structured.allocation import Target, allocate, reachable
from tinyprune.prune.structured.cost import cache_dir, ort_cost_table, table_key
from tinyprune.prune.structured.run import prune_structured
from pipelines import tiny as tiny_pipeline
from test_structured import FAST, _batches

torch.set_num_threads(2)


def _spec(method="diff-pruning", target="x86-cpu", **structured):
    spec, notes = PruneSpec.resolve(method, 0.43, "unstructured", "global", False, load_profile(target),
                                    l1grad=L1GradSpec.parse(recovery_steps=0),
                                    structured=StructuredSpec.parse(**structured))
    return spec, notes


def _one_error(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ options and defaults
@pytest.mark.parametrize("kwargs, message", [
    ({"speedup": 1.0}, "--speedup must be a number > 1"),
    ({"speedup": "x"}, "--speedup must be a number > 1"),
    ({"latency_budget_ms": -3}, "--latency-budget-ms must be a number > 0"),
    ({"speedup": 2, "target_macs": 0.5}, "--target-macs and --speedup are both targets"),
    ({"speedup": 2, "latency_aware": False}, "cannot go with --no-latency-aware"),
    ({"latency_budget_ms": 5, "cost_model": "macs"}, "needs --cost-model ort"),
    ({"cost_model": "macs", "latency_aware": False}, "drop --no-latency-aware"),
])
def test_refusals(kwargs, message):
    with pytest.raises(InputError, match=message):
        StructuredSpec.parse(**kwargs)


def test_latency_aware_by_default_where_only_structure_pays():
    spec, notes = _spec()  # x86-cpu: onnxruntime on a CPU, measured
    assert spec.structured.latency_aware is True and spec.structured.cost_model == "ort"
    assert any("latency-aware allocation by measured onnxruntime time" in n for n in notes)
    spec, _ = _spec(target="jetson-agx-xavier")  # TensorRT GPU without sparse tensor cores: MACs, the stated model
    assert spec.structured.latency_aware is True and spec.structured.cost_model == "macs"
    spec, notes = _spec(target="jetson-agx-orin")  # sparse tensor cores: by parameters, as before
    assert spec.structured.latency_aware is False and not any("latency-aware" in n for n in notes)
    spec, _ = _spec(latency_aware=False)
    assert spec.structured.latency_aware is False
    spec, _ = _spec(target="jetson-agx-orin", speedup=1.5)  # a latency target is latency-aware anywhere
    assert spec.structured.latency_aware is True and spec.structured.cost_model == "macs"
    with pytest.raises(InputError, match="GPU target"):
        _spec(target="jetson-agx-xavier", latency_budget_ms=10)
    with pytest.raises(InputError, match="needs a structured method"):
        _spec(method="magnitude", speedup=2)


# ------------------------------------------------------------------------------------------ allocation and cost table
def test_latency_target_removes_the_milliseconds_asked():
    pipe = tiny_pipeline(seed=0)
    groups = find_groups(pipe.unet)
    g = torch.Generator().manual_seed(0)
    scores = {gr.path: torch.rand(gr.units, generator=g) for gr in groups}
    costs = {gr.path: 0.01 * (i + 1) for i, gr in enumerate(groups)}  # ms per unit
    total = reachable(groups, costs) + 5.0  # 5 ms no group owns
    for keep_ms in (0.8 * total, 0.5 * total):
        keep = allocate(groups, scores, Target("latency", keep_ms), costs=costs, latency_total=total)
        left = total - sum((gr.units - len(keep[gr.path])) * costs[gr.path] for gr in groups)
        assert abs(left - keep_ms) <= max(costs.values())  # the closer side, one unit at most
    # damage per ms: of two equally scored groups, the one whose units cost more time goes first
    flat = {gr.path: torch.ones(gr.units) for gr in groups}
    keep = allocate(groups, flat, Target("latency", total - costs[groups[-1].path] * 3), costs=costs,
                    latency_total=total)
    assert len(keep[groups[-1].path]) == groups[-1].units - 3
    assert all(len(keep[gr.path]) == gr.units for gr in groups[:-1])


def test_cost_table_is_cached_by_architecture():
    pipe = tiny_pipeline(seed=0)
    groups = find_groups(pipe.unet)
    cond = pipe.family.example_condition(1)
    first = ort_cost_table(pipe.unet, groups, cond, runs=2)
    assert (cache_dir() / f"{first.key}.json").is_file() and first.total_ms >= sum(first.groups.values()) > 0
    other = tiny_pipeline(seed=1)  # other weights, the same architecture: the same table
    again = ort_cost_table(other.unet, find_groups(other.unet), other.family.example_condition(1), runs=2)
    assert again.source == "cache" and again.groups == first.groups and again.total_ms == first.total_ms
    assert table_key(pipe.unet, cond, 2, 2, 2) != table_key(pipe.unet, cond, 1, 2, 2)  # batch is part of it
    fresh = ort_cost_table(pipe.unet, groups, cond, runs=2, cache=False)
    assert fresh.source == "measured" and set(fresh.groups) == set(first.groups)
    assert "source" not in first.to_dict()  # the plan holds the figures, not where this run read them


# ------------------------------------------------------------------------------------------ --speedup
def test_speedup_on_the_measured_table_is_timed_and_reproducible(monkeypatch):
    logs = []
    spec, _ = _spec(speedup=1.4)
    pipe = tiny_pipeline(seed=0)
    plan = prune_structured(pipe, spec, _batches(pipe), score_options=FAST["diff-pruning"], log=logs.append)
    u = plan.components["unet"]
    v = u.target["speedup"]
    assert u.target["kind"] == "latency" and u.allocation["cost"] == "onnxruntime ms"
    assert u.allocation["cost_table"]["total_ms"] == v["dense_ms"] and v["cost_model"] == "onnxruntime ms"
    assert 1 <= len(v["rounds"]) <= structured_run.MEASURE_ROUNDS
    assert v["chosen"] in [r["asked"] for r in v["rounds"]] and v["rounds"][0]["asked"] == 1.4
    chosen = next(r for r in v["rounds"] if r["asked"] == v["chosen"])
    assert v["measured"] == chosen["measured"] and v["predicted_speedup"] == chosen["predicted"]
    # what the table predicts for the first round's units (asked 1.4); the chosen round may be a later one, asked for
    # less after a measurement that outran the table (a fresh-clone CI run chose one predicting 1.29)
    assert v["rounds"][0]["predicted"] >= 1.4 * 0.95
    m = v["measured"]
    assert m["backend"] == "ort-cpu" and m["speedup"] == round(m["dense_p50_ms"] / m["p50_ms"], 3)
    assert v["met"] == (m["speedup"] >= 1.4 * (1 - structured_run.MEASURE_SLACK))
    assert u.macs < u.macs_dense and any("round 1" in line for line in logs)

    # the same command again: the cost table and the timed rounds come from the cache, the allocation is the same
    def no_timing(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(structured_run, "measured_speedup", no_timing)
    again = tiny_pipeline(seed=0)
    plan2 = prune_structured(again, spec, _batches(again), score_options=FAST["diff-pruning"], log=logs.append)
    assert plan2.components["unet"].to_dict() | {"seconds": 0} == u.to_dict() | {"seconds": 0}


def test_speedup_out_of_reach_is_one_line():
    spec, _ = _spec(speedup=500)
    pipe = tiny_pipeline(seed=0)
    with pytest.raises(InputError, match=r"--speedup 500 is out of reach: .* so at most [\d.]+x"):
        prune_structured(pipe, spec, _batches(pipe, 2), score_options=FAST["diff-pruning"])


def test_speedup_on_macs_for_a_gpu_target():
    spec, _ = _spec(target="jetson-agx-xavier", speedup=1.5)
    pipe = tiny_pipeline(seed=0)
    plan = prune_structured(pipe, spec, _batches(pipe), score_options=FAST["diff-pruning"])
    u = plan.components["unet"]
    v = u.target["speedup"]
    assert u.target["kind"] == "macs" and "measured" not in v and "cost_table" not in u.allocation
    assert v["predicted_speedup"] == round(u.macs_dense / u.macs, 3) >= 1.5 * 0.98


def test_cli_speedup_and_its_refusals(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("tinyprune.prune.importance.taylor_timestep.DEFAULT_STRIDE", 250)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a], catch_exceptions=False)
    out = tmp_path / "p"
    r = run("prune", "--model", tiny_dir, "--method", "diff-pruning", "--speedup", "1.3", "--target", "x86-cpu",
            "--recovery-steps", "0", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads((out / "pruning_plan.json").read_text())
    v = plan["components"]["unet"]["target"]["speedup"]
    assert v["speedup"] == 1.3 and v["measured"]["speedup"] > 0
    assert "--speedup" in _one_error(run("prune", "--model", tiny_dir, "--method", "magnitude", "--speedup", "2",
                                         "--out", tmp_path / "x"))
    assert "both targets" in _one_error(run("prune", "--model", tiny_dir, "--method", "ld-pruner", "--speedup", "2",
                                            "--target-macs", "0.5", "--out", tmp_path / "x"))
    assert "> 1" in _one_error(run("export", "--model", tiny_dir, "--method", "ld-pruner", "--speedup", "0.5",
                                   "--out", tmp_path / "x"))
    assert "GPU target" in _one_error(run("prune", "--model", tiny_dir, "--method", "ld-pruner", "--latency-budget-ms",
                                          "5", "--target", "jetson-agx-xavier", "--out", tmp_path / "x"))
    assert not (tmp_path / "x").exists()
