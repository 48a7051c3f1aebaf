"""Models: `import models.registry` (or any model module) registers the GFNet and GFNet-Dynn variants with timm;
`TimmDynn` puts the same exits on a timm ResNet, EfficientNet, MobileNetV3, ConvNeXt or ViT.

The package itself imports nothing, so that the ONNX runner (`python -m models.onnx_runner`) starts without
torch; its public names load on first use.
"""
import importlib

_HOMES = {
    'count_flops': 'models.flops', 'exit_gflops': 'models.flops', 'normalized_exit_costs': 'models.flops',
    'GFNet': 'models.gfnet', 'checkpoint_filter_fn': 'models.gfnet',
    'DEFAULT_EXIT_POSITIONS': 'models.gfnet_dynn', 'DynnOutput': 'models.gfnet_dynn', 'GFNetDynn': 'models.gfnet_dynn',
    'EarlyExitNetwork': 'models.early_exit_net', 'TimmDynn': 'models.timm_dynn',
    'load_checkpoint': 'models.weights', 'load_state': 'models.weights', 'read_checkpoint': 'models.weights',
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(_HOMES[name]), name)
