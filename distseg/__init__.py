"""distseg: Ray-distributed self-supervised semantic segmentation."""

__version__ = "0.1.0"
