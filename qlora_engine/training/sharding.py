"""`parallel: fsdp`: the 4-bit base and the adapter split over the ranks with FSDP2, one shard group per decoder layer.

The base is loaded on the CPU (bitsandbytes quantizes there) and never whole on a card: each decoder layer is moved
to its rank's GPU and `fully_shard`ed there, one after the other, so a card holds its shares of the layers plus the
parts every rank keeps whole (a model larger than one card trains on several). The layer's parameters (the 4-bit
codes, stored as the compute dtype's elements: bitsandbytes' quant_storage, as FSDP shards floating-point tensors
only, and the LoRA weights) become DTensors holding 1/N of the rows on each rank; a layer's forward all-gathers
them, runs, and frees them again (the backward gathers them once more). bitsandbytes' Linear4bit rebuilds its 4-bit
parameter from the gathered codes and the quantization state it keeps on the module. The embeddings, the final norm
and lm_head are frozen and stay whole on every rank.

FSDP sums the LoRA gradients over ranks by reduce-scatter (the loss is already divided by the step's trained tokens
over all ranks, so no averaging). The optimizer (torch AdamW) updates each rank's shard. A checkpoint is written in
the same files as a single process's: every rank takes part in gathering the whole adapter and optimizer state, rank
0 writes them; on resume each rank reads them and keeps its own shard. So export, chat and the checkpoint pickers read
an FSDP run's checkpoints as any other.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from qlora_engine.model import layer_compile
from qlora_engine.training.distributed import Ranks

LORA_KEY_MARK = "lora_"  # in the names of the adapter's weights: lora_A, lora_B, lora_magnitude_vector, ...


def sharded_run(parallel: str, ranks: Ranks) -> bool:
    """Whether this process shards the model: parallel fsdp over several ranks (one rank keeps it whole)."""
    return parallel == "fsdp" and ranks.several


def shard_layers(model: Any, ranks: Ranks, device: str) -> int:
    """fully_shard every decoder layer of `model` over all ranks, in place; returns how many."""
    import bitsandbytes as bnb
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (ranks.world,))
    layers = layer_compile.decoder_layers(model)
    for module in model.modules():  # where Linear4bit rebuilds its gathered weight's state from (a loader sets it,
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "quant_state", None) is None:  # not all do)
            module.quant_state = module.weight.quant_state
    for layer in layers:  # a layer loaded on the CPU is moved to `device` here, one layer at a time, then cut
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)  # a sum over ranks, not a mean: see the module's docstring
        layer.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    _move_the_rest(model, torch.device(device))
    return len(layers)


def _move_the_rest(model: Any, device: torch.device) -> None:
    """What fully_shard did not move of a base loaded on the CPU: the embeddings, final norm, lm_head and rotary
    buffers (whole on every rank), and each 4-bit layer's quantization state (kept on the module, not a parameter)."""
    import bitsandbytes as bnb

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and not is_sharded(param) and param.device.type != device.type:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != device.type:
                module._buffers[name] = buffer.to(device)
        state = getattr(module, "quant_state", None) if isinstance(module, bnb.nn.Linear4bit) else None
        if state is not None and state.absmax.device.type != device.type:
            state.to(device)  # in place: code, absmax and the nested constants


def is_sharded(tensor: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: Any) -> Any:
    """A DTensor gathered whole (collective: every rank calls it in the same order), on the CPU; anything else as is."""
    return tensor.full_tensor().cpu() if is_sharded(tensor) else tensor


def gathered_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's LoRA weights by state-dict name, whole, for peft's save_pretrained(state_dict=...) (collective)."""
    return {name: whole(value.detach()) for name, value in model.state_dict().items() if LORA_KEY_MARK in name}


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded state whole (collective)."""
    state = optimizer.state_dict()
    return {**state, "state": {index: {key: whole(value) for key, value in entry.items()}
                               for index, entry in sorted(state["state"].items())}}


def cut_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state (as gathered_optimizer_state had it) cut as each of its parameters is cut here."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {**state, "state": {index: {key: _like(value, params[int(index)]) for key, value in entry.items()}
                               for index, entry in state["state"].items()}}


def cut_adapter_weights(model: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole adapter weights under peft's names (adapter_model.safetensors) cut as the model's weights are cut here,
    for peft's set_peft_model_state_dict."""
    from peft import get_peft_model_state_dict

    targets = get_peft_model_state_dict(model)
    return {name: _like(value, targets.get(name)) for name, value in weights.items()}


def share(ranks: Ranks, rows: list[Any], sharded: bool) -> list[Any]:
    """This rank's share of a global micro-batch (Ranks.share). Sharded, a rank whose share is empty gets the first
    row with no trained token instead: it must take part in every layer's gather and gradient sum, while adding
    nothing to the loss or the gradients."""
    mine = ranks.share(rows)
    if mine or not sharded:
        return mine
    return [replace(row, trained_token_mask=[False] * len(row.trained_token_mask)) for row in rows[:1]]


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The gradient norm over the whole adapter (sharded and whole gradients alike), clipped to `max_norm`."""
    squares = torch.zeros((), dtype=torch.float64)
    sharded_squares = torch.zeros((), dtype=torch.float64)
    for param in params:
        if param.grad is None:
            continue
        if is_sharded(param.grad):
            sharded_squares += param.grad.to_local().double().pow(2).sum().cpu()
        else:
            squares += param.grad.double().pow(2).sum().cpu()
    device = next((p.grad.to_local().device for p in params if is_sharded(p.grad)), torch.device("cpu"))
    total = sharded_squares.to(device)
    torch.distributed.all_reduce(total)
    norm = float((total.cpu() + squares).sqrt())
    if max_norm and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for param in params:
            if param.grad is not None:
                param.grad.mul_(scale)
    return norm


def _like(value: Any, target: Any) -> Any:
    """`value` (whole) as a DTensor cut like `target`, when `target` is sharded and of the same shape."""
    if not (isinstance(value, torch.Tensor) and is_sharded(target) and tuple(value.shape) == tuple(target.shape)):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
