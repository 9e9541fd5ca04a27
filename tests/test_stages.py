"""The stages command: the stage table, depth statistics and the ordering test, the Hugging Face path, end to end."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import rankdata
from tiny_models import tiny_config, tiny_model, word_tokenizer
from transformers import AutoModel

from headlab.cli import main
from headlab.errors import HeadlabError
from roles import DETECTORS
from roles.ablation import AblationResult
from roles.batches import repeat_batch
from roles.mapping import DetectConfig
from roles.null import NullStats
from roles.rule import PROPERTIES, Verdict
from roles.stages.sources import load_toy_run, map_hf_model
from roles.stages.statistics import depth_stats, ordering_test, relative_depth
from roles.stages.taxonomy import STAGE_ORDER, STAGES, stage_table
from roles.table import RoleTable
from toymodels.modeling import ToyTransformerConfig

FAST = DetectConfig(batch_size=8, n_null=2, eval_batch_size=8)


def test_every_detector_has_a_stage_or_is_a_property():
    assert set(DETECTORS) <= set(STAGES) | set(PROPERTIES)
    assert set(STAGES.values()) <= set(STAGE_ORDER)
    assert STAGES["previous_token"] == STAGES["duplicate_token"] == STAGES["name_mover"] == "ICI"  # the survey's table
    assert STAGES["induction"] == STAGES["successor"] == STAGES["truthfulness"] == "LR"
    assert STAGES["memory"] == "KR" and STAGES["amplification"] == "EP"
    assert {"copying", "name_copy", "attention_sink"} == set(PROPERTIES) and not set(PROPERTIES) & set(STAGES)


def test_stage_map_overrides_and_errors():
    assert stage_table({"name_mover": "lr"})["name_mover"] == "LR"
    assert stage_table()["name_mover"] == "ICI"  # the default is untouched
    with pytest.raises(HeadlabError, match=r"unknown stage 'XX'.*KR \(Knowledge Recalling\), ICI"):
        stage_table({"induction": "XX"})
    with pytest.raises(HeadlabError, match=r"unknown role 'nope'.*previous_token"):
        stage_table({"nope": "LR"})


def test_relative_depth_is_the_layer_centre():
    assert relative_depth(0, 2) == 0.25 and relative_depth(1, 2) == 0.75
    assert np.allclose(relative_depth(np.arange(6), 6), (np.arange(6) + 0.5) / 6)


def _rows(pairs):
    return pd.DataFrame(pairs, columns=["stage", "relative_depth"])


def test_depth_stats_known_answer():
    stats = depth_stats(pd.Series([0.25, 0.25, 0.75, 0.75]))
    assert stats == {"n": 4, "mean": 0.5, "median": 0.5, "q25": 0.25, "q75": 0.75, "min": 0.25, "max": 0.75}
    assert depth_stats([])["n"] == 0 and depth_stats([])["mean"] is None


def test_ordering_known_answers():
    ordered = ordering_test(_rows([("KR", 0.1), ("ICI", 0.3), ("LR", 0.6), ("EP", 0.9)]))
    assert ordered["rho"] == pytest.approx(1.0) and ordered["monotone"] and ordered["holds"]
    assert ordered["significant"] is True  # rho = 1 exactly: p = 0
    assert ordered["stage_means"] == {"KR": 0.1, "ICI": 0.3, "LR": 0.6, "EP": 0.9}

    reversed_ = ordering_test(_rows([("KR", 0.9), ("ICI", 0.6), ("LR", 0.3), ("EP", 0.1)]))
    assert reversed_["rho"] == pytest.approx(-1.0) and reversed_["monotone"] is False and reversed_["holds"] is False

    # ties (a 2-layer model): Spearman = Pearson of average ranks
    pairs = [("ICI", 0.25), ("ICI", 0.25), ("KR", 0.25), ("LR", 0.75), ("LR", 0.25), ("EP", 0.75)]
    result = ordering_test(_rows(pairs))
    rank = [STAGE_ORDER.index(s) for s, _ in pairs]
    expected = np.corrcoef(rankdata(rank), rankdata([d for _, d in pairs]))[0, 1]
    assert result["rho"] == pytest.approx(expected)
    assert result["stage_means"]["LR"] == pytest.approx(0.5)
    assert result["monotone"] and result["holds"]

    # non-monotone means with a positive rho do not count as holding
    bumpy = ordering_test(_rows([("KR", 0.1), ("ICI", 0.5), ("ICI", 0.5), ("LR", 0.4), ("EP", 0.9), ("EP", 0.9)]))
    assert bumpy["rho"] > 0 and bumpy["monotone"] is False and bumpy["holds"] is False

    # untestable: one stage only, or no spread in depth
    assert ordering_test(_rows([("LR", 0.25), ("LR", 0.75), ("LR", 0.5)]))["holds"] is None
    assert ordering_test(_rows([("KR", 0.5), ("LR", 0.5), ("EP", 0.5)]))["rho"] is None
    assert ordering_test(_rows([]))["n"] == 0


# --------------------------------------------------------------------------------------------------------------
# hand-built toy run directories (role tables written by the real RoleTable, so the CSV format is the toy one)


def _write_toy_run(run_dir, detected: dict[str, list[tuple[int, int]]], n_layers=2, n_heads=2):
    roles = ["previous_token", "duplicate_token", "induction", "memory", "amplification", "copying"]
    verdicts = {}
    for role in roles:
        hit = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in detected.get(role, []):
            hit[layer, head] = True
        verdicts[role] = Verdict(torch.where(hit, 0.9, 0.1), torch.full(hit.shape, 0.05), 0.3,
                                 torch.where(hit, 1e-6, 0.5), torch.where(hit, 1e-5, 0.9), hit)
    effect = torch.zeros(n_layers, n_heads)
    ablation = AblationResult(effect, torch.full_like(effect, 0.01), 1.0)
    table = RoleTable.build(verdicts, ablation, {role: NullStats(0.1, 0.01, 20) for role in roles}).frame
    run_dir.mkdir(parents=True)
    table.to_csv(run_dir / "roles.csv", index=False)
    config = ToyTransformerConfig(
        vocab_size=12,
        max_position_embeddings=16,
        hidden_size=16,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        headlab_task={"name": "induction", "options": {}},
    )
    config.save_pretrained(run_dir / "model")
    return run_dir


SHALLOW_TO_DEEP = {"memory": [(0, 1)], "previous_token": [(0, 0)], "induction": [(1, 1)], "amplification": [(1, 0)],
                   "copying": [(0, 0)]}
DEEP_TO_SHALLOW = {"memory": [(1, 1)], "previous_token": [(1, 0)], "induction": [(0, 0)], "amplification": [(0, 1)]}


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    tiny_model("gpt2", causal_lm=True).save_pretrained(path)
    word_tokenizer(bos=True).save_pretrained(path)
    return path


def bert_like_tokenizer():
    """A word-level tokenizer that frames a text as [CLS] ... [SEP], like BERT's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = word_tokenizer().get_vocab()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{w: i for w, i in words.items() if i >= 3}}
    vocab["[SEP]"] = len(vocab)
    vocab["[unused0]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    )


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tokenizer = bert_like_tokenizer()
    config = tiny_config("bert")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_command_end_to_end_toy_seeds_and_a_causal_lm(tmp_path, tiny_gpt2_dir, capsys):
    _write_toy_run(tmp_path / "toy" / "seed-0", SHALLOW_TO_DEEP)
    _write_toy_run(tmp_path / "toy" / "seed-1", DEEP_TO_SHALLOW)
    single = _write_toy_run(tmp_path / "single", {"previous_token": [(0, 0)], "induction": [(2, 1)]}, n_layers=4)
    out = tmp_path / "out"
    args = [
        "stages",
        "--toy_runs",
        f"[{tmp_path / 'toy'}, {single}]",
        "--models",
        f"[{tiny_gpt2_dir}]",
        "--out",
        str(out),
        "--detection.batch_size",
        "8",
        "--detection.n_null",
        "2",
        "--detection.eval_batch_size",
        "8",
        "--length",
        "16",
        "--ablate",
        "false",
        "--stage_map",
        '{"name_mover": "ICI"}',
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no ablation (--ablate false)" in printed
    for name in ("stages.csv", "stage_depths.csv", "stage_map.png", "summary.json", "config.yaml"):
        assert (out / name).exists(), name

    scored = pd.read_csv(out / "stages.csv")
    assert list(scored.columns[:9]) == ["model", "layer", "head", "n_layers", "relative_depth", "role", "stage",
                                        "method", "score"]
    # every scored (head, role) of a staged role is a row, detected or not: 5 roles x 4 heads per toy run
    assert (scored.groupby("model").size().loc[["toy:toy/seed-0", "toy:toy/seed-1"]] == 5 * 4).all()
    rows = scored[scored["detected"]]
    seed0 = rows[rows["model"] == "toy:toy/seed-0"].set_index("role")
    assert len(seed0) == 4
    assert seed0.loc["induction", "relative_depth"] == 0.75 and seed0.loc["induction", "stage"] == "LR"
    assert seed0.loc["memory", "stage"] == "KR" and seed0.loc["amplification", "stage"] == "EP"
    assert "copying" not in seed0.index  # a property, in no stage
    four = rows[rows["model"] == "toy:single"].set_index("role")
    assert four.loc["induction", "relative_depth"] == pytest.approx(2.5 / 4) and (four["n_layers"] == 4).all()

    depths = pd.read_csv(out / "stage_depths.csv")
    pooled = depths[depths["model"] == "toy:toy (pooled, 2 seeds)"].set_index("stage")
    assert pooled.loc["LR", "n"] == 2 and pooled.loc["LR", "mean"] == pytest.approx(0.5)
    assert pooled.loc["KR", "q25"] == pytest.approx(0.375)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_map"]["name_mover"] == "ICI"
    by_name = {e["model"]: e for e in summary["models"]}
    assert by_name["toy:toy/seed-0"]["ordering"]["holds"] is True
    assert by_name["toy:toy/seed-0"]["ordering"]["rho"] == pytest.approx(np.sqrt(0.8))
    assert by_name["toy:toy/seed-0"]["ordering"]["significant"] is False  # p = 0.106 with 4 heads
    assert by_name["toy:toy/seed-1"]["ordering"]["holds"] is False
    group = summary["toy_groups"]["toy:toy"]
    assert group["n_seeds"] == 2 and group["fraction_holds"] == 0.5
    hf = by_name[tiny_gpt2_dir.name]
    assert hf["kind"] == "causal_lm" and set(hf["scored_stages"]) == {"KR", "ICI", "LR", "EP"}
    assert set(hf["stage_passed"]) == {"KR", "ICI", "LR", "EP"}
    seed0_entry = by_name["toy:toy/seed-0"]
    assert seed0_entry["rho"] == seed0_entry["ordering"]["rho"] and seed0_entry["holds"] is True
    low, high = seed0_entry["rho_ci"]
    assert -1 <= low <= seed0_entry["rho"] <= high <= 1

    lines = printed.strip().splitlines()
    assert any(line.startswith("stages: toy:toy/seed-0 ordering rho=0.894") for line in lines)
    assert lines[-1] == "stages: toy:toy seeds holding=1/2 fraction=0.500 of 2"
    seed0_line = next(line for line in lines if line.startswith("toy:toy/seed-0 "))
    assert "n/s" not in seed0_line and "0.75 (n=1)" in seed0_line

    # the type-level test, by hand: seed 0 has one type per stage at depths 0.25, 0.25, 0.75, 0.75. S = 4 (the two
    # tied pairs count 0), tau-b = 4 / sqrt(6 * 4); of the 24 label orders, the 2 x 2 that keep KR, ICI shallow
    # reach S = 4, so p = min p = 4/24 > alpha: inconclusive, whatever the order (seed 1 is reversed: p = 1)
    types = pd.read_csv(out / "stage_types.csv")
    assert list(types.columns) == ["model", "stage", "role", "n_detected", "n_functional", "median_depth",
                                   "depth_lo", "depth_hi"]
    mine = types[types["model"] == "toy:toy/seed-0"].set_index("role")
    assert list(mine["stage"]) == ["KR", "ICI", "LR", "EP"] and (mine["n_detected"] == 1).all()
    assert mine.loc["induction", "median_depth"] == 0.75
    assert "stages: toy:toy/seed-0 types=4 tau=0.816 perm_p=0.1667 min_p=0.1667 verdict=inconclusive" in lines
    assert "stages: toy:toy/seed-1 types=4 tau=-0.816 perm_p=1.0000 min_p=0.1667 verdict=inconclusive" in lines
    assert by_name["toy:toy/seed-0"]["type_verdict"] == "inconclusive"
    assert set(by_name["toy:toy/seed-0"]["types"]) == {"all", "functional_only", "without_probe",
                                                       "without_attribution"}


def test_glob_patterns_are_expanded(tmp_path, capsys):
    for k in range(3):
        _write_toy_run(tmp_path / "many" / f"seed-{k}", SHALLOW_TO_DEEP)
    out = tmp_path / "out"
    assert main(["stages", "--toy_runs+", str(tmp_path / "many" / "seed-*"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["toy_groups"]["toy:many"]["fraction_holds"] == 1.0
    assert [e["model"] for e in summary["models"]][:3] == [f"toy:many/seed-{k}" for k in range(3)]


def test_hf_path_encoder_and_causal_lm(tiny_gpt2_dir, tiny_bert_dir):
    gpt2 = map_hf_model(str(tiny_gpt2_dir), FAST, length=32, seed=0)
    assert gpt2.kind == "causal_lm" and (gpt2.n_layers, gpt2.n_heads) == (2, 4)
    roles = {"previous_token", "duplicate_token", "induction", "attention_sink", "name_mover", "copying", "name_copy",
             "memory", "amplification", "truthfulness"}
    assert set(gpt2.table.frame["role"]) == roles  # the word tokenizer has no ordinals: no successor detector
    methods = gpt2.scored_rows(STAGES).groupby("role")["method"].first()
    assert methods["memory"] == "knockout" and methods["amplification"] == "patching"
    assert methods["truthfulness"] == "probe"
    frame = gpt2.table.frame
    assert set(frame.loc[frame["role"] == "memory", "effect_method"]) == {"knockout"}
    assert set(frame.loc[frame["role"] == "amplification", "effect_method"]) == {"patching"}
    for role in ("memory", "amplification"):
        assert {"agreement", "window_effects", "floor"} <= set(gpt2.extra["localisers"][role])
    assert any("by attention knockout" in note for note in gpt2.notes)
    assert any("successor detector skipped" in note for note in gpt2.notes)
    assert len(gpt2.table.frame) == 10 * 2 * 4

    bert = map_hf_model(str(tiny_bert_dir), FAST, length=32, seed=0)
    assert bert.kind == "encoder" and (bert.n_layers, bert.n_heads) == (2, 4)
    assert set(bert.table.frame["role"]) == {"previous_token", "duplicate_token", "induction", "attention_sink"}
    assert bert.table.frame["functional"].isna().all()
    assert any("no ablation" in note for note in bert.notes)
    assert any("OV detectors (copying, successor, name copying) skipped" in note for note in bert.notes)
    rows = bert.scored_rows(STAGES)
    assert rows["relative_depth"].isin([0.25, 0.75]).all() and (rows["method"] == "detector").all()
    assert len(rows) == 3 * 2 * 4  # previous_token, duplicate_token, induction; the sink is a property


def test_repeat_batch_framing_and_vocabulary(tiny_bert_dir):
    from transformers import AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = repeat_batch(model, tokenizer, batch_size=4, length=40, seed=1)
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (4, 42)
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    body = ids[:, 1:-1]
    assert not torch.isin(
        body, torch.tensor([*tokenizer.all_special_ids, tokenizer.convert_tokens_to_ids("[unused0]")])
    ).any()
    assert len(body.unique()) > 20  # drawn from the ordinary words
    # every target is the next token, on the repeated part only
    keep = targets[:, :-1] != -100
    assert keep.any() and torch.equal(targets[:, :-1][keep], ids[:, 1:][keep])
    assert (targets[:, -1] == -100).all()


def test_repeat_batch_frames_like_the_tokenizer(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)  # word tokenizer with a [BOS] post-processor
    batch = repeat_batch(model, tokenizer, batch_size=3, length=200, seed=0)
    assert batch["input_ids"].shape == (3, 64)  # capped at the model's 64 positions, BOS included
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all() and (batch["targets"][:, 0] == -100).all()
    assert not torch.isin(batch["input_ids"][:, 1:], torch.tensor(tokenizer.all_special_ids)).any()


def _error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    assert "does not exist" in _error(["stages", "--toy_runs", f"[{tmp_path / 'missing'}]", *out], capsys)
    (tmp_path / "empty").mkdir()
    assert "no roles.csv" in _error(["stages", "--toy_runs", f"[{tmp_path / 'empty'}]", *out], capsys)
    broken = _write_toy_run(tmp_path / "broken", SHALLOW_TO_DEEP)
    (broken / "model" / "config.json").unlink()
    assert "no model/config.json" in _error(["stages", "--toy_runs", f"[{broken}]", *out], capsys)
    assert "nothing to compare" in _error(["stages", *out], capsys)
    err = _error(["stages", "--models", "[no-such-org/no-such-model]", *out], capsys)
    assert "cannot load model 'no-such-org/no-such-model'" in err
    err = _error(["stages", "--toy_runs+", str(tmp_path / "nothing-*"), *out], capsys)
    assert "matches nothing" in err
    err = _error(["stages", "--toy_runs+", str(broken), "--stage_map", '{"induction": "late"}', *out], capsys)
    assert "valid stages: KR" in err
    odd = _write_toy_run(tmp_path / "odd", SHALLOW_TO_DEEP)
    table = pd.read_csv(odd / "roles.csv")
    table.loc[0, "role"] = "mystery"
    table.to_csv(odd / "roles.csv", index=False)
    assert "mystery have no stage" in _error(["stages", "--toy_runs+", str(odd), *out], capsys)


@pytest.mark.realmodel
def test_minilm_is_scored_as_an_encoder_without_special_tokens():
    from headlab.models import load_model

    loaded = load_model("minilm")
    batch = repeat_batch(loaded.model, loaded.tokenizer, batch_size=2, length=64, seed=0)
    ids = batch["input_ids"]
    assert ids.shape == (2, 66)
    assert (ids[:, 0] == loaded.tokenizer.cls_token_id).all() and (ids[:, -1] == loaded.tokenizer.sep_token_id).all()
    names = loaded.tokenizer.convert_ids_to_tokens(ids[:, 1:-1].flatten().tolist())
    assert not any(name.startswith("[") for name in names)
    heads = map_hf_model("minilm", FAST, length=32, seed=0)
    assert heads.kind == "encoder" and (heads.n_layers, heads.n_heads) == (6, 12)
    assert heads.table.frame["detected"].any()
    rows = heads.scored_rows(STAGES)
    depths = rows.loc[rows["detected"], "relative_depth"]
    assert all(any(math.isclose(d, (layer + 0.5) / 6) for layer in range(6)) for d in depths)


def test_toy_runs_keep_their_verdicts_and_old_tables_are_refused(tmp_path, capsys):
    run = _write_toy_run(tmp_path / "run", SHALLOW_TO_DEEP)
    as_is = load_toy_run(run)
    assert as_is.table.frame["detected"].sum() == 5 and (as_is.n_layers, as_is.n_heads) == (2, 2)
    old = tmp_path / "old"
    _write_toy_run(old, SHALLOW_TO_DEEP)
    table = pd.read_csv(old / "roles.csv").drop(columns=["floor", "control", "p_value", "p_adjusted"])
    table["threshold"] = 0.13  # the random-initialisation null rule
    table.to_csv(old / "roles.csv", index=False)
    err = _error(["stages", "--toy_runs", f"[{old}]", "--out", str(tmp_path / "out")], capsys)
    assert "written by an older headlab" in err and "rerun" in err


def test_subject_and_relation_heads_are_knowledge_recall_with_the_reason_stored():
    from roles.stages.taxonomy import SELF_CONTRADICTIONS, SURVEY

    stage = {t.name: t.stage for t in SURVEY}
    # the survey lists them under ICI in its table and under KR in its IOI walk-through; headlab says which and why
    assert stage["Subject / relation head"] == "KR"
    assert "ICI" in SELF_CONTRADICTIONS["Subject / relation head"]
    assert set(SELF_CONTRADICTIONS) <= set(stage)
