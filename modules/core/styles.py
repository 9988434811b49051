"""Prompt styles: named prompt/negative-prompt snippets kept in A1111's ``styles.csv``.

File format (A1111): a CSV with the header ``name,prompt,negative_prompt`` (very old files have
``text`` instead of ``prompt``). A style text containing ``{prompt}`` wraps the user's prompt
("insert it here"); any other style text is appended after ``, ``. Several files can be given
(``--styles-file``, repeatable); a new style goes to the first one, an edited style stays in its
own file.

Infotext round trip, as A1111 1.10 does it: the infotext holds only the *expanded* prompt, and
pasting recovers the styles by recognising their text at the ends of the prompts
(``extract_styles_from_prompt``), yielding the parsed key ``Styles array``.

No gradio here: the UI and the API both call this.
"""
from __future__ import annotations

import csv
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from modules.core.atomic import atomic_write_text

log = logging.getLogger(__name__)

PLACEHOLDER = "{prompt}"
FIELDS = ("name", "prompt", "negative_prompt")

__all__ = ["PLACEHOLDER", "PromptStyle", "StyleDatabase", "StyleError", "apply_styles_to_params",
           "extract_style_text", "merge_prompts"]


class StyleError(ValueError):
    """A style cannot be saved or deleted; the message is shown to the user."""


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str
    path: Path | None = None

    def api_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompts(style_text: str, prompt: str) -> str:
    """One style applied to one prompt."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """Undo `merge_prompts` if `prompt` could have come from it: (matched, the prompt before)."""
    text, style = prompt.strip(), style_text.strip()
    if PLACEHOLDER in style:
        left, _, right = style.partition(PLACEHOLDER)
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return True, text[len(left):len(text) - len(right)]
        return False, prompt
    if not style:
        return True, text
    if text == style:
        return True, ""
    if text.endswith(", " + style):
        return True, text[:-len(style) - 2]
    return False, prompt


class StyleDatabase:
    """Styles from one or more CSV files. Thread-safe; writes are atomic (temp file + rename)."""

    def __init__(self, paths: Any):
        # AppPaths (its styles_files), a sequence of paths, or one path.
        files = getattr(paths, "styles_files", paths)
        if isinstance(files, (str, Path)):
            files = [files]
        self.files: tuple[Path, ...] = tuple(Path(f) for f in files) or (Path("styles.csv"),)
        self._lock = threading.RLock()
        self.styles: dict[str, PromptStyle] = {}
        self.warnings: list[str] = []
        self.reload()

    # -- reading -------------------------------------------------------------------------------
    def reload(self) -> list[str]:
        """Read every file again; returns (and logs) a warning per skipped row or unreadable file."""
        styles: dict[str, PromptStyle] = {}
        warnings: list[str] = []
        for path in self.files:
            for style in self._read_file(path, warnings):
                styles[style.name] = style  # a later file (or row) with the same name wins
        for text in warnings:
            log.warning("%s", text)
        with self._lock:
            self.styles = styles
            self.warnings = warnings
        return warnings

    @staticmethod
    def _read_file(path: Path, warnings: list[str]) -> list[PromptStyle]:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as err:
            warnings.append(f"Could not read styles from {path}: {err}")
            return []
        out: list[PromptStyle] = []
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
            if reader.fieldnames is None:
                return []
            header = [(f or "").strip() for f in reader.fieldnames]
            reader.fieldnames = header
            if "name" not in header:
                warnings.append(f"Styles file {path} has no 'name' column; ignored")
                return []
            for row in reader:
                line = reader.line_num
                if None in row:  # more cells than the header has columns
                    warnings.append(f"{path}:{line}: too many columns; row skipped")
                    continue
                name = (row.get("name") or "").strip()
                if not name:
                    if any((v or "").strip() for v in row.values()):
                        warnings.append(f"{path}:{line}: a style without a name; row skipped")
                    continue
                prompt = row.get("prompt")
                if prompt is None:
                    prompt = row.get("text")  # the oldest A1111 files
                out.append(PromptStyle(name=name, prompt=prompt or "",
                                       negative_prompt=row.get("negative_prompt") or "", path=path))
        except csv.Error as err:
            warnings.append(f"{path}: malformed CSV ({err}); the rest of the file is skipped")
        return out

    def names(self) -> list[str]:
        with self._lock:
            return list(self.styles)

    def get(self, name: str) -> PromptStyle | None:
        with self._lock:
            return self.styles.get(name)

    def list(self) -> list[PromptStyle]:
        with self._lock:
            return list(self.styles.values())

    # -- applying ------------------------------------------------------------------------------
    def _known(self, styles: Iterable[str] | None) -> list[PromptStyle]:
        with self._lock:
            return [self.styles[n] for n in (styles or []) if n in self.styles]  # unknown names: no-op, as A1111

    def apply_styles_to_prompt(self, prompt: str, styles: Iterable[str] | None) -> str:
        for style in self._known(styles):
            prompt = merge_prompts(style.prompt, prompt)
        return prompt

    def apply_negative_styles(self, negative_prompt: str, styles: Iterable[str] | None) -> str:
        for style in self._known(styles):
            negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
        return negative_prompt

    apply_negative_styles_to_prompt = apply_negative_styles  # A1111's name

    def extract_styles_from_prompt(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """Which styles an expanded (prompt, negative) pair was made with, and the prompts before them.

        Styles are peeled off from the outside in: each round removes one style whose prompt *and*
        negative text both match the current ends; the found styles come back in application
        order. Styles with no text at all are never reported (they leave no trace).
        """
        candidates = [s for s in self.list() if s.prompt or s.negative_prompt]
        found: list[str] = []
        while True:
            for style in candidates:
                ok_pos, new_prompt = extract_style_text(style.prompt, prompt)
                if not ok_pos:
                    continue
                ok_neg, new_negative = extract_style_text(style.negative_prompt, negative_prompt)
                if not ok_neg:
                    continue
                prompt, negative_prompt = new_prompt, new_negative
                found.append(style.name)
                candidates.remove(style)
                break
            else:
                break
        return list(reversed(found)), prompt, negative_prompt

    # -- editing -------------------------------------------------------------------------------
    def save_style(self, name: str, prompt: str, negative_prompt: str, path: Path | None = None) -> PromptStyle:
        """Add or replace a style; it keeps its file, a new one goes to `path` or the first file."""
        name = (name or "").strip()
        if not name:
            raise StyleError("a style needs a name")
        with self._lock:
            old = self.styles.get(name)
            target = Path(path) if path is not None else (old.path if old and old.path else self.files[0])
            style = PromptStyle(name=name, prompt=prompt or "", negative_prompt=negative_prompt or "", path=target)
            styles = dict(self.styles)
            styles[name] = style
            touched = {target} | ({old.path} if old and old.path and old.path != target else set())
            self._write(styles, touched)
            self.styles = styles
            return style

    def delete_style(self, name: str) -> bool:
        """Remove a style from its file; False if there was no such style."""
        with self._lock:
            old = self.styles.get(name)
            if old is None:
                return False
            styles = {k: v for k, v in self.styles.items() if k != name}
            self._write(styles, {old.path or self.files[0]})
            self.styles = styles
            return True

    def _write(self, styles: dict[str, PromptStyle], files: set[Path]) -> None:
        for path in files:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(FIELDS)
            for style in styles.values():
                if (style.path or self.files[0]) == path:
                    writer.writerow([style.name, style.prompt, style.negative_prompt])
            try:
                atomic_write_text(path, buf.getvalue())
            except OSError as err:
                raise StyleError(f"could not write {path}: {err}") from err


def apply_styles_to_params(params: Any, db: StyleDatabase | None, styles: Sequence[str] | None) -> Any:
    """Expand the chosen styles into a GenerationParams before it is queued (UI and API).

    `params.styles` records the names (A1111's ``p.styles``); the prompts become the expanded
    text that the model sees and the infotext records. A1111 writes no styles key into the
    infotext: the styles are recognised again when the infotext is pasted.
    """
    names = [s for s in (styles or []) if s]
    params.styles = names
    if db is None or not names:
        return params
    params.prompt = db.apply_styles_to_prompt(params.prompt, names)
    params.negative_prompt = db.apply_negative_styles(params.negative_prompt, names)
    hires = getattr(params, "hires", None)
    if hires is not None and getattr(hires, "enabled", False):
        # A1111 styles the hires prompts too; an empty one means "the same prompt" and stays empty.
        if hires.prompt:
            hires.prompt = db.apply_styles_to_prompt(hires.prompt, names)
        if hires.negative_prompt:
            hires.negative_prompt = db.apply_negative_styles(hires.negative_prompt, names)
    return params
