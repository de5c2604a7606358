"""Placement of samplers, their TP ranks and the trainer on fake machines; the requests' tp_size; the
hunt space's multi-GPU knobs."""
import pytest

from rollout_lab.config import ConfigError, RunConfig
from rollout_lab.hunt.space import Space, SpaceConfig
from rollout_lab.placement import plan
from rollout_lab.records import REQUEST_SCHEMA, SampledRequest, read_requests, write_requests


def config(tp=1, workers=1, trainer_gpu="auto", **ray):
    cfg = RunConfig()
    cfg.engine.args = {"tensor_parallel_size": tp} if tp != 1 else {}
    cfg.loop.num_workers, cfg.ray.trainer_gpu = workers, trainer_gpu
    for key, value in ray.items():
        setattr(cfg.ray, key, value)
    return cfg


def test_tp2_on_two_gpus_puts_a_rank_on_each_and_the_trainer_beside_rank_0():
    p = plan(config(tp=2), num_gpus=2, num_cores=16)
    (s,) = p.samplers
    assert (s.tp_size, s.gpus, s.gpu_share, s.executor) == (2, (0, 1), 0.5, "ray")
    assert (p.trainer.gpu, p.trainer.gpu_share, p.trainer.shared) == (0, 0.5, True)
    # Two bundles of a whole GPU each, so Ray cannot put both ranks on one GPU; actors' CPUs on bundle 0.
    assert p.bundles() == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}]
    assert s.engine_kwargs() == {"distributed_executor_backend": "ray"}
    assert s.engine_env()["VLLM_RAY_BUNDLE_INDICES"] == "0,1"
    assert s.engine_env()["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    assert p.describe() == ("placement (2 GPUs):\n"
                            "  sampler 0: TP 2: rank 0 GPU 0, rank 1 GPU 1 (0.5 of each), vLLM executor ray\n"
                            "  trainer: GPU 0 (shared with sampler ranks, 0.5 of it)")


def test_two_samplers_on_two_gpus_take_one_each_and_the_trainer_shares_the_first():
    p = plan(config(workers=2), num_gpus=2, num_cores=16)
    assert [(s.gpus, s.gpu_share, s.executor) for s in p.samplers] == [((0,), 0.5, None), ((1,), 1.0, None)]
    assert (p.trainer.gpu, p.trainer.gpu_share) == (0, 0.5)
    assert p.bundles() == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0, "CPU": 1.0}]
    assert "sampler 1: TP 1: rank 0 GPU 1\n" in p.describe()


def test_a_spare_gpu_goes_to_the_trainer_and_separate_or_shared_can_be_asked_for():
    p = plan(config(), num_gpus=2, num_cores=16)
    assert (p.samplers[0].gpus, p.samplers[0].gpu_share, p.trainer.gpu, p.trainer.shared) == ((0,), 1.0, 1, False)
    assert p.describe().endswith("trainer: GPU 1 (its own, 1 of it)")
    shared = plan(config(trainer_gpu="shared"), num_gpus=2, num_cores=16)
    assert (shared.trainer.gpu, shared.trainer.gpu_share, shared.samplers[0].gpu_share) == (0, 0.5, 0.5)
    assert plan(config(tp=2, trainer_gpu="separate"), num_gpus=3, num_cores=16).trainer.gpu == 2


def test_one_gpu_is_shared_and_explicit_shares_reserve_only_what_they_use():
    p = plan(config(), num_gpus=1, num_cores=16)
    assert (p.samplers[0].gpu_share, p.trainer.gpu_share, p.bundles()) == (0.5, 0.5, [{"GPU": 1.0, "CPU": 2.0}])
    # Several jobs at once on one GPU (scripts/gpu_check.sh): each job's group holds only its 0.2.
    small = plan(config(sampler_num_gpus=0.1, trainer_num_gpus=0.1), num_gpus=1, num_cores=16)
    assert small.bundles() == [{"GPU": 0.2, "CPU": 2.0}]
    three = plan(config(workers=2), num_gpus=1, num_cores=16)
    assert [s.gpu_share for s in three.samplers] == [0.333, 0.333] and three.trainer.gpu_share == 0.333


