"""The LLM client: one component, several backends, one append-only archive.

`archive` stores every request and response; `guard` refuses unapproved endpoints before a
note is sent; `backends` talk to OpenAI, Azure OpenAI, any OpenAI-compatible server, or replay
the archive; `client` runs many requests concurrently within rate limits and a budget; `batch` sends them
through the Batch API instead.
"""

from .archive import Archive, ArchiveInUseError, ChatRequest, ChatResult
from .backends import ReplayMissError
from .client import BudgetExceededError, LLMClient, LLMSettings
from .guard import UnapprovedEndpointError

__all__ = [
    "Archive",
    "ArchiveInUseError",
    "BudgetExceededError",
    "ChatRequest",
    "ChatResult",
    "LLMClient",
    "LLMSettings",
    "ReplayMissError",
    "UnapprovedEndpointError",
]
