"""Bundled data files of QLoRA Studio (installed as the package qlora_studio_resources)."""
