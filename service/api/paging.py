"""OpenAI's cursor paging (`after` = the id of the previous page's last item, `limit`,
`has_more`) over a list already in its final order. The store pages its own tables in SQL
(store._newest_first_page) with the same contract."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from service.core.errors import InvalidInput

T = TypeVar("T")


def page_after(items: Sequence[T], after: str | None, limit: int, *, what: str) -> tuple[list[T], bool]:
    """The page of `items` (each with an `.id`) that follows the item `after`, and whether
    more follow it; an unknown `after` is a 400 naming the parameter."""
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise InvalidInput(f"after: no {what} {after!r}", param="after")
        items = items[ids.index(after) + 1:]
    return list(items[:limit]), len(items) > limit
