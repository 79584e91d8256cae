from tlops.config import PipelineConfig


def test_digits_config_fixture_validates(digits_cfg):
    cfg = digits_cfg()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.strategies == ["linear-probe"]
