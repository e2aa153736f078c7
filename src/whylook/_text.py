"""Small text formats shared by the summary, the report, the CLI and its errors.

Imports nothing heavy: ``whylook --help`` reads from here without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

#: The data specs whylook reads, as the CLI's help and data's errors name them.
DATA_SPECS = ("mnist5k, npz:PATH, folder:PATH (a folder or .zip), "
              "torchvision:mnist:ROOT or torchvision:cifar10:ROOT")


def floor_pct(rate: float) -> str:
    """A rate as a whole percentage, rounded down, so that a rate just under a 50% bar never
    prints as 50%.

    >>> floor_pct(0.497), floor_pct(0.7), floor_pct(1.0)
    ('49%', '70%', '100%')
    """
    return f"{int(rate * 100 + 1e-9)}%"


#: The summary and the report caution when the final model's analysis-set accuracy is less
#: than this fraction of the way from chance to perfect (19 % for ten classes).
NEAR_CHANCE = 0.1

#: A rate (a ratio of counts) within this of a bar counts as on it. A bar computed from
#: settings (``1 - tolerance``) or a difference of two rates can land a rounding step beyond
#: the exact value (30/52 - 17/52 = 0.24999999999999994), while a rate of fewer than a
#: million samples lies at least 1e-12 from any other such rate (differences of two rates
#: need smaller classes: below about a million samples in all).
RATE_ROUNDING = 1e-12

#: How far a rate read back from explanation.json (6 decimals) may lie from its exact value.
STORED_ROUNDING = 5e-7


def near_chance_caution(
    accuracy: float, n_classes: int, *, source: str | None = None
) -> str | None:
    """A caution when the final model is right little more often than chance: every rule
    still runs, but there is little learning for them to explain (``None`` otherwise).

    ``source`` is run.json's ``source``. Checkpoints trained elsewhere (``"import"``) may
    expect other inputs than whylook feeds them, and the caution says so; a run that
    ``whylook train`` made (``"train"``) was trained on those very inputs. An unknown
    source (``None``: an explanation written before it was recorded) keeps the clause.

    >>> near_chance_caution(0.12, 10, source="train")[:40]
    'the final model is right on 12% of the a'
    >>> [near_chance_caution(0.12, 10, source=s).endswith("must be inside the model)")
    ...  for s in ("train", "import", None)]
    [False, True, True]
    >>> near_chance_caution(0.19, 10) is None
    True
    """
    chance = 1.0 / n_classes
    # The summary reads the accuracy from explanation.json, which keeps 6 decimals: on the
    # bar there it may lie up to 5e-7 below, where the report's own k/n is on it.
    if accuracy >= chance + NEAR_CHANCE * (1.0 - chance) - STORED_ROUNDING:
        return None
    text = (f"the final model is right on {floor_pct(accuracy)} of the analysis set (chance: "
            f"{floor_pct(chance)}); it has learned little, so there is little for this "
            "explanation to explain: train longer and explain again")
    if source == "train":
        return text
    return text + (" (a model that does better in your own evaluation may expect other "
                   "inputs: whylook feeds it float pixels in [0, 1], so its normalisation "
                   "must be inside the model)")


#: Below this lift the summary and the report say that the uncertain prototypes' pairs
#: hardly stand out from the average pair (the demo: 1.86; a synthetic 100-class run:
#: 1.02 with 20 samples a class, 1.29 with 60, where the entries that come with the classes'
#: average seesaw reach 2.50 and 1.56; docs/METHOD-NOTES.md, Step 6).
WEAK_LIFT = 1.25


def pair_confusion_text(lift: float) -> str:
    """How much more often the model confused the uncertain prototypes' pairs than the
    average pair (``uncertain_pairs_confusion.lift``), with a caution when barely more.

    >>> pair_confusion_text(1.86)[:50]
    'the model confused those pairs 1.86x as often as t'
    >>> ["--uncertain-null" in pair_confusion_text(lift) for lift in (1.02, 1.86)]
    [True, False]
    >>> pair_confusion_text(0.88).split("; ")[1][:8]
    'no more:'
    >>> pair_confusion_text(1.004)[:62]
    'the model confused those pairs as often as the average class p'

    """
    # The words follow the printed figure, rounded half up from the file's decimals (the
    # lift is stored to 6): 0.995 and 1.004 both print as 1.00, and read "as often as",
    # not "1.00x as often" followed by "no more" or "barely more" at random.
    # Beyond 1e6 (only a hand-edited file) the figure needs no rounding, and quantize
    # would run out of Decimal's 28 digits.
    shown = (float(Decimal(repr(float(lift))).quantize(Decimal("0.01"), ROUND_HALF_UP))
             if math.isfinite(lift) and abs(lift) < 1e6 else float(lift))
    times = "" if shown == 1 else f"{shown:.2f}x "
    text = (f"the model confused those pairs {times}as often as the average class pair "
            "(errors both ways, every checkpoint after the first)")
    if shown < WEAK_LIFT:
        # At or below 1 the flagged pairs were confused no more than the average one.
        text += ("; no more" if shown <= 1 else "; barely more") + (
            ": over many pairs, many swings come from samples whose attention and confidence "
            "moved together while the two classes did not trade confidence on average; "
            "--uncertain-null N names the entries that come with such a trade, which point at "
            "confusions more (docs/METHOD-NOTES.md, Step 6)")
    return text


def uncertain_null_lines(null: dict[str, Any] | None) -> list[str]:
    """What the uncertain rule flagged with the link between attention and confidence cut
    (``uncertain_by_chance`` in explanation.json; :class:`whylook.explain.UncertainNull`),
    in words: the mean flags by chance and from the classes' average drift, then the
    entries the drift flags too.

    >>> null = {"draws": 2, "sign_flipped": [0, 1], "sign_flipped_mean": 0.5,
    ...         "shuffled": [2, 3], "shuffled_mean": 2.5,
    ...         "entries_in_shuffles": [{"id": "P-9", "classes": ["0", "1"], "shuffles": 2}]}
    >>> for line in uncertain_null_lines(null):
    ...     print(line)  # doctest: +NORMALIZE_WHITESPACE
    by chance (confidence changes sign-flipped, 2 refits): 0.5 entries flagged on
    average; from the average drift alone (attention changes shuffled): 2.5
      of these entries, flagged under shuffles too: P-9 0/1 (2/2)
    >>> old = {"shuffles": 20, "flagged": [2] * 20, "mean": 2.0}  # the first version
    >>> print(uncertain_null_lines(old)[0])  # doctest: +NORMALIZE_WHITESPACE
    with each sample's attention changes given to another sample, the rule flags 2.0
    entries (20 shuffles, mean)
    """
    if not null:
        return []
    if "draws" not in null:
        return [f"with each sample's attention changes given to another sample, the rule "
                f"flags {null['mean']:.1f} entries ({null['shuffles']} shuffles, mean)"]
    draws = null["draws"]
    lines = [f"by chance (confidence changes sign-flipped, {draws} refits): "
             f"{null['sign_flipped_mean']:.1f} entries flagged on average; from the average "
             f"drift alone (attention changes shuffled): {null['shuffled_mean']:.1f}"]
    drift = [f"{e['id']} {e['classes'][0]}/{e['classes'][1]} ({e['shuffles']}/{draws})"
             for e in null["entries_in_shuffles"]]
    if drift:
        lines.append(f"  of these entries, flagged under shuffles too: {', '.join(drift)}")
    return lines


def rank_classes(entries: Sequence[int], accuracy: Sequence[float | None]) -> list[int]:
    """Class indices in the order the summary and the report pick classes past their limit:
    most uncertain-prototype entries first, then least accurate at the final checkpoint (a
    class without samples, or accuracy unknown, after the others), then class order.

    >>> rank_classes([0, 2, 0, 1], [0.9, 0.5, 0.4, None])
    [1, 3, 2, 0]
    """
    return sorted(range(len(entries)), key=lambda c: (
        -entries[c], 2.0 if accuracy[c] is None else accuracy[c], c))


def uncertain_entries_by_class(uncertain: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Class name -> the uncertain-prototype entries whose pair names it, in file order:
    what the summary and the report rank classes by.

    >>> entries = [{"id": "P-1", "classes": ["3", "5"]}, {"id": "P-2", "classes": ["5", "8"]}]
    >>> {c: [u["id"] for u in us] for c, us in uncertain_entries_by_class(entries).items()}
    {'3': ['P-1'], '5': ['P-1', 'P-2'], '8': ['P-2']}
    """
    by_class: dict[str, list[dict[str, Any]]] = {}
    for u in uncertain:
        for name in (u.get("classes") or [])[:2]:
            by_class.setdefault(str(name), []).append(u)
    return by_class
