"""Compile-only accelerator targets: devices and meshes for H200 and v5p, and the errors for what cannot work."""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jaxlib  # noqa: E402
import pytest  # noqa: E402

from t3rl_jax.accel import targets  # noqa: E402

CUDA_OK = {"jax-cuda13-plugin": jaxlib.__version__, "jax-cuda13-pjrt": jaxlib.__version__,
           "nvidia-cudnn-cu13": "9.28.1.4"}


def test_unknown_target_names_the_known_ones():
    with pytest.raises(targets.TargetError, match=r"unknown target 'h300'; known: h100, h200, v5e, v5p, v6e"):
        targets.target("h300")


def test_plugin_problems_missing_and_mismatched_versions():
    assert targets.plugin_problems("cuda", CUDA_OK, jaxlib.__version__) == []
    missing = targets.plugin_problems("cuda", {**CUDA_OK, "jax-cuda13-pjrt": None}, "0.10.2")
    assert missing == ["jax-cuda13-pjrt is not installed: pip install --no-deps jax-cuda13-plugin==0.10.2 "
                       "jax-cuda13-pjrt==0.10.2 nvidia-cudnn-cu13 (or pip install -e '.[cuda13]' on a GPU)"]
    other = targets.plugin_problems("cuda", {**CUDA_OK, "jax-cuda13-plugin": "0.11.2"}, "0.10.2")
    assert other == ["jax-cuda13-plugin 0.11.2 does not match jaxlib 0.10.2: pip install --no-deps "
                     "jax-cuda13-plugin==0.10.2"]
    no_cudnn = targets.plugin_problems("cuda", {**CUDA_OK, "nvidia-cudnn-cu13": None}, jaxlib.__version__)
    assert len(no_cudnn) == 1 and no_cudnn[0].startswith("nvidia-cudnn-cu13 is not installed")
    assert targets.plugin_problems("tpu", {"libtpu": None}, "0.10.2") == [
        "libtpu is not installed: pip install 'jax[tpu]==0.10.2'"]
    with pytest.raises(targets.TargetError, match="unknown platform 'rocm'"):
        targets.plugin_problems("rocm", {}, "0.10.2")


def test_gpu_spec_unreadable_or_not_a_spec(tmp_path):
    with pytest.raises(targets.TargetError, match=r"cannot read GPU target spec .*missing\.txtpb"):
        targets.load_gpu_spec(tmp_path / "missing.txtpb")
    other = tmp_path / "other.txtpb"
    other.write_text("name: 'not a gpu'\n")
    with pytest.raises(targets.TargetError, match=r"GPU target spec .*other\.txtpb is not a GpuTargetConfigProto"):
        targets.load_gpu_spec(other)


def test_gpu_spec_the_plugin_cannot_parse(tmp_path):
    bad = tmp_path / "bad.txtpb"
    bad.write_text("gpu_device_info {\n  threads_per_block_limit: many\n}\n")
    with pytest.raises(targets.TargetError, match=r"CUDA topology from GPU target spec .*bad\.txtpb failed"):
        targets.compile_only_devices("h200", 8, gpu_spec=str(bad))


def test_h200_and_v5p_meshes():
    mesh = targets.mesh_for("h200", {"data": 1, "fsdp": 8})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    assert all("H200" in d.device_kind for d in mesh.devices.flat)
    v5p = targets.compile_only_devices("v5p")
    assert len(v5p) == 8 and all(d.platform == "tpu" for d in v5p)
    with pytest.raises(targets.TargetError, match="v5p slices have 8 devices; 12 is not a multiple"):
        targets.compile_only_devices("v5p", 12)
    with pytest.raises(targets.TargetError, match="12 GPUs do not fill hosts of 8"):
        targets.compile_only_devices("h200", 12)