@pytest.mark.parametrize("cfg, gpus, message", [
    (config(tp=2, workers=2), 1, r"^engine.args.tensor_parallel_size=2 needs 2 GPUs \(one per rank\); the machine has 1$"),
    (config(tp=2, workers=2), 2, r"^loop.num_workers=2 samplers x engine.args.tensor_parallel_size=2 need 4 GPUs .*the machine has 2$"),
    (config(tp=2, trainer_gpu="separate"), 2, r"^ray.trainer_gpu=separate needs a GPU no sampler rank uses: 3 GPUs; the machine has 2$"),
    (config(trainer_gpu="own"), 2, r"^ray.trainer_gpu='own' is not valid; choose one of auto, separate, shared$"),
    (config(tp=0), 2, r"^engine.args.tensor_parallel_size=0 must be a positive integer$"),
    (config(sampler_num_gpus=0.7), 1, r"^GPU 0 would hold 1.2 GPUs of actors"),
    (config(tp=4), 0, r"^engine.args.tensor_parallel_size=4 needs a core per rank; the machine has 2$"),
])
def test_a_placement_that_cannot_fit_fails_with_one_line(cfg, gpus, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan(cfg, num_gpus=gpus, num_cores=2)
    assert "\n" not in str(info.value)


def test_the_executor_is_the_placements_to_choose():
    cfg = config(tp=2)
    cfg.engine.args["distributed_executor_backend"] = "mp"
    with pytest.raises(ConfigError, match="distributed_executor_backend is rollout_lab's placement's to choose"):
        plan(cfg, num_gpus=2, num_cores=16)


def test_on_cpu_the_ranks_split_the_cores_in_vllms_multiprocessing_executor():
    p = plan(config(tp=2), num_gpus=0, num_cores=4)
    (s,) = p.samplers
    assert (s.gpus, s.cpu_cores, s.executor, s.gpu_share) == ((), ("0-1", "2-3"), "mp", 0.0)
    assert s.engine_env() == {"VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"}
    assert p.bundles() == [{"CPU": 2.0}] and p.trainer.gpu is None
    assert p.describe() == ("placement (CPU, 4 cores):\n"
                            "  sampler 0: TP 2: rank 0 cores 0-1, rank 1 cores 2-3, vLLM executor mp\n"
                            "  trainer: CPU")
    one = plan(config(), num_gpus=0, num_cores=2).samplers[0]
    assert (one.executor, one.engine_kwargs(), one.engine_env()) == (None, {}, {})


def test_requests_record_their_engines_tp_size_and_older_ones_read_as_1(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sent = SampledRequest(step=0, worker=1, tp_size=2, request_id="0", prompt_index=3, sample_index=0, prompt_token_ids=[5, 6],
                          seed=7, n=1, max_tokens=4, temperature=1.0, top_p=1.0, top_k=-1, logprobs=0)
    write_requests(tmp_path / "new", 0, [sent])
    assert read_requests(tmp_path / "new") == [sent]
    old_schema = pa.schema([f for f in REQUEST_SCHEMA if f.name != "tp_size"], metadata=REQUEST_SCHEMA.metadata)
    row = {f.name: [getattr(sent, f.name)] for f in old_schema}
    (tmp_path / "old" / "requests").mkdir(parents=True)
    pq.write_table(pa.table(row, schema=old_schema), tmp_path / "old" / "requests" / "step_00000.parquet")
    assert read_requests(tmp_path / "old")[0].tp_size == 1


def multi_gpu_space(gpus):
    return Space.from_config(SpaceConfig(models=["a"], generators=["many_short"],
                                         engine={"dtype": ["float32"], "tensor_parallel_size": [1, 2, 4],
                                                 "disable_custom_all_reduce": [False, True]}), gpus=gpus)


def test_the_hunt_space_keeps_multi_gpu_knobs_only_where_the_gpus_are():
    for gpus in (0, 1):
        assert set(multi_gpu_space(gpus).engine_dims()) == {"model", "engine.dtype"}
    two = multi_gpu_space(2).engine
    assert two["tensor_parallel_size"] == [1, 2] and two["disable_custom_all_reduce"] == [False, True]
    assert multi_gpu_space(4).engine["tensor_parallel_size"] == [1, 2, 4]


def test_a_standalone_tp_engine_gets_the_multiprocessing_executor_and_on_cpu_the_cores_split():
    from rollout_lab.placement import standalone

    assert standalone({"dtype": "float32"}, 0, 2) == ({}, {})
    kwargs, env = standalone({"tensor_parallel_size": 2}, 0, 4)
    assert kwargs == {"distributed_executor_backend": "mp"} and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"
    kwargs, env = standalone({"tensor_parallel_size": 2}, 2, 16)
    assert kwargs == {"distributed_executor_backend": "mp"} and "VLLM_CPU_OMP_THREADS_BIND" not in env
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        standalone({"tensor_parallel_size": 2}, 1, 16)
