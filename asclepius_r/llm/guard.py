"""The PHI guard: notes go only to endpoints the user has declared approved.

PhysioNet's credentialed-data rules (24 Sep 2025) allow sending MIMIC notes only to a service
that retains no data, does not train on it and has no human review (such as an Azure OpenAI
deployment with abuse monitoring opted out), or to a locally deployed model. The workflow
cannot verify that contract, so the user states it by listing the endpoint.
"""

from __future__ import annotations

from ..errors import UserError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"


class UnapprovedEndpointError(UserError, PermissionError):
    """The endpoint is not listed in `llm.approved_endpoints`."""


def endpoint_identity(settings) -> str:
    """The string a user lists in `llm.approved_endpoints` to approve this backend."""
    if settings.backend == "azure":
        return f"{settings.azure_endpoint.rstrip('/')}/openai/deployments/{settings.azure_deployment}"
    return (settings.base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")


def check_endpoint(settings) -> None:
    """Raise before the first request if notes would go to an endpoint not listed as approved."""
    if settings.backend == "replay":
        return
    identity = endpoint_identity(settings)
    approved = [e.rstrip("/") for e in settings.approved_endpoints]
    if identity in approved:
        return
    raise UnapprovedEndpointError(
        f"refusing to send notes to {identity!r}: it is not listed in llm.approved_endpoints.\n"
        "MIMIC notes are credentialed data. PhysioNet's rules allow an LLM service only if it keeps\n"
        "no data (zero retention), does not train on it and has no human review (for Azure OpenAI:\n"
        "abuse monitoring / human review opted out), or a model deployed locally.\n"
        f"Once you have confirmed that for this endpoint, add it to the config:\n"
        f"  llm:\n    approved_endpoints:\n      - {identity}"
    )
