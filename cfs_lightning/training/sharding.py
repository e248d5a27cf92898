"""Sharding a Hugging Face causal LM: FSDP2 (`fully_shard`) and an FSDP1 strategy, both per decoder block.

FSDP2 (`ModelParallelStrategy`, CPU or GPU): `CausalLMFineTuner.configure_model` calls
`shard_fsdp2` on the trainable model and, separately, on the frozen reference, so the two never
share a sharding unit. FSDP1 (`DecoderBlockFSDPStrategy`, GPU only): Lightning's `FSDPStrategy`
with the auto-wrap policy read from the model (its decoder block class), so a YAML needs no class
path of the architecture.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .lora import LoRA, apply_lora, unwrap


def decoder_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the model's decoder blocks, from transformers' `_no_split_modules`."""
    hf = _transformers_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    found = {type(m) for m in hf.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(
            f"{type(hf).__name__} declares no decoder block class (`_no_split_modules` is "
            f"{sorted(names) or 'empty'}), so it cannot be sharded per block; use the ddp strategy"
        )
    return found


def _transformers_model(model: nn.Module) -> PreTrainedModel:
    for m in model.modules():  # the outermost transformers model (inside a peft wrapper)
        if isinstance(m, PreTrainedModel):
            return m
    raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel")


def shard_fsdp2(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool | None = None) -> None:
    """`fully_shard` every decoder block of `model`, then the model itself (embeddings, final norm,
    output head and anything else left over form the root unit). Sharded in place.

    `reshard_after_forward` None keeps FSDP2's default (the root stays gathered until backward).
    Mixed precision comes from the trainer's `precision` (autocast), as on one device.
    """
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    blocks = tuple(decoder_block_classes(model))
    for module in [m for m in model.modules() if isinstance(m, blocks)]:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel axis of the device mesh FSDP2 (`ModelParallelStrategy`) hands the module;
    a mesh that would also split tensors is refused."""
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "cfs_lightning shards with FSDP2 only (no tensor parallelism): set the strategy's "
            "tensor_parallel_size=1 and data_parallel_size to the number of devices "
            "(configs/strategies/fsdp2.yaml)"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def reshard(model: nn.Module) -> None:
    """Drop every gathered FSDP2 parameter copy of `model`, so the next forward gathers afresh.

    FSDP2 keeps the root unit gathered after a forward pass; code that writes into the sharded
    parameters directly (weight averaging swapping weights in) must reshard first and after,
    or a forward would run on the stale gathered copy. A no-op for unsharded models.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    """True when `model` is sharded by FSDP2 (`fully_shard`) or wrapped by FSDP1."""
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2) parameter; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def gather_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole CPU tensor whose shard `local` is, sharded as `param` is (all ranks call it)."""
    if isinstance(param, DTensor):
        local = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride()).full_tensor()
    return local.detach().cpu()


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `whole`, cut as `param` is (no communication)."""
    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


class DecoderBlockFSDPStrategy(FSDPStrategy):
    """FSDP1 with one unit per decoder block and one for the transformers model (GPU only).

    The auto-wrap policy is read from the LightningModule's model when the strategy wraps it, so
    the same YAML serves any architecture. `activation_checkpointing_blocks` recomputes each
    block's activations in the backward pass. Every other `FSDPStrategy` argument passes through
    (`sharding_strategy`, `cpu_offload`, `state_dict_type`, ...).

    The frozen reference of KL regularizers is not part of the trained module; under FSDP1 every
    device holds a whole copy of it (use FSDP2, `configs/strategies/fsdp2.yaml`, to shard it too).
    """

    def __init__(self, activation_checkpointing_blocks: bool = False, **kwargs) -> None:
        """
        Args:
            activation_checkpointing_blocks: Recompute decoder-block activations in backward.
            **kwargs: Passed to `lightning.pytorch.strategies.FSDPStrategy`.
        """
        if "auto_wrap_policy" in kwargs:
            raise ValueError(
                "DecoderBlockFSDPStrategy builds its auto_wrap_policy from the model; use "
                "lightning's FSDPStrategy to give your own"
            )
        super().__init__(**kwargs)
        self.activation_checkpointing_blocks = activation_checkpointing_blocks

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if getattr(model, "lora", None) is not None:
            raise ValueError("LoRA is not supported with FSDP1: use FSDP2 (configs/strategies/fsdp2.yaml) or DDP")
        stateful = [r.name for r in getattr(model, "regularizers", []) if r.per_parameter_state]
        if stateful:
            raise ValueError(
                f"regularizers {stateful} keep per-parameter state, which FSDP1's flattened shards "
                "do not support: use FSDP2 (configs/strategies/fsdp2.yaml) or DDP"
            )
        blocks = decoder_block_classes(model)
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks | {type(_transformers_model(model))})
        if self.activation_checkpointing_blocks:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(blocks)}
        return super()._setup_model(model)


def full_params_for_eval(root: nn.Module):
    """FSDP1: every rank gathers the whole model for the duration (read-only), so that it can be
    called outside the wrapped training forward, e.g. by lm-eval. A no-op for unwrapped and FSDP2
    models (FSDP2 gathers in each unit's own forward)."""
    if any(isinstance(m, FullyShardedDataParallel) for m in root.modules()):
        return FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True)
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a possibly sharded model on CPU: filled on rank 0, empty elsewhere
    when sharded. Every rank must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_copy(model: nn.Module, config: PretrainedConfig, lora: LoRA | None,
                  root: nn.Module | None = None, prefix: str = "") -> nn.Module | None:
    """A whole, unsharded CPU copy of a sharded trainable model on rank 0 (None on other ranks).

    Every rank must call it (the weights are all-gathered). Under FSDP1 the state is read from
    the wrapped `root` (the LightningModule) and `prefix` (its attribute path to the model) is
    stripped. The copy is built on the meta device and takes the gathered tensors as they are, so
    rank 0 holds one CPU copy, no more.
    """
    state = full_state_dict(root if root is not None else model)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(config)
    if lora is not None:
        copy = apply_lora(copy, lora)
    copy.load_state_dict(state, assign=True)
    unwrap(copy).tie_weights()
    return copy


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: `ModelParallelStrategy` with all devices on the data-parallel
    axis (no tensor parallelism), so `trainer.devices` alone sets the world size.

    `CausalLMFineTuner.configure_model` does the sharding (`shard_fsdp2`). Checkpoints are
    distributed (a folder, one file per rank) unless `save_distributed_checkpoint=False`.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        """
        Args:
            save_distributed_checkpoint: Each rank writes its shard (a checkpoint folder); False
                gathers a single-file checkpoint on rank 0.
            **kwargs: Passed to `lightning.pytorch.strategies.ModelParallelStrategy` (`timeout`,
                `process_group_backend`).
        """
        for key in ("data_parallel_size", "tensor_parallel_size"):
            if key in kwargs:
                raise ValueError(f"FSDP2Strategy sets {key} itself; use ModelParallelStrategy to choose it")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
