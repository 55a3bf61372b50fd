"""`qlora-studio bench`: the engine's peak memory against the estimate, and its speed against other stacks."""
