"""Behaviour of the A1111 prompt syntax (emphasis, editing, AND, extra networks).

Expected values follow A1111 v1.10's documented behaviour; exact float
weights matter because the conditioning must match A1111's bit for bit.
"""

import pytest

from modules.engine.prompt_parser import (
    ExtraNetworkCall,
    ScheduledPrompt,
    get_learned_conditioning_prompt_schedules,
    get_multicond_prompt_list,
    get_prompt_schedule,
    group_extra_networks,
    parse_extra_networks,
    parse_extra_networks_prompts,
    parse_prompt_attention,
)

UP = 1.1
DOWN = 1 / 1.1


# ---------------------------------------------------------------------------
# parse_prompt_attention
# ---------------------------------------------------------------------------


class TestAttention:
    def test_plain_text_has_weight_one(self):
        assert parse_prompt_attention("a red fox") == [["a red fox", 1.0]]

    def test_empty_prompt_gives_one_empty_fragment(self):
        assert parse_prompt_attention("") == [["", 1.0]]

    def test_round_brackets_multiply_by_1_1(self):
        assert parse_prompt_attention("a (red) fox") == [["a ", 1.0], ["red", UP], [" fox", 1.0]]

    def test_double_round_brackets_are_exactly_1_1_squared(self):
        # same float as A1111, not a rounded 1.21
        assert parse_prompt_attention("((fox))") == [["fox", 1.2100000000000002]]

    def test_square_brackets_divide_by_1_1(self):
        assert parse_prompt_attention("a [dim] fox") == [["a ", 1.0], ["dim", DOWN], [" fox", 1.0]]

    def test_explicit_weight(self):
        assert parse_prompt_attention("(fox:1.5) den") == [["fox", 1.5], [" den", 1.0]]

    def test_explicit_weight_allows_spaces_and_sign(self):
        assert parse_prompt_attention("(fox: 0.25 )") == [["fox", 0.25]]
        assert parse_prompt_attention("(fox:-1)") == [["fox", -1.0]]

    def test_nesting_multiplies_inner_first(self):
        # the weight closes the inner bracket, the outer one adds 1.1
        assert parse_prompt_attention("((fox:1.5)) den") == [["fox", 1.5 * UP], [" den", 1.0]]
        assert parse_prompt_attention("(a (b) c)") == [["a ", UP], ["b", UP * UP], [" c", UP]]

    def test_mixed_sentence(self):
        # the first "(" is closed by the last ")" of "clouds)))"
        got = parse_prompt_attention("old (((tower:1.2)) [by] the (sea:0.8), dusk, ((clouds))).")
        assert got == [
            ["old ", 1.0],
            ["tower", 1.2 * UP * UP],
            [" ", UP],
            ["by", DOWN * UP],
            [" the ", UP],
            ["sea", 0.8 * UP],
            [", dusk, ", UP],
            ["clouds", UP * UP * UP],
            [".", 1.0],
        ]

    def test_adjacent_equal_weights_merge(self):
        assert parse_prompt_attention("(first)(second)") == [["firstsecond", UP]]

    def test_unclosed_round_bracket_applies_to_the_rest(self):
        assert parse_prompt_attention("(never closed") == [["never closed", UP]]
        assert parse_prompt_attention("a (b") == [["a ", 1.0], ["b", UP]]

    def test_unclosed_square_bracket_applies_to_the_rest(self):
        assert parse_prompt_attention("a [b") == [["a ", 1.0], ["b", DOWN]]

    def test_unclosed_weight_keeps_its_text(self):
        # "(a:1.5" never closes, so ":1.5" is text and the bracket means 1.1
        assert parse_prompt_attention("(a:1.5") == [["a:1.5", UP]]

    def test_closer_without_opener_is_literal(self):
        assert parse_prompt_attention("smile) and wink]") == [["smile) and wink]", 1.0]]
        assert parse_prompt_attention("a:1.5) b") == [["a:1.5) b", 1.0]]

    def test_crossed_brackets_follow_close_order(self):
        assert parse_prompt_attention("(a [b) c]") == [["a ", UP], ["b", UP * DOWN], [" c", DOWN]]

    def test_escapes_give_literal_brackets(self):
        assert parse_prompt_attention(r"\(tag\] and \[x\)") == [["(tag] and [x)", 1.0]]

    def test_escaped_backslash(self):
        assert parse_prompt_attention(r"a\\b") == [["a\\b", 1.0]]

    def test_backslash_before_other_character_is_dropped(self):
        assert parse_prompt_attention(r"a\nb") == [["anb", 1.0]]

    def test_escapes_inside_emphasis(self):
        assert parse_prompt_attention(r"(smile \(happy\))") == [["smile (happy)", UP]]

    def test_colon_without_weight_is_text(self):
        assert parse_prompt_attention("style: anime") == [["style: anime", 1.0]]

    def test_break_becomes_a_marker(self):
        assert parse_prompt_attention("a cat BREAK a dog") == [
            ["a cat", 1.0],
            ["BREAK", -1],
            ["a dog", 1.0],
        ]

    def test_break_at_start_leaves_empty_fragment(self):
        assert parse_prompt_attention("BREAK dog") == [["", 1.0], ["BREAK", -1], ["dog", 1.0]]

    def test_break_must_be_a_whole_uppercase_word(self):
        assert parse_prompt_attention("BREAKFAST break") == [["BREAKFAST break", 1.0]]
        assert parse_prompt_attention("a,BREAK,b") == [["a,", 1.0], ["BREAK", -1], [",b", 1.0]]

    def test_two_breaks_keep_an_empty_chunk_between(self):
        assert parse_prompt_attention("a BREAK BREAK b") == [
            ["a", 1.0],
            ["BREAK", -1],
            ["", 1.0],
            ["BREAK", -1],
            ["b", 1.0],
        ]

    def test_break_inside_brackets_is_scaled_like_a1111(self):
        # A1111 quirk kept for parity: the marker's -1 is scaled too
        assert parse_prompt_attention("(a BREAK b)") == [["a", UP], ["BREAK", -UP], ["b", UP]]

    def test_fragments_unpack_like_pairs(self):
        for text, weight in parse_prompt_attention("x (y)"):
            assert isinstance(text, str) and isinstance(weight, float)


