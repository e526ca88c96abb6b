"""Named datasets: a plain dict from name to a function that loads it."""

from __future__ import annotations

from collections.abc import Callable

from itdcli.data.cifar import cifar_test, cifar_train
from itdcli.data.dataset import Dataset
from itdcli.data.digits import digits_test, digits_train

Loader = Callable[[], Dataset]

REGISTRY: dict[str, Loader] = {
    "digits_train": digits_train,
    "digits_test": digits_test,
    "cifar_train": cifar_train,
    "cifar_test": cifar_test,
}


def register_dataset(name: str, loader: Loader) -> None:
    """Add (or replace) a named dataset."""
    REGISTRY[name] = loader
