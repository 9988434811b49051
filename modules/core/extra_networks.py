"""The Extra Networks browser's model: its pages, the cards on them, and what a card click does to a prompt.

Torch-free and Gradio-free: the UI (modules/ui/extra_networks*.py) renders these cards and calls
``toggle``; the preview route serves ``Card.preview`` files only from a page's roots. Every page lists
its files through ``models.network_files.scan_network_files`` (imported when a page is first listed),
so names and previews agree with the LoRA/embedding registries.

A1111's card behaviour (v1.10): a click adds the card's text (``<lora:NAME:W>`` with the preferred weight
or ``extra_networks_default_multiplier``, then the activation text; ``<hypernet:NAME:W>``; an embedding's
name) after ``extra_networks_add_text_separator``, and a second click removes it again (any weight); the
negative text goes to the negative prompt the same way. A checkpoint card selects that checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from modules.core.infotext import format_number

TEXTUAL_INVERSION, HYPERNETWORKS, CHECKPOINTS, LORA = "textual_inversion", "hypernetworks", "checkpoints", "lora"
PAGE_TITLES = {TEXTUAL_INVERSION: "Textual Inversion", HYPERNETWORKS: "Hypernetworks", CHECKPOINTS: "Checkpoints",
               LORA: "Lora"}
SORT_FIELDS = ("Path", "Name", "Date Created", "Date Modified")
MAX_CARDS = 5000                 # per page; a folder with more is listed up to this many
MAX_DESCRIPTION = 2000           # characters of a description shown on a card
EDITABLE_FIELDS = ("description", "activation text", "preferred weight", "negative text", "notes", "sd version")
SD_VERSIONS = ("Unknown", "SD1", "SD2", "SDXL")


@dataclass(frozen=True)
class Page:
    """One tab of the browser: its files' roots and extensions, and how a card's text is made."""
    id: str
    roots: tuple[Path, ...]
    extensions: tuple[str, ...]

    @property
    def title(self) -> str:
        return PAGE_TITLES[self.id]


@dataclass(frozen=True)
class Card:
    page: str
    name: str
    relpath: str                  # under its root; what the UI and the preview route name a card by
    path: Path
    root: Path
    prompt: str                   # the text a click adds to the prompt ("" for checkpoints)
    negative: str                 # the text a click adds to the negative prompt
    description: str
    preview: Path | None
    mtime: float
    ctime: float
    search_terms: str             # lowercase text the search box matches
    user_metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def folder(self) -> str:
        """The card's folder under its root ("" at the top)."""
        return self.relpath.rpartition("/")[0]

    @property
    def tag(self) -> str:
        """The prompt text without the activation text (what identifies the card in a prompt)."""
        return self.prompt.split(">", 1)[0] + ">" if self.prompt.startswith("<") else self.prompt


def default_pages(paths: Any, cmd_opts: Any = None) -> list[Page]:
    """A1111's four pages over this install's folders (--embeddings-dir, --ckpt-dir, --lora-dir); the Lora and
    hypernetwork roots are the ones the networks service applies from, so names agree."""
    from modules.core.networks_service import hypernetwork_roots, lora_roots

    return [
        Page(TEXTUAL_INVERSION, (paths.embeddings_dir,), (".pt", ".bin", ".safetensors", ".png", ".webp")),
        Page(HYPERNETWORKS, tuple(hypernetwork_roots(paths)), (".pt",)),
        Page(CHECKPOINTS, (paths.ckpt_dir,), (".safetensors", ".ckpt")),
        Page(LORA, tuple(lora_roots(paths)), (".safetensors", ".pt", ".ckpt")),
    ]


# --------------------------------------------------------------------------- card text


