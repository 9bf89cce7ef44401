"""OpenAI's cursor paging (`after` = the id of the previous page's last item, `limit`,
`has_more`) over a list already in its final order. The store pages its own tables in SQL
(store._newest_first_page) with the same contract: an `after` naming no object of the list is a
404 (UnknownCursor), as AFTER_DESCRIPTION tells clients."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from service.core.errors import UnknownCursor

T = TypeVar("T")

AFTER_DESCRIPTION = ("Cursor: the `id` of the last object of the previous page; the page holds the objects "
                     "that follow it in this list's order. An id naming no object of this list (unknown, "
                     "deleted, or another tenant's) answers 404 with `error.param` \"after\".")
# The `after` query parameter of every list route.
After = Annotated[str | None, Query(max_length=128, description=AFTER_DESCRIPTION)]


def page_after(items: Sequence[T], after: str | None, limit: int, *, what: str) -> tuple[list[T], bool]:
    """The page of `items` (each with an `.id`) that follows the item `after`, and whether
    more follow it; an unknown `after` is UnknownCursor (404, param `after`)."""
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise UnknownCursor(what, after)
        items = items[ids.index(after) + 1:]
    return list(items[:limit]), len(items) > limit
