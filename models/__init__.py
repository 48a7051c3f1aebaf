"""What computes: GFNet and GFNet-Dynn, exits and gates, the exit rule, FLOP counting, weight filters.

Importing the package registers every GFNet and GFNet-Dynn variant with timm (`timm.create_model('gfnet_xs')`);
`TimmDynn` puts the same exits on a timm ResNet, EfficientNet, MobileNetV3, ConvNeXt or ViT.
"""
from models.early_exit_net import EarlyExitNetwork
from models.flops import count_flops, exit_gflops, normalized_exit_costs
from models.gfnet import GFNet, checkpoint_filter_fn
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS, DynnOutput, GFNetDynn
from models.timm_dynn import TimmDynn
from models.weights import load_checkpoint, load_state, read_checkpoint

__all__ = ['DEFAULT_EXIT_POSITIONS', 'DynnOutput', 'EarlyExitNetwork', 'GFNet', 'GFNetDynn', 'TimmDynn',
           'checkpoint_filter_fn', 'count_flops', 'exit_gflops', 'load_checkpoint', 'load_state',
           'normalized_exit_costs', 'read_checkpoint']
