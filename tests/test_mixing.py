"""Mix strings, mix files and weight resolution, including every error path."""

import json
import random

import pytest

from litgpt_ext.data import (
    Blend,
    MixError,
    build_registry,
    discover_shards,
    mix_spec,
    parse_weights_str,
    resolve_weights,
)
from litgpt_ext.data.inspect import mix_report


def resolve(root, **kw):
    reg = build_registry(kw.pop("extra_shard_types", None))
    return resolve_weights(mix_spec(**kw), discover_shards(root, reg), reg)


def test_parse_weights_str_values():
    assert parse_weights_str("main:0.8, code:0.15,math:0.05", "x") == {"main": 0.8, "code": 0.15, "math": 0.05}
    assert parse_weights_str("main/1:2,q1:1", "x") == {"main/1": 2.0, "q1": 1.0}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("main=0.8", "'main=0.8' is not 'name:weight'"),
        ("main:abc", "weight 'abc' of 'main' is not a number"),
        ("main:0.5,,code:0.5", "empty entry"),
        ("main:0.5,main:0.5", "'main' appears twice"),
        (":0.5", "has no name"),
    ],
)
def test_parse_weights_str_errors(text, fragment):
    with pytest.raises(MixError, match=fragment.replace("(", r"\(")):
        mix_spec(mix_weights_str=text)


def test_negative_and_all_zero_weights():
    with pytest.raises(MixError, match="weight of 'code' is negative"):
        mix_spec(mix_weights_str="main:1,code:-0.1")
    with pytest.raises(MixError, match="all weights are zero"):
        mix_spec(mix_weights_str="main:0,code:0")


def test_two_mix_sources_refused(tmp_path):
    with pytest.raises(MixError, match="only one mix source, got mix_weights_str and literal_weights_str"):
        mix_spec(mix_weights_str="main:1", literal_weights_str="main/1:1")
    with pytest.raises(MixError, match="literal_weights_str and mix_config_path"):
        mix_spec(literal_weights_str="main/1:1", mix_config_path=str(tmp_path / "m.json"))


def test_weighted_splits_type_weight_equally(shard_root):
    w = resolve(shard_root, mix_weights_str="main:0.8,code:0.15,math:0.05")
    assert w == pytest.approx({"main/1": 0.4, "main/2": 0.4, "c1": 0.075, "c2": 0.075, "m1": 0.05})
    assert list(w) == ["main/1", "main/2", "c1", "c2", "m1"]


def test_zero_weight_drops_type(shard_root):
    assert resolve(shard_root, mix_weights_str="main:1,code:0") == pytest.approx({"main/1": 0.5, "main/2": 0.5})


def test_default_is_main_only(shard_root):
    assert resolve(shard_root) == pytest.approx({"main/1": 0.5, "main/2": 0.5})


def test_proportional_uses_token_counts_and_type_weights_multiply(shard_root):
    # tokens: 1=3200 2=1600 c1=1600 c2=800 m1=800 (total 8000)
    w = resolve(shard_root, proportional_sampling=True)
    assert w == pytest.approx({"main/1": 0.4, "main/2": 0.2, "c1": 0.2, "c2": 0.1, "m1": 0.1})
    w = resolve(shard_root, mix_weights_str="main:1,math:3", proportional_sampling=True)
    # raw: 3200, 1600, 3*800 = 2400 -> /7200
    assert w == pytest.approx({"main/1": 3200 / 7200, "main/2": 1600 / 7200, "m1": 2400 / 7200})


def test_literal_weights_exact_ids(shard_root):
    w = resolve(shard_root, literal_weights_str="main/2:0.8,c2:0.1,m1:0.1")
    assert w == pytest.approx({"main/2": 0.8, "c2": 0.1, "m1": 0.1})


def test_literal_unknown_id_lists_available(shard_root):
    with pytest.raises(MixError, match=r"'q1' matches no shard; available: main/1, main/2, c1, c2, m1"):
        resolve(shard_root, literal_weights_str="main/1:0.9,q1:0.1")
    with pytest.raises(MixError, match="numbered shards are named 'main/1'"):
        resolve(shard_root, literal_weights_str="1:1")


def test_unknown_type_names_known_types(shard_root):
    with pytest.raises(MixError, match=r"unknown shard type 'mth' in mix; known: main, code, math, web"):
        resolve(shard_root, mix_weights_str="main:0.9,mth:0.1")
    with pytest.raises(MixError, match="did you mean 'code'"):
        resolve(shard_root, mix_weights_str="main:0.9,c:0.1")


