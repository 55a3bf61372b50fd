"""CUDA: parallel fsdp's sharding (FSDP2 over bitsandbytes' 4-bit layers, NCCL) on one GPU.

Two ranks need two GPUs (NCCL refuses two ranks on one device); with one rank FSDP still turns every decoder layer's
4-bit codes and LoRA weights into DTensors, all-gathers them through NCCL for each forward and backward, and
Linear4bit rebuilds its weight from the gathered codes on the GPU: the part of the sharded path that the CPU tests
(gloo) cannot reach. Run with `pytest -m gpu tests/gpu/test_fsdp_cuda.py`.
"""
import os
import random
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_train import tiny_config  # noqa: E402

from qlora_engine.training import loop, sharding  # noqa: E402
from qlora_engine.training.data.templates import Tokenized  # noqa: E402
from qlora_engine.training.distributed import Ranks  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture
def nccl_group():
    import torch.distributed as dist

    with socket.socket() as probe:  # a free port for the one-rank group's store
        probe.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(probe.getsockname()[1]))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def train(model_dir, alpaca_file, run_dir, sharded, steps=6, load_device="cuda"):
    # the whole model without the fused LoRA path and compiled layers, which fsdp turns off: the same arithmetic
    cfg = tiny_config(model_dir, alpaca_file, run_dir, device="cuda", parallel="fsdp" if sharded else "ddp",
                      optimizer="adamw", lora_dropout=0.0, compute_dtype="bf16", fused_lora=False,
                      compile_layers=False)
    loop.seed_everything(0)
    model = loop.build_model(cfg, Path(model_dir), load_device, torch.bfloat16, run_dir=Path(run_dir),
                             sharded=sharded)
    if sharded:  # the 4-bit codes stored as bf16 elements (quant_storage): FSDP makes each shard a parameter
        import bitsandbytes as bnb

        codes = {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert codes == {torch.bfloat16}
        assert sharding.shard_layers(model, Ranks(), "cuda") > 0
        # a base loaded on the CPU (as a sharded run loads it) is on the card now, quantization states included
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
        states = [m.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert states and {s.absmax.device.type for s in states} == {"cuda"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(sharding.is_sharded(p) for p in trainable) == sharded
    optimizer = loop.build_optimizer(cfg, trainable)
    generator = random.Random(0)
    vocab = model.config.vocab_size
    losses = []
    for _ in range(steps):
        rows = [Tokenized([generator.randrange(vocab) for _ in range(48)], [True] * 48, line=i) for i in range(4)]
        batch = loop.micro_batch(rows, cfg, 0, "cuda")
        loss, grad_norm = loop.training_step(model, [batch], trainable, optimizer, cfg.max_grad_norm,
                                             cfg.chunked_loss, sharded=sharded)
        losses.append(loss)
        assert grad_norm > 0
    adapter = sharding.gathered_adapter_state(model) if sharded else {
        name: value.detach().cpu() for name, value in model.state_dict().items() if sharding.LORA_KEY_MARK in name}
    return losses, adapter


def test_fsdp_sharded_4bit_layers_train_on_cuda_as_the_whole_model(nccl_group, tiny_model_dir, alpaca_file, tmp_path):
    whole_losses, whole_adapter = train(tiny_model_dir, alpaca_file, tmp_path / "whole", sharded=False)
    sharded_losses, sharded_adapter = train(tiny_model_dir, alpaca_file, tmp_path / "sharded", sharded=True)
    assert whole_losses[-1] < whole_losses[0]  # it learns (a fixed random stream)
    assert sharded_losses == pytest.approx(whole_losses, rel=2e-2)
    assert sharded_adapter.keys() == whole_adapter.keys()
    for name, value in sharded_adapter.items():
        reference = whole_adapter[name].float()
        assert value.shape == reference.shape, name
        assert (value.float() - reference).norm() <= 0.05 * reference.norm() + 1e-6, name


def test_a_base_loaded_on_the_cpu_is_sharded_onto_the_card_and_trains_the_same(nccl_group, tiny_model_dir,
                                                                               alpaca_file, tmp_path):
    """What a sharded run does (the base never whole on a card): load on the CPU, shard_layers moves each layer."""
    whole_losses, _ = train(tiny_model_dir, alpaca_file, tmp_path / "whole", sharded=False)
    torch.cuda.reset_peak_memory_stats()
    cpu_losses, cpu_adapter = train(tiny_model_dir, alpaca_file, tmp_path / "from-cpu", sharded=True,
                                    load_device="cpu")
    assert cpu_losses == pytest.approx(whole_losses, rel=2e-2)
    assert cpu_adapter and all(torch.isfinite(value).all() for value in cpu_adapter.values())
