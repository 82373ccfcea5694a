"""The LLM client: one component, several backends, one append-only archive.

`archive` stores every request and response; `guard` refuses unapproved endpoints before a
note is sent; `backends` talk to OpenAI, Azure OpenAI, any OpenAI-compatible server, or replay
the archive; `client` runs many requests concurrently within rate limits and a budget.
"""

from .archive import Archive, ChatRequest, ChatResult
from .client import LLMClient, LLMSettings

__all__ = ["Archive", "ChatRequest", "ChatResult", "LLMClient", "LLMSettings"]
