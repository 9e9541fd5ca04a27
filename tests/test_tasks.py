"""Task generators: seeded and deterministic, targets that follow each task's definition."""

import os

os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch

from data.tasks import TASKS, make_task
from headlab.errors import HeadlabError


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_gives_same_stream_and_other_seed_differs(name):
    task = make_task(name)
    a, b, c = task.stream(8, seed=3), task.stream(8, seed=3), task.stream(8, seed=4)
    for _ in range(2):
        x, y, z = next(a), next(b), next(c)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x["input_ids"], z["input_ids"])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_have_shapes_vocab_and_some_targets(name):
    task = make_task(name)
    for split in task.splits:
        batch = task.batch(16, seed=0, split=split)
        assert batch["input_ids"].shape == batch["targets"].shape == (16, task.seq_len)
        assert int(batch["input_ids"].min()) >= 0 and int(batch["input_ids"].max()) < task.vocab_size
        kept = batch["targets"][batch["targets"] != -100]
        assert kept.numel() >= 16 and int(kept.max()) < task.vocab_size


def test_induction_targets_are_the_next_token_inside_the_repeat():
    batch = make_task("induction").batch(64, seed=1)
    ids, targets, repeat = batch["input_ids"], batch["targets"], batch["repeat_mask"]
    b, i = (targets != -100).nonzero(as_tuple=True)
    assert torch.equal(targets[b, i], ids[b, i + 1])
    assert bool(repeat[b, i].all()) and bool(repeat[b, i + 1].all())


def _segments(batch):
    """(length, first start, second start) of each sequence's repeated segment, found by brute force."""
    out = []
    for ids, repeat in zip(batch["input_ids"], batch["repeat_mask"]):
        where = repeat.nonzero()[:, 0]
        start2, length = int(where[0]), len(where)
        segment = ids[start2 : start2 + length]
        start1 = next(s for s in range(start2 - length + 1) if torch.equal(ids[s : s + length], segment))
        out.append((length, start1, start2))
    return out


def test_induction_segment_length_and_starts_are_random_so_position_cannot_solve_it():
    segments = _segments(make_task("induction").batch(200, seed=2))
    lengths, starts, offsets = zip(*[(n, s2, s2 - s1) for n, s1, s2 in segments])
    assert len(set(lengths)) > 5 and len(set(starts)) > 10 and len(set(offsets)) > 10


def test_fixed_offset_variant_repeats_at_a_constant_distance():
    segments = _segments(make_task("induction", fixed_offset=30).batch(100, seed=2))
    assert {s2 - s1 for _, s1, s2 in segments} == {30}


def test_fixed_offset_task_is_detected_on_random_offsets():
    segments = _segments(make_task("induction", fixed_offset=30).detection_batch(100, seed=2))
    assert len({s2 - s1 for _, s1, s2 in segments}) > 10


def test_recall_targets_are_the_values_paired_with_each_query_key():
    task = make_task("recall", n_pairs=6, n_queries=3)
    batch = task.batch(32, seed=0)
    for ids, targets in zip(batch["input_ids"], batch["targets"]):
        keys, values = ids[:12:2].tolist(), ids[1:12:2].tolist()
        assert len(set(keys)) == len(keys)
        positions = (targets != -100).nonzero()[:, 0].tolist()
        assert positions == [12, 14, 16]
        assert [values[keys.index(int(ids[p]))] for p in positions] == targets[positions].tolist()


def test_ioi_answer_is_the_name_seen_once_and_abc_corruption_uses_three_names():
    task = make_task("ioi")
    batch = task.batch(64, seed=0)
    names = set(batch["name_tokens"].tolist())
    patterns = set()
    for ids, corrupt, answer in zip(batch["input_ids"], batch["corrupt_input_ids"], batch["targets"][:, -1]):
        mentions = [t for t in ids.tolist() if t in names]
        assert len(mentions) == 3 and mentions.count(int(answer)) == 1
        subject = next(t for t in mentions if t != int(answer))
        assert mentions[2] == subject
        patterns.add("ABBA" if mentions[0] == int(answer) else "BABA")
        assert len({t for t in corrupt.tolist() if t in names}) == 3
    assert patterns == {"ABBA", "BABA"}


