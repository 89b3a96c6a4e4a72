"""The `distill.*` config section: MaskDistill part 2 (Mask R-CNN on the pseudo masks, confident masks,
the segmentation model). A leaf module (pydantic and core.section only), assembled into the Config by
distseg.config.

Defaults are paper-sized (Van Gansbeke et al. 2022, Sec. 4.1 and Appendix A); the numbers the stored
text of the paper lost come from the setups it cites: Mask R-CNN from He et al.'s VOC recipe
(MoCo's detectron2 config: lr 0.02, 24k iterations, decay x0.1 at 18k and 22k, 100 warm-up
iterations, short side drawn from 480..800, 800 at test, first two stages frozen) and DeepLab-v3 from
MaskContrast's (SGD lr 0.002, momentum 0.9, weight decay 1e-4, 45 epochs, x0.1 after 40, batch 16,
first two ResNet stages frozen). `maskdistill_demo` shrinks them to CPU size.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from distseg.core.section import Section


class DistillTrainConfig(Section):
    """What both distillation networks share: the backbone's origin, the optimiser, placement."""

    backend: str = Field(
        "torchvision", description="the model builder by registry name (a detectron2 one may be added)"
    )
    backbone: str = Field("resnet50", description="torchvision ResNet: resnet18 | resnet34 | resnet50 | resnet101")
    weights: str | None = Field(None, description="a local torchvision-ResNet state_dict for the backbone (e.g. MoCo)")
    checkpoint: str | None = Field(
        None, description="a distseg checkpoint whose model.backbone is this torchvision ResNet: its trunk weights"
    )
    batch_size: int = Field(16, ge=1, description="images per step per worker")
    lr: float = Field(0.02, gt=0, description="SGD learning rate (before warm-up and decay)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay")
    gamma: float = Field(0.1, gt=0, le=1, description="learning-rate factor at each milestone")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (from warmup_factor x lr)")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="the warm-up's starting fraction of lr")
    flip: bool = Field(True, description="random horizontal flips")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker")
    use_gpu: bool = Field(False, description="one GPU per worker")
    log_every: int = Field(20, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints")
    num_to_keep: int | None = Field(2, ge=1, description="checkpoints kept (null: all)")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (resume from the last checkpoint)")

    @model_validator(mode="after")
    def _one_init(self):
        if self.weights and self.checkpoint:
            raise ValueError("give the backbone's weights or a distseg checkpoint, not both")
        return self


class MaskRCNNConfig(DistillTrainConfig):
    """`distseg distill train`: Mask R-CNN on the clustered masks (Sec. 3.2, Appendix A.1)."""

    steps: int = Field(24000, ge=1, description="optimizer steps")
    milestones: list[int] = Field([18000, 22000], description="steps where lr *= gamma")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    trainable_layers: int = Field(
        3, ge=0, le=5, description="ResNet stages trained, counted from the top (3: stem and res2 frozen, as the paper)"
    )
    min_sizes: list[int] = Field(
        list(range(480, 801, 32)), min_length=1, description="training short side, drawn per image from this list"
    )
    test_size: int = Field(800, ge=16, description="short side at inference")
    max_size: int = Field(1333, ge=16, description="cap of the long side")
    detections: int = Field(100, ge=1, description="detections kept per image at inference")


class ConfidentConfig(Section):
    """`distseg distill confident`: the trained Mask R-CNN over the dataset -> pseudo label maps (Sec. 3.3)."""

    threshold: float = Field(0.9, ge=0, le=1, description="keep predictions with score >= this (0.9 in the paper)")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="binarise the predicted soft masks at this")
    max_overlap: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="a mask sharing more than this fraction of its pixels with a more confident kept one is dropped",
    )
    batch_size: int = Field(4, ge=1, description="images per actor call")
    num_actors: int | None = Field(
        None,
        ge=1,
        description="actor pool size (default: the cluster's available CPUs, at most one actor per 8 images)",
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU actors)")


class SegmentConfig(DistillTrainConfig):
    """`distseg distill segment`: DeepLab-v3 on the pseudo label maps, hard pixel mining (Sec. 3.3)."""

    lr: float = Field(0.002, gt=0, description="SGD learning rate")
    epochs: float = Field(45, gt=0, description="passes over the pseudo-labelled images")
    milestones: list[float] = Field([40], description="epochs where lr *= gamma")
    hard_fraction: float = Field(
        0.2, gt=0, le=1, description="cross entropy on the top fraction of hardest labelled pixels (1: plain CE)"
    )
    frozen_stages: int = Field(2, ge=0, le=5, description="ResNet stages frozen from the input (stem, res2, ...)")
    crop: int = Field(512, ge=32, description="side of the square training crops")
    scale_range: tuple[float, float] = Field((0.75, 1.25), description="random rescaling (ScaleNRotate)")
    rotate: float = Field(5.0, ge=0, description="random rotation, +-degrees (ScaleNRotate)")
    crf: bool = Field(False, description="refine predictions with a dense CRF (needs pydensecrf; skipped otherwise)")


class DistillConfig(Section):
    """MaskDistill part 2."""

    maskrcnn: MaskRCNNConfig = MaskRCNNConfig()
    confident: ConfidentConfig = ConfidentConfig()
    segment: SegmentConfig = SegmentConfig()
