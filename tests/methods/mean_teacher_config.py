"""Config of the test-only mean-teacher method: warm-up (source only), an offline pass of
pseudo labels over the target split, then mean-teacher self-training from both.

  stages.run(get_config(), workdir)   # or :stage=NAME for one stage
"""

import ml_collections

from configs import common
from tests.methods import mean_teacher  # noqa: F401  (registers the method)


def get_config(arg=None):
    args = common.parse_arg(arg, stage="")
    config = common.base_config()
    common.use_synthetic(config)
    config.method = "mean_teacher_test"
    config.mean_teacher = ml_collections.ConfigDict(
        {"threshold": 0.5, "lambda_target": 1.0, "momentum": 0.9}
    )
    config.stage_order = ("warmup", "pseudo_labels", "self_training")
    config.stages = ml_collections.ConfigDict(
        {
            "warmup": {"method": "source_only"},
            "pseudo_labels": {
                "init_from": "stage:warmup",
                "offline": {"pass": "predictions", "stream": "target"},
            },
            "self_training": {
                "init": {"seg": "stage:warmup"},  # The teacher starts as a copy of it.
                "data": {"target": {"artifacts": "stage:pseudo_labels"}},
            },
        }
    )
    config.stage = args.stage
    return config
