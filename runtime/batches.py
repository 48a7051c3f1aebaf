"""One pass over a loader under a progress bar (main process only), at most a given number of batches: the
iterator every training and evaluation loop runs on."""
from typing import Iterator

import torch
from tqdm import tqdm

from runtime.distributed import is_main_process


def batches_per_epoch(loader, max_batches: int | None) -> int:
    return min(len(loader), max_batches or len(loader))


def batches(loader, desc: str, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's (images, targets) batches under a progress bar, at most max_batches of them."""
    bar = tqdm(loader, desc=desc, leave=False, disable=not is_main_process(),
               total=batches_per_epoch(loader, max_batches))
    for step, batch in enumerate(bar):
        if max_batches is not None and step >= max_batches:
            break
        yield batch
