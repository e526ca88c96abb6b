"""Small stand-ins written in the real on-disk formats: CIFAR-10 pickles, an IDDPM state_dict, a diffusers folder."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from itdcli.models.diffusers_unet import DDPM_CIFAR10_SCHEDULER

CIFAR_FILES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
DDPM_SMALL = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": None,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "norm_eps": 1e-6,
}
DDPM_SCHEDULER = DDPM_CIFAR10_SCHEDULER


def write_cifar(folder: Path, n: int = 20, seed: int = 0) -> None:
    """A fake cifar-10-batches-py/ with n images per batch file and an .itd-md5.json listing their md5s."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in CIFAR_FILES:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {
            "data": rows,
            "labels": rng.integers(0, 10, n).tolist(),
            "batch_label": name,
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [str(k) for k in range(10)], "num_cases_per_batch": n, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    (folder / ".itd-md5.json").write_text(json.dumps(md5s))


def save_iddpm(path: Path, seed: int = 0) -> None:
    """The IDDPM-small stand-in (models.md §5) with its zero-initialised layers re-drawn, saved as upstream does."""
    from itdcli.models.iddpm_unet import IDDPMConfig, IDDPMUNet

    torch.manual_seed(seed)
    config = IDDPMConfig(32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,))
    unet = IDDPMUNet(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(("out_layers.3.weight", "proj_out.weight", "out.2.weight")):
                p.normal_(0, 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(unet.state_dict(), path)


def save_ddpm(folder: Path, seed: int = 0) -> None:
    """The DDPM-small stand-in (models.md §5) and a DDPMScheduler with the Hub settings, in one flat folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(**DDPM_SMALL).save_pretrained(folder)
    DDPMScheduler(**DDPM_SCHEDULER).save_pretrained(folder)
