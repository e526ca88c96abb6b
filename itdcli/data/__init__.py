"""Datasets: bundled names, image folders and .npz arrays, held in memory as level indices or floats."""

from itdcli.data.dataset import Dataset, dataset_names, load_data

__all__ = ["Dataset", "dataset_names", "load_data"]
