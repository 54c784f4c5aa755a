"""Default configuration: PSPNet-50 with the official recipe (hszhao/semseg, ADE20K yaml).

The values, each with the yaml key it mirrors, live in psp_jax/config_schema.py (the one
declaration of every key, which the config checks read too). Any key can be overridden:

  python train.py --config configs/default.py --workdir runs/x --config.optim.base_lr=0.02
"""

from psp_jax.config_schema import get_config

__all__ = ['get_config']
