"""Prompt banks: the shipped VOC bank matches the reference wording; bad banks fail with a clear message."""

from __future__ import annotations

import pytest

from clims_pl.data.voc import VOC_CLASSES
from clims_pl.prompts.bank import PromptBankError, bank_path, load_prompt_bank


def _write(tmp_path, text: str):
    path = tmp_path / "bank.yaml"
    path.write_text(text)
    return path


def test_voc_bank_reference_prompts():
    bank = load_prompt_bank("voc", classes=VOC_CLASSES)
    prompts = bank.class_prompts()
    assert bank.classes == VOC_CLASSES
    assert len(prompts) == 20 and all(len(p) == 1 for p in prompts)
    # docs/reference.md#class-names-in-prompts, docs/reference.md#q8-prompt-wording: "player" for person, spaced names, trailing period, untouched aeroplane/motorbike.
    assert prompts[14] == ["a photo of player."]
    assert prompts[10] == ["a photo of dining table."]
    assert prompts[15] == ["a photo of potted plant."]
    assert prompts[19] == ["a photo of tv monitor."]
    assert prompts[0] == ["a photo of aeroplane."]
    assert prompts[13] == ["a photo of motorbike."]
    assert [p[0] for p in bank.background_prompts()] == [
        f"a photo of {b}."
        for b in ["tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks"]
    ]


def test_bank_by_path_with_templates(tmp_path):
    path = _write(
        tmp_path,
        "name: two\nclasses: [cat, dog]\ntext_names: {dog: puppy}\n"
        'templates: ["a photo of {}.", "a {} in the wild"]\nbackground: [grass]\n',
    )
    bank = load_prompt_bank(str(path), classes=["cat", "dog"])
    assert bank.class_prompts() == [
        ["a photo of cat.", "a cat in the wild"],
        ["a photo of puppy.", "a puppy in the wild"],
    ]
    assert bank.background_prompts() == [["a photo of grass.", "a grass in the wild"]]
    assert bank.source == str(path)


@pytest.mark.parametrize(
    ("text", "classes", "match"),
    [
        ("classes: [cat, dog]\ntext_names: {cow: calf}\n", None, r"text_names.*unknown class.*cow"),
        ("classes: [dog, cat]\n", ["cat", "dog"], r"same order.*different order"),
        ("classes: [cat]\n", ["cat", "dog"], r"missing \['dog'\]"),
        ("classes: [cat, bird]\n", ["cat", "dog"], r"unknown \['bird'\]"),
        ("classes: [cat]\ntemplates: [a photo]\n", None, r"exactly one '\{\}'"),
        ("classes: [cat]\nprompt: x\n", None, r"unknown key.*prompt"),
        ("classes: []\n", None, r"'classes' is empty"),
        ("classes: [cat, cat]\n", None, r"duplicates"),
    ],
)
def test_bad_bank_is_a_clear_error(tmp_path, text, classes, match):
    path = _write(tmp_path, text)
    with pytest.raises(PromptBankError, match=match) as err:
        load_prompt_bank(path, classes=classes)
    assert str(path) in str(err.value)


def test_unknown_bank_name_lists_shipped_banks():
    with pytest.raises(PromptBankError, match=r"data.prompts='vocc'.*'voc'"):
        bank_path("vocc")
