import pytest
import yaml

from var_train.cli import main
from var_train.config import ConfigError, load_config
from var_train.schedules import Schedule, build_schedule, steps_per_epoch


def test_recipes_hold_the_papers_hyperparameters():
    expected = {  # depth: (global batch, peak lr, epochs, wpe, alng, weight_decay_end)
        16: (768, 3e-4, 200, 0.1, 1e-3, None), 20: (768, 3e-4, 250, 0.1, 1e-3, None),
        24: (768, 2.4e-4, 350, 0.01, 1e-4, None), 30: (1024, 3.2e-4, 350, 0.01, 1e-5, 0.08),
    }
    for depth, (batch, peak, epochs, wpe, alng, wd_end) in expected.items():
        cfg = load_config(f"recipes/d{depth}.yaml")
        assert cfg.model.depth == depth and cfg.optim.global_batch_size == batch
        assert cfg.optim.base_lr * batch / 256 == pytest.approx(peak)
        assert (cfg.optim.epochs, cfg.optim.wpe, cfg.model.alng) == (epochs, wpe, alng)
        assert cfg.optim.weight_decay == 0.05 and cfg.optim.weight_decay_end == wd_end
        assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.clip_grad_norm == 2.0
        assert cfg.model.label_dropout == 0.1 and cfg.model.drop_path_rate is None  # 0.1 * depth / 24


def test_overrides_are_typed_and_unknown_keys_list_the_valid_ones():
    cfg = load_config("recipes/tiny.yaml", ["optim.base_lr=2e-4", "model.patch_nums=[1,2]", "eval.top_k=5"])
    assert cfg.optim.base_lr == 2e-4 and cfg.model.patch_nums == [1, 2] and cfg.eval.top_k == 5
    with pytest.raises(ConfigError, match="valid keys of \\[optim\\]: global_batch_size, micro_batch_size"):
        load_config("recipes/tiny.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config("recipes/tiny.yaml", ["model.depth=deep"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("recipes/tiny.yaml", ["parallel.engine=megatron"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("recipes/tiny.yaml", ["depth"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config("recipes/tiny.yaml", ["trainer.depth=3"])


def test_bad_recipe_file_and_cli_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optim": {"base_lr": 1e-4, "lr_typo": 3}}))
    assert main(["train", "--recipe", str(bad)]) == 2
    assert "unknown key optim.lr_typo" in capsys.readouterr().err
    assert main(["train", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("recipes/d30.yaml", ["optim.micro_batch_size=8"])
    again = load_config(cfg.save(tmp_path / "config.yaml"))
    assert again == cfg


def test_dry_run_prints_the_plan(capsys):
    assert main(["train", "--recipe", "recipes/d16.yaml", "--dry-run", "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "310,283,520" in out and "839.3 GFLOP" in out and "522,240" in out and "memory per GPU" in out


def test_dry_run_says_where_optim_max_steps_stops_the_run(tmp_path, capsys):
    from tests.training.learnable_shards import make_learnable_shards

    shards = make_learnable_shards(tmp_path / "shards", num_records=64)  # batch 16: 4 steps an epoch
    argv = ["train", "--recipe", "recipes/tiny.yaml", "--dry-run", f"data.train_shards={shards}"]
    assert main([*argv, "optim.max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert "80 steps for 20 epochs; the run stops at optim.max_steps=6" in out, out
    assert main([*argv, "optim.max_steps=500"]) == 0  # beyond the schedule: nothing to say
    assert "the run stops at" not in capsys.readouterr().out


def test_lr_schedule_warmup_hold_linear_decay():
    s = Schedule(peak_lr=1.0, total_steps=101, warmup_steps=10, warmup_start_ratio=0.005, hold_fraction=0.1, wpe=0.1)
    assert s.lr(0) == pytest.approx(0.005)
    assert s.lr(5) == pytest.approx(0.005 + 0.995 * 0.5)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(18) == pytest.approx(1.0)  # hold: 10% of 90 steps
    assert s.lr(100) == pytest.approx(0.1)
    midway = 10 + 45
    assert s.lr(midway) == pytest.approx(0.1 + 0.9 * 0.5 / 0.9)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 100))


def test_weight_decay_cosine_rise_and_constant():
    rising = Schedule(peak_lr=1, total_steps=11, warmup_steps=1, weight_decay=0.05, weight_decay_end=0.08)
    assert rising.weight_decay_at(0) == pytest.approx(0.05) and rising.weight_decay_at(10) == pytest.approx(0.08)
    assert rising.weight_decay_at(5) == pytest.approx(0.065)
    assert Schedule(peak_lr=1, total_steps=11, warmup_steps=1).weight_decay_at(7) == 0.05


def test_build_schedule_from_recipe():
    cfg = load_config("recipes/d16.yaml")
    s = build_schedule(cfg.optim, steps_per_epoch=1000)
    assert s.total_steps == 200_000 and s.warmup_steps == 4_000 and s.peak_lr == pytest.approx(3e-4)


def test_an_epoch_is_a_pass_over_the_data_whatever_the_accumulation():
    """7 micro-batches per rank at 2 per step: 3.5 steps an epoch (steps run on across epochs), so 100
    epochs are 350 steps (700 micro-batches = 100 passes), not 300 (85.7 passes)."""
    assert steps_per_epoch(7, 2) == 3.5 and steps_per_epoch(8, 1) == 8
    cfg = load_config("recipes/tiny.yaml", ["optim.epochs=100", "optim.warmup_epochs=2"])
    schedule = build_schedule(cfg.optim, steps_per_epoch(7, 2))
    assert schedule.total_steps == 350 and schedule.warmup_steps == 7
    with pytest.raises(ConfigError, match="one epoch has 1 micro-batches per rank, fewer than the 2 accumulated"):
        steps_per_epoch(1, 2)
