"""MaskDistill masks on a Ray cluster (the same as `distseg distill masks`).

ray job submit --working-dir . -- python jobs/distill_masks.py --config maskdistill --input s3://bucket/images \
    --shards s3://bucket/vit_masks priors.vit_masks.weights=dino_deitsmall16_pretrain.pth priors.vit_masks.num_gpus=1
"""

from distseg.cli import main

if __name__ == "__main__":
    import sys

    main(["distill", "masks", *sys.argv[1:]])
