"""Model mechanics: loading (folders, .gguf, the bundled default), 4-bit + LoRA, packing, the chunked loss,
compiled layers. Knows nothing of runs or events beyond the error type."""
