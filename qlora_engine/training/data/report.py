"""What reading one source found: its shape, rows, bad rows by line, rows left out on purpose (KTO `label: false`,
weight-0-only), truncations, the columns mapped, and how many rows it gave the mix.

Not here: reading (sources.py) or the typed answers the CLI prints (protocol/queries.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PREFERENCE_NOTICE = ("preference pairs: trained as supervised fine-tuning on the chosen answers (the rejected ones "
                     "are not used; preference training such as DPO is not built in yet)")


@dataclass
class BadRow:
    file: str
    line: int
    reason: str

    def describe(self) -> str:
        return f"{self.file} line {self.line}: {self.reason}"


@dataclass
class DataReport:
    file: str
    detected_format: str
    format: str
    rows: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    truncated_rows: int = 0
    no_trained_tokens_rows: int = 0
    not_target_rows: int = 0  # KTO-style rows marked undesirable (label: false): counted, never trained on
    columns: dict[str, str] = field(default_factory=dict)  # {field: the file's column} applied to every row
    columns_suggested: bool = False  # the mapping was suggested from common names, not given
    source_columns: list[str] = field(default_factory=list)
    ratio: float = 1.0  # this source's share of the training rows in a mix
    used_rows: int = 0  # rows this source gave the training set (after the mix)

    @property
    def valid_rows(self) -> int:
        return self.rows - len(self.bad_rows) - self.not_target_rows

    @property
    def notice(self) -> str:
        return PREFERENCE_NOTICE if self.format == "preference" else ""

    def summary_fields(self) -> dict[str, Any]:
        """This source's report as the plain dict the `data_ready` event and the `data_report` answer carry."""
        return {"file": self.file, "format": self.format, "detected_format": self.detected_format,
                "rows": self.rows, "bad_rows": len(self.bad_rows), "not_target_rows": self.not_target_rows,
                "truncated_rows": self.truncated_rows, "columns": dict(self.columns),
                "columns_suggested": self.columns_suggested, "ratio": self.ratio, "used_rows": self.used_rows,
                "notice": self.notice}