def preferred_weight(user_metadata: dict[str, Any], default: float) -> str:
    """The card's weight as A1111 writes it: the user's "preferred weight" when set (non-zero), else the default."""
    try:
        weight = float(user_metadata.get("preferred weight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    return format_number(weight if weight else float(default))


def card_prompt(page: str, name: str, user_metadata: dict[str, Any], default_multiplier: float) -> str:
    if page == CHECKPOINTS:
        return ""
    if page == TEXTUAL_INVERSION:
        return name
    kind = "lora" if page == LORA else "hypernet"
    text = f"<{kind}:{name}:{preferred_weight(user_metadata, default_multiplier)}>"
    activation = str(user_metadata.get("activation text") or "").strip()
    return f"{text} {activation}" if activation and page == LORA else text


_WEIGHT_SUFFIXES = (".pt", ".bin", ".safetensors")


def _preview_names(files: Iterable[Any]) -> set[Path]:
    """Every path that would be the preview of one of the weights files (NAME.png, NAME.preview.png...)."""
    from modules.models.network_files import PREVIEW_SUFFIXES

    return {nf.base.with_name(nf.base.name + suffix) for nf in files
            if nf.path.suffix.lower() in _WEIGHT_SUFFIXES for suffix in PREVIEW_SUFFIXES}


def _is_image_preview_of_another(path: Path, previews: set[Path]) -> bool:
    """An image named as a weights file's preview is that preview (A1111 also skips any *.preview.*)."""
    return ".preview" in path.name.lower() or path in previews


def _embedding_image_name(path: Path) -> str | None:
    """The embedding name stored in an image, or None for a plain picture (or one we cannot read)."""
    from modules.models import image_embedding

    try:
        data = image_embedding.read_image_embedding(path)
    except (OSError, ValueError):
        return None
    return None if data is None else str(data.get("name") or path.stem)


def _card_name(page: Page, nf: Any, previews: set[Path]) -> str | None:
    if page.id == TEXTUAL_INVERSION and nf.path.suffix.lower() in (".png", ".webp"):
        if _is_image_preview_of_another(nf.path, previews):
            return None
        return _embedding_image_name(nf.path)
    return nf.name   # the file stem (A1111's default; an alias from ss_output_name only with a setting)


def _make_card(page: Page, nf: Any, name: str, default_multiplier: float) -> Card:
    meta = nf.user_metadata()
    st = nf.path.stat()
    description = str(meta.get("description") or "")[:MAX_DESCRIPTION]
    terms = " ".join([name, nf.relpath, description, str(meta.get("activation text") or "")]).lower()
    return Card(page=page.id, name=name, relpath=nf.relpath, path=nf.path, root=nf.root,
                prompt=card_prompt(page.id, name, meta, default_multiplier),
                negative=str(meta.get("negative text") or "").strip() if page.id == LORA else "",
                description=description, preview=nf.preview() if page.id != TEXTUAL_INVERSION or
                nf.path.suffix.lower() not in (".png", ".webp") else nf.path,
                mtime=st.st_mtime, ctime=st.st_ctime, search_terms=terms, user_metadata=meta)


def list_cards(page: Page, default_multiplier: float = 1.0) -> list[Card]:
    """Every card of the page, in scan order (bounded by MAX_CARDS). Unreadable files are left out."""
    from modules.models.network_files import scan_network_files

    cards: list[Card] = []
    files = scan_network_files(page.roots, page.extensions)
    previews = _preview_names(files)
    for nf in files:
        if len(cards) >= MAX_CARDS:
            break
        try:
            name = _card_name(page, nf, previews)
            if name is not None:
                cards.append(_make_card(page, nf, name, default_multiplier))
        except OSError:
            continue
    return cards


# --------------------------------------------------------------------------- search, sort, folders


def filter_cards(cards: Iterable[Card], search: str = "", folder: str = "") -> list[Card]:
    """Cards whose text contains every word of `search` (case-insensitive), inside `folder` ("" = all)."""
    words = (search or "").lower().split()
    prefix = folder.strip("/")
    return [c for c in cards
            if all(w in c.search_terms for w in words)
            and (not prefix or c.folder == prefix or c.folder.startswith(prefix + "/"))]


def sort_cards(cards: Iterable[Card], by: str = "Path", descending: bool = False) -> list[Card]:
    keys: dict[str, Callable[[Card], Any]] = {
        "Path": lambda c: c.relpath.lower(), "Name": lambda c: c.name.lower(),
        "Date Created": lambda c: c.ctime, "Date Modified": lambda c: c.mtime}
    return sorted(cards, key=keys.get(by, keys["Path"]), reverse=descending)


def folders(cards: Iterable[Card]) -> list[str]:
    """Every folder (and its parents) holding a card, sorted: the tree/dirs view."""
    found: set[str] = set()
    for c in cards:
        parts = c.folder.split("/") if c.folder else []
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]))
    return sorted(found, key=str.lower)


def tree_label(folder: str) -> str:
    """A folder as a line of the tree view: indented by depth, its last name shown."""
    depth = folder.count("/")
    return "\u2003" * depth + "📁 " + folder.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- prompt editing


