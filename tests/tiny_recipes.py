"""Recipes the CLI tests build their bad inputs from (a test helper module, no tests)."""

# The smallest dense recipe: 7-class segmentation on 32x32 synthetic scenes, SegNet at 1/16
# width (split attention unless a test adds one), one CPU epoch of one step.
TINY_SEGMENTATION_RECIPE = """
[model.backbone]
name = "segnet"
params = { width = 0.0625 }
[tasks.segmentation]
name = "segmentation"
params = { num_classes = 7 }
[data]
name = "synthetic_scenes"
params = { height = 32, width = 32, num_train = 2, num_val = 2, num_classes = 7 }
[training]
epochs = 1
batch_size = 2
device = "cpu"
"""
