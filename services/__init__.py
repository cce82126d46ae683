"""agentkit.services: the REST API, the feedback and conversation stores, the model server."""
