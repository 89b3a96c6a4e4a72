"""MaskDistill end to end on a Ray cluster (the same as `distseg distill run`; rerun to resume).

ray job submit --working-dir . -- python jobs/distill_run.py --config maskdistill --input s3://bucket/images \
    --root /mnt/shared/maskdistill priors.vit_masks.weights=dino_deitsmall16_pretrain.pth \
    distill.maskrcnn.weights=moco_r50.pth distill.maskrcnn.use_gpu=true distill.maskrcnn.num_workers=4 \
    distill.confident.num_gpus=1 distill.segment.weights=moco_r50.pth distill.segment.use_gpu=true
"""

from distseg.cli import main

if __name__ == "__main__":
    import sys

    main(["distill", "run", *sys.argv[1:]])
