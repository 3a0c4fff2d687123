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
