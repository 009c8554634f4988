"""The catalogue refresh: ingest and validate a snapshot, embed what changed, build the
index and bundle, gate it, publish it."""
