"""The per-arch tile tables (``Tuned.arch_configs``): which table a launch picks, and that the
sm_80 overrides keep what the kernels rely on. Whether they spill is the static report's job
(``python -m r21d.static --archs 90,80``)."""

from r21d.triton_kernels import (
    _gemm,
    _launch,
    conv2plus1d,
    depthwise,
    depthwise_bwd,
    implicit_gemm,
    implicit_gemm_bwd,
    pointwise,
)

TUNED = {f"{mod.__name__.rsplit('.', 1)[1]}.{name}": value
         for mod in (pointwise, depthwise, depthwise_bwd, implicit_gemm, implicit_gemm_bwd, conv2plus1d)
         for name, value in vars(mod).items() if isinstance(value, _launch.Tuned)}
WITH_OVERRIDES = {name: t for name, t in TUNED.items() if t.arch_configs}


def test_sm80_overrides_exist_and_name_real_variants():
    assert {"conv2plus1d._UNIT", "implicit_gemm_bwd._DGRAD", "implicit_gemm._FWD_STATS",
            "implicit_gemm_bwd._WGRAD", "pointwise._FWD_EVAL", "depthwise._FWD",
            "depthwise_bwd._BWD"} <= set(WITH_OVERRIDES)
    for name, tuned in WITH_OVERRIDES.items():
        assert set(tuned.arch_configs) == {80}, name  # current_tile_arch() gives 80 or 90 only
        for variant, configs in tuned.arch_configs[80].items():
            assert variant in tuned.configs, f"{name}: sm_80 overrides unknown variant {variant}"
            assert configs and configs != tuned.configs[variant], (name, variant)
            # same meta-parameters as the sm_90 table: only the sizes change
            assert all(c.kwargs.keys() == tuned.configs[variant][0].kwargs.keys() for c in configs)


def test_training_forward_tiles_keep_the_statistics_row_block_on_every_arch():
    tables = [implicit_gemm._FWD_STATS.configs, *implicit_gemm._FWD_STATS.arch_configs.values()]
    assert {c.kwargs["BLOCK_M"] for t in tables for cs in t.values() for c in cs} == \
        {_gemm.STATS_BLOCK_M}


def test_tile_arch_picks_the_table_a_launch_runs(monkeypatch):
    monkeypatch.setattr(_launch, "interpreted", lambda: False)
    tuned = conv2plus1d._UNIT
    assert _launch.current_tile_arch() == 90  # no GPU: sm_90, the report names others
    sm80 = tuned.arch_configs[80]
    for arch, table in ((90, tuned.configs), (100, tuned.configs), (120, sm80), (89, sm80),
                        (86, sm80), (80, sm80)):
        with _launch.tile_arch(arch):
            choice, meta = tuned.select("16bit")
        assert meta == {} and list(choice.configs) == table["16bit"], arch
    # variants without an override keep sm_90's table on sm_80
    with _launch.tile_arch(80):
        choice, _ = tuned.select("ieee")
    assert list(choice.configs) == tuned.configs["ieee"]


def test_choices_are_kept_per_arch(monkeypatch):
    monkeypatch.setattr(_launch, "interpreted", lambda: False)
    tuned = _launch.Tuned(conv2plus1d._UNIT.fn, conv2plus1d._UNIT.configs, key=["HW"], interpret={},
                          arch_configs=conv2plus1d._UNIT.arch_configs)
    for arch in (80, 90):
        with _launch.tile_arch(arch):
            choice, meta = tuned.select("16bit")
            assert tuned.select("16bit")[0] is choice  # built once
        assert meta == {} and list(choice.configs) == tuned.configs_for("16bit", arch)
        assert choice.arch == arch and choice.fn is tuned.fn
    assert len(tuned._choices) == 2
