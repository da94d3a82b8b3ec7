"""The target's TensorRT parser takes every ONNX file of a bundle: the per-version table (export/trt_parser.py), the
opset export picks for it (16 for TensorRT 8.5, whose parser has no LayerNormalization), export's refusal of a file
the parser cannot take, `verify --target`, and build/ in every GPU target's bundle (same bytes as `tinyprune build`)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from tinyprune.cli import app
from tinyprune.config import ExportSpec, load_profile
from tinyprune.errors import GateFailed, InputError
from tinyprune.export.metadata import set_metadata, sparsity_metadata
from tinyprune.export.trt_parser import PARSERS, ParserOpset, parser_opset, parser_row, unparseable
from tinyprune.ship.bundle import sha256_file, write_manifest
from tinyprune.ship.verify import verify
from tinyprune.ship.tensorrt import build, trtexec_command

LN_ERROR = ("unet/model.onnx: LayerNormalization (ai.onnx, 1 node) cannot be parsed by TensorRT 8.5.2 "
            "(jetson-agx-xavier): its parser imports it from TensorRT 8.6 on")


def _ln_model(opset: int = 17, op: str = "LayerNormalization", domain: str = "", in_if: bool = False):
    """x [2, 4] -> one LayerNormalization (or `op`), optionally inside an If branch."""
    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4),
             helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.0] * 4)]
    node = helper.make_node(op, ["x", "scale", "bias"], ["y"], axis=-1, domain=domain)
    if in_if:
        branch = helper.make_graph([node], "branch", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "other", [],
                                  [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 4])])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)]
        inits.append(cond)
        out = "out"
    else:
        nodes, out = [node], "y"
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 4])], initializer=inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


# ---- the table -----------------------------------------------------------------------------------------------

def test_rows_follow_the_onnx_tensorrt_release_branches():
    assert [row.version for row in PARSERS] == ["8.0", "8.2", "8.4", "8.5", "8.6", "10.0"]
    assert {r.version: r.max_opset for r in PARSERS} == {"8.0": 13, "8.2": 13, "8.4": 17, "8.5": 17, "8.6": 17,
                                                          "10.0": 20}
    assert parser_row("8.5.2").version == "8.5" and parser_row("10.3").version == "10.0"
    assert parser_row("9.3").version == "8.6"  # no 9.x row: the 8.6 parser's subset
    for older, newer in zip(PARSERS, PARSERS[1:]):
        assert newer.lacks <= older.lacks, newer.version  # a parser only gains importers
    assert "LayerNormalization" in parser_row("8.5.2").lacks and "LayerNormalization" not in parser_row("8.6.2").lacks
    assert "Trilu" in parser_row("8.2.1").lacks and "Trilu" not in parser_row("8.5.2").lacks
    assert "Gelu" in parser_row("8.6.2").lacks and "Gelu" not in parser_row("10.3").lacks
    with pytest.raises(InputError, match="TensorRT '7.1.3' predates"):
        parser_row("7.1.3")


@pytest.mark.parametrize("target,opset,avoided", [
    ("jetson-nano", 13, ()), ("jetson-xavier-nx", 16, ("LayerNormalization",)),
    ("jetson-agx-xavier", 16, ("LayerNormalization",)), ("jetson", 17, ()), ("jetson-agx-orin", 17, ()),
    ("x86-ampere-gpu", 17, ()), ("x86-cpu", 17, ()),
])
def test_export_opset_per_target(target, opset, avoided):
    from tinyprune.export.writer import MAX_EXPORT_OPSET

    chosen = parser_opset(load_profile(target), MAX_EXPORT_OPSET)
    assert (chosen.opset, chosen.avoided) == (opset, avoided)
    assert chosen.lowered == bool(avoided)
    assert load_profile(target).max_opset >= opset  # within the profile's own max


def test_trt10_targets_take_the_exporters_full_range():
    # TensorRT 10.x parses LayerNormalization and Gelu (torch emits it from opset 20): nothing to lower up to 20.
    for target in ("x86-ampere-gpu", "jetson-agx-orin"):
        assert parser_opset(load_profile(target), 20) == ParserOpset(20, 20, ())
    assert parser_opset(load_profile("jetson-agx-xavier"), 20).opset == 16  # its parser's 17, less LayerNorm


def test_layer_norm_at_17_is_refused_by_trt85_and_taken_by_trt10():
    model = _ln_model(17)
    (problem,) = unparseable(model, load_profile("jetson-agx-xavier"), file="unet/model.onnx")
    assert (problem.what, problem.domain, problem.nodes) == ("LayerNormalization", "ai.onnx", 1)
    assert str(problem) == LN_ERROR
    assert unparseable(model, load_profile("jetson-agx-orin")) == ()
    assert unparseable(model, load_profile("x86-cpu")) == ()  # no TensorRT: only the opset counts


def test_subgraphs_custom_domains_and_opsets_are_checked(tmp_path):
    xavier = load_profile("jetson-agx-xavier")
    assert [p.what for p in unparseable(_ln_model(17, in_if=True), xavier)] == ["LayerNormalization"]
    (custom,) = unparseable(_ln_model(16, op="FusedLayerNorm", domain="com.microsoft"), xavier)
    assert (custom.what, custom.domain) == ("FusedLayerNorm", "com.microsoft") and "plugin" in custom.reason
    path = tmp_path / "m.onnx"
    onnx.save(_ln_model(17), str(path))
    nano = unparseable(path, load_profile("jetson-nano"))  # TensorRT 8.2: opset 13 at most, and no LayerNormalization
    assert [p.what for p in nano] == ["opset", "LayerNormalization"]
    assert str(nano[0]) == f"{path}: opset 17 is outside what TensorRT 8.2.1 (jetson-nano) parses (opset 1 to 13)"
    assert [p.what for p in unparseable(_ln_model(18), load_profile("x86-cpu"))] == ["opset"]  # its max_opset 17


# ---- verify --target --------------------------------------------------------------------------------------------

def _crafted_bundle(root: Path, profile: str = "jetson-agx-xavier") -> Path:
    """A bundle whose unet/model.onnx holds one LayerNormalization at opset 17, stamped like export stamps files."""
    model = _ln_model(17)
    set_metadata(model, sparsity_metadata(model, version="t", component="unet", method="magnitude", pattern="none",
                                          profile=profile, source_sha256="0" * 64))
    (root / "unet").mkdir(parents=True)
    onnx.save(model, str(root / "unet" / "model.onnx"))
    write_manifest(root, {"profile": profile, "components": {"unet": {"file": "unet/model.onnx", "pattern": "none"}}})
    return root


def test_verify_target_names_the_file_and_op(tmp_path):
    bundle = _crafted_bundle(tmp_path / "b")
    with pytest.raises(GateFailed) as e:
        verify(bundle, "jetson-agx-xavier")
    assert str(e.value) == f"verify failed: {LN_ERROR}"
    with pytest.raises(GateFailed):
        verify(bundle)  # the manifest's profile, jetson-agx-xavier
    r = verify(bundle, "jetson-agx-orin")  # TensorRT 10.3 parses LayerNormalization
    assert r["ok"] and (r["target"], r["trt_version"]) == ("jetson-agx-orin", "10.3")
    cli = CliRunner()
    r = cli.invoke(app, ["verify", str(bundle), "--target", "jetson-agx-xavier"])
    assert r.exit_code == 1
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [f"error: verify failed: {LN_ERROR}"]
    r = cli.invoke(app, ["verify", str(bundle), "--target", "jetson-agx-orin"])
    assert r.exit_code == 0 and "TensorRT 10.3 (jetson-agx-orin) parses" in " ".join(r.stdout.split())
    r = cli.invoke(app, ["verify", str(bundle), "--target", "jetson-thor"])
    assert r.exit_code == 2 and "unknown target 'jetson-thor'" in r.stderr


def test_verify_without_a_known_profile_skips_the_parser_check(tmp_path):
    bundle = _crafted_bundle(tmp_path / "b", profile="my-board")  # a custom profile file the bundle no longer has
    r = verify(bundle)
    assert r["ok"] and r["target"] is None


# ---- export -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from pipelines import save

    return save("sd", tmp_path_factory.mktemp("sd") / "sd")


def _export(model: Path, out: Path, target: str) -> dict:
    from tinyprune.workflows.export import export

    return export(str(model), 0.43, target, out=out, image_checks=0).to_dict()


def _ops_and_opsets(bundle: Path) -> dict[str, tuple[set[str], set[int]]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    found = {}
    for name, comp in manifest["components"].items():
        model = onnx.load(str(bundle / comp["file"]), load_external_data=False)
        found[name] = ({n.op_type for n in model.graph.node},
                       {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")})
    return found


def _script_components(bundle: Path) -> list[str]:
    return [line.split()[1] for line in (bundle / "build" / "build_engines.sh").read_text().splitlines()
            if line.startswith("build_component ")]


def test_xavier_export_has_no_layer_norm_and_its_build_script(sd_dir, tmp_path):
    out = tmp_path / "b"
    r = _export(sd_dir, out, "jetson-agx-xavier")
    assert r["opset"] == 16
    assert ("jetson-agx-xavier: exported at opset 16, not 17: TensorRT 8.5.2's ONNX parser cannot parse "
            "LayerNormalization, which torch emits from opset 17 on (decomposed below it)") in r["notices"]
    found = _ops_and_opsets(out)
    assert set(found) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for name, (ops, opsets) in found.items():
        assert opsets == {16}, name
        assert "LayerNormalization" not in ops, name
    assert {"ReduceMean", "Sqrt"} <= found["unet"][0]  # LayerNorm, decomposed
    manifest = json.loads((out / "manifest.json").read_text())
    assert _script_components(out) == sorted(manifest["components"])
    profile = load_profile("jetson-agx-xavier")
    text = (out / "build" / "build_engines.sh").read_text()
    for name, comp in manifest["components"].items():
        assert " ".join(trtexec_command(name, comp, profile)) in text
    for rel in ("build/build_engines.sh", "build/README.md"):  # among the checksummed files
        assert manifest["files"][rel] == sha256_file(out / rel)
    assert verify(out)["ok"] and verify(out, "jetson-xavier-nx")["ok"]
    with pytest.raises(GateFailed, match="opset 16 is outside what TensorRT 8.2.1"):
        verify(out, "jetson-nano")
    before = {rel: sha256_file(out / rel) for rel in ("build/build_engines.sh", "build/README.md", "manifest.json")}
    build(out, None, require_engine=False)  # no TensorRT here, or not a Xavier: the script only, the same bytes
    assert {rel: sha256_file(out / rel) for rel in before} == before


def test_jetson_export_keeps_layer_norm_its_tensorrt_parses(sd_dir, tmp_path):
    # `jetson` is the Orin Nano on JetPack 6.2 (TensorRT 10.3), whose parser has LayerNormalization: opset 17 stays.
    out = tmp_path / "b"
    r = _export(sd_dir, out, "jetson")
    assert r["opset"] == 17 and not any("exported at opset" in n for n in r["notices"])
    found = _ops_and_opsets(out)
    assert all(opsets == {17} for _, opsets in found.values())
    assert "LayerNormalization" in found["unet"][0] and "LayerNormalization" in found["text_encoder"][0]
    assert _script_components(out) == sorted(found)
    assert verify(out)["ok"]
    with pytest.raises(GateFailed, match="LayerNormalization .* cannot be parsed by TensorRT 8.5.2"):
        verify(out, "jetson-agx-xavier")


def test_cpu_export_has_no_build_dir(sd_dir, tmp_path):
    out = tmp_path / "b"
    _export(sd_dir, out, "x86-cpu")
    assert not (out / "build").exists()
    assert not any(rel.startswith("build/") for rel in json.loads((out / "manifest.json").read_text())["files"])


def test_export_refuses_a_file_the_parser_cannot_take_and_keeps_out(sd_dir, tmp_path, monkeypatch):
    from tinyprune.workflows import export as workflow

    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("the previous bundle")
    real = workflow.export_spec
    monkeypatch.setattr(workflow, "export_spec",  # an exporter that ignores the parser rule: LayerNorm at 17
                        lambda pipe, profile, max_opset: ExportSpec(17, *(lambda s: (s.batch, s.latent))(
                            real(pipe, profile, max_opset))))
    from tinyprune.workflows.export import export

    with pytest.raises(InputError) as e:
        export(str(sd_dir), 0.43, "jetson-agx-xavier", out=out, force=True, image_checks=0)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    assert msg.startswith("text_encoder/model.onnx: LayerNormalization (ai.onnx, ")
    assert msg.endswith(f"cannot be parsed by TensorRT 8.5.2 (jetson-agx-xavier): its parser imports it from "
                        f"TensorRT 8.6 on; nothing was written to {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging dir left
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
