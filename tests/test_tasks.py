"""Task data: file formats, errors, templates, label words, truncation, LM targets, batch order."""

from __future__ import annotations

import csv
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zoo_ort.errors import ZooError
from zoo_ort.tasks import (
    TextEncoder,
    balanced_batch_indices,
    batch_indices,
    build_task,
    infer_task_name,
    load_task_data,
    make_batch_fn,
    parse_verbalizer,
    read_records,
    resolve_data,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")

CORPUS = [
    "Review: a good film, well acted and never dull.",
    "Sentiment (positive or negative): positive negative positive negative",
    "Movie review: The sentiment of this review is positive",
    "Question: is it true or false? Answer: True False Yes No",
    "the plot is thin but the music is great and the cast is good",
    "a bad, bad movie; the worst thing i have seen this year",
    "it was good. it was bad. it was fine. goodness me.",
]
PAD, BOS, EOS = 0, 1, 2
META = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}


def build_tokenizer(path: Path, post_bos: bool = False) -> Path:
    """A small byte-level BPE (GPT-2/SmolLM style: the space belongs to the following word)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS)]
        )
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def enc(tok_path) -> TextEncoder:
    return TextEncoder.from_file(tok_path, META)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def decode(enc: TextEncoder, ids) -> str:
    return enc.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# -- reading files --------------------------------------------------------------------------------
@needs_data
def test_reads_glue_tsv_files_as_shipped():
    sst = read_records(DATA / "sst2" / "dev.tsv")
    assert len(sst) == 872
    assert set(sst[0].values) == {"sentence", "label"}
    assert {r.values["label"] for r in sst} == {"0", "1"}
    assert sst[0].where.endswith("dev.tsv:2")  # line 1 is the header
    rte = read_records(DATA / "rte" / "dev.tsv")
    assert len(rte) == 277
    assert set(rte[0].values) == {"sentence1", "sentence2", "label", "idx"}
    # GLUE's TSVs are not CSV-quoted: a row that starts with '"' keeps its quotes and its columns.
    quoted = [r for r in rte if r.values["sentence1"].startswith('"')]
    assert quoted and all(r.values["label"] in {"0", "1"} for r in quoted)
    with (DATA / "rte" / "dev.tsv").open(encoding="utf-8") as f:
        raw = [line.rstrip("\n").split("\t") for line in f][1:]
    assert [r.values["sentence1"] for r in rte] == [row[0] for row in raw]


def test_reads_csv_with_quotes_and_jsonl(tmp_path):
    rows = [["text", "label"], ["fine, really", "pos"], ['he said "meh"\nand left', "neg"]]
    with (tmp_path / "train.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    recs = read_records(tmp_path / "train.csv")
    assert [r.values for r in recs] == [
        {"text": "fine, really", "label": "pos"},
        {"text": 'he said "meh"\nand left', "label": "neg"},
    ]
    write(
        tmp_path / "dev.jsonl",
        '{"question": "is it", "passage": "p", "answer": true}\n\n{"question": "q", "passage": '
        '"p2", "answer": false}\n',
    )
    recs = read_records(tmp_path / "dev.jsonl")
    assert [r.values["answer"] for r in recs] == [True, False]
    assert recs[1].where.endswith("dev.jsonl:3")  # blank lines are skipped but counted


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "train.tsv",
            "sentence\tlabel\ngood\t1\nbad\t0\textra\n",
            "train.tsv:3: expected 2 columns",
        ),
        (
            "train.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
            "train.jsonl:2: bad JSON",
        ),
        (
            "train.jsonl",
            '{"text": "a", "label": 1}\n[1, 2]\n',
            "train.jsonl:2: expected a JSON object",
        ),
        ("train.tsv", "sentence\tlabel\n", "train.tsv: no examples"),
        ("train.txt", "hello\n", "unknown data format"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    write(tmp_path / name, text)
    with pytest.raises(ZooError, match=message.replace("(", r"\(")):
        read_records(tmp_path / name)


def test_data_errors_name_file_line_and_field(tmp_path, enc):
    sst2 = build_task("sst2")
    write(tmp_path / "a" / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(
        ZooError, match=r"train.tsv:3: label '2' is not in the verbalizer.*'0', '1'"
    ):
        load_task_data(tmp_path / "a", "train", sst2, enc)
    write(tmp_path / "b" / "train.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(ZooError, match=r"train.tsv:2: missing field 'sentence' \(fields: text"):
        load_task_data(tmp_path / "b", "train", sst2, enc)
    write(tmp_path / "c" / "train.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "x"}\n')
    with pytest.raises(ZooError, match=r"train.jsonl:2: missing label field 'label'"):
        load_task_data(tmp_path / "c", "train", sst2, enc)
    with pytest.raises(ZooError, match=r"no 'dev' split .*found: train.tsv"):
        load_task_data(tmp_path / "a", "dev", sst2, enc)
    with pytest.raises(ZooError, match="no such data file or folder"):
        load_task_data(tmp_path / "missing", "train", sst2, enc)
    write(tmp_path / "a" / "train.jsonl", "{}\n")
    with pytest.raises(ZooError, match="ambiguous"):
        load_task_data(tmp_path / "a", "train", sst2, enc)
    write(tmp_path / "d" / "train.jsonl", '{"prompt": "a"}\n')
    with pytest.raises(
        ZooError, match=r"train.jsonl:1: LM data needs fields prompt and completion"
    ):
        load_task_data(tmp_path / "d", "train", build_task("lm"), enc)


def test_split_aliases_and_single_files(tmp_path, enc):
    write(tmp_path / "validation.jsonl", '{"sentence": "good", "label": 1}\n')
    data = load_task_data(tmp_path, "dev", build_task("sst2"), enc)
    assert len(data) == 1 and data.labels.tolist() == [1]
    single = load_task_data(tmp_path / "validation.jsonl", "whatever", build_task("sst2"), enc)
    assert single.tokens.tolist() == data.tokens.tolist()


# -- task specs -----------------------------------------------------------------------------------
def test_task_specs_and_verbalizers():
    assert parse_verbalizer("0= bad,1= good") == {"0": " bad", "1": " good"}
    assert parse_verbalizer('{"neg": " no", "pos": " yes"}') == {"neg": " no", "pos": " yes"}
    for bad in ("0= bad", "0 bad,1 good", "0= bad,0= good", "{"):
        with pytest.raises(ZooError):
            parse_verbalizer(bad)
    custom = build_task(template="Text: {text}\\nIt was", verbalizer="0= bad,1= good")
    assert custom.template == "Text: {text}\nIt was" and custom.fields == ["text"]
    assert custom.label_field == "label"
    with pytest.raises(ZooError, match=r"unknown task 'sst3'; known tasks: sst2, sentiment, rte"):
        build_task("sst3")
    with pytest.raises(ZooError, match="custom task needs --template"):
        build_task("custom", template="{text}")
    with pytest.raises(ZooError, match="names no"):
        build_task(template="no fields", verbalizer="0= a,1= b")
    rte = build_task("rte")
    assert rte.labels == ["0", "1"] and rte.words == [" True", " False"]  # 0 = entailment
    assert build_task("sst2", verbalizer="0= bad,1= good").template == build_task("sst2").template
    assert infer_task_name("sentiment") == "sentiment"
    assert infer_task_name("../shared/data/rte/") == "rte"
    assert infer_task_name("my/data") is None


def test_generic_task_with_string_labels_and_boolq_json(tmp_path, enc):
    write(tmp_path / "train.csv", "review,stars\nloved it,pos\nhated it,NEG\nmeh,pos\n")
    spec = build_task(
        template="{review} It was", label_field="stars", verbalizer="neg= bad,pos= good"
    )
    data = load_task_data(tmp_path, "train", spec, enc)
    assert data.labels.tolist() == [1, 0, 1]  # labels match case-insensitively
    assert data.candidates.tolist() == [enc.encode(" bad")[0], enc.encode(" good")[0]]
    write(
        tmp_path / "bq" / "dev.jsonl",
        "".join(
            json.dumps({"question": f"q {i}", "passage": "p", "answer": i % 2 == 0}) + "\n"
            for i in range(4)
        ),
    )
    bq = load_task_data(tmp_path / "bq", "dev", build_task("boolq"), enc)
    assert bq.labels.tolist() == [1, 0, 1, 0]  # verbalizer order: false " No", true " Yes"
    assert decode(enc, bq.example(0)) == "p\nQuestion: q 0?\nAnswer:"


# -- tokenisation ---------------------------------------------------------------------------------
def test_label_words_are_first_tokens_and_must_differ(enc):
    words = [" positive", " negative", " goodness"]
    assert enc.label_tokens(words) == [enc.encode(w)[0] for w in words]
    assert len(enc.encode(" goodness")) >= 1
    with pytest.raises(ZooError, match="start with the same token"):
        enc.label_tokens([" good", " good"])


def test_bos_is_added_once(tmp_path):
    plain = build_tokenizer(tmp_path / "plain.json")
    with_bos = build_tokenizer(tmp_path / "bos.json", post_bos=True)
    assert TextEncoder.from_file(plain, META).prefix == []
    assert TextEncoder.from_file(plain, META | {"add_bos": True}).prefix == [BOS]
    # The post-processor already adds BOS: never doubled, even when the manifest asks for it.
    assert TextEncoder.from_file(with_bos, META | {"add_bos": True}).prefix == [BOS]
    assert TextEncoder.from_file(with_bos, META).prefix == [BOS]
    enc = TextEncoder.from_file(with_bos, META)
    write(tmp_path / "d" / "train.tsv", "sentence\tlabel\ngood fun\t1\n")
    data = load_task_data(tmp_path / "d", "train", build_task("sst2"), enc)
    ids = data.example(0).tolist()
    assert ids[0] == BOS and ids.count(BOS) == 1 and EOS not in ids
    with pytest.raises(ZooError, match="tokenizer file not found"):
        TextEncoder.from_file(tmp_path / "none.json")


@needs_data
def test_target_is_the_last_prompt_token(enc):
    spec = build_task("sst2")
    data = load_task_data(DATA / "sst2", "dev", spec, enc, limit=40)
    records = read_records(DATA / "sst2" / "dev.tsv")[:40]
    b = data.batch(np.arange(40))
    t = b.tokens
    assert t.input_ids.shape[1] == max(len(data.example(i)) for i in range(40))  # dynamic padding
    assert t.target_pos.shape == (40, 1) and t.target_mask.tolist() == [[1.0]] * 40
    lengths = t.attention_mask.sum(axis=1)
    for r, rec in enumerate(records):
        prompt = spec.template.format(sentence=rec.values["sentence"].strip())
        ids = enc.encode(prompt)
        assert t.input_ids[r, : len(ids)].tolist() == ids
        assert (t.input_ids[r, len(ids) :] == PAD).all() and lengths[r] == len(ids)  # right pad
        assert t.target_pos[r, 0] == len(ids) - 1
        label = int(rec.values["label"])
        assert b.labels[r] == label
        assert t.target_ids[r, 0] == enc.encode([" negative", " positive"][label])[0]
        assert t.candidate_ids[r].tolist() == [
            enc.encode(" negative")[0],
            enc.encode(" positive")[0],
        ]


@needs_data
def test_truncation_cuts_fields_from_the_left_and_keeps_the_tail(enc):
    spec = build_task("rte")
    full = load_task_data(DATA / "rte", "dev", spec, enc, limit=30, max_length=10_000)
    cut = load_task_data(DATA / "rte", "dev", spec, enc, limit=30, max_length=128)
    assert cut.truncated > 20 and full.truncated == 0
    records = read_records(DATA / "rte" / "dev.tsv")[:30]
    for i, rec in enumerate(records):
        ids = cut.example(i)
        assert len(ids) <= 128
        text = decode(enc, ids)
        assert text.endswith(" True or False?\nAnswer:")  # the template's tail survives
        s1, s2 = rec.values["sentence1"].strip(), rec.values["sentence2"].strip()
        kept1, kept2 = text.removesuffix(" True or False?\nAnswer:").split("\nQuestion: ")
        assert s1.endswith(kept1) and s2.endswith(kept2)  # fields lose their start only
        assert len(kept2) > 0.5 * len(s2)  # the long premise is cut first
        if len(full.example(i)) <= 128:
            assert ids.tolist() == full.example(i).tolist()
        else:
            assert len(ids) >= 128 - 4  # no more is cut than needed (give or take a token)
        assert cut.batch([i]).tokens.target_pos[0, 0] == len(ids) - 1


def test_truncation_when_the_template_alone_is_too_long(tmp_path, enc):
    write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\n")
    data = load_task_data(tmp_path, "train", build_task("sst2"), enc, max_length=5)
    ids = data.example(0).tolist()
    assert ids == enc.encode("Movie review: \nThe sentiment of this review is")[-5:]


# -- LM data --------------------------------------------------------------------------------------
def test_lm_prompt_completion_scores_completion_only(tmp_path, enc):
    rows = [
        {"prompt": "Question: is it good?", "completion": " Yes, it is."},
        {"prompt": "a", "completion": " bad movie and a bad plot"},
    ]
    write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = load_task_data(tmp_path, "train", build_task("lm"), enc)
    b = data.batch([0, 1])
    t = b.tokens
    assert b.labels is None and t.candidate_ids.tolist() == [[EOS], [EOS]]
    ks = []
    for r, row in enumerate(rows):
        p, c = enc.encode(row["prompt"]), enc.encode(row["completion"]) + [EOS]
        ids = p + c
        assert t.input_ids[r, : len(ids)].tolist() == ids
        n = int(t.target_mask[r].sum())
        ks.append(n)
        assert n == len(c)
        assert t.target_pos[r, :n].tolist() == list(range(len(p) - 1, len(ids) - 1))
        assert t.target_ids[r, :n].tolist() == c
        assert (t.target_mask[r, n:] == 0).all()
    assert t.target_pos.shape[1] == max(ks)  # K padded to the batch's longest


def test_lm_text_and_truncation(tmp_path, enc):
    text = "the plot is thin but the music is great"
    long_prompt = "good " * 50
    write(
        tmp_path / "train.jsonl",
        json.dumps({"text": text}) + "\n" + json.dumps({"text": text + " " + long_prompt}) + "\n",
    )
    data = load_task_data(tmp_path, "train", build_task("lm"), enc, max_length=12)
    t = data.batch([0]).tokens
    ids = enc.encode(text)
    n = len(ids) - 1
    assert t.target_pos[0, :n].tolist() == list(range(n))  # every token after the first
    assert t.target_ids[0, :n].tolist() == ids[1:]
    assert data.example(1).tolist() == enc.encode(text + " " + long_prompt)[:12]
    write(
        tmp_path / "pc" / "train.jsonl",
        json.dumps({"prompt": long_prompt, "completion": " bad"}) + "\n",
    )
    pc = load_task_data(tmp_path / "pc", "train", build_task("lm"), enc, max_length=12)
    ids = pc.example(0).tolist()
    c = enc.encode(" bad") + [EOS]
    assert len(ids) == 12 and ids[-len(c) :] == c  # the prompt lost its start, not the answer
    assert ids[: -len(c)] == enc.encode(long_prompt)[-(12 - len(c)) :]
    write(tmp_path / "short" / "train.jsonl", json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ZooError, match=r"train.jsonl:1: too short"):
        load_task_data(tmp_path / "short", "train", build_task("lm"), enc)


def test_pad_to_gives_static_width(tmp_path, enc):
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\na bad, bad movie\t0\n")
    data = load_task_data(tmp_path, "train", build_task("sst2"), enc)
    t = data.batch([0, 1], pad_to=40).tokens
    assert t.input_ids.shape == (2, 40) and t.attention_mask.shape == (2, 40)
    assert t.attention_mask.sum(axis=1).tolist() == [len(data.example(0)), len(data.example(1))]
    with pytest.raises(ZooError, match="padded to 3"):
        data.batch([0], pad_to=3)


# -- batch order ----------------------------------------------------------------------------------
def test_batches_are_a_pure_function_of_seed_and_step(tmp_path, enc):
    lines = "".join(f"movie number {i}\t{i % 2}\n" for i in range(23))
    write(tmp_path / "train.tsv", "sentence\tlabel\n" + lines)
    data = load_task_data(tmp_path, "train", build_task("sst2"), enc)
    fn, again, other = (make_batch_fn(data, 5, s) for s in (7, 7, 8))
    for step in (0, 3, 11, 4, 0):  # out of order, as after a resume
        a, b = fn(step), again(step)
        assert all(
            np.array_equal(x, y)
            for x, y in zip(a.tokens.arrays().values(), b.tokens.arrays().values(), strict=True)
        )
        assert np.array_equal(a.labels, b.labels)
    seen = np.concatenate([batch_indices(23, 5, 7, s) for s in range(23)])  # 5 epochs exactly
    for e in range(5):
        assert sorted(seen[e * 23 : (e + 1) * 23].tolist()) == list(range(23))  # once per epoch
    assert not np.array_equal(seen[:23], seen[23:46])  # a new order each epoch
    mine = np.concatenate([batch_indices(23, 5, 8, s) for s in range(5)])
    assert not np.array_equal(seen[:25], mine)  # another seed, another order
    first = fn(0)
    idx = batch_indices(23, 5, 7, 0)
    assert first.labels.tolist() == (idx % 2).tolist()
    assert not np.array_equal(fn(0).tokens.input_ids, other(0).tokens.input_ids)


def test_balanced_batches_split_labels_evenly_and_cover_each_label(tmp_path, enc):
    # 3 labels of unequal sizes (9, 4, 2 examples) and B=5: 1 spare slot per step, dealt in turn.
    labels = [0] * 9 + [1] * 4 + [2] * 2
    lab = np.array(labels)
    idx = [balanced_batch_indices(lab, 5, 3, s) for s in range(36)]
    counts = np.array([np.bincount(lab[i], minlength=3) for i in idx])
    assert counts.sum(axis=1).tolist() == [5] * 36
    assert counts.min() == 1 and counts.max() == 2  # 5 // 3 each, the spare slot rotating
    assert counts.sum(axis=0).tolist() == [60, 60, 60]  # every label gets the same share
    stream = np.concatenate(idx)
    for c, size in ((0, 9), (1, 4), (2, 2)):
        own = stream[lab[stream] == c]
        for e in range(len(own) // size):  # each label's own epochs: every example once
            assert (
                sorted(own[e * size : (e + 1) * size].tolist()) == np.flatnonzero(lab == c).tolist()
            )
    again = [balanced_batch_indices(lab, 5, 3, s) for s in (7, 0, 35)]  # pure in (seed, step)
    assert all(np.array_equal(a, idx[s]) for a, s in zip(again, (7, 0, 35), strict=True))
    other = np.concatenate([balanced_batch_indices(lab, 5, 4, s) for s in range(6)])
    assert not np.array_equal(stream[:30], other)


def test_balanced_sampler_through_make_batch_fn(tmp_path, enc):
    lines = "".join(f"movie number {i}\t{int(i < 4)}\n" for i in range(20))  # 4 positive, 16 not
    write(tmp_path / "train.tsv", "sentence\tlabel\n" + lines)
    data = load_task_data(tmp_path, "train", build_task("sst2"), enc)
    fn = make_batch_fn(data, 6, 0, sampler="balanced")
    assert all(np.bincount(fn(s).labels, minlength=2).tolist() == [3, 3] for s in range(10))
    plain = make_batch_fn(data, 6, 0)
    assert np.array_equal(plain(2).labels, data.labels[batch_indices(20, 6, 0, 2)])
    with pytest.raises(ZooError, match="unknown sampler"):
        make_batch_fn(data, 6, 0, sampler="stratified")
    write(tmp_path / "lm" / "train.jsonl", json.dumps({"text": "one line of text"}) + "\n")
    lm = load_task_data(tmp_path / "lm", "train", build_task("lm"), enc)
    with pytest.raises(ZooError, match="needs labelled classification data"):
        make_batch_fn(lm, 2, 0, sampler="balanced")


# -- the shipped set ------------------------------------------------------------------------------
def test_shipped_sentiment_set():
    root = files("zoo_ort") / "data" / "sentiment"
    assert resolve_data("sentiment") == Path(str(root))
    splits = {s: read_records(Path(str(root / f"{s}.tsv"))) for s in ("train", "dev")}
    assert len(splits["train"]) >= 300 and len(splits["dev"]) >= 150
    sentences = {}
    for name, recs in splits.items():
        labels = [r.values["label"] for r in recs]
        assert set(labels) == {"0", "1"} and labels.count("0") == labels.count("1")  # balanced
        texts = [r.values["sentence"] for r in recs]
        assert all(t == t.lower() and t.strip() == t and t for t in texts)
        assert len(set(texts)) == len(texts)
        sentences[name] = set(texts)
    assert not sentences["train"] & sentences["dev"]
    if DATA.is_dir():
        sst = {r.values["sentence"].strip() for r in read_records(DATA / "sst2" / "dev.tsv")}
        assert not (sentences["train"] | sentences["dev"]) & sst
