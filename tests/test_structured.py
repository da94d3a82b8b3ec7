"""Structured methods end to end on the tiny pipeline: targets hit, plan, save -> load -> ONNX, config, CLI."""

import json

import numpy as np
import pytest
import torch

from tinyprune.prune.structured.allocation import Target, allocate, removed_params

from tinyprune.prune.structured.cost import count_macs, unit_macs, token_counts
from tinyprune.model.calibration import CalibrationSet
from tinyprune.config import DEFAULT_STRUCTURED_RECOVERY_STEPS, L1GradSpec, PruneSpec, StructuredSpec, load_profile
from tinyprune.errors import InputError
from tinyprune.model.structure import find_groups
from tinyprune.prune.structured.groups import prunable_params
from pipelines import tiny as tiny_pipeline
from tinyprune.prune.structured.run import prune_structured

torch.set_num_threads(2)
CPU = load_profile("x86-cpu")
FAST = {"diff-pruning": {"stride": 250}, "ld-pruner": {"chunk": 16},
        "ecodiff": {"iterations": 2, "steps": 2, "batch": 2, "trajectories": 1}}


def _batches(pipe, n=8):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randn(n, 4, 8, 8, generator=g), pipe.family.check_conditions(n), "test").batches(pipe, n)


def _spec(method, sparsity=0.43, recovery_steps=0, **structured):
    spec, _ = PruneSpec.resolve(method, sparsity, "unstructured", "global", False, CPU,
                                l1grad=L1GradSpec.parse(recovery_steps=recovery_steps),
                                structured=StructuredSpec.parse(**structured))
    return spec


def test_structured_recovery_defaults_to_2000_distillation_steps():
    spec, _ = PruneSpec.resolve("ecodiff", 0.43, "unstructured", "global", False, CPU)
    assert spec.pattern == "channel" and spec.recovery_steps == DEFAULT_STRUCTURED_RECOVERY_STEPS == 2000


@pytest.mark.parametrize("method", ["diff-pruning", "ld-pruner", "ecodiff"])
def test_each_method_hits_the_parameter_fraction(method):
    pipe = tiny_pipeline(seed=0)
    dense = prunable_params(pipe.unet)
    plan = prune_structured(pipe, _spec(method), _batches(pipe, 4), score_options=FAST[method])
    u = plan.components["unet"]
    assert plan.pattern == "channel" and plan.structured and u.params_dense == dense
    assert u.params == prunable_params(pipe.unet)
    assert abs(u.params_removed - 0.43) <= 0.01, u.params_removed
    assert u.macs < u.macs_dense
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # still a working UNet of the same interface
        assert pipe.unet(x, torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 1, 32)).sample.shape == x.shape


