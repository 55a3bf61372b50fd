"""The memory budget spent on precision: bitsandbytes' block sizes, exact sizes, the integer program's optimum and
budget, and a mixed-precision model through training, stop, resume, both exports and chat."""
import dataclasses
import itertools
import json
import random

import pytest
import torch
from test_adapter_init import check_exports_and_chat, train_stop_resume
from test_train import tiny_config

from qlora_engine.model import precision_budget as pb
from qlora_engine.model import weight_formats as wf
from qlora_engine.protocol.errors import EngineError


@pytest.mark.parametrize("blocksize", wf.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_takes_each_offered_block_size_and_the_bits_are_what_it_stores(blocksize, double_quant):
    weight = torch.randn(96, 200)
    fmt = wf.WeightFormat(f"4bit-b{blocksize}", "4bit", blocksize)
    param = wf.quantize(fmt, weight, "nf4", double_quant, "cpu")
    state = param.quant_state
    assert state.blocksize == blocksize
    tensors = [param.data, state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset]
                                                        if double_quant else [])
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in tensors)
    assert fmt.bits(96, 200, double_quant) == stored_bits


def test_the_error_falls_as_the_formats_cost_more():
    weight = torch.randn(256, 384)
    errors = [wf.squared_error(f, weight, "nf4", True) for f in wf.FORMATS]  # b32, b64, b128, b256, int8, 16bit
    assert errors[3] > errors[2] > errors[1] > errors[0] > errors[4] > errors[5]
    bits = [f.bits(256, 384, True) for f in wf.FORMATS]
    assert bits[3] < bits[2] < bits[1] < bits[0] < bits[4] < bits[5]


def test_int8_bits_are_what_bitsandbytes_stores():
    param = wf.quantize(wf.format_named("int8"), torch.randn(96, 200), "", False, "cpu")
    assert wf.format_named("int8").bits(96, 200, False) == param.numel() * 8 + param.SCB.numel() * 32


def brute_force(choices, budget):
    best = None
    for picked in itertools.product(*[range(len(c.bits)) for c in choices]):
        bits = sum(c.bits[i] for c, i in zip(choices, picked))
        error = sum(c.errors[i] for c, i in zip(choices, picked))
        if bits <= budget and (best is None or error < best[0] - 1e-12):
            best = (error, picked)
    return best


def test_the_solver_picks_the_hand_checked_optimum():
    # two matrices, three formats each: 100 bits buys one upgrade; upgrading b saves 5, a only 3
    a = pb.MatrixChoice("a", 1, 10, bits=[40, 60, 80], errors=[10.0, 7.0, 1.0])
    b = pb.MatrixChoice("b", 1, 10, bits=[40, 60, 80], errors=[9.0, 4.0, 3.5])
    assert pb.solve([a, b], 100) == [0, 1]  # errors 10 + 4 = 14 beats 7 + 9 = 16
    assert pb.solve([a, b], 120) == [2, 0]  # 1 + 9 = 10 beats 7 + 4 = 11 and 10 + 3.5
    assert pb.solve([a, b], 160) == [2, 2]
    assert pb.solve([a, b], 80) == [0, 0]


def test_the_solver_is_optimal_and_never_over_budget_on_random_cases():
    rng = random.Random(0)
    for _ in range(40):
        choices = []
        for k in range(rng.randint(2, 5)):
            bits = sorted(rng.randint(10, 200) for _ in range(4))
            errors = sorted((rng.random() * 100 for _ in range(4)), reverse=True)
            choices.append(pb.MatrixChoice(f"m{k}", 1, 1, bits, errors))
        budget = rng.randint(sum(c.bits[0] for c in choices), sum(c.bits[-1] for c in choices))
        picked = pb.solve(choices, budget)
        assert sum(c.bits[i] for c, i in zip(choices, picked)) <= budget
        assert sum(c.errors[i] for c, i in zip(choices, picked)) == pytest.approx(brute_force(choices, budget)[0],
                                                                                 rel=pb.SOLVER_GAP)


def test_many_matrices_of_nearly_equal_error_end_with_a_plan_and_its_proven_gap(monkeypatch, capfd):
    """A 28-layer model of random weights: every matrix of a shape has nearly the same error, and with a generous
    budget HiGHS' search for the last 0.01% ran for minutes (it held a GPU measurement past its time limit). Now the
    bits are scaled to bits per weight and the search stops at its time limit with the best plan and its gap; none of
    HiGHS' own prints reach stdout, the engine's event stream."""
    shapes = [(1536, 1536), (256, 1536), (256, 1536), (1536, 1536), (8960, 1536), (8960, 1536), (1536, 8960)]
    rng = random.Random(0)
    choices = [pb.MatrixChoice(f"{layer}.{k}", rows, cols, [f.bits(rows, cols, True) for f in wf.FORMATS],
                               [rows * cols * 0.009 * (1 + 1e-4 * rng.random()) * share
                                for share in (1.0, 0.5, 0.3, 0.2, 0.1, 0.0)][:len(wf.FORMATS)])
               for layer in range(28) for k, (rows, cols) in enumerate(shapes)]
    params = sum(c.rows * c.cols for c in choices)
    monkeypatch.setattr(pb, "SOLVER_TIME_S", 5.0)
    picked, gap = pb.solve_with_gap(choices, int(6.0 * params))
    assert sum(c.bits[i] for c, i in zip(choices, picked)) <= 6.0 * params and 0 <= gap < 1e-2
    assert "Highs" not in capfd.readouterr().out