# ---------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------


def sched(prompt, steps=10, hires=None, old=False):
    result = get_learned_conditioning_prompt_schedules([prompt], steps, hires, old)[0]
    return [tuple(x) for x in result]


class TestSchedules:
    def test_plain_prompt_is_one_entry(self):
        assert sched("just a prompt") == [(10, "just a prompt")]

    def test_entries_are_named_tuples(self):
        entry = get_learned_conditioning_prompt_schedules(["x [y:2]"], 5)[0][0]
        assert isinstance(entry, ScheduledPrompt)
        assert entry.end_at_step == 2 and entry.text == "x "
        end, text = entry
        assert (end, text) == (2, "x ")

    def test_from_to_at_fraction(self):
        assert sched("a [b:c:0.5] d") == [(5, "a b d"), (10, "a c d")]

    def test_add_at_integer_step(self):
        assert sched("sky [stars:4]") == [(4, "sky "), (10, "sky stars")]

    def test_spaces_around_the_step(self):
        assert sched("sky [stars: 4 ]") == [(4, "sky "), (10, "sky stars")]

    def test_remove_at_step(self):
        assert sched("sky [stars::6]") == [(6, "sky stars"), (10, "sky ")]

    def test_spaces_inside_parts_are_kept(self):
        assert sched("a [b : c : 1] d") == [(1, "a b  d"), (10, "a  c  d")]

    def test_fraction_is_truncated_not_rounded(self):
        assert sched("[a:b:0.25]") == [(2, "a"), (10, "b")]
        assert sched("[a:b:0.29]", steps=20) == [(5, "a"), (20, "b")]

    def test_number_with_a_dot_is_always_a_fraction(self):
        # A1111 >= 1.6: "1.0" means the whole pass, "1.5" is clamped to the end
        assert sched("[a:b:1.0]") == [(10, "a")]
        assert sched("[a:b:1.5]") == [(10, "a")]

    def test_integer_past_the_end_is_clamped(self):
        assert sched("[a:b:30]") == [(10, "a")]

    def test_step_zero_or_negative_means_always_after(self):
        assert sched("[a:b:0]") == [(10, "b")]
        assert sched("[a:b:-3]") == [(10, "b")]

    def test_exponent_numbers_are_accepted(self):
        assert sched("[a:b:3e0]") == [(3, "a"), (10, "b")]

    def test_nested_editing(self):
        assert sched("a[b:[c:d:3]:1]e") == [(1, "abe"), (3, "ace"), (10, "ade")]

    def test_emphasis_inside_editing_is_kept_as_text(self):
        assert sched("[(gold:1.3):silver:3]") == [(3, "(gold:1.3)"), (10, "silver")]
        assert sched("([gold:silver:3])") == [(3, "(gold)"), (10, "(silver)")]

    def test_several_edits_share_boundaries(self):
        got = sched("[a:b:0.2] [c:d:0.6] [e::0.2]")
        assert got == [(2, "a c e"), (6, "b c "), (10, "b d ")]

    def test_escaped_brackets_are_not_syntax(self):
        assert sched(r"\[a:b:3\]") == [(10, r"\[a:b:3\]")]

    def test_alternation_cycles_every_step(self):
        assert sched("[cat|dog]", steps=4) == [(1, "cat"), (2, "dog"), (3, "cat"), (4, "dog")]

    def test_alternation_with_empty_options(self):
        assert sched("[fox|]tail", steps=3) == [(1, "foxtail"), (2, "tail"), (3, "foxtail")]
        assert sched("[a||b]", steps=4) == [(1, "a"), (2, ""), (3, "b"), (4, "a")]

    def test_alternation_inside_editing(self):
        got = sched("[x:[r|s]:2]", steps=4)
        assert got == [(1, "x"), (2, "x"), (3, "r"), (4, "s")]

    def test_unbalanced_brackets_around_valid_syntax(self):
        assert sched("x [a [b:2]") == [(2, "x [a "), (10, "x [a b")]
        assert sched("((a][:b:c [d:3]") == [(3, "((a][:b:c "), (10, "((a][:b:c d")]

    def test_invalid_syntax_is_used_verbatim(self):
        # a '|' outside an alternation makes A1111 give up on the whole prompt
        assert sched("a | b [c:d:2]") == [(10, "a | b [c:d:2]")]
        assert sched("a [b:c:2] \\") == [(10, "a [b:c:2] \\")]
        assert sched("a [unclosed") == [(10, "a [unclosed")]

    def test_top_level_ambiguity_resolved_like_a1111(self):
        # A1111's parser reads a construct followed by an odd-length run of
        # stray brackets/colons as literal text; we reproduce its choice.
        assert sched("[a:b:3]:") == [(3, "a:"), (10, "b:")]
        assert sched("[a:b:3]::") == [(10, "[a:b:3]::")]
        assert sched("[a:b:3]:::") == [(3, "a:::"), (10, "b:::")]
        assert sched("([a:b:3]))") == [(10, "([a:b:3]))")]
        assert sched("(([a:b:3]))") == [(3, "((a))"), (10, "((b))")]

    def test_hires_pass_uses_offsets(self):
        # with hires steps, integers count on from the base pass and 1.x is the hires pass
        assert sched("a [b:c:1.5] d", steps=20, hires=10) == [(5, "a b d"), (10, "a c d")]
        assert sched("a [b:c:25] d", steps=20, hires=10) == [(5, "a b d"), (10, "a c d")]
        assert sched("a [b:c:0.5] d", steps=20, hires=10) == [(10, "a c d")]
        assert sched("a [b:c:5] d", steps=20, hires=10) == [(10, "a c d")]

    def test_old_scheduling(self):
        assert sched("[a:b:0.5]", old=True) == [(5, "a"), (10, "b")]
        # pre-1.6: only values below 1 are fractions, so 1.5 means step 1
        assert sched("[a:b:1.5]", old=True) == [(1, "a"), (10, "b")]
        # and the hires pass is scheduled with the base step count
        assert sched("[a:b:0.5]", steps=10, hires=4, old=True) == [(5, "a"), (10, "b")]

    def test_batch_keeps_order_and_duplicates(self):
        got = get_learned_conditioning_prompt_schedules(["x", "[y:z:1]", "x"], 2)
        assert [[tuple(e) for e in s] for s in got] == [[(2, "x")], [(1, "y"), (2, "z")], [(2, "x")]]

    def test_results_are_independent_lists(self):
        first, second = get_learned_conditioning_prompt_schedules(["same", "same"], 3)
        first.append(ScheduledPrompt(9, "changed"))
        assert len(second) == 1

    def test_single_prompt_helper(self):
        assert get_prompt_schedule("[a:b:2]", 4) == [ScheduledPrompt(2, "a"), ScheduledPrompt(4, "b")]

    def test_deep_nesting_does_not_crash(self):
        deep = "[a:" * 400 + "z" + ":1]" * 400
        assert sched(deep)[-1][0] == 10
        assert sched("(" * 5000) == [(10, "(" * 5000)]


