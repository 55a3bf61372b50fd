"""The compiled layers and the in-torch 4-bit dequantization they trace compute what the eager engine computes."""
import bitsandbytes as bnb
import pytest
import torch
from test_packing import random_rows

from qlora_engine.model import layer_compile, lm_loss, lora_nf4
from qlora_engine.protocol.config import RunConfig
from qlora_engine.training import loop


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (96, 40), (3, 100)])  # whole blocks; a last partial block; tiny
def test_dequantize_in_torch_equals_bitsandbytes(quant_type, nested, shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested,
                                                 quant_type=quant_type)
    expected = bnb.functional.dequantize_4bit(packed, state).to(torch.bfloat16)
    second = state.state2 if nested else None
    layout = lora_nf4.Layout(tuple(shape), 64, second.blocksize if nested else 0, quant_type)
    args = (packed, state.absmax, second.absmax if nested else None, second.code if nested else None,
            state.offset if nested else None, state.code, layout, torch.bfloat16)
    assert torch.equal(lora_nf4.dequantize_in_torch(*args), expected)
    assert torch.equal(lora_nf4.dequantize(*args), expected)  # the eager route: bitsandbytes' own kernels
    assert (expected - weight.bfloat16()).abs().max() > 0  # it was quantized


def loss_and_grads(model_dir, compiled: bool, dropout: float = 0.0, graphs: list | None = None):
    cfg = RunConfig(model=str(model_dir), lora_dropout=dropout, packing=False, compute_dtype="fp32", device="cpu")
    torch.manual_seed(0)
    model = loop.build_model(cfg, model_dir, "cpu", torch.float32)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    if compiled:  # aot_eager: dynamo's trace and AOTAutograd's joint graph, run without generating code
        torch._dynamo.reset()
        aot_eager = torch._dynamo.lookup_backend("aot_eager_decomp_partition")

        def recording(graph, inputs):
            graphs.append(graph.print_readable(print_output=False))
            return aot_eager(graph, inputs)

        assert layer_compile.compile_layers(model, backend=recording, fullgraph=True) == 2
    model.train()
    batch = loop.collate(random_rows([20, 33]), 0, "cpu")
    torch.manual_seed(1)
    loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_trace_whole_and_match_eager(tiny_model_dir):
    """fullgraph: the decoder layer with the fused LoRA function, the dequantization and the attention traces
    without one graph break; in training mode, loss and every adapter gradient as the eager engine's."""
    eager_loss, eager_grads = loss_and_grads(tiny_model_dir, compiled=False)
    graphs = []
    compiled_loss, compiled_grads = loss_and_grads(tiny_model_dir, compiled=True, graphs=graphs)
    assert len(graphs) == 1  # compiled once, reused by the second layer
    assert all(op in graph for graph in graphs for op in ("autograd_function_apply", "rshift"))
    assert not any("bitsandbytes" in graph for graph in graphs)  # dequantized in torch operations, fused by Inductor
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_compiling_is_for_cuda_only():
    assert "CUDA" in layer_compile.compile_supported("cpu")
    cfg = RunConfig()
    assert cfg.compile_layers  # on by default; attach_lora asks compile_supported first


def saved_activation_bytes(model_dir, compiled: bool, activation_memory_budget: float = 0.0) -> int:
    """Bytes of the tensors a forward keeps for the backward, other than the model's own weights and buffers."""
    cfg = RunConfig(model=str(model_dir), packing=False, compute_dtype="fp32", device="cpu")
    model = loop.build_model(cfg, model_dir, "cpu", torch.float32)
    model.train()
    if compiled:
        torch._dynamo.reset()
        layer_compile.compile_layers(model, backend="aot_eager_decomp_partition", fullgraph=True,
                                     activation_memory_budget=activation_memory_budget)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    batch = loop.collate(random_rows([200, 330]), 0, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch)).backward()
    return sum(kept.values())


def test_compiled_layers_recompute_like_gradient_checkpointing(tiny_model_dir):
    """transformers' checkpoint is taken off the compiled layers and the compiler recomputes instead: the forward
    keeps about what the checkpointed eager layers keep (measured 1.4x on this tiny model; its default trade-off
    keeps 13x)."""
    checkpointed = saved_activation_bytes(tiny_model_dir, compiled=False)
    compiled = saved_activation_bytes(tiny_model_dir, compiled=True)
    assert torch._functorch.config.activation_memory_budget == 0.0
    assert compiled < 2 * checkpointed, (compiled, checkpointed)


def test_a_compiler_that_fails_leaves_the_layers_running_eagerly(tiny_model_dir, monkeypatch):
    """On a machine where Inductor or Triton breaks, training goes on uncompiled with the same loss."""
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # restored after the test

    def broken_backend(graph, inputs):
        raise RuntimeError("no working C compiler")

    cfg = RunConfig(model=str(tiny_model_dir), packing=False, compute_dtype="fp32", device="cpu")
    losses = []
    for backend in (None, broken_backend):
        torch.manual_seed(0)
        model = loop.build_model(cfg, tiny_model_dir, "cpu", torch.float32)
        model.train()
        if backend:
            torch._dynamo.reset()
            layer_compile.compile_layers(model, backend=backend)
        batch = loop.collate(random_rows([20, 33]), 0, "cpu")
        losses.append(float(lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch))))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_an_activation_memory_budget_keeps_more_of_each_layer_for_the_backward(tiny_model_dir):
    """activation_memory_budget (a run option) lets the compiled backward keep activations instead of recomputing
    them: with the whole budget the forward keeps several times what it keeps at 0 (checkpointing's trade)."""
    try:
        recomputing = saved_activation_bytes(tiny_model_dir, compiled=True)
        keeping = saved_activation_bytes(tiny_model_dir, compiled=True, activation_memory_budget=1.0)
        assert torch._functorch.config.activation_memory_budget == 1.0
    finally:
        torch._functorch.config.activation_memory_budget = 0.0
    assert keeping > 3 * recomputing, (keeping, recomputing)
