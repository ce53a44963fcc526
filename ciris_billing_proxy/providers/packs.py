"""Packs a provider sells (`CreditProvider.packs`, `models.CreditPack`): the first is the default."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidRequest
from ..models import CreditPack


class Packs:
    """The packs by id, the default first."""

    def __init__(self, packs: Sequence[CreditPack]) -> None:
        if not packs:
            raise ValueError("at least one pack is needed")
        self.all = tuple(packs)
        self.by_id = {pack.id: pack for pack in self.all}
        self.default = self.all[0]

    def choose(self, pack_id: str | None) -> CreditPack:
        """The pack asked for (the default for None); an unknown id is a 400 naming the packs."""
        if pack_id is None:
            return self.default
        pack = self.by_id.get(pack_id)
        if pack is None:
            raise InvalidRequest(unknown_pack(self.all))
        return pack


def unknown_pack(packs: Sequence[CreditPack]) -> str:
    return f"Unknown pack; choose one of: {', '.join(pack.id for pack in packs)}"
