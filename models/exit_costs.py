"""The exit-cost vectors the gates trade against (`--exit-costs`), one entry each: its builder, its help line,
and whether it counts GFNet only. To add a vector: its builder and one `EXIT_COSTS` entry."""
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from models.flops import normalized_exit_costs, reference_normalized_exit_costs


@dataclass(frozen=True)
class CostInputs:
    """What a builder may read: the model whose exits are costed (on its device), that device, and the timing
    that measures its exits' batch-1 latency (handed in from below-the-models code: models/ times nothing)."""
    model: torch.nn.Module
    device: torch.device
    measure_latency: Callable[[torch.nn.Module], list[float]] | None = None


class ExitCosts(NamedTuple):
    """build(inputs) -> cost of each exit as a fraction of the full network, the final exit 1; gfnet_only: a
    vector only a GFNet has (another family trains against `flops` instead, and an explicit choice is an error)."""
    build: Callable[[CostInputs], list[float]]
    help: str
    gfnet_only: bool = False


EXIT_COSTS = {
    'reference': ExitCosts(lambda inputs: reference_normalized_exit_costs(inputs.model),
                           "the reference counter's flatter vector, so --ce_ic_tradeoff means what it means there",
                           gfnet_only=True),
    'flops': ExitCosts(lambda inputs: normalized_exit_costs(inputs.model),
                       'true FLOPs: the same lambda exits earlier, see docs/METHOD.md'),
    'latency': ExitCosts(lambda inputs: inputs.measure_latency(inputs.model),
                         "each exit's measured batch-1 latency on this machine, a share of the full network's "
                         '(measured once when the run starts and recorded, so --resume keeps it)'),
}
DEFAULT_EXIT_COSTS = 'flops'  # what a family without a GFNet-only vector trains against


def exit_costs_help() -> str:
    """`--exit-costs`'s help line, from the entries."""
    return ('exit costs the gates trade against: ' + '; '.join(f'{name}: {entry.help}' for name, entry in
                                                                EXIT_COSTS.items())
            + '; reported GFLOPs are always true FLOPs')
