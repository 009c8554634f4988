"""Names of the columns and fields that several parts of the system share: the warehouse's
tables, a release's item table, judged data files and feedback events. One place, so that a
column is never spelled two ways."""

from __future__ import annotations

ITEM_ID = "item_id"            # an item's id: warehouse, bundle items, events, judged pairs
QUERY_ID = "query_id"          # a judged query's id (judged data files)
CONTENT_HASH = "content_hash"  # digest of the text an item's vector is computed from

# Catalogue and judged product files may name their id column any of these (first found wins).
ID_ALIASES = ("id", ITEM_ID, "product_id", "product_uid", "sku")
