"""Leaf modules every stage shares: the registry, constants. They import nothing from distseg."""