# ---------------------------------------------------------------------------
# AND (composable diffusion)
# ---------------------------------------------------------------------------


class TestMulticond:
    def test_split_with_weights(self):
        indexes, flat, index_of = get_multicond_prompt_list(["a castle AND a dragon:0.5"])
        assert indexes == [[(0, 1.0), (1, 0.5)]]
        # trailing space dropped, leading space kept (A1111)
        assert flat == ["a castle", " a dragon"]
        assert index_of == {"a castle": 0, " a dragon": 1}

    def test_weight_with_spaces_and_sign(self):
        indexes, flat, _ = get_multicond_prompt_list(["x AND y : -1.5 "])
        assert indexes == [[(0, 1.0), (1, -1.5)]]
        assert flat == ["x", " y"]

    def test_identical_subprompts_share_an_index(self):
        indexes, flat, _ = get_multicond_prompt_list(["cat AND dog", "dog AND cat:2"])
        assert flat == ["cat", " dog", "dog", " cat"]
        assert indexes == [[(0, 1.0), (1, 1.0)], [(2, 1.0), (3, 2.0)]]
        indexes, flat, _ = get_multicond_prompt_list(["same", "same"])
        assert flat == ["same"] and indexes == [[(0, 1.0)], [(0, 1.0)]]

    def test_and_must_be_a_whole_word(self):
        _, flat, _ = get_multicond_prompt_list(["ANDROID and BRAND"])
        assert flat == ["ANDROID and BRAND"]

    def test_single_prompt_trailing_weight(self):
        indexes, flat, _ = get_multicond_prompt_list(["cat:1.2"])
        assert flat == ["cat"] and indexes == [[(0, 1.2)]]

    def test_emphasis_weight_is_not_an_and_weight(self):
        indexes, flat, _ = get_multicond_prompt_list(["(cat:1.2)"])
        assert flat == ["(cat:1.2)"] and indexes == [[(0, 1.0)]]


