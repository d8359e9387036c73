"""A full da-sac SAC snapshot (student, momentum teacher, class prior; DDP keys with
`num_batches_tracked`) converted into configs/dasac.py's network: the student's outputs match
the PyTorch reference (`torch_reference.DeepLabV2Torch`, one head summing four ASPP branches)
in both BN modes, and nothing of the teacher leaks in."""

import jax
import jax.numpy as jnp
import pytest

from configs import dasac
from jaxda import checkpoints, models
from jaxda.interop import convert
from tests.interop.test_parity import TOLERANCE, randomize, relative_error

torch = pytest.importorskip("torch")
torch_reference = pytest.importorskip("jaxda.interop.torch_reference")

STAGE_SIZES, WIDTH, DILATIONS = (2, 1, 2, 1), 8, (1, 2, 3, 4)


def _network(seed: int):
    torch.manual_seed(seed)
    model = torch_reference.DeepLabV2Torch(
        num_classes=19,
        layers=STAGE_SIZES,
        width=WIDTH,
        num_aspp_branches=4,
        multi_level=False,
        aspp_dilations=DILATIONS,
    )
    generator = torch.Generator().manual_seed(seed + 1)
    randomize(model, seed + 2, torch.randn(2, 3, 64, 96, generator=generator) * 2 + 0.5)
    return model


def _snapshot(student, teacher) -> dict:
    """da-sac's `{'model': DDP state_dict, 'opt', 'score', 'epoch'}` of a SAC run."""
    sd = {f"module.backbone.model.{k}": v for k, v in student.state_dict().items()}
    sd |= {f"module.slow_net.model.{k}": v for k, v in teacher.state_dict().items()}
    sd["module.running_conf"] = torch.rand(19)
    sd["module.slow_init"] = torch.ones(1)
    return {"model": sd, "opt": {"state": {}}, "score": 0.52, "epoch": 136}


def test_full_snapshot_loads_into_the_dasac_config(tmp_path):
    config = dasac.get_config("synthetic")
    config.model.stage_sizes, config.model.width = STAGE_SIZES, WIDTH
    config.model.aspp_dilations = DILATIONS
    student, teacher = _network(0), _network(10)
    path = str(tmp_path / "final_e136.pth")
    torch.save(_snapshot(student, teacher), path)
    out = str(tmp_path / "converted")
    report = convert.convert_file(path, config, out)
    assert report.layout == "dasac" and report.missing == []
    assert report.ignored["module.running_conf"] == "da-sac's running class confidence"
    assert any(k.startswith("module.slow_net.") for k in report.ignored)

    model = models.build_segmenter(config.model, config.num_classes)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    variables, _ = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(out), abstract, checkpoints.model_meta(config.model)
    )
    x = torch.randn(2, 3, 65, 97, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    for mode in ("eval", "train"):
        student.train(mode == "train")
        teacher.train(mode == "train")
        with torch.no_grad():
            (expected,), (other,) = student(x)[1:], teacher(x)[1:]
        if mode == "train":
            out, _ = model.apply(variables, x_nhwc, train=True, mutable=["batch_stats"])
        else:
            out = model.apply(variables, x_nhwc, train=False)
        assert set(out) == {"main"}
        assert relative_error(out["main"], expected) < TOLERANCE, mode
        assert relative_error(out["main"], other) > 0.1, mode  # Not the teacher.
