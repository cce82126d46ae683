"""agentkit.prompts (see ../shared/design.md)."""
