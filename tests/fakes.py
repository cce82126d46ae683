"""Test doubles for agentkit's own tests; they live in ``agentkit.testing`` for users' tests too."""

from agentkit.testing import HashingEmbedder, WordCounter

__all__ = ["HashingEmbedder", "WordCounter"]
