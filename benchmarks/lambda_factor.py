"""What a λ means under each exit-cost vector, for every data set's default input size: the gates' two cost
vectors (`--exit-costs reference`, the default, and `flops`) and the factor that turns a λ under true FLOPs into
the λ that draws the same gate targets under the reference's vector (the table in docs/METHOD.md).

  python -m benchmarks.lambda_factor [--arch GFNet-xs-dynn] [--patch-size 16] [--json PATH]
"""
import argparse
import sys

import timm

from benchmarks.common import measure_and_write, run_benchmark
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError, OneLineParser
from jobs.flags import add_flag, positive
from models.flops import lambda_factor
from models.model_factory import DEFAULT_ARCH, DEFAULT_PATCH_SIZE, arch_choices, dynn_model_name
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('python -m benchmarks.lambda_factor', description=__doc__.split('\n')[0])
    add_flag(parser, '--arch', type=str, default=DEFAULT_ARCH, choices=arch_choices(), help='GFNet-Dynn variant')
    add_flag(parser, '--patch-size', check=positive, type=int, default=DEFAULT_PATCH_SIZE, help='patch side')
    add_flag(parser, '--json', type=str, default=None, help='output JSON (default: bench/lambda_factor.json)')
    return parser


def factor_rows(arch: str, patch_size: int) -> list[dict]:
    """One row per data set entry: its default input size, both cost vectors and the λ factor."""
    smallest = min(entry['default_input_size'] for entry in DATASET_CONFIG.values())
    if patch_size > smallest:
        raise GFNetDynnError(f'--patch-size {patch_size} is larger than the smallest data set input ({smallest} px): '
                             f'a patch must fit in every image; pass at most {smallest}')
    rows = []
    for name, entry in sorted(DATASET_CONFIG.items()):
        size = entry['default_input_size']
        model = timm.create_model(dynn_model_name(arch), num_classes=entry['num_classes'], img_size=size,
                                  patch_size=patch_size, exit_positions=DEFAULT_EXIT_POSITIONS)
        rows.append({'data_set': name, 'input_size': size, 'grid': list(model.grid_size), **lambda_factor(model)})
    return rows


def format_table(result: dict) -> str:
    lines = [f"{result['arch']}, patch {result['patch_size']}, exits after blocks "
             f"{' '.join(map(str, result['exit_positions']))}",
             f"{'data set':<11} {'size':>5} {'grid':>6}  {'reference costs':<31} {'true FLOP costs':<31} {'factor':>6}"]
    for row in result['rows']:
        vector = lambda costs: ' '.join(f'{c:.3f}' for c in costs[:-1]) + ' 1'  # noqa: E731
        lines.append(f"{row['data_set']:<11} {row['input_size']:>5} {'x'.join(map(str, row['grid'])):>6}  "
                     f"{vector(row['reference_costs']):<31} {vector(row['flops_costs']):<31} {row['mean']:6.2f}")
    lines.append('factor: λ under --exit-costs flops acts like λ x factor under --exit-costs reference')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    def measure(args: argparse.Namespace) -> dict:
        return {'arch': args.arch, 'patch_size': args.patch_size, 'exit_positions': list(DEFAULT_EXIT_POSITIONS),
                'rows': factor_rows(args.arch, args.patch_size)}
    return run_benchmark(get_args_parser(), argv, lambda args: measure_and_write(
        'lambda_factor', args.json, 'lambda_factor.json', lambda: measure(args), format_table))


if __name__ == '__main__':
    sys.exit(main())
