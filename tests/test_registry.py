"""Provider discovery through the real `importlib.metadata` entry-point path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import web

from ciris_billing_proxy import ConfigError, setup_billing
from ciris_billing_proxy.providers import ProviderContext, create_provider, installed_providers
from ciris_billing_proxy.providers.simple import SimpleProvider

from .conftest import make_config
from .providers import fake_distribution

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "provider_plugin"


def test_builtin_simple_is_registered_through_the_package_entry_point() -> None:
    [ep] = installed_providers()["simple"]
    assert ep.dist is not None
    assert ep.dist.name == "ciris-billing-proxy"
    provider = create_provider("simple", ProviderContext(options={"database": ":memory:"}))
    assert isinstance(provider, SimpleProvider)


def test_unknown_provider_lists_the_installed_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Unknown credit provider 'nope'\. Installed providers: .*simple"):
        setup_billing(web.Application(), make_config(tmp_path, provider="nope"), environ={})


def test_third_party_provider_is_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(
        tmp_path,
        "tiny-credits",
        "tiny_credits",
        """
        from ciris_billing_proxy.providers.simple import SimpleProvider

        class TinyProvider(SimpleProvider):
            name = "tiny"
        """,
        "tiny = tiny_credits:TinyProvider",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny" in installed_providers()
    provider = create_provider("tiny", ProviderContext(options={"database": ":memory:"}))
    assert type(provider).__name__ == "TinyProvider"


def test_a_provider_that_fails_to_import_names_its_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(
        tmp_path,
        "broken-credits",
        "broken_credits",
        "import not_installed_anywhere\n",
        "broken = broken_credits:Provider",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'broken' from distribution 'broken-credits' failed to import"):
        create_provider("broken", ProviderContext())


def test_an_entry_point_that_is_not_a_provider_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(tmp_path, "odd-credits", "odd_credits", "Provider = 42\n", "odd = odd_credits:Provider")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="not a CreditProvider subclass"):
        create_provider("odd", ProviderContext())


def test_the_example_plugin_installs_with_pip_and_is_found(tmp_path: Path) -> None:
    """The provider-author example, built and installed by pip, then discovered in a fresh interpreter."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    probe = textwrap.dedent(
        """
        import asyncio, sys
        from ciris_billing_proxy import Identity
        from ciris_billing_proxy.providers import ProviderContext, create_provider
        p = create_provider("daily-quota", ProviderContext(options={"per_day": 2}))
        who = Identity("u", "local", "OBSERVER")
        async def main():
            await p.spend(who, "a"); await p.spend(who, "b")
            print(type(p).__module__, (await p.credit_status(who)).has_credit)
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": ""},
        cwd=tmp_path,
    )
    assert out.stdout.split() == ["acme_daily_quota", "False"]