# ---------------------------------------------------------------------------
# Extra networks
# ---------------------------------------------------------------------------


class TestExtraNetworks:
    def test_lora_tag_is_removed_and_reported(self):
        text, calls = parse_extra_networks("a knight <lora:armor_v2:0.8>, castle")
        assert text == "a knight , castle"
        assert calls == [ExtraNetworkCall("lora", ["armor_v2", "0.8"])]

    def test_several_types_in_order(self):
        text, calls = parse_extra_networks("<hypernet:anime:1>x<lyco:foo:0.5:0.3> y <lora:bar>")
        assert text == "x y "
        assert [(c.name, c.items) for c in calls] == [
            ("hypernet", ["anime", "1"]),
            ("lyco", ["foo", "0.5", "0.3"]),
            ("lora", ["bar"]),
        ]

    def test_named_and_positional_arguments(self):
        _, (call,) = parse_extra_networks("<lora:x:1:te=0.5:unet=0.7>")
        assert call.positional == ["x", "1"]
        assert call.named == {"te": "0.5", "unet": "0.7"}

    def test_text_that_is_not_a_tag_stays(self):
        prompt = "a <b> c <d:> <:e> <f g:1>"
        assert parse_extra_networks(prompt) == (prompt, [])

    def test_allowed_types(self):
        text, calls = parse_extra_networks("<lora:a:1><foo:b>", allowed={"lora"})
        assert text == "<foo:b>" and [c.name for c in calls] == ["lora"]

    def test_batch_uses_first_prompt_networks(self):
        texts, calls = parse_extra_networks_prompts(["x <lora:a:1>", "y <lora:b:1>"])
        assert texts == ["x ", "y "]
        assert calls == [ExtraNetworkCall("lora", ["a", "1"])]

    def test_grouping_by_type(self):
        _, calls = parse_extra_networks("<lora:a:1><hypernet:h:1><lora:b:0.5>")
        grouped = group_extra_networks(calls)
        assert list(grouped) == ["lora", "hypernet"]
        assert [c.items[0] for c in grouped["lora"]] == ["a", "b"]


@pytest.mark.parametrize(
    "prompt",
    ["", "a", "(", ")", "[", "]", ":", "|", "\\", "[a|", "[:]", "(:)", "[::]", "((a:1)", "a:)", "]:[", "[a:b:c]"],
)
def test_odd_inputs_never_raise(prompt):
    get_learned_conditioning_prompt_schedules([prompt], 5, 3)
    parse_prompt_attention(prompt)
    get_multicond_prompt_list([prompt])
    parse_extra_networks(prompt)