def test_a_budget_below_the_smallest_mix_is_a_bad_config():
    a = pb.MatrixChoice("a", 1, 10, bits=[40, 60], errors=[1.0, 0.5])
    with pytest.raises(EngineError) as caught:
        pb.solve([a], 39)
    assert caught.value.code == "bad_config" and "precision_budget_bits" in caught.value.message


def test_more_budget_never_costs_error_and_the_plain_budget_is_no_worse_than_plain_qlora(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora_engine.protocol.config import RunConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    linears = pb.quantizable_linears(model)
    choices = pb.measure_choices(linears, "nf4", True)
    plain = wf.FORMATS.index(wf.PLAIN_FORMAT)
    plain_bits = sum(c.bits[plain] for c in choices) / sum(c.rows * c.cols for c in choices)
    errors = []
    for bits in (plain_bits, 6.0, 8.5, 12.0):
        plan = pb.plan_for_model(model, RunConfig(model=str(tiny_model_dir), precision_budget_bits=bits))
        assert plan.total_bits <= bits * plan.params
        errors.append(plan.error)
    assert errors[0] <= plan.plain_error + 1e-9
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_a_mixed_precision_model_trains_resumes_exports_and_chats(tiny_model_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, alpaca_file, run_dir, max_steps=4, save_steps=2, precision_budget_bits=7.0)
    train_stop_resume(config, run_dir)
    plan = json.loads((run_dir / pb.PLAN_FILE).read_text())
    assert len(set(plan["formats"].values())) > 1 and plan["total_bits"] <= 7.0 * plan["params"]
    check_exports_and_chat(run_dir)


def test_the_estimate_counts_the_budget_and_the_plan_stays_within_it(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora_engine.planning import memory
    from qlora_engine.planning.memory import estimate_peak
    from qlora_engine.planning.model_shape import load_model_config
    from qlora_engine.protocol.config import RunConfig

    model_config = load_model_config(tiny_model_dir)
    run = RunConfig(model=str(tiny_model_dir), precision_budget_bits=7.5)
    estimate = estimate_peak(model_config, run)
    names = [term.name for term in estimate.terms]
    assert "precision_weights" in names and "nf4_weights" not in names and "quant_constants" not in names
    # the same run with plain 4-bit on the path a budget run takes (its int8 / 16-bit layers on peft's path,
    # uncompiled: measured on the H200, compiled int8 layers held 1.6 GiB more): only the weights differ
    plain = estimate_peak(model_config, RunConfig(model=str(tiny_model_dir), fused_lora=False, compile_layers=False))
    plan = pb.plan_for_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), run)
    assert plan.total_bits / 8 <= estimate.bytes_of("precision_weights") == int(plan.params * 7.5 / 8)
    assert estimate.peak_bytes - plain.peak_bytes == pytest.approx(
        estimate.bytes_of("precision_weights") - plain.bytes_of("nf4_weights") - plain.bytes_of("quant_constants"))
    gpu = RunConfig(device="cuda")
    assert memory.compiled_path(gpu) and not memory.compiled_path(dataclasses.replace(gpu, precision_budget_bits=4.5))


def test_the_memory_bench_builds_a_budget_runs_base_as_a_run_does():
    """bench --memory with precision_budget_bits: the random model's matrices in the formats the budget's solver
    picks for them (some above 4 bits), as run_base builds a run's base."""
    from qlora_engine.bench.models import random_planned_model
    from qlora_engine.planning.model_shape import load_model_config
    from qlora_engine.protocol.config import RunConfig
    from qlora_engine.resources import resources_dir

    config = {**load_model_config(resources_dir() / "model_configs" / "smollm2-135m.json"), "num_hidden_layers": 2}
    model = random_planned_model(config, RunConfig(device="cpu", compute_dtype="fp32", precision_budget_bits=5.0),
                                 device="cpu")
    kinds = {type(m).__name__ for n, m in model.named_modules() if "layers." in n and n.endswith("proj")}
    assert "Linear4bit" in kinds and kinds - {"Linear4bit"}, kinds  # a mix, as the budget bought