def _span_with_separator(text: str, start: int, end: int, separator: str) -> tuple[int, int]:
    """Widen [start, end) by the separator before it (else the one after), so removal leaves no double gap."""
    if separator and text[max(0, start - len(separator)):start] == separator and start >= len(separator):
        return start - len(separator), end
    if separator and text[end:end + len(separator)] == separator:
        return start, end + len(separator)
    return start, end


def _network_tag_pattern(tag: str) -> re.Pattern | None:
    """`<lora:NAME:1>` -> a pattern for that network at any weight (also `<lora:NAME>`, `<lora:NAME:a:b>`)."""
    m = re.fullmatch(r"<([^:<>]+):([^<>]+?)(?::[^<>]*)?>", tag)
    if not m:
        return None
    kinds = "lora|lyco" if m.group(1) in ("lora", "lyco") else re.escape(m.group(1))
    return re.compile(rf"<(?:{kinds}):{re.escape(m.group(2))}(?::[^<>]*)?>")


def remove_text(prompt: str, text: str, separator: str = " ", extra: str = "") -> tuple[str, bool]:
    """Remove every occurrence of `text` (a network tag matches at any weight; `extra`, e.g. the activation
    text, goes too when it follows the tag). Returns (prompt, whether anything was removed)."""
    if not text:
        return prompt, False
    pattern = _network_tag_pattern(text) or re.compile(rf"(?<![\w]){re.escape(text)}(?![\w])")
    removed = False
    while True:
        m = pattern.search(prompt)
        if m is None:
            return prompt, removed
        start, end = m.span()
        follow = prompt[end:]
        for gap in (separator, " ", ", ", ""):
            if extra and follow.startswith(gap + extra):
                end += len(gap + extra)
                break
        start, end = _span_with_separator(prompt, start, end, separator)
        prompt, removed = _join(prompt[:start], prompt[end:]), True


def _join(left: str, right: str) -> str:
    """Glue the text around a removed span without leaving ",," or a leading comma behind."""
    if right.lstrip().startswith(",") and (left.rstrip().endswith(",") or not left.strip()):
        right = right.lstrip()[1:].lstrip() if not left.strip() else right.lstrip()[1:]
    return left + right


def add_text(prompt: str, text: str, separator: str = " ") -> str:
    if not text:
        return prompt
    return f"{prompt}{separator}{text}" if prompt else text


@dataclass(frozen=True)
class PromptEdit:
    prompt: str
    negative_prompt: str
    added: bool


def toggle(card: Card, prompt: str, negative_prompt: str, separator: str = " ") -> PromptEdit:
    """A card click: remove the card's text if the prompt has it (any weight), else add it; its negative
    text follows in the negative prompt."""
    activation = card.prompt[len(card.tag):].strip()
    new_prompt, removed = remove_text(prompt or "", card.tag, separator, extra=activation)
    negative = negative_prompt or ""
    if removed:
        negative, _ = remove_text(negative, card.negative, separator)
        return PromptEdit(new_prompt, negative, added=False)
    new_prompt = add_text(prompt or "", card.prompt, separator)
    if card.negative and remove_text(negative, card.negative, separator)[1] is False:
        negative = add_text(negative, card.negative, separator)
    return PromptEdit(new_prompt, negative, added=True)


# --------------------------------------------------------------------------- user metadata


