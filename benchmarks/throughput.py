"""Training and evaluation images/s of GFNet-Ti and GFNet-XS at 64, 224 and 256 px.

  python -m benchmarks.throughput [--device cpu] [--json PATH]

Synthetic inputs (the model, not the decoder, is measured); 64 px uses 8-px patches (the DEMO set-up),
224 and 256 px the standard 16. Training = forward + backward + AdamW step.
"""
import argparse
import sys
import time

import timm
import torch

import models  # noqa: F401  (registers the GFNet variants with timm)
from benchmarks.common import json_path, run_benchmark, write_json
from errors import OneLineParser
from jobs.flags import add_flag, positive
from jobs.run_setup import resolve_device
from runtime.distributed import synchronize

CONFIGS = [('gfnet_ti', 64, 8), ('gfnet_ti', 224, 16), ('gfnet_ti', 256, 16),
           ('gfnet_xs', 64, 8), ('gfnet_xs', 224, 16), ('gfnet_xs', 256, 16)]


def images_per_second(step, batch: torch.Tensor, device: torch.device, seconds: float) -> float:
    """Run `step(batch)` for about `seconds` (at least once) after two warm-up calls."""
    step(batch)
    step(batch)
    synchronize(device)
    started, images = time.perf_counter(), 0
    while not images or time.perf_counter() - started < seconds:
        step(batch)
        synchronize(device)
        images += batch.shape[0]
    return images / (time.perf_counter() - started)


def measure(name: str, size: int, patch: int, device: torch.device, batch: int, seconds: float) -> dict:
    model = timm.create_model(name, num_classes=21, img_size=size, patch_size=patch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 21, (batch,), device=device)

    def train_step(x: torch.Tensor) -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def eval_step(x: torch.Tensor) -> None:
        model.eval()
        model(x)

    return {'model': name, 'input_size': size, 'patch_size': patch, 'batch': batch,
            'train_images_per_s': images_per_second(train_step, images, device, seconds),
            'eval_images_per_s': images_per_second(eval_step, images, device, seconds)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.throughput', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    add_flag(parser, '--batch', check=positive, type=int, default=None, help='default: 64 on CUDA, 8 on CPU')
    add_flag(parser, '--seconds', check=positive, type=float, default=3.0, help='timed seconds per measurement')
    add_flag(parser, '--json', default=None, help='default: bench/throughput_{device}.json')
    return parser


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device, None)
    path = json_path(args.json, f'throughput_{device.type}.json')
    batch = args.batch or (64 if device.type == 'cuda' else 8)
    rows = [measure(name, size, patch, device, batch, args.seconds) for name, size, patch in CONFIGS]
    print(f"device {device}, {torch.get_num_threads()} threads, batch {batch}")
    print(f"{'model':>9} {'px':>4} {'patch':>5} {'train img/s':>12} {'eval img/s':>11}")
    for row in rows:
        print(f"{row['model']:>9} {row['input_size']:4d} {row['patch_size']:5d} {row['train_images_per_s']:12.1f} "
              f"{row['eval_images_per_s']:11.1f}")
    write_json({'device': str(device), 'threads': torch.get_num_threads(), 'results': rows}, path, 'throughput')
    print(f'written: {path}')


def main(argv: list[str] | None = None) -> int:
    """Entry point: a user mistake prints one line and exits 2."""
    return run_benchmark(get_args_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
