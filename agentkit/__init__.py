"""agentkit: RAG, PAL and ReAct agents on a self-hosted, aligned model served by vLLM."""

from agentkit.ai_feedback import ai_label
from agentkit.client import AsyncClient, ChatReply, Client
from agentkit.constitution import Constitution, Principle, load_constitution
from agentkit.critique import Critic, Revision
from agentkit.errors import (
    AgentkitError,
    ConfigError,
    ContextBudgetError,
    EmbeddingModelError,
    GuardError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidPathError,
    InvalidQueryError,
    LLMError,
    ModelPrepareError,
    ModelServerError,
    SandboxError,
    ToolError,
)
from agentkit.guardrails import Guardrails, GuardRule
from agentkit.guards import CallableGuard, Guard, JudgeGuard, LlamaGuard, Verdict
from agentkit.llm import (
    ChatModel,
    Completion,
    Delta,
    ModelSettings,
    OpenAIChatModel,
    Structured,
    Usage,
    connect,
)
from agentkit.mcp_client import MCPConnection, MCPServerSpec
from agentkit.pal import PAL, PALAnswer
from agentkit.rag import RAG, Answer, Citation
from agentkit.react import ReAct, Step, Trajectory
from agentkit.refusal import RefusalJudge, classify_refusal, validate_refusal
from agentkit.retrievers import (
    Hit,
    Index,
    LoadedDocument,
    SyncSummary,
    index_folder,
    register_loader,
)
from agentkit.rewards import CallableReward, JudgeReward, Reward, RewardModel
from agentkit.settings import Settings, get_settings
from agentkit.testing import HashingEmbedder, ScriptedChatModel
from agentkit.tools.registry import Tool, ToolRegistry, from_langchain, tool
from agentkit.tools.sandbox import Sandbox, SandboxResult, python_tool

__version__ = "0.1.0"

# fmt: off
__all__ = [
    "PAL", "RAG", "AgentkitError", "Answer", "AsyncClient", "ChatModel", "ChatReply", "Citation",
    "Client", "Completion", "ConfigError", "ContextBudgetError", "Delta", "EmbeddingModelError",
    "HashingEmbedder", "Hit", "Index", "IndexFormatError", "IndexLockedError",
    "IndexNotFoundError", "InvalidPathError", "InvalidQueryError", "LLMError", "LoadedDocument",
    "ModelPrepareError", "ModelServerError", "ModelSettings", "OpenAIChatModel", "PALAnswer",
    "ReAct", "Sandbox", "SandboxError", "SandboxResult", "ScriptedChatModel", "Settings", "Step",
    "Structured", "SyncSummary", "Tool", "ToolError", "ToolRegistry", "Trajectory", "Usage",
    "connect", "from_langchain", "get_settings", "index_folder", "python_tool",
    "register_loader", "tool",
    # guardrails (issue 14)
    "CallableGuard", "CallableReward", "Constitution", "Critic", "Guard", "GuardError",
    "GuardRule", "Guardrails", "JudgeGuard", "JudgeReward", "LlamaGuard", "Principle",
    "RefusalJudge", "Revision", "Reward", "RewardModel", "Verdict", "ai_label",
    "classify_refusal", "load_constitution", "validate_refusal",
    # MCP and tracing (issue 15; agentkit.tracing is the tracing module)
    "MCPConnection", "MCPServerSpec",
]
# fmt: on
