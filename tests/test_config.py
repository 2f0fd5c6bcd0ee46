import pytest

from t3rl_jax.config import (
    SCHEMA,
    ConfigError,
    available_presets,
    config_from_argv,
    export_dir,
    load_config,
    parse_config_args,
)
from t3rl_jax.config_checks import CHOICES

PRESETS = ["tiny", "stage1", "stage2", "paper_stage1", "paper_stage2", "paper_stage3", "paper_stage4"]


def test_all_presets_are_found():
    assert set(PRESETS) <= set(available_presets())
    assert "base" not in available_presets()  # a helper, not a preset


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_validates_and_is_frozen(name):
    cfg = load_config(name)
    assert set(cfg.keys()) == set(SCHEMA)
    for section, fields in SCHEMA.items():
        if fields is not None:
            assert set(cfg[section].keys()) == set(fields), section
    assert cfg.stage == name and cfg.workdir == f"runs/{name}"
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0
    hash(cfg)


def test_t3rl_recipe_numbers():
    s1, s2 = load_config("stage1"), load_config("stage2")
    for c in (s1, s2):
        t, r, a = c.train, c.rollout, c.algo
        assert (t.lr, t.lr_schedule, t.b1, t.b2) == (1e-6, "constant", 0.9, 0.999)
        assert (t.weight_decay, t.grad_clip) == (0.01, 1.0)
        assert (r.samples_per_prompt, c.data.prompts_per_step, r.temperature) == (16, 32, 1.0)
        assert (a.clip_low, a.clip_high, a.entropy_coef, a.kl_coef, a.kl_type) == (0.2, 0.28, 0.001, 0.0, "low_var_kl")
        assert (r.max_response_tokens, r.max_steps_per_turn, r.max_model_calls) == (10000, 10, 30)
        assert a.filter_zero_variance and c.model.preset == "qwen3_4b_instruct_2507"
    assert s1.data.train_file == "bfcl_train_base.jsonl" and s1.mesh.sequence == 1
    assert s2.data.train_file == "bfcl_train.jsonl" and s2.mesh.sequence == 4
    assert s1.next_stage == "stage2" and s2.init_from == export_dir(s1.workdir)


def test_paper_curriculum_is_chained():
    stages = [load_config(f"paper_stage{n}") for n in range(1, 5)]
    for prev, nxt in zip(stages, stages[1:]):
        assert prev.next_stage == nxt.stage
        assert nxt.init_from == export_dir(prev.workdir)
    assert stages[-1].next_stage == ""
    assert [s.env.reward for s in stages] == ["format", "progress", "progress", "progress"]
    assert [s.env.augment for s in stages] == [False, True, True, False]
    assert [s.data.train_file for s in stages[2:]] == ["bfcl_train.jsonl"] * 2
    assert all(s.eval.plateau_patience > 0 for s in stages)


def test_tiny_is_cpu_sized():
    c = load_config("tiny")
    m = c.model
    assert (m.preset, m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim) == ("tiny", 2, 64, 4, 2, 16)
    assert c.init_from == "" and c.log.wandb_mode == "offline"
    assert c.data.prompts_per_step * c.rollout.samples_per_prompt == 8
    assert c.train.num_steps <= 20 and c.rollout.max_context_tokens <= 8192


def test_overrides_apply_with_types():
    c = load_config(
        "stage2",
        ["train.lr=2e-6", "dry_run=True", "train.num_steps=7", "algo.clip_high=1", "data.categories=base,miss_func",
         "model.vocab_size=151936", "workdir='/tmp/x'", "env.augment=false"],
    )
    assert c.train.lr == 2e-6 and c.dry_run is True and c.train.num_steps == 7
    assert c.algo.clip_high == 1.0 and isinstance(c.algo.clip_high, float)
    assert c.data.categories == ("base", "miss_func") and c.model.vocab_size == 151936
    assert c.workdir == "/tmp/x" and c.env.augment is False
    typed = load_config("tiny", {"seed": 3, "model.vocab_size": None, "data.categories": ["long_context"]})
    assert typed.seed == 3 and typed.model.vocab_size is None and typed.data.categories == ("long_context",)


