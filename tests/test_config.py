"""SpeculativeConfig validation and the draft-pair table."""

import pytest

from exo.models import CARDS
from exo.speculative.config import DRAFT_PAIRS, ConfigError, SpeculativeConfig, choose_draft


def test_defaults_match_the_design():
    config = SpeculativeConfig()
    assert (config.enabled, config.draft_tokens, config.draft_model, config.acceptance_threshold,
            config.max_speculation_depth, config.adaptive_speculation, config.pipelined) == (
        False, 4, "auto", 0.8, 8, True, False)


@pytest.mark.parametrize("fields,fragment", [
    (dict(draft_tokens=-1), "draft_tokens"),
    (dict(draft_tokens=9), "draft_tokens"),
    (dict(max_speculation_depth=0), "max_speculation_depth"),
    (dict(acceptance_threshold=1.0), "acceptance_threshold"),
    (dict(acceptance_threshold=-0.1), "acceptance_threshold"),
    (dict(draft_model=""), "draft_model"),
])
def test_invalid_values_name_the_field(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SpeculativeConfig(**fields)


def test_merged_overrides_validate_and_refuse_unknown_fields():
    config = SpeculativeConfig(enabled=True)
    assert config.merged({"draft_tokens": 6}).draft_tokens == 6
    with pytest.raises(ConfigError, match="unknown speculative field"):
        config.merged({"draft_tokenz": 6})
    with pytest.raises(ConfigError, match="draft_tokens"):
        config.merged({"draft_tokens": 20})


def test_auto_draft_pairs():
    assert choose_draft("llama-3.1-70b") == "llama-3.2-3b"
    assert choose_draft("llama-3.1-8b") == "llama-3.2-1b"
    assert choose_draft("qwen-2.5-72b") == "qwen-2.5-7b"
    assert choose_draft("qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"
    assert choose_draft("qwen2.5-coder-1.5b", "smollm2-135m") == "smollm2-135m"
    with pytest.raises(ConfigError, match="no draft model known"):
        choose_draft("smollm2-135m")


def test_table_pairs_share_a_family_and_exist():
    for target, draft in DRAFT_PAIRS.items():
        assert CARDS[target].family == CARDS[draft].family, (target, draft)
        assert CARDS[draft].layers < CARDS[target].layers or "coder" in target


def test_deepseek_distill_pair_is_refused_with_the_reason():
    assert "deepseek-v3" not in DRAFT_PAIRS
    with pytest.raises(ConfigError, match="tokenizer"):
        choose_draft("deepseek-v3", "deepseek-r1-distill-qwen-7b")
    with pytest.raises(ConfigError, match="129k"):
        choose_draft("deepseek-v3")


def test_every_field_has_one_flag_on_both_commands_and_the_flags_make_the_config():
    """A new knob is one field plus its entry in FLAGS: this fails for a field without a flag,
    and checks that `exo` and `exo run` both take it and hand it to the config unchanged."""
    from exo.main import build_parser
    from exo.speculative.config import FLAGS

    assert list(FLAGS) and set(FLAGS) == set(SpeculativeConfig.__struct_fields__)
    parser = build_parser()
    for argv in ([], ["run"]):
        args = parser.parse_args([*argv])
        from exo.cli_run import speculative_config

        assert speculative_config(args) == SpeculativeConfig()
        changed = parser.parse_args([*argv, "--enable-speculative", "--fixed-k", "--suffix-min-match", "3",
                                     "--speculative-threshold", "0.5", "--drafter", "suffix", "--ring-window", "2"])
        assert speculative_config(changed) == SpeculativeConfig(enabled=True, adaptive_speculation=False,
                                                                suffix_min_match=3, acceptance_threshold=0.5,
                                                                drafter="suffix", ring_window=2)
    for command in (parser, parser._subparsers._group_actions[0].choices["run"]):
        text = command.format_help()
        assert all(flag.name in text for flag in FLAGS.values()) and "--max-batch-size" in text


def test_batching_that_cannot_act_is_refused_at_start_up():
    from exo.cli_run import max_batch_size
    from exo.main import build_parser

    parse = build_parser().parse_args
    assert max_batch_size(parse([])) == 8 and max_batch_size(parse(["--placement", "processes"])) == 1
    assert max_batch_size(parse(["run", "--max-batch-size", "4"])) == 4
    with pytest.raises(ValueError, match="cannot act with --placement processes"):
        max_batch_size(parse(["--placement", "processes", "--max-batch-size", "4"]))
    with pytest.raises(ValueError, match="at least 1"):
        max_batch_size(parse(["--max-batch-size", "0"]))