def test_successor_target_is_the_cyclic_successor_of_the_ordinal_token():
    task = make_task("successor", cycles=(3, 4))  # tokens 0 1 2 | 3 4 5 6
    succ = {0: 1, 1: 2, 2: 0, 3: 4, 4: 5, 5: 6, 6: 3}
    batch = task.batch(64, seed=0)
    for ids, target in zip(batch["input_ids"], batch["targets"][:, -1]):
        ordinals = [t for t in ids.tolist() if t < 7]
        assert len(ordinals) == 1 and succ[ordinals[0]] == int(target)


def test_icl_splits_in_weights_and_in_context():
    task = make_task("icl")
    label0 = task.n_classes + task.n_novel
    iw = task.batch(64, seed=0, split="iw")
    for ids, target in zip(iw["input_ids"], iw["targets"][:, -1]):
        query = int(ids[-1])
        assert query < task.n_classes and query not in ids[:-1:2].tolist()
        assert int(target) == label0 + int(task.mapping[query])
    ic = task.batch(64, seed=0, split="ic")
    for ids, target in zip(ic["input_ids"], ic["targets"][:, -1]):
        query, items, labels = int(ids[-1]), ids[:-1:2].tolist(), ids[1:-1:2].tolist()
        assert query >= task.n_classes and items.count(query) == task.burst
        assert all(label == int(target) for item, label in zip(items, labels) if item == query)


def test_iteration_targets_are_running_parities_and_mask_points_at_the_next_bit():
    task = make_task("iteration", min_bits=3, max_bits=6)
    batch = task.batch(32, seed=0)
    for ids, targets, mask in zip(batch["input_ids"], batch["targets"], batch["iteration_mask"]):
        n = ids.tolist().index(2)  # SEP
        bits = ids[:n].tolist()
        parities = [sum(bits[: t + 1]) % 2 for t in range(n)]
        assert targets[n : 2 * n].tolist() == parities
        assert ids[n + 1 : 2 * n + 1].tolist() == parities
        assert [(int(q), int(k)) for q, k in mask.nonzero()] == [(n + t, t) for t in range(n)]


def test_modular_addition_targets_and_disjoint_splits():
    task = make_task("modular_addition", p=13)
    train, test = set(task.pairs["train"].tolist()), set(task.pairs["test"].tolist())
    assert not train & test and len(train | test) == 169
    batch = task.batch(64, seed=0, split="test")
    a, b = batch["input_ids"][:, 0], batch["input_ids"][:, 1]
    assert torch.equal(batch["targets"][:, 2], (a + b) % 13)
    assert {int(x) * 13 + int(y) for x, y in zip(a, b)} <= test


