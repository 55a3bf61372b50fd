"""Planning before anything is loaded: the GPUs (pynvml) and the memory estimate. Imports without torch."""
