"""A trained run reopened from its checkpoint: its stored arguments as one typed record, its early-exit model rebuilt
as it was trained, and the images of the split it trained on. --eval, --export, --resume and the benchmarks start
here rather than each reading the checkpoint's dict."""
import logging
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Sequence

import torch.nn as nn

from data_loader_help import DataSets, SplitRequest, build_datasets, resolve_data_path
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError
from models.exit_heads import ExitHeadConfig, exit_head_classes
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS
from models.model_factory import DEFAULT_ARCH, DEFAULT_PATCH_SIZE, build_dynn, is_gfnet
from models.weights import load_state, read_checkpoint

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunArgs:
    """A checkpoint's stored run arguments, typed. The defaults an older or foreign checkpoint falls back to live here
    only; a key the record does not name stays in `stored`, a missing or null one takes the default."""
    arch: str = DEFAULT_ARCH
    patch_size: int = DEFAULT_PATCH_SIZE
    input_size: int | None = None
    exit_positions: Sequence[int] = DEFAULT_EXIT_POSITIONS
    gate: str = 'unc'
    exit_head: str = ExitHeadConfig.kind
    exit_norm: str = ExitHeadConfig.norm
    exit_grid: int = ExitHeadConfig.grid
    class_names: Sequence[str] | None = None
    data_set: str | None = None
    ce_ic_tradeoff: float | None = None
    num_epoch: int | None = None
    batch: int | None = None
    split: dict | None = None  # data_splits.split_record of the run's split
    stored: dict = field(default_factory=dict, repr=False, compare=False)  # the whole dict, as saved

    @classmethod
    def from_dict(cls, stored: dict | None, fallback: dict | None = None) -> 'RunArgs':
        """The record of `stored` (a checkpoint's 'args'); `fallback` (e.g. this job's flags) fills what it lacks."""
        stored = stored if isinstance(stored, dict) else {}
        given = {**(fallback or {}), **{key: value for key, value in stored.items() if value is not None}}
        names = {f.name for f in fields(cls)} - {'stored'}
        return cls(**{key: value for key, value in given.items() if key in names and value is not None},
                   stored=dict(stored))

    @classmethod
    def of(cls, checkpoint: dict, fallback: dict | None = None) -> 'RunArgs':
        return cls.from_dict(checkpoint.get('args'), fallback)

    def given(self, name: str):
        """What the checkpoint itself stored under `name` (None when it stored nothing), before any default."""
        return self.stored.get(name)

    def recorded_split(self, data_set: str) -> dict | None:
        """The split the run trained on, when it was of this data set (not, say, ImageNet weights)."""
        split = self.split
        return split if isinstance(split, dict) and split.get('dataset') == data_set else None

    @property
    def exit_head_config(self) -> ExitHeadConfig:
        return ExitHeadConfig(self.exit_head, self.exit_norm, self.exit_grid)


class TrainedRun(NamedTuple):
    model: nn.Module  # the early-exit network (GFNetDynn or TimmDynn), in eval mode on the CPU
    args: RunArgs  # with input_size and class_names filled in
    checkpoint: dict


def reopen(checkpoint: dict | str, source: str | None = None, *, input_size: int | None = None,
           fallback: dict | None = None) -> TrainedRun:
    """The early-exit model of a dynn-stage checkpoint (a path or one already read), rebuilt from its own run args
    at `input_size` if given (grids are resized)."""
    if isinstance(checkpoint, str):
        source, checkpoint = checkpoint, read_checkpoint(checkpoint)
    weights = checkpoint.get('model', checkpoint)
    args = RunArgs.of(checkpoint, fallback)
    gfnet = is_gfnet(args.arch)
    head = weights.get('head.weight')
    if head is None and gfnet:
        raise GFNetDynnError(f'{source} has no head.weight: not a GFNet checkpoint')
    if checkpoint.get('stage') == 'backbone' or not any(key.startswith('intermediate_heads.') for key in weights):
        raise GFNetDynnError(f'{source} has no trained exits (a backbone checkpoint); pass a best.pth of the dynn '
                             f'stage, e.g. train one with --checkpoint-path {source}')
    if checkpoint.get('stage') == 'warmup':
        _logger.warning('%s comes from the warm-up: its exits are trained, its gates are not', source)
    num_classes = head.shape[0] if gfnet else exit_head_classes(weights)
    size = input_size or args.input_size
    # a timm backbone's run always stores its positions; without them, the family's default (None)
    positions = args.given('exit_positions') or (list(DEFAULT_EXIT_POSITIONS) if gfnet else None)
    model = build_dynn(args.arch, num_classes, size, args.patch_size, 0.0, positions, args.gate,
                       args.exit_head_config)
    report = load_state(model, checkpoint, source=source)
    if any(key.startswith('intermediate_heads.') for key in report.fresh):
        raise GFNetDynnError(f'{source} lacks some exits of its own --exit-positions; pass a checkpoint written by '
                             f'the dynn stage')
    class_names = args.class_names or [str(i) for i in range(num_classes)]
    return TrainedRun(model.eval(), replace(args, input_size=size, class_names=class_names,
                                            exit_positions=tuple(model.exit_positions)), checkpoint)


def reopen_data(args: RunArgs, data_set: str, data_path: str | None, *, need_train: bool = True) -> DataSets:
    """The images of the split the run trained on (its calibration share included), at the run's input size. A data
    set of other classes is one line: by their count before any image is read (or generated), by name after."""
    num_classes = len(args.class_names or [])  # reopen fills in placeholder names where the run stored none
    other_classes = GFNetDynnError(f'the run was trained on other classes than those of {data_set}; pass the '
                                   f'--data-set it was trained on ({args.data_set})')
    if num_classes and DATASET_CONFIG.get(data_set, {}).get('num_classes', num_classes) != num_classes:
        raise other_classes
    data = build_datasets(data_set, resolve_data_path(data_set, data_path), args.input_size,
                          split=SplitRequest.reusing(args.recorded_split(data_set)), need_train=need_train)
    stored_names = args.given('class_names')
    if (num_classes and len(data.classes) != num_classes) or (stored_names and list(data.classes) != stored_names):
        raise other_classes
    return data
