"""Credit providers: the interface, entry-point discovery, and the built-in providers."""

from .base import CreditProvider, ProviderContext
from .registry import GROUP, create_provider, installed_providers, load_provider_class

__all__ = [
    "GROUP",
    "CreditProvider",
    "ProviderContext",
    "create_provider",
    "installed_providers",
    "load_provider_class",
]
