"""agentkit.tools (see ../shared/design.md)."""
