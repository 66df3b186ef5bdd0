"""The real config tree composes, validates before anything runs, and names the offending key."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from ssl_path.cli.train import INJECTED, TOP_LEVEL, run
from ssl_path.config_validation import ConfigValidationError, validate_config


@pytest.mark.parametrize(
    "overrides",
    [[], ["experiment=smoke"], ["trainer=ddp"], ["trainer=fsdp"], ["trainer=cpu"], ["logger=csv"]],
)
def test_configs_compose_and_validate(compose_train, overrides, tmp_path):
    cfg = compose_train([*overrides, f"paths.output_dir={tmp_path}"])
    validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    assert cfg.trainer.max_epochs == -1 and cfg.trainer.gradient_clip_val is None
    assert cfg.trainer.enable_checkpointing is False


def test_unknown_key_in_yaml_is_named_with_suggestion(cfg_train):
    with open_dict(cfg_train):
        cfg_train.method.student_tmp = 0.2  # as if an experiment file had the typo
    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg_train, injected=INJECTED, top_level=TOP_LEVEL)
    msg = str(err.value)
    assert "method.student_tmp: not a parameter of ssl_path.method.DINOv2Module" in msg
    assert "did you mean 'student_temp'?" in msg


def test_wrong_type_and_missing_and_top_level(compose_train, tmp_path):
    cfg = compose_train(["experiment=smoke", f"paths.output_dir={tmp_path}", "optim.lr=fast", "seed=abc"])
    with open_dict(cfg):
        del cfg.method.batch_size
        cfg.max_step = 3
    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    msg = str(err.value)
    assert "optim.lr: ssl_path.method.OptimConfig expects float, got 'fast'" in msg
    assert "method.batch_size: missing, required by ssl_path.method.DINOv2Module" in msg
    assert "seed: expected int, got 'abc'" in msg
    assert "max_step: not a parameter of the top level of the config" in msg


def test_cli_typo_fails_in_hydra_struct_mode(compose_train):
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(["trainer.max_stepz=5"])


def test_run_fails_before_creating_anything(compose_train, tmp_path):
    out = tmp_path / "run"
    cfg = compose_train(["experiment=smoke", f"paths.output_dir={out}", "data.root=/nonexistent"])
    with open_dict(cfg):
        cfg.trainer.max_stepz = 5
    with pytest.raises(ConfigValidationError, match=r"trainer.max_stepz: .*did you mean 'max_steps'"):
        run(cfg)
    assert not out.exists()


def test_lightning_gradient_clipping_is_refused(compose_train, tmp_path):
    cfg = compose_train(
        ["experiment=smoke", f"paths.output_dir={tmp_path / 'run'}", "trainer.gradient_clip_val=1.0"]
    )
    with pytest.raises(
        ConfigValidationError, match="trainer.gradient_clip_val: must stay null.*optim.clip_grad"
    ):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_fp16_precision_is_refused_before_anything_runs(compose_train, tmp_path):
    cfg = compose_train(
        ["experiment=smoke", f"paths.output_dir={tmp_path / 'run'}", "trainer.precision=16-mixed"]
    )
    with pytest.raises(ConfigValidationError, match="trainer.precision=16-mixed: fp16 needs a GradScaler"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_nonfinite_numbers_are_refused_naming_the_key(compose_train, tmp_path):
    """hydra parses inf/-inf/nan overrides to floats: they fit `float` but would make the weights NaN."""
    out = tmp_path / "run"
    nonfinite = ["optim.lr=inf", "method.student_temp=nan", "model.backbone.drop_path_rate=-inf"]
    cfg = compose_train(["experiment=smoke", f"paths.output_dir={out}", *nonfinite])
    with pytest.raises(ConfigValidationError) as err:
        run(cfg)
    for override in nonfinite:
        assert f"{override}: must be finite" in str(err.value)
    assert not out.exists()


def test_head_sizes_must_be_positive_ints(compose_train, tmp_path):
    overrides = ["model.head.out_dim=0", "model.head.nlayers=-1"]
    cfg = compose_train(["experiment=smoke", f"paths.output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    msg = str(err.value)
    assert "model.head.out_dim=0: must be a positive int (ssl_path.models.DINOHead)" in msg
    assert "model.head.nlayers=-1: must be a positive int" in msg


def test_entry_without_target_in_callbacks_is_named(compose_train, tmp_path):
    """learn_cpu tunes callbacks.periodic_eval; with callbacks=default that entry has no _target_."""
    cfg = compose_train(["experiment=learn_cpu", "callbacks=default", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    msg = str(err.value)
    assert "callbacks.periodic_eval: no _target_ (set: every_n_steps, split)" in msg
    assert "callbacks.periodic_eval=null" in msg
    dropped = ["callbacks.periodic_eval=null", f"paths.output_dir={tmp_path}"]
    fixed = compose_train(["experiment=learn_cpu", "callbacks=default", *dropped])
    validate_config(fixed, injected=INJECTED, top_level=TOP_LEVEL)
