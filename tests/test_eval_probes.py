"""Probes: deterministic generation, correct targets, exact scoring (no model needed)."""
import re

import pytest

from llmprune.eval import probes


def test_generation_is_deterministic_and_seeded():
    for kind in probes.PROBES:
        a = probes.make_items({"probe": kind, "n": 20, "seed": 3})[1]
        b = probes.make_items({"probe": kind, "n": 20, "seed": 3})[1]
        c = probes.make_items({"probe": kind, "n": 20, "seed": 4})[1]
        assert a == b
        assert a != c
        assert len({it.prompt for it in a}) == 20  # items are distinct


def test_arithmetic_targets_are_the_right_answers():
    _, items = probes.make_items({"probe": "arithmetic", "n": 50, "digits": 3, "shots": 3})
    for it in items:
        lines = it.prompt.rstrip("\n").split("\n")
        assert len(lines) == 2 * 3 + 1
        for q, a in zip(lines[0:-1:2], lines[1:-1:2]):           # the demonstrations are right too
            assert int(a) == eval(q[4:])
        question = lines[-1][4:]
        assert re.fullmatch(r"\d{3} [-+*] \d+", question)
        assert int(it.target) == eval(question)


def test_brackets_targets_close_the_prefix():
    _, items = probes.make_items({"probe": "brackets", "n": 50, "length": 8, "max_depth": 4})
    pairs = dict(zip("([{<", ")]}>"))
    for it in items:
        prefix = it.prompt.rsplit("\n", 1)[-1].removesuffix(" ->")
        full = (prefix + " " + it.target).split()
        stack = []
        for ch in full:                      # the completed string is balanced
            if ch in pairs:
                stack.append(ch)
            else:
                assert stack and pairs[stack.pop()] == ch
        assert stack == [] and it.target      # something was left open
    assert probes.closing_sequence("( [ { } < >") == "] )"
    with pytest.raises(ValueError):
        probes.closing_sequence("( ]")


def test_kv_target_is_the_value_of_the_queried_key():
    _, items = probes.make_items({"probe": "kv_retrieval", "n": 30, "pairs": 6})
    for it in items:
        first, *_rest = it.prompt.split("\n")
        table = eval(first[len(">>> d = "):])
        assert len(table) == 6
        key = re.findall(r'd\["(\w+)"\]', it.prompt)[-1]
        assert str(table[key]) == it.target


@pytest.mark.parametrize("kind,target,good,bad", [
    ("arithmetic", "929", ["929", " 929\n>>> 1 + 1", "929 is the answer"], ["92", "9290", "", "-929", "x929"]),
    ("kv_retrieval", "417", ["417", "  417\n"], ["41", "4170", "'417'"]),
    ("brackets", "] )", ["] )", " ])", "]   )\n( (", " ] )"], ["] ) )", ")", "] }", "]) x"]),
])
def test_scoring_hand_made_answers(kind, target, good, bad):
    item = probes.ProbeItem(prompt="...", target=target)
    for g in good:
        assert probes.score(kind, item, g) == 1.0, g
    for b in bad:
        assert probes.score(kind, item, b) == 0.0, b


class _EchoLM:
    """Stands in for HFLM.generate_until: answers each request from a lookup."""
    def __init__(self, answer):
        self.answer = answer
        self.seen = []

    def generate_until(self, requests, disable_tqdm=False):
        self.seen += requests
        return [self.answer(r.arguments[0], r.doc["target"]) for r in requests]


def test_run_probe_scores_through_the_lm_interface():
    params = {"probe": "arithmetic", "n": 10, "seed": 0}
    right, recs = probes.run_probe(_EchoLM(lambda p, t: f" {t}\n>>> 1 + 2"), params)
    assert right == 1.0 and len(recs) == 10
    lm = _EchoLM(lambda p, t: str(int(t) + 1))
    wrong, _ = probes.run_probe(lm, params, limit=4)
    assert wrong == 0.0 and len(lm.seen) == 4
    gen_kwargs = lm.seen[0].arguments[1]
    assert gen_kwargs["until"] == ["\n"] and gen_kwargs["do_sample"] is False