def test_weighted_type_without_shards_is_refused(shard_root):
    with pytest.raises(MixError, match=r"type 'web' has weight 0.1 but no shards on disk"):
        resolve(shard_root, mix_weights_str="main:0.9,web:0.1")


def test_json_mix_file_paper_format(shard_root, tmp_path):
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"weights": {"main": 0.5, "math": 0.5}, "proportional_sampling": False, "literal_weights": {}}))
    assert resolve(shard_root, mix_config_path=str(f)) == pytest.approx({"main/1": 0.25, "main/2": 0.25, "m1": 0.5})
    f.write_text(json.dumps({"weights": {}, "proportional_sampling": False, "literal_weights": {"c1": 1, "m1": 3}}))
    assert resolve(shard_root, mix_config_path=str(f)) == pytest.approx({"c1": 0.25, "m1": 0.75})
    f.write_text(json.dumps({"weights": {"main": 1}, "bogus": 1}))
    with pytest.raises(MixError, match=r"unknown keys \['bogus'\]"):
        mix_spec(mix_config_path=str(f))
    f.write_text("{not json")
    with pytest.raises(MixError, match="is not valid JSON"):
        mix_spec(mix_config_path=str(f))


def test_extra_shard_types_from_config(shard_root, tmp_path):
    from tests.conftest import make_shard

    root = tmp_path / "d"
    make_shard(root / "1", 0, 400)
    make_shard(root / "l1", 70_000, 400)
    with pytest.raises(MixError, match="unknown shard type 'legal'"):
        resolve(root, mix_weights_str="main:0.5,legal:0.5")
    w = resolve(root, mix_weights_str="main:0.5,legal:0.5", extra_shard_types={"legal": "l"})
    assert w == pytest.approx({"main/1": 0.5, "l1": 0.5})
    with pytest.raises(MixError, match="prefix 'c' for 'legal' is already used by type 'code'"):
        build_registry({"legal": "c"})


def test_discovery_errors(tmp_path):
    with pytest.raises(MixError, match="data_path is not set"):
        discover_shards("", build_registry())
    with pytest.raises(MixError, match="does not exist"):
        discover_shards(tmp_path / "nope", build_registry())
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixError, match="no shards found under data_path"):
        discover_shards(tmp_path / "empty", build_registry())
    (tmp_path / "bad" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no index.json"):
        discover_shards(tmp_path / "bad", build_registry())
    (tmp_path / "bad" / "1" / "index.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt index.json"):
        discover_shards(tmp_path / "bad", build_registry())


def test_unknown_prefix_folder_is_reported(tmp_path, caplog):
    from tests.conftest import make_shard

    make_shard(tmp_path / "1", 0, 400)
    make_shard(tmp_path / "z1", 70_000, 400)
    shards = discover_shards(tmp_path, build_registry())
    assert [s.id for s in shards] == ["main/1"]
    assert "z1" in caplog.text and "extra_shard_types" in caplog.text


def test_numbered_main_shards_have_no_cap(tmp_path):
    from tests.conftest import make_shard

    for n in (1, 2, 10, 11, 100):
        make_shard(tmp_path / str(n), n * 1000, 100)
    assert [s.id for s in discover_shards(tmp_path, build_registry())] == ["main/1", "main/2", "main/10", "main/11", "main/100"]


def test_blend_prefix_counts_within_one():
    rng = random.Random(0)
    for _ in range(200):
        weights = [rng.random() ** 3 + 1e-3 for _ in range(rng.randint(1, 9))]
        blend = Blend(weights)
        for n in range(1, 400):
            blend.next()
            assert max(abs(c - w * n) for c, w in zip(blend.counts, blend.weights)) < 1


def test_blend_is_memoryless():
    a = Blend([0.5, 0.3, 0.2])
    first = a.take(37)
    b = Blend([0.5, 0.3, 0.2], counts=list(a.counts))
    assert a.take(50) == b.take(50)
    assert len(first) == 37


def test_mix_report_epochs(shard_root):
    rep = mix_report(shard_root, mix_weights_str="main:0.5,math:0.5", tokens=8000, max_seq_length=15)
    rows = {r["shard"]: r for r in rep["shards"]}
    # m1: 800 tokens in chunks of 800 -> 50 samples of 16 tokens = 800 served; 4000 budget -> 5 epochs
    assert rows["m1"]["samples"] == 50 and rows["m1"]["epochs"] == pytest.approx(5.0)
    assert rows["main/1"]["epochs"] == pytest.approx(2000 / 3200)
    assert rows["c1"]["weight"] == 0 and rows["c1"]["epochs"] == 0
    assert rep["types"]["math"] == pytest.approx(0.5)
