"""What a `model` value names: the bundled default, a path on disk, or a Hugging Face Hub id ORG/NAME[@revision].

One rule for every layer (loading, the estimate, the catalog, the CLI). No torch, no network here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The Hub's repo ids: an owner and a name of letters, digits, '-', '_', '.'; a revision after '@' (branch, tag, sha).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
FILE_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt", ".yaml", ".jsonl")


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub: its repo id and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    @property
    def revision_or_main(self) -> str:
        return self.revision or "main"

    @property
    def page_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(spec: str) -> HubRef | None:
    """The Hub id in `spec`, or None when it is 'default', an existing path, or doesn't look like ORG/NAME[@rev].

    A path on disk always wins, so a local folder named like a Hub id is never downloaded over.
    """
    spec = spec.strip()
    if spec in ("", "default") or spec.startswith((".", "/", "~")) or "\\" in spec:
        return None
    match = HUB_ID.fullmatch(spec)
    if match is None or match.group("repo").lower().endswith(FILE_SUFFIXES) or Path(spec).exists():
        return None
    if ".." in match.group("repo") or (match.group("revision") or "").startswith("/"):
        return None
    return HubRef(match.group("repo"), match.group("revision"))
