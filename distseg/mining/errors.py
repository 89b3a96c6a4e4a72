"""The one error `distseg mine` raises for a failed image or a crashed worker pool."""


class MiningError(RuntimeError):
    """Raised with --fail-fast: names the image, the stage and the reason."""
