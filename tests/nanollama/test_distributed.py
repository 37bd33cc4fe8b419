import pytest
import torch

from src.nanollama import distributed
from src.nanollama.config import ConfigError, build_config
from src.nanollama.distributed import Cluster, ClusterConfig, detect_environment


def test_single_process():
    env = detect_environment({})
    assert (env.kind, env.rank, env.world_size) == ("single", 0, 1)


def test_torchrun():
    env = detect_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "1234"})
    assert (env.kind, env.rank, env.local_rank, env.world_size, env.master_port) == (
        "torchrun",
        3,
        1,
        4,
        1234,
    )


def test_srun_tasks():
    slurm = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node1",
    }
    env = detect_environment(slurm)
    assert (env.kind, env.rank, env.local_rank, env.world_size) == ("slurm", 1, 1, 2)
    assert env.master_addr == "node1" and env.master_port == 20077


def test_sbatch_script_without_srun_is_single():
    assert (
        detect_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}).kind == "single"
    )


def test_cpu_cluster_wraps_and_autocasts():
    with Cluster(ClusterConfig(device="cpu", dtype="bfloat16")) as cluster:
        assert cluster.device == torch.device("cpu") and cluster.world_size == 1
        model = cluster.wrap(torch.nn.Linear(4, 4))
        with cluster.autocast():
            assert model(torch.randn(2, 4)).dtype == torch.bfloat16
        assert cluster.all_reduce([1.5, 2.0]) == [1.5, 2.0]


def test_config_errors():
    with pytest.raises(ConfigError, match="parallelism"):
        build_config(ClusterConfig, {"parallelism": "tp"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: cuda requested"):
            build_config(ClusterConfig, {"device": "cuda"})


@pytest.mark.parametrize(
    "flags, native",
    [("fpu sse avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True), ("fpu sse avx2 avx512f", False)],
)
def test_dtype_auto_follows_the_cpu_bf16_flags(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert distributed.native_bf16("cpu", cpuinfo) is native
    real = distributed.native_bf16
    monkeypatch.setattr(distributed, "native_bf16", lambda device_type: real(device_type, cpuinfo))
    measured = []
    peaks = {"bfloat16": 4e11, "float32": 1e11}  # an EPYC: bf16 4x faster
    monkeypatch.setattr(
        distributed, "peak_flops", lambda device, dtype: measured.append(dtype) or peaks[dtype]
    )
    cfg = build_config(ClusterConfig, {"device": "cpu", "dtype": "auto"})
    assert cfg.dtype == ("bfloat16" if native else "float32")  # resolved: config.yaml records it
    assert measured == (["bfloat16", "float32"] if native else [])  # no flags: emulated, never measured


def test_dtype_auto_on_cpu_picks_the_faster_measured_matmul(monkeypatch, caplog):
    """Flags say bf16 is native, not that it is fast: an avx512_bf16 Xeon without AMX ran a bf16 matmul at
    135 GFLOP/s against 238 in fp32."""
    monkeypatch.setattr(distributed, "native_bf16", lambda device_type: True)
    for peaks, chosen in (
        ({"bfloat16": 135e9, "float32": 238e9}, "float32"),
        ({"bfloat16": 4e11, "float32": 1e11}, "bfloat16"),
    ):
        monkeypatch.setattr(distributed, "peak_flops", lambda device, dtype, peaks=peaks: peaks[dtype])
        with caplog.at_level("INFO", logger="src.nanollama.distributed"):
            assert build_config(ClusterConfig, {"device": "cpu", "dtype": "auto"}).dtype == chosen
        assert f"cluster.dtype=auto: {chosen}" in caplog.text and "GFLOP/s" in caplog.text
        caplog.clear()


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert distributed.native_bf16("cpu", tmp_path / "missing") is False
