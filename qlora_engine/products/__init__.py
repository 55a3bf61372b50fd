"""What a run is for: chat with base and tuned, and exports (adapter, merged)."""
