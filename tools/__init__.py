"""agentkit.tools: the @tool registry, search/lookup/finish over an index, the sandbox."""
