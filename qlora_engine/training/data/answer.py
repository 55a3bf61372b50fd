"""The `data` command's answer: a prepared source (or mix) as the protocol's DataReport, and as lines for a
terminal. Not here: preparing it (prepare.py)."""
from __future__ import annotations

from typing import Any

from qlora_engine.protocol import queries
from qlora_engine.training.data.prepare import PreparedMix, preview_segments
from qlora_engine.training.data.report import DataReport


def report_answer(prepared: PreparedMix, tokenizer: Any, file: str, preview_rows: int) -> queries.DataReport:
    """The first source's report at the top (what a single file gives), each source's own in `sources`, and
    `preview_rows` rows of each source as highlighted segments."""
    first = prepared.reports[0]
    preview = [{"file": part.report.file, "line": e.line, "segments": preview_segments(e, tokenizer)}
               for part in prepared.parts for e in part.examples[:preview_rows]]
    return queries.DataReport(
        file=file, detected_format=first.detected_format, format=first.format, rows=first.rows,
        valid_rows=len(prepared.parts[0].examples), bad_rows=_bad_rows(first),
        truncated_rows=first.truncated_rows, no_trained_tokens_rows=first.no_trained_tokens_rows,
        token_lengths=[len(e.input_ids) for e in prepared.examples], preview=preview,
        not_target_rows=first.not_target_rows, columns=first.columns, columns_suggested=first.columns_suggested,
        source_columns=first.source_columns, notice=first.notice,
        sources=[{**part.report.summary_fields(), "valid_rows": len(part.examples), "bad_rows": _bad_rows(part.report),
                  "source_columns": part.report.source_columns} for part in prepared.parts])


def _bad_rows(report: DataReport) -> list[dict[str, Any]]:
    return [{"line": bad.line, "reason": bad.reason} for bad in report.bad_rows]


def report_text(answer: queries.DataReport) -> str:
    """The answer for a person at a terminal: one block per source."""
    blocks = []
    for source in answer.sources:
        lines = [f"{source['file']}: {source['format']} (detected {source['detected_format']}), {source['rows']} rows, "
                 f"{source['valid_rows']} usable, {len(source['bad_rows'])} bad, {source['truncated_rows']} truncated"]
        if len(answer.sources) > 1:
            lines[0] += f"; {source['used_rows']} rows in the mix ({source['ratio']:.0%})"
        if source["columns"]:
            mapped = ", ".join(f"{field} <- {column}" for field, column in source["columns"].items())
            lines.append(f"  columns: {mapped}" + (" (suggested from the names)" if source["columns_suggested"]
                                                   else ""))
        if source["not_target_rows"]:
            lines.append(f"  {source['not_target_rows']} row(s) marked label: false: never trained on")
        if source["notice"]:
            lines.append(f"  note: {source['notice']}")
        lines += [f"  line {bad['line']}: {bad['reason']}" for bad in source["bad_rows"][:50]]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
