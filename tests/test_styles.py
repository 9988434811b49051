"""Prompt styles: styles.csv reading, applying, saving, and the infotext round trip."""
from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import pytest

from modules.core import styles as styles_mod
from modules.core.pipeline import Txt2ImgParams
from modules.core.styles import StyleDatabase, StyleError, apply_styles_to_params, merge_prompts

CSV = (
    "name,prompt,negative_prompt\n"
    "Cinematic,\"cinematic still, {prompt}, film grain\",\"cartoon, drawing\"\n"
    "Sharp,\"sharp focus, 8k\",blurry\n"
    "Empty,,\n"
    "OnlyNeg,,lowres\n"
)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return StyleDatabase([path])


def test_placeholder_inserts_the_prompt_and_plain_text_is_appended(db):
    assert merge_prompts("a {prompt} b", "cat") == "a cat b"
    assert merge_prompts("x, y", " cat ") == "cat, x, y"
    assert merge_prompts("x", "") == "x"
    assert db.apply_styles_to_prompt("a cat", ["Cinematic"]) == "cinematic still, a cat, film grain"
    assert db.apply_styles_to_prompt("a cat", ["Sharp"]) == "a cat, sharp focus, 8k"
    # Applied in order: the second style wraps the result of the first.
    assert (db.apply_styles_to_prompt("a cat", ["Sharp", "Cinematic"])
            == "cinematic still, a cat, sharp focus, 8k, film grain")
    assert db.apply_styles_to_prompt("a cat", ["Empty", "no such style"]) == "a cat"


def test_negative_styles(db):
    assert db.apply_negative_styles("ugly", ["Cinematic", "Sharp"]) == "ugly, cartoon, drawing, blurry"
    assert db.apply_negative_styles("", ["OnlyNeg"]) == "lowres"


def test_missing_file_is_an_empty_database(tmp_path):
    db = StyleDatabase([tmp_path / "nope.csv"])
    assert db.names() == [] and db.warnings == []
    assert db.apply_styles_to_prompt("x", ["A"]) == "x"


def test_app_paths_are_accepted(tmp_path):
    (tmp_path / "styles.csv").write_text(CSV, encoding="utf-8")
    db = StyleDatabase(SimpleNamespace(styles_files=(tmp_path / "styles.csv",)))
    assert "Sharp" in db.names()


def test_bad_rows_are_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "styles.csv"
    path.write_text(
        "\ufeffname,prompt,negative_prompt\n"
        "Good,good prompt,\n"
        ",orphan text,\n"          # no name
        "Wide,a,b,c,d\n"           # too many cells
        "\n"                       # blank line: ignored silently
        "Also good,\"quoted, with comma\",neg\n",
        encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        db = StyleDatabase([path])
    assert db.names() == ["Good", "Also good"]
    assert db.get("Also good").prompt == "quoted, with comma"
    assert len(db.warnings) == 2 and any(":3:" in w for w in db.warnings) and any(":4:" in w for w in db.warnings)
    assert "row skipped" in caplog.text


def test_old_text_column_and_missing_name_column(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("name,text\nLegacy,legacy text\n", encoding="utf-8")
    bad = tmp_path / "bad.csv"
    bad.write_text("title,prompt\nX,y\n", encoding="utf-8")
    db = StyleDatabase([old, bad])
    assert db.get("Legacy").prompt == "legacy text"
    assert any("no 'name' column" in w for w in db.warnings)


def _read_rows(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_save_and_delete_write_a_valid_file_atomically(db, tmp_path, monkeypatch):
    path = db.files[0]
    db.save_style("New, with comma", 'say "hi", {prompt}', "bad\nthings")
    rows = _read_rows(path)
    assert [r["name"] for r in rows] == ["Cinematic", "Sharp", "Empty", "OnlyNeg", "New, with comma"]
    assert rows[-1]["prompt"] == 'say "hi", {prompt}' and rows[-1]["negative_prompt"] == "bad\nthings"
    # A fresh database reads back exactly what was saved.
    again = StyleDatabase([path])
    assert again.get("New, with comma").negative_prompt == "bad\nthings"

    db.save_style("Sharp", "very sharp", "")  # replace in place, order kept
    assert [r["name"] for r in _read_rows(path)][1] == "Sharp"
    assert StyleDatabase([path]).get("Sharp").prompt == "very sharp"

    assert db.delete_style("Cinematic") is True
    assert db.delete_style("Cinematic") is False
    assert "Cinematic" not in [r["name"] for r in _read_rows(path)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"

    # The write goes through atomic_write_text: a failure leaves the old file complete.
    before = path.read_text(encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(styles_mod, "atomic_write_text", boom)
    with pytest.raises(StyleError, match="disk full"):
        db.save_style("Doomed", "x", "y")
    assert path.read_text(encoding="utf-8") == before
    assert db.get("Doomed") is None
    with pytest.raises(StyleError):
        db.save_style("  ", "x", "y")


def test_new_styles_go_to_the_first_file_and_edits_stay_in_theirs(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    second.write_text("name,prompt,negative_prompt\nB,b text,\n", encoding="utf-8")
    db = StyleDatabase([first, second])
    db.save_style("A", "a text", "")
    db.save_style("B", "b edited", "")
    assert [r["name"] for r in _read_rows(first)] == ["A"]
    assert _read_rows(second) == [{"name": "B", "prompt": "b edited", "negative_prompt": ""}]


def test_extract_styles_undoes_apply(db):
    for chosen in (["Cinematic"], ["Sharp"], ["Sharp", "Cinematic"], ["Cinematic", "Sharp"], ["OnlyNeg", "Sharp"]):
        prompt = db.apply_styles_to_prompt("a red fox", chosen)
        negative = db.apply_negative_styles("ugly", chosen)
        found, p, n = db.extract_styles_from_prompt(prompt, negative)
        assert (found, p, n) == (chosen, "a red fox", "ugly"), chosen
    # Nothing to find: the prompts come back unchanged.
    assert db.extract_styles_from_prompt("a red fox", "ugly") == ([], "a red fox", "ugly")
    # The prompt text matches but the negative does not: not that style.
    assert db.extract_styles_from_prompt("a fox, sharp focus, 8k", "ugly")[0] == []


def test_styles_round_trip_through_params_and_infotext(db):
    from modules.core.infotext import build_infotext, parse_infotext
    from modules.ui.paste import parse_for_paste

    params = Txt2ImgParams(prompt="a red fox", negative_prompt="ugly", steps=3)
    apply_styles_to_params(params, db, ["Sharp", "Cinematic"])
    assert params.styles == ["Sharp", "Cinematic"]
    assert params.prompt == "cinematic still, a red fox, sharp focus, 8k, film grain"
    assert params.negative_prompt == "ugly, blurry, cartoon, drawing"
    text = build_infotext(params.prompt, params.negative_prompt, {"Steps": 3, "Sampler": "Euler", "Seed": 5})
    assert "Styles array" not in text  # A1111 1.10 writes only the expanded prompt
    parsed = parse_for_paste(text, styles=db)
    assert parsed["Styles array"] == ["Sharp", "Cinematic"]
    assert parsed["Prompt"] == "a red fox" and parsed["Negative prompt"] == "ugly"
    # Without a style database the expanded text is pasted as it is.
    plain = parse_for_paste(text, styles=None)
    assert plain["Prompt"] == params.prompt and "Styles array" not in plain
    assert parse_infotext(text)["Prompt"] == params.prompt
