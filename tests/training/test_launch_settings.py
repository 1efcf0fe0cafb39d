"""What a launcher's environment and the multi-process flags mean, checked without launching:
RANK / WORLD_SIZE / LOCAL_RANK, the device each process takes, the shares of a batch, DeepSpeed
configs (their "auto" values, a missing file or package), --report-to, and the free memory the
memory check counts when several processes share one machine."""

from __future__ import annotations

import json

import pytest

from qtune import distributed
from qtune.errors import QtuneError
from qtune.training import memory, replica

from support import assert_user_error, run


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    where = distributed.launch()
    assert (where.rank, where.world_size, where.local_rank, where.launched, where.is_main) == (0, 1, 0, False, True)
    assert distributed.device_name("cuda:1") == "cuda:1"  # nothing launched: the flag as given


def test_the_launchers_environment_gives_rank_world_and_device(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    where = distributed.launch()
    assert (where.rank, where.world_size, where.local_rank, where.distributed, where.is_main) == (3, 4, 1, True, False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert distributed.device_name("auto") == "cpu"
    with pytest.raises(QtuneError, match="would put all of them on one GPU"):
        distributed.device_name("cuda:0")
    with pytest.raises(QtuneError, match="no GPU is visible"):
        distributed.device_name("cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert distributed.device_name("auto") == "cuda:1"


@pytest.mark.parametrize("env, message", [({"RANK": "2", "WORLD_SIZE": "2"}, "do not fit together"),
                                          ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number")])
def test_a_broken_launcher_environment_is_a_clear_error(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(QtuneError, match=message):
        distributed.launch()


def test_shares_are_contiguous_cover_everything_and_differ_by_at_most_one():
    for count in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [distributed.shard_bounds(count, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert [distributed.shard_bounds(7, 2, r) for r in range(2)] == [(0, 4), (4, 7)]


def test_batches_with_fewer_rows_than_processes_are_left_out():
    from qtune.training.trainer import global_batches

    assert global_batches([[0, 1, 2], [3, 4], [5]], 2) == [[0, 1, 2], [3, 4]]
    assert global_batches([[0, 1, 2], [3]], 1) == [[0, 1, 2], [3]]


def test_deepspeed_auto_values_come_from_the_flags():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "zero_optimization": {"stage": 3}}
    filled = replica.fill_auto(config, batch_size=8, grad_accum=2, max_grad_norm=1.0, bf16=True, world_size=4)
    assert filled == {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
                      "bf16": {"enabled": True}, "fp16": {"enabled": False}, "zero_optimization": {"stage": 3},
                      "train_batch_size": 64}
    assert config["bf16"] == {"enabled": "auto"}  # the user's dict is not changed
    fixed = replica.fill_auto({"train_micro_batch_size_per_gpu": 4}, batch_size=8, grad_accum=1, max_grad_norm=0.0,
                              bf16=False, world_size=1)
    assert fixed["train_micro_batch_size_per_gpu"] == 4  # a value the user set stays


def test_a_bad_deepspeed_config_stops_the_run_before_the_model_loads(capsys, tiny_bert_dir, synthetic_files,
                                                                     tmp_path, monkeypatch):
    base = ["train", "pair-cls", "--model", tiny_bert_dir, "--train", str(synthetic_files["train"]), "--device", "cpu"]
    code, _, err = run(capsys, *base, "--output", str(tmp_path / "a"), "--deepspeed", str(tmp_path / "none.json"))
    assert_user_error(code, err, "none.json: no such file")
    broken = tmp_path / "broken.json"
    broken.write_text("{zero", encoding="utf-8")
    code, _, err = run(capsys, *base, "--output", str(tmp_path / "b"), "--deepspeed", str(broken))
    assert_user_error(code, err, "broken.json: not a JSON DeepSpeed config")
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 2}}), encoding="utf-8")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "deepspeed" else object())
    code, _, err = run(capsys, *base, "--output", str(tmp_path / "c"), "--deepspeed", str(good))
    assert_user_error(code, err, "pip install 'qtune[deepspeed]'")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_report_to_none_writes_no_logs_and_a_bad_tracker_stops_before_work(capsys, tiny_bert_dir,
                                                                           synthetic_files, tmp_path):
    base = ["train", "pair-cls", "--model", tiny_bert_dir, "--train", str(synthetic_files["train"]), "--device",
            "cpu", "--epochs", "0.05", "--batch-size", "16"]
    code, _, err = run(capsys, *base, "--output", str(tmp_path / "bad"), "--report-to", "comet")
    assert_user_error(code, err, "unknown tracker 'comet'", "tensorboard, wandb, mlflow, swanlab, none")
    assert not (tmp_path / "bad").exists()
    code, _, err = run(capsys, *base, "--output", str(tmp_path / "quiet"), "--report-to", "none")
    assert code == 0, err
    assert (tmp_path / "quiet" / "best").is_dir() and not (tmp_path / "quiet" / "runs").exists()


def test_processes_on_one_machine_share_its_free_memory(monkeypatch):
    import torch

    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8 << 30)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.free_memory(torch.device("cpu")) == 8 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory.free_memory(torch.device("cpu")) == 2 << 30


def test_the_process_group_is_left_before_exit(monkeypatch):
    """A gloo group still alive at interpreter exit can abort a rank after its work is done: joining
    registers leaving at exit (it does nothing where none was joined)."""
    import torch.distributed as dist

    from support import free_port

    distributed.leave_process_group()  # none joined: a no-op
    at_exit = []
    monkeypatch.setattr(distributed.atexit, "register", at_exit.append)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    # taken for one of 2 launched processes, while the group itself (env://) has just this one
    monkeypatch.setattr(distributed, "launch", lambda: distributed.Launch(rank=0, world_size=2, local_rank=0,
                                                                          launched=True))
    distributed.init_process_group()
    assert dist.is_initialized() and at_exit == [distributed.leave_process_group]
    distributed.leave_process_group()
    assert not dist.is_initialized()
