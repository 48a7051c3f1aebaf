"""How much class information each exit position holds, whatever its trained head learned: linear probes on the
frozen pooled features of an early-exit checkpoint, fit the way stage 1 trains a head (SGD, momentum 0.9), with
and without a parameter-free LayerNorm before them. A probe that stays low says the position (or pooling it
over all positions) is the limit; a probe that gains from the norm says the features are too small for the lr.

  python -m benchmarks.exit_probe --checkpoint RUN/best.pth --data-set DIGITS [--epochs 12] [--lr 0.01]
"""
import argparse
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from benchmarks.common import measure_and_write, run_benchmark
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError, OneLineParser
from jobs.flags import add_flag, bounded, non_negative, positive
from jobs.trained_run import reopen, reopen_data
from learning_helpers.optim import seed_epoch
from models.early_exit_net import EarlyExitNetwork


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('python -m benchmarks.exit_probe', description=__doc__.split('\n')[0])
    add_flag(parser, '--checkpoint', required=True, help='a dynn-stage checkpoint (best.pth of a run)')
    add_flag(parser, '--data-set', default=None, choices=sorted(DATASET_CONFIG),
                        help="default: the data set the checkpoint was trained on")
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--epochs', check=positive, type=int, default=12,
             help='probe training epochs over the cached features')
    add_flag(parser, '--lr', check=bounded(0, 10, low_open=True), type=float, default=0.01,
             help='SGD lr of the probes (momentum 0.9, wd 5e-4)')
    add_flag(parser, '--train-passes', check=positive, type=int, default=2,
                        help='augmented passes over the training images whose features the probes train on')
    add_flag(parser, '--seed', check=non_negative, type=int, default=0)
    add_flag(parser, '--json', default=None, help='default: bench/exit_probe.json')
    return parser


@torch.no_grad()
def pooled_features(model: EarlyExitNetwork, dataset, passes: int = 1,
                    seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per intermediate exit (N, D_k), labels (N,)): what each exit's head reads, over `passes` passes, each
    pass's augmentation seeded from (seed, pass) as a training epoch's is."""
    features, labels = [], []
    for augmentation_pass in range(passes):
        loader = DataLoader(dataset, batch_size=128, num_workers=0)
        seed_epoch(seed, augmentation_pass, loader)
        for images, targets in loader:
            features.append(model.forward_pooled(images, through_final=False))
            labels.append(targets)
    return [torch.cat([batch[k] for batch in features]) for k in range(len(features[0]))], torch.cat(labels)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, norm: bool, epochs: int,
              lr: float, batch: int = 64, seed: int = 0) -> nn.Module:
    """A Linear head (after a LayerNorm without parameters when `norm`) trained with SGD on fixed features."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.LayerNorm(features.shape[1], elementwise_affine=False) if norm else nn.Identity(),
                          nn.Linear(features.shape[1], num_classes))
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch):
            index = order[start:start + batch]
            loss = nn.functional.cross_entropy(probe(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


@torch.no_grad()
def accuracy(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * (probe(features).argmax(-1) == labels).float().mean().item()


def measure(args: argparse.Namespace) -> dict:
    run = reopen(args.checkpoint)
    model = run.model.eval()
    data_set = args.data_set or run.args.data_set
    if data_set not in DATASET_CONFIG:
        raise GFNetDynnError(f'{args.checkpoint} does not say which data set it was trained on; pass --data-set')
    data = reopen_data(run.args, data_set, args.data_path)  # refuses a data set of other classes
    train, train_labels = pooled_features(model, data.train, args.train_passes, args.seed)
    val, val_labels = pooled_features(model, data.val)
    rows = []
    for k, (train_k, val_k) in enumerate(zip(train, val)):
        row = {'exit': k, 'position': model.exit_positions[k], 'width': train_k.shape[1],
               'feature_std': train_k.std().item()}
        for norm in (False, True):
            probe = fit_probe(train_k, train_labels, model.num_classes, norm=norm, epochs=args.epochs, lr=args.lr,
                              seed=args.seed)
            row['probe_norm' if norm else 'probe'] = accuracy(probe, val_k, val_labels)
        rows.append(row)
    return {'checkpoint': args.checkpoint, 'arch': run.args.arch, 'data_set': data_set, 'epochs': args.epochs,
            'lr': args.lr, 'num_val': len(val_labels), 'rows': rows}


def format_table(result: dict) -> str:
    lines = [f"{result['arch']} on {result['data_set']}: linear probes on frozen pooled features "
             f"({result['epochs']} epochs, SGD lr {result['lr']:g}), accuracy on {result['num_val']} validation images",
             f"{'exit':>4} {'after':>5} {'width':>5} {'feature std':>11} {'probe %':>8} {'norm + probe %':>14}"]
    lines += [f"{r['exit']:>4} {r['position']:>5} {r['width']:>5} {r['feature_std']:>11.3f} {r['probe']:>8.1f} "
              f"{r['probe_norm']:>14.1f}" for r in result['rows']]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(get_args_parser(), argv, lambda args: measure_and_write(
        'exit_probe', args.json, 'exit_probe.json', lambda: measure(args), format_table))


if __name__ == '__main__':
    sys.exit(main())
