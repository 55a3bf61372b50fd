"""The memory of a precision budget (precision_budget_bits): what the decoder's linear weights take when each matrix
may be held at more than 4 bits, and how many bits per weight a given amount of spare memory buys.

The plan itself (which matrix gets which format) is made by the engine from the weights (model/precision_budget.py);
it never spends more than budget x weights bits, so the estimate counts exactly that: an upper bound that is reached
to within one matrix's upgrade. No torch here.
"""
from __future__ import annotations

from qlora_engine.planning.model_shape import ModelShape
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.queries import Term

MAX_BITS = 16.0  # every matrix in 16-bit: nothing more to buy


def linear_weight_count(shape: ModelShape) -> int:
    return shape.num_layers * sum(linear.params for linear in shape.decoder_linears())


def budget_weight_term(shape: ModelShape, run: RunConfig) -> Term:
    """The one term that replaces the 4-bit weights and their constants under a precision budget."""
    weights = linear_weight_count(shape)
    return Term("precision_weights", int(weights * run.precision_budget_bits / 8),
                f"{weights / 1e6:,.1f} M parameters of the decoder layers' linear layers at a budget of "
                f"{run.precision_budget_bits:g} bits per weight (constants included): each matrix 4-bit with blocks "
                "of 32 to 256, int8 or 16-bit, chosen for the least quantization error")


def bits_for_spare(shape: ModelShape, current_weight_bytes: int, spare_bytes: int) -> float:
    """The precision budget (bits per weight) that spends `spare_bytes` more on the linear weights than the
    `current_weight_bytes` they take now; at most 16, two decimals, rounded down so the spare is not exceeded."""
    weights = linear_weight_count(shape)
    bits = (current_weight_bytes + max(spare_bytes, 0)) * 8 / weights
    return min(MAX_BITS, int(bits * 100) / 100)
