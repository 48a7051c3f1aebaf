"""Models: importing this package registers the GFNet and GFNet-Dynn variants with timm."""
from models.flops import count_flops, exit_gflops, normalized_exit_costs
from models.gfnet import GFNet, checkpoint_filter_fn
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS, DynnOutput, GFNetDynn
from models.weights import load_checkpoint, load_state, read_checkpoint

__all__ = ['GFNet', 'GFNetDynn', 'DynnOutput', 'DEFAULT_EXIT_POSITIONS', 'checkpoint_filter_fn', 'count_flops',
           'exit_gflops', 'normalized_exit_costs', 'load_checkpoint', 'load_state', 'read_checkpoint']
