"""The web UI's version, written into every infotext."""
VERSION = "0.1.0"
