"""The ImageNet statistics every image is normalised with (RGB, on the 0..255 scale).

tool/train.py and tool/test.py: mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225]
times value_scale 255. Training (psp_jax.data.transforms), inference (psp_jax.inference.planning)
and TensorBoard's pictures all read them here. NumPy-free and TF-free on purpose: predict
imports it without TensorFlow.
"""

MEAN_RGB: tuple[float, float, float] = tuple(v * 255 for v in (0.485, 0.456, 0.406))
STD_RGB: tuple[float, float, float] = tuple(v * 255 for v in (0.229, 0.224, 0.225))

# config.data.transfer_dtype: how training images travel from the input pipeline to the
# devices. 'float32': normalised on the host. 'uint8': the augmented image on the 0..255
# scale rounded to integers (a quarter of the bytes), normalised inside the train step
# (psp_jax.train.train_step.normalised_images) with the same float32 arithmetic.
TRANSFER_DTYPES = ('float32', 'uint8')
