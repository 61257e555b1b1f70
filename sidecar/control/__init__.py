"""The control-plane client: discovery stream, the saved table, table files, app health."""
