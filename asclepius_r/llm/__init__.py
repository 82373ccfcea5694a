"""The LLM client: one component, several backends, one append-only archive.

`archive` stores every request and response; `guard` refuses unapproved endpoints before a
note is sent; `backends` talk to OpenAI, Azure OpenAI, any OpenAI-compatible server, or replay
the archive; `client` runs many requests concurrently within rate limits and a budget; `batch` sends them
through the Batch API instead; `redact` decides what of a server's replies may leave the client.
"""

from asclepius_r.llm.archive import Archive, ChatRequest, ChatResult
from asclepius_r.llm.backends import ProviderError, ReplayMissError
from asclepius_r.llm.client import BudgetExceededError, LLMClient, LLMSettings
from asclepius_r.llm.guard import UnapprovedEndpointError

__all__ = [
    "Archive",
    "BudgetExceededError",
    "ChatRequest",
    "ChatResult",
    "LLMClient",
    "LLMSettings",
    "ProviderError",
    "ReplayMissError",
    "UnapprovedEndpointError",
]
