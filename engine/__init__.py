"""dreamfuse engine."""
