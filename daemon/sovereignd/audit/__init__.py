"""The audit: evidence from logs and files, controls with verdicts, and the report's renderings."""
