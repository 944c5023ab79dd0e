"""Prompt banks: the CLIP text side of CLIMS kept as data (yaml), not code.

A bank names the dataset classes in channel order, the wording CLIP reads for each (docs/reference.md#class-names-in-prompts: "player" for
person), the prompt templates and the co-occurring background concepts used by L_CBS (docs/reference.md#clims-training-step). Keeping it as data
lets a new dataset or a prompt ablation be a yaml file and a ``data.prompts=...`` override.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: Folder of the shipped banks; ``load_prompt_bank("voc")`` reads ``BANK_DIR / "voc.yaml"``.
BANK_DIR = Path(__file__).resolve().parent
_KEYS = {"name", "classes", "text_names", "templates", "background"}


class PromptBankError(ValueError):
    """A prompt bank that cannot be used; the message names the file and the key to fix."""


@dataclass(frozen=True)
class PromptBank:
    """Class and background prompts for one dataset.

    Attributes:
        name: bank name (for logs).
        classes: dataset class names in channel order.
        text_names: class name → wording used in prompts, where it differs.
        templates: prompt templates with one ``{}`` each; several are averaged per class by the evaluator.
        background: background concepts for L_CBS (may be empty when CBS is off).
        source: file the bank was read from.
    """

    name: str
    classes: tuple[str, ...]
    text_names: dict[str, str] = field(default_factory=dict)
    templates: tuple[str, ...] = ("a photo of {}.",)
    background: tuple[str, ...] = ()
    source: str = "<memory>"

    def text_name(self, cls: str) -> str:
        return self.text_names.get(cls, cls)

    def class_prompts(self) -> list[list[str]]:
        """One list of filled templates per class, in channel order: C × T strings."""
        return [[t.format(self.text_name(c)) for t in self.templates] for c in self.classes]

    def background_prompts(self) -> list[list[str]]:
        """One list of filled templates per background concept: B × T strings ("a photo of tree.")."""
        return [[t.format(b) for t in self.templates] for b in self.background]


def bank_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped bank name (``voc``, ``toy``) or a yaml path → the file."""
    text = str(name_or_path)
    shipped = BANK_DIR / f"{text}.yaml"
    if "/" not in text and not text.endswith((".yaml", ".yml")) and shipped.is_file():
        return shipped
    path = Path(text).expanduser()
    if path.is_file():
        return path
    available = sorted(p.stem for p in BANK_DIR.glob("*.yaml"))
    raise PromptBankError(
        f"data.prompts={text!r}: no such prompt bank; use one of {available} or a path to a yaml file"
    )


def load_prompt_bank(name_or_path: str | os.PathLike, classes: Sequence[str] | None = None) -> PromptBank:
    """Read and validate a bank; with ``classes`` (the datamodule's), the bank must list exactly those, in order."""
    path = bank_path(name_or_path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise PromptBankError(f"{path}: expected a mapping with keys {sorted(_KEYS)}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise PromptBankError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    bank = PromptBank(
        name=str(raw.get("name", path.stem)),
        classes=tuple(_str_list(raw.get("classes"), path, "classes", allow_empty=False)),
        text_names={str(k): str(v) for k, v in (raw.get("text_names") or {}).items()},
        templates=tuple(_str_list(raw.get("templates", ["a photo of {}."]), path, "templates", allow_empty=False)),
        background=tuple(_str_list(raw.get("background") or [], path, "background", allow_empty=True)),
        source=str(path),
    )
    _validate(bank, path, classes)
    return bank


def _str_list(value: object, path: Path, key: str, *, allow_empty: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PromptBankError(f"{path}: '{key}' must be a list of non-empty strings, got {value!r}")
    if not value and not allow_empty:
        raise PromptBankError(f"{path}: '{key}' is empty")
    return value


def _validate(bank: PromptBank, path: Path, classes: Sequence[str] | None) -> None:
    if len(set(bank.classes)) != len(bank.classes):
        raise PromptBankError(f"{path}: 'classes' has duplicates")
    unknown = sorted(set(bank.text_names) - set(bank.classes))
    if unknown:
        raise PromptBankError(f"{path}: 'text_names' names unknown class(es) {unknown}; known: {list(bank.classes)}")
    bad = [t for t in bank.templates if t.count("{}") != 1]
    if bad:
        raise PromptBankError(f"{path}: every template needs exactly one '{{}}', got {bad}")
    if classes is not None and tuple(classes) != bank.classes:
        missing = [c for c in classes if c not in bank.classes]
        extra = [c for c in bank.classes if c not in classes]
        detail = (
            f"missing {missing} (names in data.classes the bank does not know), unknown {extra} (bank names "
            "not in data.classes)"
            if missing or extra
            else "same names, different order"
        )
        raise PromptBankError(
            f"data.classes must equal the 'classes' of the prompt bank {path} in the same order ({detail}); "
            f"known classes: {list(bank.classes)}; fix the spelling in data.classes or point data.prompts at "
            "the bank of this dataset"
        )
