"""Importing this module registers every GFNet and GFNet-Dynn variant with timm (`timm.create_model(args.arch)`)."""
import models.gfnet  # noqa: F401  (GFNet-ti ... GFNet-b)
import models.gfnet_dynn  # noqa: F401  (their -dynn twins)
