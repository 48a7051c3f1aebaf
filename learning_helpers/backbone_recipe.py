"""Stage 0's recipe, GFNet's transfer script through timm's factories: the optimizer (no weight decay on norms, biases
and other 1-d parameters), the warm-up + cosine schedule, and Mixup/CutMix with the criterion that reads its
soft targets."""
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2

from errors import GFNetDynnError

TIMM_OPTIMIZERS = {'adamw': 'adamw', 'sgd': 'momentum'}  # our sgd: momentum 0.9 without Nesterov, as before


@dataclass(frozen=True)
class BackboneRecipe:
    """The stage-0 values of the command line (lr unscaled, as given)."""
    opt: str
    lr: float
    lr_base_batch: int  # 0: no scaling
    weight_decay: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: int
    cooldown_epochs: int
    num_epochs: int
    clip_grad: float  # 0: no clipping
    smoothing: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str

    def __post_init__(self):
        if self.cooldown_epochs >= self.num_epochs:
            raise GFNetDynnError(f'--cooldown-epochs {self.cooldown_epochs} leaves no epoch of the --num_epoch '
                                 f'{self.num_epochs} for the cosine: pass fewer cool-down epochs')

    def scaled_lr(self, total_batch: int) -> float:
        """GFNet's linear scaling rule: lr x total batch / lr_base_batch (512)."""
        return self.lr * total_batch / self.lr_base_batch if self.lr_base_batch else self.lr

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def build_mixup(recipe: BackboneRecipe, num_classes: int, batch: int) -> Mixup | None:
    """timm's Mixup/CutMix with the label smoothing inside it, or None when both are off."""
    if not recipe.mixes:
        return None
    if batch % 2:
        raise GFNetDynnError(f'--mixup and --cutmix mix each image with another of its batch and need an even --batch, '
                             f'got {batch}: pass an even --batch, or --mixup 0 --cutmix 0')
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                 switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode, label_smoothing=recipe.smoothing,
                 num_classes=num_classes)


def base_criterion(recipe: BackboneRecipe) -> nn.Module:
    """Soft-target CE under Mixup (the smoothing is in its targets), else label-smoothed CE, else plain CE."""
    if recipe.mixes:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(recipe.smoothing) if recipe.smoothing > 0 else nn.CrossEntropyLoss()


def build_backbone_optimizer(model: nn.Module, extra: nn.Module, recipe: BackboneRecipe,
                             total_batch: int) -> torch.optim.Optimizer:
    """timm's optimizer factory on the model (its no_weight_decay names exempted too), plus the learned parts of
    the loss (freq's projections) under the same weight-decay rule."""
    optimizer = create_optimizer_v2(model, TIMM_OPTIMIZERS[recipe.opt], lr=recipe.scaled_lr(total_batch),
                                    weight_decay=recipe.weight_decay, momentum=0.9)
    for group in param_groups_weight_decay(extra, recipe.weight_decay):
        if group['params']:
            optimizer.add_param_group(group)
    return optimizer


def build_backbone_scheduler(optimizer: torch.optim.Optimizer, recipe: BackboneRecipe):
    """timm's cosine schedule, stepped with the next epoch's index after each epoch: --warmup-epochs linear from
    --warmup-lr, cosine to --min-lr at num_epochs - cooldown_epochs, then --min-lr."""
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=recipe.num_epochs - recipe.cooldown_epochs,
                                       cooldown_epochs=recipe.cooldown_epochs, min_lr=recipe.min_lr,
                                       warmup_lr=recipe.warmup_lr, warmup_epochs=recipe.warmup_epochs)
    return scheduler