@pytest.mark.parametrize(
    "override, key",
    [("train.lrr=1", "train.lrr"), ("trian.lr=1", "trian.lr"), ("nope=1", "nope"), ("train.lr.x=1", "train.lr.x")],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config("tiny", [override])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config("tiny", ["train.lrr=1"])


@pytest.mark.parametrize(
    "override",
    ["train.lr=fast", "train.num_steps=2.5", "dry_run=maybe", "seed=None", "model=3"],
)
def test_wrong_type_is_named(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("tiny", [override])


def test_wrong_python_type_is_named():
    with pytest.raises(ConfigError, match="'train.num_steps'"):
        load_config("tiny", {"train.num_steps": 2.5})
    with pytest.raises(ConfigError, match="'dry_run'"):
        load_config("tiny", {"dry_run": 1})
    with pytest.raises(ConfigError, match="'data.categories'"):
        load_config("tiny", {"data.categories": [1]})


@pytest.mark.parametrize(
    "override, key",
    [
        ("resume=sometimes", "resume"),
        ("algo.loss_agg=sum", "algo.loss_agg"),
        ("mesh.data=-1", "mesh.data, mesh.fsdp"),  # a second fill axis
        ("rollout.max_context_tokens=100", "rollout.max_context_tokens"),
        ("rollout.max_prefill_length=5000", "rollout.max_prefill_length"),
        ("algo.dual_clip=0.5", "algo.dual_clip"),
        ("data.categories=base,chess", "data.categories"),
        ("next_stage=stage9", "next_stage"),
        ("train.lr=0", "train.lr"),
        ("model.num_kv_heads=3", "model.num_heads"),
        ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config("stage2", [override])


def test_context_parallel_needs_divisible_rows():
    with pytest.raises(ConfigError, match="^train.max_seq_len:"):
        load_config("stage2", ["train.max_seq_len=18436", "rollout.max_context_tokens=18436"])


def test_cli_parsing():
    name, overrides, rest = parse_config_args(
        ["--config=stage2", "--config.train.lr=2e-6", "--config.dry_run", "True", "--verbose"]
    )
    assert (name, overrides, rest) == ("stage2", ["train.lr=2e-6", "dry_run=True"], ["--verbose"])
    cfg, rest = config_from_argv(["--config", "tiny", "--config.seed=5"])
    assert cfg.seed == 5 and rest == []
    assert config_from_argv([], default="tiny")[0].stage == "tiny"
    with pytest.raises(ConfigError, match="no --config=NAME"):
        parse_config_args([])


def test_unknown_preset_and_file_paths(tmp_path):
    with pytest.raises(ConfigError, match="unknown config preset 'stage9'.*tiny"):
        load_config("stage9")
    path = tmp_path / "mine.py"
    path.write_text(
        "from configs.tiny import get_config as tiny\n\n"
        "def get_config():\n    c = tiny()\n    c.seed = 11\n    return c\n"
    )
    assert load_config(str(path)).seed == 11
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


def test_choices_mirror_the_rl_registries():
    from t3rl_jax.rl.advantages import ADVANTAGE_MODES
    from t3rl_jax.rl.aggregation import LOSS_AGG_MODES
    from t3rl_jax.rl.losses import KL_TYPES

    assert CHOICES["algo.kl_type"] == KL_TYPES
    assert CHOICES["algo.loss_agg"] == LOSS_AGG_MODES
    assert CHOICES["algo.advantage"] == ADVANTAGE_MODES


def test_algo_section_builds_loss_settings():
    from t3rl_jax.rl.grpo import LossSettings

    settings = LossSettings.from_algo_config(load_config("paper_stage2").algo)
    assert settings.needs_reference and settings.kl_coef == 0.1 and settings.dual_clip == 10.0


def test_compilation_cache_is_on_for_the_recipe_and_off_for_the_cpu_demo(tmp_path):
    import jax

    from t3rl_jax.main import use_compilation_cache

    assert load_config("stage2").compilation_cache_dir == "runs/.jax_cache"
    assert load_config("tiny").compilation_cache_dir == ""
    before = jax.config.jax_compilation_cache_dir
    try:
        use_compilation_cache("")
        assert jax.config.jax_compilation_cache_dir == before
        use_compilation_cache(str(tmp_path / "cache"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
