"""The audit's controls, one module per section of the report."""