def test_ld_pruner_logs_its_forwards_as_it_goes():
    from tinyprune.prune.importance.latent_stats import latent_stats

    pipe = tiny_pipeline(seed=0)
    groups, lines, info = find_groups(pipe.unet), [], {}
    latent_stats(pipe.unet, groups, _batches(pipe, 2), chunk=4, log=lines.append, info=info)
    progress = [line for line in lines if " forwards, " in line]
    counts = [int(line.split()[1].split("/")[0]) for line in progress]
    assert info["forwards"] == 1 + sum(-(-g.units // 4) for g in groups) == int(progress[0].split("/")[1].split()[0])
    assert 9 <= len(progress) <= 11 and counts == sorted(counts) and counts[-1] > 0.9 * info["forwards"]


class _Identity(torch.nn.Module):
    """Predicts epsilon as x_t itself: its loss falls as t grows (x_t -> noise), like a trained model's."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, encoder_hidden_states=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=x * self.w)


def test_diff_pruning_stops_at_the_threshold():
    from tinyprune.prune.importance.taylor_timestep import taylor_timestep

    pipe = tiny_pipeline(seed=0)
    info = {}
    taylor_timestep(_Identity(), [], _batches(pipe, 4), scheduler=pipe.scheduler, stride=50, threshold=0.05,
                    info=info)
    losses = info["losses"]
    assert info["timesteps"] == list(range(0, 50 * len(losses), 50)) and len(losses) < 20
    assert losses[-1] < 0.05 * max(losses) and all(l >= 0.05 * max(losses) for l in losses[:-1])
    pipe = tiny_pipeline(seed=0)  # on a real UNet: scores per unit, gradients released
    groups = find_groups(pipe.unet)
    scores = taylor_timestep(pipe.unet, groups, _batches(pipe, 2), scheduler=pipe.scheduler, stride=500)
    assert all(scores[g.path].shape == (g.units,) and (scores[g.path] >= 0).all() for g in groups)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_diff_pruning_in_gradient_passes_gives_the_one_pass_scores(monkeypatch):
    """Past the floor the summed gradient is held a share at a time: every unit's score is the one-pass score."""
    from tinyprune.prune.importance import taylor_timestep as tt

    pipe = tiny_pipeline(seed=0)
    groups = find_groups(pipe.unet)
    batches = _batches(pipe, 2)
    whole, split = {}, {}
    one = tt.taylor_timestep(pipe.unet, groups, batches, scheduler=pipe.scheduler, stride=250, info=whole)
    monkeypatch.setattr(tt, "GRADIENT_FLOOR", 0)
    monkeypatch.setattr(tt, "GRADIENT_SHARE", 0.2)
    monkeypatch.setattr("tinyprune.config.LARGE_UNET_BYTES", 0)  # a large UNet's way: checkpointed blocks too
    seen = []
    monkeypatch.setattr(type(pipe.unet), "enable_gradient_checkpointing",
                        lambda self, _f=type(pipe.unet).enable_gradient_checkpointing: (seen.append(1), _f(self))[1])
    several = tt.taylor_timestep(pipe.unet, groups, batches, scheduler=pipe.scheduler, stride=250, info=split)
    assert whole["gradient_passes"] == 1 and split["gradient_passes"] >= 5 and seen == [1]
    assert not pipe.unet.is_gradient_checkpointing
    assert split["timesteps"] == whole["timesteps"]
    for g in groups:
        assert torch.allclose(several[g.path], one[g.path], rtol=1e-4, atol=1e-12), g.path
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_allocation_targets():
    pipe = tiny_pipeline(seed=0)
    groups = find_groups(pipe.unet)
    g = torch.Generator().manual_seed(0)
    scores = {gr.path: torch.rand(gr.units, generator=g) for gr in groups}
    total = prunable_params(pipe.unet)
    for scope in ("global", "layer"):
        keep = allocate(groups, scores, Target("params", 0.3 * total), scope=scope)
        assert abs(removed_params(groups, keep) / total - 0.3) < 0.01
    keep = allocate(groups, scores, Target("params", 0.3 * total), scope="layer")
    fractions = [1 - len(keep[gr.path]) / gr.units for gr in groups]
    assert min(fractions) > 0 and max(fractions) - min(fractions) <= 2 / 8  # one fraction, up to whole units
    cond = pipe.family.example_condition(1)
    macs = unit_macs(pipe.unet, groups, token_counts(pipe.unet, groups, cond))
    m0 = count_macs(pipe.unet, cond)
    keep = allocate(groups, scores, Target("macs", 0.6 * m0), macs=macs, macs_total=m0)
    removed = sum((gr.units - len(keep[gr.path])) * macs[gr.path] for gr in groups)
    assert m0 - removed <= 0.6 * m0 * 1.02
    keep = allocate(groups, scores, Target("params", 0.0))
    assert all(len(keep[gr.path]) == gr.units for gr in groups)


def test_align_channels_rounds_kept_channels_down_to_the_multiple():
    from tinyprune.model.structure import Group
    from tinyprune.prune.structured.allocation import align_channels

    groups = [Group("resnet", "r", units=32, width=10, params_per_unit=1),  # 4 units = 40 channels per multiple
              Group("attention", "a", units=8, width=40, params_per_unit=1),  # every head count is a multiple
              Group("feedforward", "f", units=20, width=1, params_per_unit=1),
              Group("feedforward", "e", units=16, width=1, params_per_unit=1),
              Group("resnet", "s", units=32, width=10, params_per_unit=1)]
    scores = {g.path: torch.arange(g.units, dtype=torch.float) for g in groups}  # higher index = more important
    keep = {"r": torch.tensor([3, 9, 30, 31, 1, 2]), "a": torch.tensor([0, 5, 7]),
            "f": torch.tensor([19] + list(range(10))), "e": torch.tensor([], dtype=torch.long),
            "s": torch.tensor([3, 9])}
    out = align_channels(groups, scores, keep, 8)
    assert out["r"].tolist() == [3, 9, 30, 31]  # 60 channels -> 40: the least important kept units go too
    assert out["a"].tolist() == [0, 5, 7]  # 120 channels: already a multiple of 8
    assert out["f"].tolist() == list(range(3, 10)) + [19]  # 11 -> 8 channels
    assert out["e"].tolist() == []  # an emptied group stays empty
    assert out["s"].tolist() == [3, 9, 30, 31]  # 20 channels, under one multiple: the best removed come back to 40
    assert align_channels(groups, scores, keep, 1) is keep


def test_structured_on_tensorrt_targets_keeps_channels_in_multiples_of_8():
    pipe = tiny_pipeline(seed=0)
    spec, _ = PruneSpec.resolve("ld-pruner", 0.43, "unstructured", "global", False, load_profile("jetson-agx-xavier"),
                                l1grad=L1GradSpec.parse(recovery_steps=0))
    assert spec.structured.channel_multiple == 8 and _spec("ld-pruner").structured.channel_multiple == 1
    groups = {g.path: g for g in find_groups(pipe.unet)}
    plan = prune_structured(pipe, spec, _batches(pipe), score_options=FAST["ld-pruner"])
    u = plan.components["unet"]
    assert u.allocation["channel_multiple"] == 8
    kept = {p: e["kept"] * groups[p].width for p, e in u.groups.items()}
    assert all(c == 0 or c % 8 == 0 or e["kept"] == e["units"] for (p, c), e in zip(kept.items(), u.groups.values()))
    assert any(0 < e["kept"] < e["units"] for e in u.groups.values())  # thinned, not only emptied or kept whole


def test_target_macs_and_latency_aware_by_macs():
    pipe = tiny_pipeline(seed=0)
    plan = prune_structured(pipe, _spec("diff-pruning", target_macs=0.5, latency_aware=True, cost_model="macs"),
                            _batches(pipe), score_options=FAST["diff-pruning"])
    u = plan.components["unet"]
    assert u.macs <= 0.5 * u.macs_dense * 1.02 and u.allocation["cost"] == "MACs"
    assert u.macs == count_macs(pipe.unet, pipe.family.example_condition(1))


def test_ort_cost_table_covers_groups():
    from tinyprune.prune.structured.cost import ort_cost_table

    pipe = tiny_pipeline(seed=0)
    groups = find_groups(pipe.unet)
    table = ort_cost_table(pipe.unet, groups, pipe.family.example_condition(1), runs=3, cache=False)
    assert set(table.groups) == {g.path for g in groups} and all(v > 0 for v in table.groups.values())
    assert table.total_ms > sum(table.groups.values())  # conv_in/out, embeddings, the blocks' own norms: no group's


def test_config_resolution():
    spec, notes = PruneSpec.resolve("auto", 0.43, "unstructured", "global", False, CPU)
    assert (spec.method, spec.pattern) == ("diff-pruning", "channel") and "auto" in notes[0]
    spec, _ = PruneSpec.resolve("auto", 0.43, "unstructured", "global", False, load_profile("jetson-orin-nano"))
    assert spec.pattern == "2:4" and spec.method in ("l1-grad", "magnitude")
    spec, _ = PruneSpec.resolve("ld-pruner", 0.43, "auto", "global", False, load_profile("jetson-orin-nano"))
    assert spec.pattern == "channel" and spec.needs_calibration
    with pytest.raises(InputError, match="2:4 needs"):
        PruneSpec.resolve("ecodiff", 0.43, "2:4", "global", False, load_profile("jetson-orin-nano"))
    with pytest.raises(InputError, match="structured method"):
        PruneSpec.resolve("magnitude", 0.43, "channel", "global", False, CPU)
    with pytest.raises(InputError, match="UNet only"):
        PruneSpec.resolve("diff-pruning", 0.43, "unstructured", "global", True, CPU)
    for bad in ("0", "1.5", "x"):
        with pytest.raises(InputError, match="target-macs"):
            StructuredSpec.parse(target_macs=bad)
    with pytest.raises(InputError, match="cost-model"):
        StructuredSpec.parse(cost_model="flops")


def test_save_load_export_round_trip(tmp_path):
    import onnx

    from tinyprune.export.specs import component_spec, export_spec
    from tinyprune.export.writer import MAX_EXPORT_OPSET, export_component
    from tinyprune.export.metadata import PREFIX, check_claims, read_metadata
    from tinyprune.model.pipeline import load_pipeline, save_pipeline
    from tinyprune.judge.torch_runner import TorchRunner
    from tinyprune.runtime.runners import OrtRunner

    pipe = tiny_pipeline(seed=0)
    plan = prune_structured(pipe, _spec("diff-pruning"), _batches(pipe, 2), score_options=FAST["diff-pruning"])
    save_pipeline(pipe, tmp_path / "pruned")
    back = load_pipeline(tmp_path / "pruned")
    UNET = component_spec(back, "unet")
    feed = UNET.dummy_feed(2, 8, seed=3)
    ref = TorchRunner(UNET.module(pipe), UNET.inputs, UNET.outputs)
    got = TorchRunner(UNET.module(back), UNET.inputs, UNET.outputs)
    with ref, got:
        a, b = ref(feed)["out_sample"], got(feed)["out_sample"]
    assert np.array_equal(a, b)  # save -> load: zero difference
    xspec = export_spec(back, CPU, MAX_EXPORT_OPSET)
    path = tmp_path / "unet" / "model.onnx"
    u = plan.components["unet"]
    meta = {"version": "0", "method": "diff-pruning", "pattern": "channel", "profile": CPU.name, "source_sha256": "x",
            "params_dense": u.dense_params()}
    stamped = export_component(back, UNET, xspec, path, meta)
    with OrtRunner(path) as ort_runner:
        onnx_out = ort_runner(feed)["out_sample"]
    assert np.abs(onnx_out - b).max() <= UNET.tolerance(CPU)
    assert stamped[PREFIX + "pattern"] == "channel" and stamped[PREFIX + "sparsity"] == "0.000000"
    assert int(stamped[PREFIX + "params"]) == u.params
    assert float(stamped[PREFIX + "params_removed"]) == pytest.approx(u.params_removed, abs=1e-6)
    model = onnx.load(str(path))
    assert check_claims(model) == [] and read_metadata(model)[PREFIX + "params_dense"] == str(u.params_dense)
    for p in model.metadata_props:
        if p.key == PREFIX + "params_removed":
            p.value = "0.600000"
    assert any("params_removed" in m for m in check_claims(model))


def test_cli_prune_structured(tiny_dir, tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from tinyprune.cli import app
    from tinyprune.model.pipeline import load_pipeline

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    monkeypatch.setattr("tinyprune.prune.importance.taylor_timestep.DEFAULT_STRIDE", 250)  # 4 timesteps: a fast test
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["prune", "--model", str(tiny_dir), "--method", "diff-pruning", "--sparsity", "0.3",
                                 "--target", "x86-cpu", "--calibration", str(images), "--recovery-steps", "5", "--out", str(out),
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert abs(json.loads(r.stdout)["sparsity"]["unet"] - 0.3) <= 0.01
    plan = json.loads((out / "pruning_plan.json").read_text())
    rec = plan["components"]["unet"]["recovery"]
    assert rec["steps"] == 5 and rec["loss_after"] < rec["loss_before"]  # distilled towards the dense UNet
    assert plan["pattern"] == "channel" and (out / "unet" / "structure.json").is_file()
    assert prunable_params(load_pipeline(out).unet) == plan["components"]["unet"]["params"]
    from tinyprune.prune.plan import PrunePlan, StructuredComponent

    typed = PrunePlan.from_dict(plan)  # the on-disk plan reads back typed, and writes out unchanged
    assert isinstance(typed.components["unet"], StructuredComponent) and typed.structured
    assert typed.components["unet"].recovery == rec and typed.to_dict() == plan
    assert PrunePlan.from_dict(typed.to_dict()) == typed
    r = CliRunner().invoke(app, ["prune", "--model", str(tiny_dir), "--method", "magnitude", "--pattern", "channel",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "structured method" in r.stderr


def test_a_large_unet_is_weighed_by_macs_and_distils_lean(monkeypatch):
    """Past config.LARGE_UNET_BYTES: no onnxruntime profile (a second copy of the weights), a --speedup on MACs, and a
    distillation from the teacher's recorded outputs by Adafactor."""
    from tinyprune.prune.structured import run as S

    monkeypatch.setattr("tinyprune.config.LARGE_UNET_BYTES", 0)
    monkeypatch.setattr(S, "ort_cost_table", lambda *a, **k: pytest.fail("a large UNet was profiled"))
    pipe = tiny_pipeline(seed=0)
    lines = []
    plan = prune_structured(pipe, _spec("diff-pruning", recovery_steps=3, speedup=1.3, latency_aware=True,
                                        cost_model="ort"), _batches(pipe, 4), score_options=FAST["diff-pruning"],
                            log=lines.append)
    unet = plan.components["unet"]
    assert unet.target["kind"] == "macs" and unet.target["speedup"]["cost_model"] == "MACs"
    assert unet.macs_dense / unet.macs == pytest.approx(1.3, rel=0.1)
    assert any("by MACs, not a measured onnxruntime table" in line for line in lines)
    assert any("this UNet is not timed here" in line for line in lines)
    rec = unet.recovery
    assert rec["optimizer"].startswith("adafactor") and "recorded before surgery on 3 training draws" in rec["teacher"]
    with pytest.raises(InputError, match="--latency-budget-ms is measured onnxruntime time"):
        prune_structured(tiny_pipeline(seed=0), _spec("diff-pruning", latency_budget_ms=5.0), _batches(pipe, 4))
