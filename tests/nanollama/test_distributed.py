import pytest
import torch

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
