"""Pretrain pixel embeddings on a Ray cluster (the same as `distseg pretrain`).

ray job submit --working-dir . -- python jobs/pretrain.py --config hiergroup --shards SHARDS pretrain.num_workers=4
"""

from distseg.cli import main

if __name__ == "__main__":
    import sys

    main(["pretrain", *sys.argv[1:]])
