"""A memory budget spent on precision (LQ-LoRA's integer program, data-free): which format each linear weight gets.

Each decoder linear weight W may be held as 4-bit with blocks of 32 / 64 / 128 / 256, as int8 or in 16-bit
(weight_formats.FORMATS); each choice costs its exact bits and leaves an error ||W - dequant(quant(W))||_F^2.
`solve` picks one format per matrix so that the summed error is smallest and the summed bits stay within the budget:
a 0/1 integer program (scipy.optimize.milp, HiGHS) solved to a proven relative gap of 1e-4 (the summed error within
0.01% of the optimum; hand-sized cases to the optimum itself) or, where many matrices of one shape have nearly the
same error (random weights; in the measured 28-layer case a generous budget did not close the gap in 20 s), the best
plan found within SOLVER_TIME_S with its proven gap. The plan is written into the run folder (precision_plan.json) so
that resume, chat and export build the same model.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_engine.model import weight_formats as wf
from qlora_engine.protocol.config import RunConfig, write_text_atomic
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.queries import PrecisionPlanReport

PLAN_FILE = "precision_plan.json"
SKIPPED_MODULES = ("lm_head",)  # kept in the compute dtype, as transformers' bitsandbytes integration does
SOLVER_GAP = 1e-4  # proven relative gap at which the search stops
SOLVER_TIME_S = 60.0  # then the best plan found, with the gap it proves


@dataclass
class MatrixChoice:
    """One weight matrix's options: bits and squared error of each format, in FORMATS order."""
    name: str
    rows: int
    cols: int
    bits: list[int]
    errors: list[float]


@dataclass
class PrecisionPlan:
    budget_bits: float  # average bits per weight allowed
    formats: dict[str, str]  # module name -> format name
    total_bits: int
    params: int
    error: float  # summed squared Frobenius error of the plan
    plain_error: float  # the same with every matrix in blocks of 64 (plain QLoRA)
    relative_error: float  # mean over matrices of ||W - Q(W)||_F / ||W||_F
    plain_relative_error: float
    counts: dict[str, int] = field(default_factory=dict)
    optimality_gap: float = 0.0  # proven: the plan's error is at most this fraction above the optimum's

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.params


def solve(choices: list[MatrixChoice], budget_bits_total: int) -> list[int]:
    """The format index of each matrix minimizing the summed error with sum of bits <= budget."""
    return solve_with_gap(choices, budget_bits_total)[0]


def solve_with_gap(choices: list[MatrixChoice], budget_bits_total: int) -> tuple[list[int], float]:
    """`solve`'s answer and the relative gap HiGHS proved for it (0 when optimal)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_options = len(choices[0].bits)
    params = _params(choices)
    bits = np.array([c.bits for c in choices], dtype=float)
    errors = np.array([c.errors for c in choices], dtype=float)
    if bits.min(axis=1).sum() > budget_bits_total:
        raise EngineError("bad_config", f"precision_budget_bits: the budget ({budget_bits_total / params:.3f} bits per "
                          f"weight) is below the smallest mix ({bits.min(axis=1).sum() / params:.3f})",
                          "Raise precision_budget_bits, or set it to 0 for plain 4-bit.")
    scale = max(float(errors.max()), 1e-30)  # errors to order 1: HiGHS' tolerances are absolute
    one_each = np.kron(np.eye(len(choices)), np.ones(n_options))
    # the bits as bits per weight: coefficients of order 1 (raw bit counts of 1e8 stalled HiGHS' search)
    constraints = [LinearConstraint(one_each, 1, 1),
                   LinearConstraint(bits.reshape(1, -1) / params, -np.inf, budget_bits_total / params)]
    with _solver_output_hidden():
        result = milp((errors / scale).reshape(-1), integrality=np.ones(bits.size), bounds=Bounds(0, 1),
                      constraints=constraints,
                      options={"mip_rel_gap": SOLVER_GAP, "time_limit": SOLVER_TIME_S, "presolve": True})
    if result.x is None or result.status not in (0, 1):  # 1: the time limit, with the best plan found so far
        raise EngineError("solver_failed", f"the precision budget's integer program ended with: {result.message}",
                          "Set precision_budget_bits to 0 (plain 4-bit) and report this with the model.")
    picked = [int(i) for i in result.x.reshape(len(choices), n_options).argmax(axis=1)]
    used = sum(c.bits[i] for c, i in zip(choices, picked))
    if used > budget_bits_total:  # the solver's feasibility tolerance, never our budget
        return solve_with_gap(choices, budget_bits_total - (used - budget_bits_total))
    return picked, float(getattr(result, "mip_gap", 0.0) or 0.0)


@contextmanager
def _solver_output_hidden() -> Iterator[None]:
    """HiGHS' MIP search prints some of its internal messages straight to file descriptor 1, past Python: the
    engine's stdout is its event stream."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w", encoding="utf-8") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _params(choices: list[MatrixChoice]) -> int:
    return sum(c.rows * c.cols for c in choices)


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers bitsandbytes would quantize: every nn.Linear but the lm_head."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] not in SKIPPED_MODULES}


