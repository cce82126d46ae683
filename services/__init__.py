"""agentkit.services (see ../shared/design.md)."""
