"""configs/adversarial_da_exp.py: every variant builds, with Adversarial_DA_Exp's values."""

import pytest

from configs import adaptseg, adversarial_da_exp, common, source_only
from jaxda import mesh as mesh_lib
from jaxda.data import labels
from jaxda.train import trainer

VARIANTS = [
    "", "bugs", "source_only", "model=deeplabv3plus", "model=deeplabv3plus,bugs",
    "source_only,model=deeplabv3plus", "shift=groups", "shift=groups,source_only",
    "shift=groups,model=deeplabv3plus",
]  # fmt: skip


@pytest.mark.parametrize("arg", VARIANTS)
def test_variant_builds_with_the_published_values(arg):
    config = adversarial_da_exp.get_config(arg)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    v3 = "deeplabv3plus" in arg
    assert (config.optimizer.learning_rate, config.optimizer.weight_decay) == (2.5e-4, 5e-4)
    assert config.model.bn_mode == "train" and config.data.eval.size == (512, 1024)
    assert config.data.eval.label_size == (512, 1024)
    assert config.loss.lambda_seg_aux == (0.0 if v3 else 0.1)
    if v3:
        assert (config.model.depth, config.model.multi_grid) == (101, (1, 2, 4))
        assert (config.model.variant, config.model.multi_level) == ("jfzhang95", False)
        assert config.batch_size == 2
    heads = set(setup.abstract_state.params.get("disc", {}))
    if "source_only" in arg:
        assert config.method == "source_only" and not heads
        assert (config.total_steps, config.optimizer.decay_steps) == (80_000, 200_000)
    else:
        assert heads == ({"main"} if v3 else {"main", "aux"})
        assert config.adversarial.lambda_adv.to_dict() == {"main": 0.001, "aux": 0.0002}
        assert config.adversarial.replicate_da_exp_bugs == ("bugs" in arg)
        images = 1246 if "groups" in arg else 2975
        assert config.total_steps == 2 * ((images + config.batch_size) // config.batch_size)
    if "groups" in arg:
        assert config.num_classes == 19 and config.eval.classes == ()
        subsets = [config.data[s].subset for s in ("source", "target", "eval")]
        assert subsets == [f"cityscapes_group{g}" for g in ("0_train", "1_train", "1_val")]
        assert {config.data[s].split for s in ("source", "target", "eval")} == {"train"}
    else:
        assert config.data.source.size == (720, 1280)
        assert config.eval.classes == labels.SYNTHIA_16_CLASSES


def test_group_shift_is_a_data_argument_of_the_method_configs():
    for module in (source_only, adaptseg):
        config = module.get_config("source=cityscapes_group0")
        assert config.data.target.subset == "cityscapes_group1_train"
        trainer.build(config, mesh_lib.make_mesh(1))
    assert common.base_config().data.source.subset == ""
    with pytest.raises(ValueError, match="source_only has none"):
        adversarial_da_exp.get_config("source_only,bugs")
