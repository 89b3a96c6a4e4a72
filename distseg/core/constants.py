"""Constants shared by training, evaluation and the shard contract (one place, no copies)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, images scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")  # image files a folder source reads
IGNORE_INDEX = 255  # label value meaning void / not annotated, after a dataset's labels are remapped
SHARD_SCHEMA_VERSION = 1  # the grouping-shard Parquet schema (docs/DESIGN.md); bump on any column change
