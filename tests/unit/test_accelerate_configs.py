"""training/configs/*.yaml go through accelerate's own launch path: the config file parser, `accelerate launch`'s
argument validation, the environment the launcher hands to the training processes, and the plugin each
process then builds from that environment. A misspelled key would be silently ignored by `accelerate launch`
(it copies nested keys onto its arguments without checking them), so every key is checked against the
launcher's arguments as well. No process is launched and no GPU is needed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
)
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from training.loop import check_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
EXPECTED = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}
NESTED_PREFIX = {"fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}  # as launch.py maps them


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def launch_args(name: str):
    """What `accelerate launch --config_file training/configs/<name> train.py` resolves its arguments to."""
    parsed = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, _ = _validate_launch_command(parsed)
    return args, defaults


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_names_only_fields_accelerate_knows(name):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / name))  # unknown top-level keys raise here
    assert config.distributed_type == EXPECTED[name]
    assert config.num_processes >= 2 and config.num_machines == 1
    assert config.mixed_precision in ("no", "bf16")
    known = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load((CONFIGS / name).read_text())
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key in values:
            prefix = NESTED_PREFIX.get(section, "")
            flag = key if key.startswith(prefix) else prefix + key
            assert flag in known, f"{name}: {section}.{key} is no `accelerate launch` argument (it would be ignored)"
    args, _ = launch_args(name)
    assert args.num_processes == config.num_processes


def test_ddp_config_launches_one_process_per_device_with_torch_distributed():
    args, _ = launch_args("ddp.yaml")
    assert args.multi_gpu and not (args.use_fsdp or args.use_deepspeed or args.cpu)
    env = prepare_multi_gpu_env(args)  # the torch.distributed.run launcher (a process per GPU, or per CPU slot)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the loop's own --bf16 decides
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_fsdp_config_builds_the_plugin_the_training_processes_get(monkeypatch):
    args, _ = launch_args("fsdp.yaml")
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # built from the launcher's environment, as in each process
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # saving gathers full weights (export)
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.cpu_ram_efficient_loading is True
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's no-offload policy (not CPUOffloadPolicy)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_build_the_plugin_the_training_processes_get(monkeypatch, name, stage):
    args, defaults = launch_args(name)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    assert plugin.gradient_clipping == 1.0 and plugin.gradient_accumulation_steps == 1
    assert plugin.offload_optimizer_device == "none" and plugin.offload_param_device == "none"
    if stage == 3:
        assert plugin.zero3_save_16bit_model is True and plugin.zero3_init_flag is True


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM])
def test_the_loop_refuses_sharded_training_with_a_clear_error(kind):
    with pytest.raises(ValueError, match="supports one process or DDP"):
        check_distributed(SimpleNamespace(distributed_type=kind))


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_the_loop_accepts_one_process_and_ddp(kind):
    check_distributed(SimpleNamespace(distributed_type=kind))
