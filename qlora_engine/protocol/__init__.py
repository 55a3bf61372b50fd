"""The contract between the engine and its clients: the typed run config, events, query results, the
one error type, run folders. Imports without torch."""
