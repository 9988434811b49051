# An extension whose script fails at import: the web UI must report it and start without it.
raise RuntimeError("example-broken-import")