def measure_choices(linears: dict[str, torch.nn.Linear], quant_type: str, double_quant: bool) -> list[MatrixChoice]:
    choices = []
    for name, linear in linears.items():
        weight = linear.weight.detach().float()
        rows, cols = weight.shape
        choices.append(MatrixChoice(name, rows, cols, [f.bits(rows, cols, double_quant) for f in wf.FORMATS],
                                    [wf.squared_error(f, weight, quant_type, double_quant) for f in wf.FORMATS]))
    return choices


def plan_from_choices(choices: list[MatrixChoice], budget_bits: float, norms: dict[str, float]) -> PrecisionPlan:
    params = _params(choices)
    picked, gap = solve_with_gap(choices, int(budget_bits * params))
    plain = wf.FORMATS.index(wf.PLAIN_FORMAT)
    formats = {c.name: wf.FORMATS[i].name for c, i in zip(choices, picked)}
    counts = {f.name: sum(1 for name in formats.values() if name == f.name) for f in wf.FORMATS}

    def mean_relative(index_of: Any) -> float:
        return sum((c.errors[index_of(k)] ** 0.5) / norms[c.name] for k, c in enumerate(choices)) / len(choices)

    return PrecisionPlan(
        budget_bits=budget_bits, formats=formats, total_bits=sum(c.bits[i] for c, i in zip(choices, picked)),
        params=params, error=sum(c.errors[i] for c, i in zip(choices, picked)),
        plain_error=sum(c.errors[plain] for c in choices), relative_error=mean_relative(lambda k: picked[k]),
        plain_relative_error=mean_relative(lambda k: plain), counts={k: v for k, v in counts.items() if v},
        optimality_gap=gap)


def plan_for_model(model: torch.nn.Module, cfg: RunConfig) -> PrecisionPlan:
    """Measure every quantizable matrix of a 16-bit model in every format and solve for cfg's budget."""
    linears = quantizable_linears(model)
    with torch.no_grad():
        choices = measure_choices(linears, cfg.quant_type, cfg.double_quant)
        norms = {name: float(linear.weight.float().norm()) or 1.0 for name, linear in linears.items()}
    return plan_from_choices(choices, cfg.precision_budget_bits, norms)


def save_plan(plan: PrecisionPlan, path: Path) -> None:
    write_text_atomic(path, json.dumps(asdict(plan), indent=1))


def load_plan(path: Path) -> PrecisionPlan:
    return PrecisionPlan(**json.loads(path.read_text(encoding="utf-8")))


def apply_plan(model: torch.nn.Module, plan: PrecisionPlan, cfg: RunConfig, compute_dtype: torch.dtype,
               device: str) -> torch.nn.Module:
    """Swap each planned nn.Linear of a 16-bit (CPU) model for its planned layer on `device`, the rest moved."""
    for name, linear in quantizable_linears(model).items():
        if name not in plan.formats:
            raise EngineError("plan_mismatch", f"{PLAN_FILE}: no format for layer {name}",
                              "The run's precision plan was made for another model; start a new run.")
        layer = wf.make_layer(wf.format_named(plan.formats[name]), linear, cfg.quant_type, cfg.double_quant,
                              compute_dtype, device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model.to(device)


def planned_model(load_16bit: Any, cfg: RunConfig, compute_dtype: torch.dtype, device: str,
                  plan_path: Path | None) -> tuple[torch.nn.Module, PrecisionPlan]:
    """The mixed-precision base: the plan at `plan_path` when it exists (resume, chat, export), else solved now and
    written there."""
    model = load_16bit()
    if plan_path is not None and plan_path.is_file():
        plan = load_plan(plan_path)
    else:
        plan = plan_for_model(model, cfg)
        if plan_path is not None:
            save_plan(plan, plan_path)
    return apply_plan(model, plan, cfg, compute_dtype, device), plan


def plan_report(cfg: RunConfig) -> PrecisionPlanReport:
    """What cfg's budget buys on cfg's model: measured on its 16-bit weights (on the CPU), nothing trained."""
    from qlora_engine.model import loading

    source = loading.resolve_model(cfg.model, cfg.allow_pickle)
    model = loading.load_plain_model(source.path, dtype=torch.bfloat16, allow_pickle=cfg.allow_pickle,
                                     trust_remote_code=cfg.trust_remote_code)
    plan = plan_for_model(model, cfg)
    plain = wf.PLAIN_FORMAT
    plain_bits = sum(plain.bits(*linear.weight.shape, cfg.double_quant)
                     for linear in quantizable_linears(model).values())
    return PrecisionPlanReport(model=cfg.model, budget_bits=cfg.precision_budget_bits,
                               bits_per_weight=round(plan.bits_per_weight, 4), weight_bytes=plan.total_bits // 8,
                               plain_weight_bytes=plain_bits // 8, relative_error=round(plan.relative_error, 6),
                               plain_relative_error=round(plan.plain_relative_error, 6), counts=plan.counts)
