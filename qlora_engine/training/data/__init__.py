"""Training data: sources (files, saved and Hub datasets), row shapes, column mapping, chat templates and the
trained-token mask, per-source reports, mixing. The names other modules use are re-exported here."""
from __future__ import annotations

from qlora_engine.training.data.answer import report_answer, report_text
from qlora_engine.training.data.columns import apply_columns, suggest_columns
from qlora_engine.training.data.formats import FORMATS, Example, detect_format, detect_majority_format, normalize
from qlora_engine.training.data.prepare import (
    PreparedData,
    PreparedMix,
    columns_for,
    mix_ratios,
    prepare_file,
    prepare_mix,
    preview_segments,
    source_name,
    split_validation,
)
from qlora_engine.training.data.report import PREFERENCE_NOTICE, BadRow, DataReport
from qlora_engine.training.data.sources import SUFFIXES, read_records
from qlora_engine.training.data.templates import (
    CHARS_PER_TOKEN_BOUND,
    PLAIN_TEMPLATE_USER,
    Tokenized,
    prompt_text,
    render,
    tokenize,
)
from qlora_engine.training.data.turns import NotATarget, RowError

__all__ = ["CHARS_PER_TOKEN_BOUND", "FORMATS", "PLAIN_TEMPLATE_USER", "PREFERENCE_NOTICE", "SUFFIXES", "BadRow",
           "DataReport", "Example", "NotATarget", "PreparedData", "PreparedMix", "RowError", "Tokenized",
           "apply_columns", "columns_for", "detect_format", "detect_majority_format", "mix_ratios", "normalize",
           "prepare_file", "prepare_mix", "preview_segments", "prompt_text", "read_records", "render",
           "report_answer", "report_text", "source_name", "split_validation", "suggest_columns", "tokenize"]
