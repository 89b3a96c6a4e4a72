"""Sweep a method's knobs with Ray Tune on a Ray cluster (the same as `distseg tune`).

ray job submit --working-dir . -- python jobs/tune.py --space tune_spaces/hiergroup.yaml --shards SHARDS
"""

from distseg.cli import main

if __name__ == "__main__":
    import sys

    main(["tune", *sys.argv[1:]])
