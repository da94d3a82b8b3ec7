import os
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# measured cost tables and latency rounds: one cache for the run (subprocesses included), none left in ~/.cache
os.environ.setdefault("TINYPRUNE_CACHE", tempfile.mkdtemp(prefix="tinyprune-test-cache-"))


def _cuda_missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs CUDA: torch is not installed"
    return None if torch.cuda.is_available() else "needs CUDA: torch sees no CUDA GPU here"


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):  # OSError: the wheel is there but its CUDA libraries are not
        return "needs the tensorrt package, which is not importable here"
    return None


def pytest_collection_modifyitems(config, items):
    """`gpu` and `tensorrt` tests skip themselves where their hardware or package is missing, so addopts needs no
    `-m` and a user's `-m "not slow"` (which would replace it) means only what it says."""
    checks = {"gpu": _cuda_missing, "tensorrt": _tensorrt_missing}
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, check in checks.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:  # checked once, and only when a collected test carries the marker
                reasons[marker] = check()
            if reasons[marker] is not None:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A small Stable Diffusion pipeline of real diffusers components saved in diffusers layout (fixed seed)."""
    from pipelines import tiny

    from tinyprune.model.pipeline import save_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    save_pipeline(tiny(seed=0), path)
    return path


@pytest.fixture(scope="session")
def bundle(tiny_dir, tmp_path_factory):
    """One exported bundle shared by the read-only tests (verify, inspect, validate, build)."""
    from tinyprune.workflows.export import export

    out = tmp_path_factory.mktemp("bundles") / "b"
    result = export(str(tiny_dir), 0.43, "jetson", out=out)
    return out, result.to_dict()  # as --json prints it


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Every family's tiny pipeline (tests/pipelines.py), saved by diffusers' own save_pretrained."""
    from pipelines import FAMILIES, save

    root = tmp_path_factory.mktemp("families")
    return {name: save(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def family_bundle(family_dirs, tmp_path_factory):
    """family_bundle(name) -> (bundle dir, export's result dict): each family's x86-cpu bundle (magnitude 0.43,
    one image check of 2 steps), exported once for the read-only tests that share it."""
    from tinyprune.errors import GateFailed
    from tinyprune.workflows.export import export

    root, made = tmp_path_factory.mktemp("family_bundles"), {}

    def get(name: str):
        if name not in made:
            out = root / name
            try:
                result = export(str(family_dirs[name]), 0.43, "x86-cpu", out=out, image_checks=1,
                                image_steps=2).to_dict()
            except GateFailed as e:  # random weights: the dense-vs-pruned image gate may fail; the bundle is written
                result = e.result
            made[name] = (out, result)
        return made[name]

    return get
