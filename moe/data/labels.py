"""Class labels checked before training: integer ids 0..C-1, or names mapped to ids.

Integer labels must be whole numbers in [0, C): C is ``data.num_classes`` when set, else one more
than the largest training label, and then every id below it must occur in the training split (a
gap, such as labels {0, 7}, would silently train classes that never appear). Names (strings) are
numbered in sorted order; the mapping is kept with the data and saved in the run folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynamoe.data.sources import DataError


@dataclass(frozen=True)
class LabelSpace:
    num_classes: int
    names: tuple[str, ...] | None = None  # class id -> name, for labels given as names

    def as_dict(self) -> dict:
        return {"num_classes": self.num_classes, "names": None if self.names is None else list(self.names)}


def _is_int_like(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def label_space(train: list, others: dict[str, list], num_classes: int | None, source: str) -> LabelSpace:
    """The label space of a dataset from its training labels; the other splits (by name) must fit it."""
    if not train:
        raise DataError(f"{source}: the training split has no rows; fix: point data.path at a file with examples")
    if any(v is None for v in train):
        raise DataError(f"{source}: some training labels are empty; fix: give every row a label")
    if all(isinstance(v, str) for v in train):
        names = tuple(sorted(set(train)))
        if num_classes is not None and num_classes != len(names):
            raise DataError(
                f"data.num_classes: {num_classes}, but the training labels have {len(names)} names {list(names)[:10]}; "
                "fix: remove data.num_classes or correct it"
            )
        for split, labels in others.items():
            unknown = sorted({v for v in labels if v not in names})
            if unknown:
                raise DataError(
                    f"{source}: the {split} split has labels the training split lacks: {unknown[:10]}; "
                    "fix: make every class appear in the training split"
                )
        return LabelSpace(len(names), names)
    bad = [v for v in train if not _is_int_like(v)]
    if bad:
        raise DataError(
            f"{source}: label {bad[0]!r} is neither a whole number nor a name; fix: use class ids 0..C-1 or class "
            "names (strings) throughout the label column"
        )
    ids = {int(v) for v in train}
    low, high = min(ids), max(ids)
    if low < 0:
        raise DataError(
            f"{source}: label {low} is negative; fix: use class ids 0..C-1 (unlabelled rows, often -1, must be "
            "removed from training files)"
        )
    if num_classes is None:
        missing = sorted(set(range(high + 1)) - ids)
        if missing:
            raise DataError(
                f"{source}: the training labels are {sorted(ids)[:10]}{'...' if len(ids) > 10 else ''}, so classes "
                f"{missing[:10]} never occur; fix: renumber the classes 0..{len(ids) - 1}, or set data.num_classes "
                "if those classes really have no training example"
            )
        num_classes = high + 1
    for split, labels in {"training": train, **others}.items():
        for v in labels:
            if not _is_int_like(v) or not 0 <= int(v) < num_classes:
                raise DataError(
                    f"{source}: the {split} split has label {v!r}, outside 0..{num_classes - 1}; "
                    "fix: correct the label or data.num_classes"
                )
    return LabelSpace(num_classes)


def encode(labels: list, space: LabelSpace) -> list[int]:
    if space.names is None:
        return [int(v) for v in labels]
    index = {name: i for i, name in enumerate(space.names)}
    return [index[v] for v in labels]
