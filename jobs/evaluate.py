"""Evaluate a checkpoint on a Ray cluster (the same as `distseg evaluate`).

ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint CKPT --dataset msrc --baseline random,rgbxy
"""

from distseg.cli import main

if __name__ == "__main__":
    import sys

    main(["evaluate", *sys.argv[1:]])
