"""2:4: eligibility, ranking by measured sensitivity, validity, recovery, auto pattern, the exported proof."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from tinyprune.cli import app
from tinyprune.prune import two_four
from tinyprune.model.calibration import CalibrationSet
from tinyprune.config import L1GradSpec, PruneSpec, load_profile
from tinyprune.prune.importance.l1_grad import gradient_magnitudes, l1_grad_scores
from tinyprune.prune.importance.magnitude import magnitude
from tinyprune.prune.masks import n_of_m, prunable_weights
from tinyprune.export.metadata import is_n_of_m
from pipelines import tiny as tiny_pipeline
from tinyprune.prune.run import prune
from tinyprune.prune.recovery import mean_loss

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def batches():
    pipe = tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(1)
    cal = CalibrationSet(torch.randn(4, 4, 8, 8, generator=g), pipe.family.check_conditions(4), "test")
    return cal.batches(pipe, batch_size=4, seed=0)


def test_eligibility_reasons():
    assert two_four.eligibility(torch.zeros(8, 6, 3, 3)) == "6 input channels is not a multiple of 4"
    assert two_four.eligibility(torch.zeros(64, 32, 3, 3)).startswith("32 input channels < 64: too thin")
    assert two_four.eligibility(torch.zeros(8, 64)) is None


def test_ranking_follows_measured_loss_increase(batches):
    unet = tiny_pipeline(seed=0).unet
    weights = prunable_weights(unet)
    scores = dict(magnitude(weights))
    total = sum(w.numel() for w in weights.values())
    masks, decisions = two_four.select(unet, weights, scores, 0.1, batches)
    # measure each eligible layer's loss increase independently of select()
    base = mean_loss(unet, batches)
    measured = {}
    for name, w in weights.items():
        if two_four.eligibility(w) is None:
            saved = w.detach().clone()
            with torch.no_grad():
                w.mul_(n_of_m(scores[name]))
            measured[name] = mean_loss(unet, batches) - base
            with torch.no_grad():
                w.copy_(saved)
    assert set(measured) == {n for n, d in decisions.items() if "rank" in d} and len(measured) == 38
    by_rank = sorted(measured, key=lambda n: decisions[n]["rank"])
    assert by_rank == sorted(measured, key=lambda n: (measured[n], n))
    for n in measured:
        assert decisions[n]["sensitivity"] == pytest.approx(measured[n], abs=1e-6)
    # the greedy fill in that order: least sensitive first, skipping layers that would overshoot
    budget, expect = round(0.1 * total), []
    for n in by_rank:
        if weights[n].numel() // 2 <= budget:
            expect.append(n)
            budget -= weights[n].numel() // 2
    assert sorted(masks) == sorted(expect)
    assert [decisions[n]["pattern"] for n in by_rank[:3]] == ["2:4"] * 3
    assert all(decisions[n]["reason"] == "target sparsity reached" for n in measured if n not in masks)
    assert sum(weights[n].numel() // 2 for n in masks) <= round(0.1 * total)


@pytest.mark.parametrize("method", ["magnitude", "l1-grad"])
def test_prune_two_four_valid(batches, method):
    pipe = tiny_pipeline(seed=0)
    dense = {n: w.detach().clone() for n, w in prunable_weights(pipe.unet).items()}
    grads = gradient_magnitudes(pipe.unet, batches)
    spec, _ = PruneSpec.resolve(method, 0.3, "2:4", "global", False, load_profile("jetson"),
                                l1grad=L1GradSpec.parse(recovery_steps=0))
    plan = prune(pipe, spec, batches).to_dict()
    layers = plan["components"]["unet"]["layers"]
    weights = prunable_weights(pipe.unet)
    chosen = [n for n, d in layers.items() if d.get("pattern") == "2:4"]
    assert chosen and all(layers[n]["zeros"] == weights[n].numel() // 2 for n in chosen)
    for n, w in weights.items():
        if n in chosen:
            assert is_n_of_m(w.detach().numpy(), axis=1), n
        else:
            assert int((w == 0).sum()) == 0, n  # layers left dense are untouched
    total = sum(w.numel() for w in weights.values())
    achieved = plan["components"]["unet"]["sparsity"]
    assert achieved <= 0.3 and 0.3 - achieved < max(w.numel() for w in weights.values()) / 2 / total
    assert layers["conv_in.weight"]["reason"].startswith("4 input channels < 64")
    # within a layer, the method decides which 2 of 4 survive
    if method == "magnitude":
        expect = {n: n_of_m(dense[n].abs()) for n in chosen}
    else:
        scores = l1_grad_scores(dense, grads, 1.0, 1.0)
        expect = {n: n_of_m(scores[n]) for n in chosen}
        assert any(not torch.equal(expect[n], n_of_m(dense[n].abs())) for n in chosen)
    assert all(torch.equal(weights[n] != 0, expect[n]) for n in chosen)


def test_recovery_keeps_two_four(batches):
    pipe = tiny_pipeline(seed=0)
    spec, _ = PruneSpec.resolve("magnitude", 0.3, "2:4", "global", False, load_profile("jetson"),
                                l1grad=L1GradSpec.parse(recovery_steps=4, l1=0.0))
    plan = prune(pipe, spec, batches).to_dict()
    unet = plan["components"]["unet"]
    rec = unet["recovery"]
    assert rec["steps"] == 4 and rec["loss_before"] > 0
    for n, w in prunable_weights(pipe.unet).items():
        if unet["layers"][n].get("pattern") == "2:4":
            assert is_n_of_m(w.detach().numpy(), axis=1) and unet["layers"][n]["zeros"] == w.numel() // 2, n


def test_auto_pattern():
    spec, notices = PruneSpec.resolve("magnitude", 0.43, "auto", "global", False, load_profile("jetson-orin-nano"))
    assert spec.pattern == "2:4" and notices == []
    spec, notices = PruneSpec.resolve("l1-grad", 0.43, "auto", "global", False, load_profile("jetson-xavier-nx"))
    assert spec.pattern == "unstructured"
    assert notices == ["unstructured zeros run as dense math and will not be faster on jetson-xavier-nx "
                       "(it has no sparse tensor cores)"]


def test_auto_pattern_cli_notice(tiny_dir, tmp_path):
    r = CliRunner().invoke(app, ["prune", "--model", str(tiny_dir), "--pattern", "auto", "--target",
                                 "jetson-xavier-nx", "--out", str(tmp_path / "p"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "notice: unstructured zeros run as dense math and will not be faster on jetson-xavier-nx" in r.stderr
    plan = json.loads((tmp_path / "p" / "pruning_plan.json").read_text())
    assert plan["pattern"] == "unstructured" and abs(plan["components"]["unet"]["sparsity"] - 0.43) < 1e-5


@pytest.fixture(scope="module")
def two_four_bundle(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("b24")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    out = root / "bundle"
    r = CliRunner().invoke(app, ["export", "--model", str(tiny_dir), "--pattern", "2:4", "--target", "jetson",
                                 "--sparsity", "0.4", "--calibration", str(root / "imgs"), "--out", str(out),
                                 "--json"], catch_exceptions=False)
    return out, r


def test_exported_unet_two_four_proof(two_four_bundle):
    out, r = two_four_bundle
    assert r.exit_code in (0, 1), r.stderr  # 1 only if a drift gate fails; the 2:4 proof must hold either way
    model = onnx.load(str(out / "unet" / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["tinyprune.pattern"] == "2:4"
    claimed = {n: t for n, t in json.loads(meta["tinyprune.tensors"]).items() if t["pattern"] == "2:4"}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, t in claimed.items():
        w = inits[name]
        assert is_n_of_m(w, axis=t["axis"]), name
        assert int((w == 0).sum()) * 2 == w.size, name  # exactly half: 2 of every 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["tensors_2to4"] == sorted(claimed)
    plan = json.loads((out / "pruned" / "pruning_plan.json").read_text())
    chosen = [n for n, d in plan["components"]["unet"]["layers"].items() if d.get("pattern") == "2:4"]
    assert len(claimed) == len(chosen) > 0
    # MatMul initializers carry the transpose: their 2:4 runs along axis 0
    assert {t["axis"] for t in claimed.values()} == {0, 1}
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0


def test_report_lists_chosen_and_ineligible(two_four_bundle):
    out, _ = two_four_bundle
    report = json.loads((out / "report" / "report.json").read_text())
    t = report["pruning"]["unet"]["two_four"]
    assert [r["rank"] for r in t["chosen"]] == sorted(r["rank"] for r in t["chosen"])
    assert all("sensitivity" in r for r in t["chosen"] + t["not_chosen"])
    sens = [r["sensitivity"] for r in t["chosen"]]
    assert sens == sorted(sens)
    assert len(t["ineligible"]) == 45 and all(r["reason"] for r in t["ineligible"])
    md = (out / "report" / "report.md").read_text()
    assert "## unet: 2:4 layers, least sensitive first (loss increase when made 2:4 alone)" in md
    assert "| conv_in.weight | 1152 | 4 input channels < 64: too thin" in md
