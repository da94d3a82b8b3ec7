import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A small pipeline of real diffusers components saved in diffusers layout (fixed seed)."""
    from exporter.pipeline import save_pipeline, tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    save_pipeline(tiny_pipeline(seed=0), path)
    return path


@pytest.fixture(scope="session")
def bundle(tiny_dir, tmp_path_factory):
    """One exported bundle shared by the read-only tests (verify, inspect, validate, build)."""
    from exporter.export import export

    out = tmp_path_factory.mktemp("bundles") / "b"
    result = export(str(tiny_dir), 0.43, "jetson", out=out)
    return out, result
