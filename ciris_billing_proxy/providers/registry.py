"""Find credit providers by name in the `ciris_billing_proxy.providers` entry-point group.

The built-in providers are registered through this package's own entry points, exactly like
third-party ones, so there is one discovery path and it is always exercised.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from importlib.metadata import EntryPoint, entry_points
from typing import Final

from ..config import ConfigError
from .base import CreditProvider, ProviderContext

GROUP: Final = "ciris_billing_proxy.providers"
#: The interface methods the proxy awaits.
ASYNC_METHODS: Final = (
    "credit_status",
    "spend",
    "give_back",
    "give_back_owed",
    "initiate_purchase",
    "purchase_status",
    "transactions",
    "verify_google_play",
    "verify_app_store",
    "start",
    "stop",
)


def installed_providers() -> dict[str, list[EntryPoint]]:
    """Provider name -> the entry points that claim it (more than one is a packaging conflict)."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def _distribution(ep: EntryPoint) -> str:
    dist = ep.dist
    return dist.name if dist is not None else "an unknown distribution"


def load_provider_class(name: str) -> type[CreditProvider]:
    providers = installed_providers()
    candidates = providers.get(name, [])
    if not candidates:
        names = ", ".join(sorted(providers)) or "none"
        raise ConfigError(f"Unknown credit provider {name!r}. Installed providers: {names}")
    if len({_distribution(ep) for ep in candidates}) > 1:
        owners = ", ".join(sorted({_distribution(ep) for ep in candidates}))
        raise ConfigError(f"Credit provider {name!r} is registered by several distributions: {owners}")
    ep = candidates[0]
    try:
        loaded = ep.load()
    except Exception as exc:
        raise ConfigError(
            f"Credit provider {name!r} from distribution {_distribution(ep)!r} failed to import "
            f"({ep.value}): {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(loaded, type) and issubclass(loaded, CreditProvider)):
        raise ConfigError(
            f"Credit provider {name!r} from distribution {_distribution(ep)!r} is not a "
            "CreditProvider subclass"
        )
    check_provider_class(loaded, name)
    return loaded


def check_provider_class(cls: type[CreditProvider], name: str) -> None:
    """Refuse, at startup, a provider class that could only fail on requests: one with an
    interface method left abstract, or one written without `async def`."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(
            f"Credit provider {name!r} ({cls.__qualname__}): method {missing[0]} is not implemented"
        )
    for method in ASYNC_METHODS:
        if not inspect.iscoroutinefunction(getattr(cls, method, None)):
            raise ConfigError(
                f"Credit provider {name!r} ({cls.__qualname__}): method {method} must be a coroutine "
                f"function (async def)"
            )


def create_provider(name: str, context: ProviderContext) -> CreditProvider:
    cls = load_provider_class(name)
    try:
        provider = cls.from_context(replace(context, provider=name))
    except ConfigError:
        raise
    except Exception as exc:
        # The message of a provider's own exception may quote its settings (secrets): the type only.
        raise ConfigError(
            f"Credit provider {name!r} ({cls.__qualname__}): method from_context raised {type(exc).__name__}"
        ) from exc
    if not isinstance(provider, CreditProvider):
        raise ConfigError(
            f"Credit provider {name!r} ({cls.__qualname__}): method from_context returned "
            f"{type(provider).__name__}, not a CreditProvider"
        )
    return provider