def test_unknown_task_or_option_is_a_clear_error():
    with pytest.raises(HeadlabError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(HeadlabError, match="no option colour"):
        make_task("induction", colour=1)
    with pytest.raises(HeadlabError, match="fixed_offset"):
        make_task("induction", fixed_offset=2)


def test_icl_novel_training_sequences_are_bursty_with_random_labels():
    task = make_task("icl", n_classes=64, n_novel=16, n_labels=4, p_novel=0.5, p_bursty=0.0)
    label0 = task.n_classes + task.n_novel
    batch = task.batch(2000, seed=0)
    novel = batch["input_ids"][:, -1] >= task.n_classes
    assert 0.45 < float(novel.float().mean()) < 0.55
    labels_seen = set()
    for ids, target in zip(batch["input_ids"][novel], batch["targets"][novel, -1]):
        items, labels = ids[:-1:2].tolist(), ids[1:-1:2].tolist()
        assert all(item >= task.n_classes for item in items)  # the whole sequence is novel items
        assert items.count(int(ids[-1])) == task.burst
        assert all(label == int(target) for item, label in zip(items, labels) if item == int(ids[-1]))
        labels_seen.add((int(ids[-1]), int(target)))
    # a novel item gets different labels in different sequences: no fixed mapping to memorise
    by_item = {}
    for item, label in labels_seen:
        by_item.setdefault(item, set()).add(label)
    assert all(len(v) > 1 for v in by_item.values())
    for ids, target in zip(batch["input_ids"][~novel], batch["targets"][~novel, -1]):
        assert int(target) == label0 + int(task.mapping[int(ids[-1])])
    assert not (make_task("icl", p_novel=0.0).batch(500, seed=0)["input_ids"][:, -1] >= 128).any()


def test_icl_non_bursty_training_never_shows_the_query_class_in_context():
    # p_bursty = 0 with bursty_novel off (Chan et al.'s non-bursty arm): novel and training sequences alike hold the
    # query's class nowhere in the context, so the context never answers and in-context learning has nothing to gain
    task = make_task("icl", n_classes=64, n_novel=16, n_labels=4, p_novel=0.5, p_bursty=0.0, bursty_novel=False)
    ids = task.batch(1000, seed=0)["input_ids"]
    assert (ids[:, -1] >= task.n_classes).any() and (ids[:, -1] < task.n_classes).any()  # both kinds occur
    assert not (ids[:, :-1:2] == ids[:, -1:]).any()


def test_icl_zipf_query_class_frequency_matches_the_harmonic_weight():
    task = make_task("icl", n_classes=512, zipf_alpha=1.0, p_novel=0.0)
    queries = task.batch(20000, seed=0, split="iw")["input_ids"][:, -1]
    harmonic = sum(1 / k for k in range(1, 513))  # 6.8029...
    assert abs(float((queries == 0).float().mean()) - 1 / harmonic) < 0.01  # 0.147
    assert abs(float((queries == 1).float().mean()) - 0.5 / harmonic) < 0.01  # 0.073


def test_modular_addition_full_batch_is_the_whole_training_set_once():
    task = make_task("modular_addition", p=13, train_fraction=0.3)
    n_train = int(0.3 * 169)  # 50
    batch = task.batch(n_train, seed=0, split="train")
    a, b = batch["input_ids"][:, 0], batch["input_ids"][:, 1]
    pairs = (a * 13 + b).tolist()
    assert len(pairs) == n_train and sorted(pairs) == sorted(task.pairs["train"].tolist())
    small = task.batch(30, seed=1, split="train")["input_ids"]
    assert len(set((small[:, 0] * 13 + small[:, 1]).tolist())) == 30  # distinct pairs


def test_icl_bursty_context_repeats_two_classes_so_the_majority_label_does_not_answer():
    task = make_task("icl", n_classes=64, n_novel=16, n_labels=8, n_context=8, burst=3, ways=2, p_novel=0.0)
    batch = task.batch(200, seed=0, split="ic")
    for ids in batch["input_ids"]:
        items, query = ids[:-1:2].tolist(), int(ids[-1])
        counts = sorted((items.count(i) for i in set(items)), reverse=True)
        assert counts == [3, 3, 1, 1]  # two classes three times each, two singletons
        assert items.count(query) == 3
    # with ways = 1 the query's class is the only one that repeats (the old layout)
    one = make_task("icl", n_classes=64, n_novel=16, ways=1).batch(50, seed=0, split="ic")
    for ids in one["input_ids"]:
        items = ids[:-1:2].tolist()
        assert sorted((items.count(i) for i in set(items)), reverse=True) == [3, 1, 1, 1, 1, 1]


def test_icl_flip_split_shifts_every_label_of_the_training_classes():
    task = make_task("icl", n_classes=64, n_novel=16, n_labels=8)
    label0 = task.n_classes + task.n_novel
    batch = task.batch(100, seed=0, split="flip")
    for ids, target in zip(batch["input_ids"], batch["targets"][:, -1]):
        items, labels, query = ids[:-1:2].tolist(), ids[1:-1:2].tolist(), int(ids[-1])
        assert query < task.n_classes and items.count(query) == task.burst
        assert all(label == label0 + (int(task.mapping[item]) + 1) % 8 for item, label in zip(items, labels))
        assert int(target) == label0 + (int(task.mapping[query]) + 1) % 8


def test_iteration_polynomial_rule_follows_s_t_equals_s_prev_times_x_plus_one_mod_11():
    task = make_task("iteration", min_bits=2, max_bits=5, rule="polynomial")
    assert task.vocab_size == 13  # values 0..10, SEP = 11, PAD = 12
    batch = task.batch(64, seed=0)
    lengths = set()
    for ids, targets, mask in zip(batch["input_ids"], batch["targets"], batch["iteration_mask"]):
        n = ids.tolist().index(11)  # SEP
        lengths.add(n)
        xs = ids[:n].tolist()
        assert all(1 <= x <= 10 for x in xs)
        states, s = [], 0
        for x in xs:
            s = (s * x + 1) % 11
            states.append(s)
        assert targets[n : 2 * n].tolist() == states
        assert ids[n + 1 : 2 * n + 1].tolist() == states and set(ids[2 * n + 1 :].tolist()) <= {12}
        assert [(int(q), int(k)) for q, k in mask.nonzero()] == [(n + t, t) for t in range(n)]
    assert lengths == {2, 3, 4, 5}  # every length of the range was drawn, so the recurrence was checked on each


def test_iteration_filler_prefix_moves_x1_and_targets_and_mask_follow():
    task = make_task("iteration", min_bits=1, max_bits=6, rule="polynomial", prefix_max=4)
    sep, pad, fill = 11, 12, 13
    assert task.vocab_size == 14 and task.seq_len == 4 + 2 * 6 + 1
    batch = task.batch(256, seed=1)
    prefixes, lengths = set(), set()
    for ids, targets, mask in zip(batch["input_ids"].tolist(), batch["targets"].tolist(), batch["iteration_mask"]):
        m = 0
        while ids[m] == fill:
            m += 1
        e = ids.index(sep)
        n = e - m
        prefixes.add(m)
        lengths.add(n)
        assert fill not in ids[m:] and ids.count(sep) == 1
        xs = ids[m:e]
        assert all(1 <= x <= 10 for x in xs)
        states, s = [], 0
        for x in xs:
            s = (s * x + 1) % 11
            states.append(s)
        assert ids[e + 1 : e + 1 + n] == states and set(ids[e + 1 + n :]) <= {pad}
        # the loss covers only the steps after EoI: EoI predicts s_1, s_{t-1} predicts s_t, nothing else is a target
        expected = [-100] * len(ids)
        for t in range(1, n + 1):
            expected[e + t - 1] = states[t - 1]
        assert targets == expected
        # the query predicting s_t (at e + t - 1) should read x_t (at m + t - 1)
        assert [(int(q), int(k)) for q, k in mask.nonzero()] == [(e + t - 1, m + t - 1) for t in range(1, n + 1)]
    assert prefixes == set(range(5)) and lengths == set(range(1, 7))


def test_iteration_without_prefix_keeps_its_vocabulary_and_sequences():
    plain, prefixed = make_task("iteration", min_bits=2, max_bits=5, prefix_max=0), make_task(
        "iteration", min_bits=2, max_bits=5, prefix_max=3)
    assert (plain.vocab_size, plain.seq_len, prefixed.vocab_size, prefixed.seq_len) == (4, 11, 5, 14)
    ids = plain.batch(64, seed=0)["input_ids"]
    assert int(ids.max()) <= 3 and (ids[:, 0] != 2).all()  # no filler token, x_1 at position 0
    with pytest.raises(HeadlabError, match="prefix_max"):
        make_task("iteration", prefix_max=-1)


def test_iteration_start_token_and_filler_vocabulary_shift_x1_and_keep_targets_and_mask():
    # reference built by hand from the layout [BOS, m fillers, x_1..x_n, EoI, s_1..s_n, PAD...]
    task = make_task("iteration", min_bits=1, max_bits=5, rule="polynomial", modulus=5, prefix_max=3, fill_vocab=4,
                     bos=True)
    sep, pad, fills, bos = 5, 6, {7, 8, 9, 10}, 11
    assert task.vocab_size == 12 and task.seq_len == 1 + 3 + 2 * 5 + 1
    batch = task.batch(512, seed=3)
    seen_fill, prefixes, lengths = set(), set(), set()
    for ids, targets, mask in zip(batch["input_ids"].tolist(), batch["targets"].tolist(), batch["iteration_mask"]):
        assert ids[0] == bos and ids.count(bos) == 1
        m = 0
        while ids[1 + m] in fills:
            seen_fill.add(ids[1 + m])
            m += 1
        e = ids.index(sep)
        n = e - 1 - m
        prefixes.add(m)
        lengths.add(n)
        xs = ids[1 + m:e]
        assert all(1 <= x <= 4 for x in xs)
        states, s = [], 0
        for x in xs:
            s = (s * x + 1) % 5
            states.append(s)
        assert ids[e + 1:e + 1 + n] == states and set(ids[e + 1 + n:]) <= {pad}
        expected = [-100] * len(ids)
        for t in range(1, n + 1):
            expected[e + t - 1] = states[t - 1]
        assert targets == expected
        assert [(int(q), int(k)) for q, k in mask.nonzero()] == [(e + t - 1, m + t) for t in range(1, n + 1)]
    assert seen_fill == fills and prefixes == set(range(4)) and lengths == set(range(1, 6))


def test_iteration_start_token_without_prefix_puts_x1_at_position_1():
    task = make_task("iteration", min_bits=2, max_bits=4, rule="polynomial", modulus=5, bos=True)
    assert (task.vocab_size, task.seq_len, task.bos_token) == (8, 10, 7)
    ids = task.batch(64, seed=0)["input_ids"]
    assert (ids[:, 0] == 7).all() and ((ids[:, 1] >= 1) & (ids[:, 1] <= 4)).all()
    with pytest.raises(HeadlabError, match="fill_vocab"):
        make_task("iteration", fill_vocab=0)


def test_iteration_copy_first_makes_s1_the_first_input_as_cabannes_et_al():
    # reference by hand: s_1 = x_1, then s_t = s_{t-1} * x_t + 1 mod 5 (their y_1 = x_1); without it s_1 is always 1
    task = make_task("iteration", min_bits=1, max_bits=6, rule="polynomial", modulus=5, bos=True, copy_first=True)
    plain = make_task("iteration", min_bits=1, max_bits=6, rule="polynomial", modulus=5, bos=True)
    batch, plain_batch = task.batch(256, seed=2), plain.batch(256, seed=2)
    assert torch.equal(batch["iteration_mask"], plain_batch["iteration_mask"])  # same layout, only s_t differ
    firsts = set()
    for ids, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist()):
        e = ids.index(5)  # EoI
        xs = ids[1:e]
        states = [xs[0]]
        for x in xs[1:]:
            states.append((states[-1] * x + 1) % 5)
        assert ids[e + 1:e + 1 + len(xs)] == states and targets[e] == xs[0]
        firsts.add(states[0])
    assert firsts == {1, 2, 3, 4}  # the EoI query's target now varies with x_1
    assert {ids[ids.index(5) + 1] for ids in plain_batch["input_ids"].tolist()} == {1}  # ... where it was always 1
    with pytest.raises((ValueError, HeadlabError), match="copy_first"):
        make_task("iteration", rule="parity", copy_first=True)
