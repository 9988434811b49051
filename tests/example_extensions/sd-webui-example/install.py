# Runs before the web UI starts, in its own Python process, on every start: install what the
# extension needs here. This one only leaves a marker so the tests can see it ran.
from pathlib import Path

with open(Path(__file__).resolve().parent / "installed.txt", "a", encoding="utf-8") as marker:
    marker.write("ran\n")