def clean_user_metadata(values: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """The editor's fields as A1111 stores them in name.json (other keys in the old file are kept)."""
    out = dict(old or {})
    for key in EDITABLE_FIELDS:
        if key not in values:
            continue
        value = values[key]
        if key == "preferred weight":
            try:
                value = float(value or 0)
            except (TypeError, ValueError):
                raise ValueError(f"preferred weight must be a number, not {value!r}") from None
            if value != value or abs(value) > 100:
                raise ValueError("preferred weight must be a finite number between -100 and 100")
        elif key == "sd version":
            value = str(value or "Unknown")
            if value not in SD_VERSIONS:
                raise ValueError(f"sd version must be one of {', '.join(SD_VERSIONS)}")
        else:
            value = str(value or "")
        out[key] = value
    return out


def save_user_metadata(card: Card, values: dict[str, Any]) -> dict[str, Any]:
    """Write the card's name.json atomically from the editor's values; returns what was written."""
    from modules.models.network_files import NetworkFile

    nf = NetworkFile(path=card.path, root=card.root)
    data = clean_user_metadata(values, nf.user_metadata())
    nf.save_user_metadata(data)
    return data


# --------------------------------------------------------------------------- previews and training metadata

PREVIEW_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def preview_path_for(card: Card) -> Path:
    """Where "Replace preview" writes: NAME.preview.png beside the file (found first by the scan)."""
    base = card.path.with_suffix("")
    return base.with_name(base.name + ".preview.png")


def save_preview(card: Card, image: Any) -> Path:
    """Replace the card's preview with `image` (a PIL image), atomically; the user asked for the replacement."""
    import io

    from modules.core.atomic import atomic_write_bytes

    if card.page == TEXTUAL_INVERSION and card.path.suffix.lower() in (".png", ".webp"):
        raise ValueError("this embedding is stored in its picture; replacing the picture would destroy it")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    target = preview_path_for(card)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def is_inside(path: Path, roots: Iterable[Path]) -> bool:
    """Whether `path` (symlinks resolved) lies inside one of `roots` (resolved)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    for root in roots:
        try:
            real.relative_to(Path(root).resolve())
            return True
        except (OSError, ValueError):
            continue
    return False


def training_metadata(card: Card) -> dict[str, str]:
    from modules.models.network_files import NetworkFile

    return NetworkFile(path=card.path, root=card.root).training_metadata()


def tag_frequency(metadata: dict[str, str], limit: int = 500) -> list[tuple[str, int]]:
    """kohya's ``ss_tag_frequency`` ({dataset: {tag: count}}) summed over datasets, most frequent first."""
    import json

    try:
        datasets = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: dict[str, int] = {}
    for tags in (datasets.values() if isinstance(datasets, dict) else ()):
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)):
                    counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(n)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


# --------------------------------------------------------------------------- the listing the UI keeps


class CardCache:
    """The cards of each page as last listed (the browser re-lists on open, refresh and after edits)."""

    def __init__(self, pages: Iterable[Page], default_multiplier: Callable[[], float] = lambda: 1.0):
        self.pages = {p.id: p for p in pages}
        self.default_multiplier = default_multiplier
        self._cards: dict[str, list[Card]] = {}

    def reload(self, page_id: str) -> list[Card]:
        self._cards[page_id] = list_cards(self.pages[page_id], self.default_multiplier())
        return self._cards[page_id]

    def cards(self, page_id: str) -> list[Card]:
        if page_id not in self._cards:
            return self.reload(page_id)
        return self._cards[page_id]

    def find(self, page_id: str, relpath: str) -> Card | None:
        """The listed card at `relpath` (never a path the client made up: only listed cards are found)."""
        if page_id not in self.pages:
            return None
        for card in self.cards(page_id):
            if card.relpath == relpath:
                return card
        return None


def resolve_preview(page: Page, item: str) -> Path | None:
    """The preview file of the card at `item` (a relpath under one of the page's roots), or None.

    `item` comes from the client: it must name a file of the page's kind inside a root, and the preview
    (found beside it) must be an image inside a root too, symlinks resolved."""
    from modules.models.network_files import NetworkFile

    if not item or "\\" in item or "\0" in item or any(part in ("", ".", "..") for part in item.split("/")):
        return None
    for root in page.roots:
        candidate = Path(root) / item
        if not candidate.name.lower().endswith(page.extensions) or not candidate.is_file():
            continue
        if not is_inside(candidate, page.roots):
            return None
        if page.id == TEXTUAL_INVERSION and candidate.suffix.lower() in (".png", ".webp"):
            preview = candidate
        else:
            preview = NetworkFile(path=candidate, root=Path(root)).preview()
        if preview is None or not preview.name.lower().endswith(PREVIEW_IMAGE_SUFFIXES):
            return None
        return preview if is_inside(preview, page.roots) else None
    return None


def allowed_preview_file(pages: Iterable[Page], filename: str) -> Path | None:
    """A1111's ``thumb?filename=``: an image file inside one of the pages' roots (symlinks resolved), else None."""
    if not filename or "\0" in filename:
        return None
    path = Path(filename)
    if not path.name.lower().endswith(PREVIEW_IMAGE_SUFFIXES) or not path.is_file():
        return None
    roots = [r for p in pages for r in p.roots]
    return path if is_inside(path, roots) else None
